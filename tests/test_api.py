"""The curated public API: every name in __all__ exists; names other work relies on stay."""

import uba_auto

STABLE = {
    "uba_lr",
    "UBAScheduler",
    "BudgetScheduler",
    "PhiChange",
    "SCHEDULES",
    "get_schedule",
    "plot_schedules",
    "SymmetricOperator",
    "DenseOperator",
    "probe_curvature",
    "CurvatureEstimate",
    "HessianOperator",
    "GGNOperator",
    "lanczos",
}


def test_all_names_exist():
    for name in uba_auto.__all__:
        assert hasattr(uba_auto, name), name


def test_stable_names_are_public():
    assert STABLE <= set(uba_auto.__all__)

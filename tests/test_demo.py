"""The demo's pieces: augmentation, devices, determinism, the result and its files."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch

from uba_auto.demo import (
    NUM_TRAIN,
    QUICK_PROBE,
    DemoResult,
    resolve_device,
    run_demo,
    shift_images,
    write_demo_files,
)
from uba_auto.demo.data import batch_stream, load_data

pytest.importorskip("sklearn")


def test_shift_images_moves_content_and_fills_zeros():
    img = torch.arange(1.0, 17.0).view(1, 1, 4, 4).repeat(3, 2, 1, 1)
    shifts = torch.tensor([[1, 0, 2], [1, 2, 0]])  # in place; down + left; up + right
    out = shift_images(img, shifts)
    assert torch.equal(out[0], img[0])
    assert torch.equal(out[1, :, 1:, :3], img[1, :, :3, 1:])
    assert torch.equal(out[1, :, 0], torch.zeros(2, 4)) and torch.equal(
        out[1, :, :, 3], torch.zeros(2, 4)
    )
    assert torch.equal(out[2, :, :3, 1:], img[2, :, 1:, :3])


def test_batch_stream_depends_on_the_seed_only():
    x, y = torch.randn(100, 1, 8, 8), torch.arange(100)
    first = list(itertools.islice(batch_stream(x, y, 16, seed=3), 8))
    again = list(itertools.islice(batch_stream(x, y, 16, seed=3), 8))
    other = list(itertools.islice(batch_stream(x, y, 16, seed=4), 8))
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for a, b in zip(first, again, strict=True)
    )
    assert not torch.equal(first[0][1], other[0][1])
    # an epoch is 6 batches of 16 without replacement (the last 4 examples are dropped)
    assert len(set(torch.cat([b[1] for b in first[:6]]).tolist())) == 96


def test_load_data_split_is_fixed_and_scaled():
    torch.manual_seed(0)
    first = load_data(torch.device("cpu"))
    torch.manual_seed(1)  # the split depends on DATA_SEED only, not on the global RNG
    again = load_data(torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    x_train, y_train, x_held, y_held = first
    assert x_train.shape == (NUM_TRAIN, 1, 8, 8) and x_held.shape == (1797 - NUM_TRAIN, 1, 8, 8)
    assert y_train.shape == (NUM_TRAIN,) and y_held.shape == (1797 - NUM_TRAIN,)
    assert float(x_train.min()) == 0.0 and float(x_train.max()) == 1.0
    assert set(y_train.tolist()) == set(range(10))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(
        ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"
    ):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device 'cuda' asks for CUDA, but CUDA is not"):
            resolve_device("cuda", "--device")


@pytest.fixture(scope="module")
def tiny() -> DemoResult:
    return run_demo(
        6,
        phis=[2.0],
        num_batches=2,
        probe_kwargs=QUICK_PROBE,
        curve_points=3,
        progress=False,
    )


def test_run_demo_leaves_the_global_rng_alone():
    before = torch.get_rng_state()
    run_demo(2, num_batches=1, probe_kwargs=QUICK_PROBE, curve_points=1, progress=False)
    assert torch.equal(torch.get_rng_state(), before)


def test_same_weights_and_batches_for_every_schedule(tiny):
    # cosine is UBA with phi = 2: with the same initial weights and batches the runs agree
    cosine, phi2 = tiny.run("cosine"), tiny.run("phi=2")
    assert cosine.curve_train_loss == pytest.approx(phi2.curve_train_loss, rel=1e-5)
    assert cosine.final_heldout_loss == pytest.approx(phi2.final_heldout_loss, rel=1e-5)
    assert cosine.curve_lr == pytest.approx(phi2.curve_lr)
    # every schedule spends the budget: the last update uses lr_min = 0
    assert [r.curve_lr[-1] for r in tiny.runs] == [0.0, 0.0, 0.0]


def test_result_table_json_csv(tiny):
    assert [r.name for r in tiny.runs] == ["auto", "cosine", "phi=2"]
    assert tiny.runs[0].curve_steps == (2, 4, 6)
    table = tiny.table()
    assert "held-out loss" in table and "probe:" in table and "UBA auto φ=" in table
    data = json.loads(tiny.to_json())
    assert data["report"]["phi"] == pytest.approx(tiny.report.phi)
    assert len(data["runs"]) == 3 and data["budget"] == 6
    assert tiny.to_csv().splitlines()[0].startswith("name,label,phi,final_train_loss")
    with pytest.raises(KeyError, match="no run named 'linear'"):
        tiny.run("linear")


def test_write_demo_files(tiny, tmp_path):
    pytest.importorskip("matplotlib")
    paths = write_demo_files(tiny, tmp_path / "new" / "folder")
    assert sorted(p.name for p in paths.values()) == [
        "curvature_report.json",
        "demo.png",
        "results.csv",
        "results.json",
    ]
    assert paths["figure"].read_bytes()[:4] == b"\x89PNG"
    assert json.loads(paths["report"].read_text()) == tiny.report.to_dict()


def test_run_demo_rejects_bad_arguments():
    with pytest.raises(ValueError, match="budget must be >= 2"):
        run_demo(1)
    with pytest.raises(ValueError, match="phis must be finite and > 0"):
        run_demo(10, phis=[0.0])


def test_cosine_is_not_trained_twice_when_auto_chooses_phi_two():
    forced = {**QUICK_PROBE, "phi_min": 2.0, "phi_max": 2.0}
    result = run_demo(6, num_batches=2, probe_kwargs=forced, curve_points=2, progress=False)
    auto, cosine = result.run("auto"), result.run("cosine")
    assert result.report.phi == 2.0 and cosine.label == "cosine"
    assert dataclasses.replace(cosine, name="auto", label=auto.label) == auto

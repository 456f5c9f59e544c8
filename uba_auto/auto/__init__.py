"""``auto_uba``: probe the curvature, choose φ, hand back a ready UBA scheduler, re-estimate φ.

The product in one call::

    auto = auto_uba(model, loader, budget, optimizer=optimizer, loss_fn=loss_fn)
    print(auto.report)                 # the pre-training curvature report
    for step in range(budget):
        ...                            # forward, backward
        optimizer.step()
        auto.scheduler.step()          # re-probes every `reestimate_every` steps if asked

Probing cost is counted in gradient-equivalents: one Hessian-vector product costs
:data:`HVP_COST_IN_GRADIENTS` gradients (an upper bound: 2.9-4.1 measured for a product
recomputed from its batch, the default over the probe's memory cap, 1.3-2.2 with a cached graph),
one training step one gradient. Re-estimations are skipped, and the skip recorded, once
they would take the total past ``probe_fraction`` of the budget.
"""

from ._autouba import HVP_COST_IN_GRADIENTS, AutoUBA, AutoUBAScheduler
from ._cooldown import PlateauCheck, PlateauCooldown
from ._entry import auto_uba

__all__ = [
    "HVP_COST_IN_GRADIENTS",
    "AutoUBA",
    "AutoUBAScheduler",
    "PlateauCheck",
    "PlateauCooldown",
    "auto_uba",
]

"""φ from a validation loss: ``auto_uba(..., val_loader=...)`` (the plateau rule).

The rate is held near its peak (φ = 1/32) while the validation loss improves, and the rest of the
budget is annealed with a whole cosine from the first check where it stops improving (or spikes),
or from 40 % of the budget at the latest (the shape rule). Runs in a few seconds on a CPU:

    python examples/plateau_cooldown.py
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from uba_auto import AutoUBA, auto_uba


def main(budget: int = 600, seed: int = 0) -> AutoUBA:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 1, generator=gen)

    def data(n):
        x = torch.randn(n, 16, generator=gen)
        return x, torch.tanh(x @ w) + 0.3 * torch.randn(n, 1, generator=gen)

    (x, y), (xv, yv) = data(2048), data(512)
    train = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True, generator=gen
    )
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xv, yv), batch_size=64)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.functional.mse_loss
    with warnings.catch_warnings():
        # A 600-step budget: the probe, and the checks at 1 batch each, are over their 2 % shares.
        warnings.simplefilter("ignore", RuntimeWarning)
        # phi = 1/32 (the rate held) until a plateau or 40 % of the budget, then a cosine
        auto = auto_uba(model, train, budget, optimizer=opt, loss_fn=loss_fn, val_loader=val)
    step = 0
    while step < budget:
        for xb, yb in train:
            loss = loss_fn(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            auto.scheduler.step()  # runs the rule's checks (auto.plateau)
            step += 1
            if step == budget:
                break
    model.eval()
    with torch.no_grad():
        final = loss_fn(model(xv), yv).item()
    for record in auto.report.history[1:]:  # the switch (or a failed check)
        print(f"step {record.step}: {record.status}, phi -> {record.phi:g} ({record.message})")
    print(f"{len(auto.plateau.checks)} checks; validation loss at the end {final:.4f}")
    return auto


if __name__ == "__main__":
    main()

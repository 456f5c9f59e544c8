"""φ from a validation loss: auto_uba's scheduler driven by PlateauCooldown.

The rate is held near its peak (φ = 1/32) while the validation loss improves, and the rest of the
budget is annealed like cosine from the first check where it stops improving (or spikes). Runs in
a few seconds on a CPU:

    python examples/plateau_cooldown.py
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from uba_auto import PlateauCooldown, auto_uba


def main(budget: int = 600, seed: int = 0) -> PlateauCooldown:
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
        warnings.simplefilter("ignore", RuntimeWarning)  # a 600-step budget: the probe overspends
        auto = auto_uba(model, train, budget, optimizer=opt, loss_fn=loss_fn)
    watch = PlateauCooldown(auto.scheduler, model, val, loss_fn)  # phi -> 1/32 until a plateau
    step = 0
    while step < budget:
        for xb, yb in train:
            loss = loss_fn(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            auto.scheduler.step()
            check = watch.step()
            if check is not None and check.status != "hold":
                print(f"step {check.step}: {check.status}, phi -> {check.phi:g} ({check.reason})")
            step += 1
            if step == budget:
                break
    model.eval()
    with torch.no_grad():
        final = loss_fn(model(xv), yv).item()
    print(f"{len(watch.checks)} checks; validation loss at the end of the budget {final:.4f}")
    return watch


if __name__ == "__main__":
    main()

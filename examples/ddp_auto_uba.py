"""auto_uba in a DistributedDataParallel training script.

Run on CPU with two processes (gloo)::

    torchrun --nproc_per_node=2 --master_addr=127.0.0.1 examples/ddp_auto_uba.py --quick

or on GPUs with ``--nproc_per_node=<number of GPUs>`` (NCCL is used when CUDA is available).

Every rank calls ``auto_uba`` and steps the scheduler, exactly like the training step itself: the
probe is collective (each rank measures its shard of every probe batch and the Hessian-vector
products are all-reduced), so φ, its history and the learning rates are identical on all ranks.
The script checks that at the end and prints the curvature report on rank 0.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from uba_auto import auto_uba


def make_data(num_examples: int, seed: int = 0) -> TensorDataset:
    """A 10-class problem labelled by a random teacher network (the same on every rank)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_examples, 20, generator=gen)
    teacher = torch.randn(20, 10, generator=gen)
    y = (torch.tanh(x) @ teacher + 0.5 * torch.randn(num_examples, 10, generator=gen)).argmax(1)
    return TensorDataset(x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds on CPU (smoke test)")
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    parser.add_argument(
        "--probe-fraction",
        type=float,
        default=0.9,
        help="the most probing may cost, as a fraction of the budget in gradient-equivalents. "
        "A probe of this toy model costs as much as ~250 of its tiny steps; for a real network "
        "and budget the default of auto_uba, 0.02, is enough",
    )
    args = parser.parse_args()

    # One GPU per process (NCCL) when there are enough of them, else the CPU (gloo).
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    # A finite timeout: a rank that dies makes the others fail after it instead of hanging.
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=120))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same initial model on every rank (DDP also broadcasts rank 0's)

    steps, reestimate_every = (900, 300) if args.quick else (3000, 1000)
    dataset = make_data(4096 if args.quick else 32768)
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    # auto_uba draws its probe batches from a loader of its own (the training loop keeps its
    # iterator): the same dataset, sharded the same way, in another order.
    probe_loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=DistributedSampler(dataset, shuffle=True, seed=1),
        drop_last=True,
    )

    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 10)).to(device)
    ddp_model = DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None)
    optimizer = torch.optim.SGD(ddp_model.parameters(), lr=args.lr, momentum=0.9)

    auto = auto_uba(
        ddp_model,  # probed through its inner module: DDP's hooks and state are untouched
        probe_loader,
        budget=steps,
        optimizer=optimizer,
        loss_fn=F.cross_entropy,
        num_batches=4,  # per rank; global batch b = every rank's batch b
        reestimate_every=reestimate_every,
        probe_fraction=args.probe_fraction,
        max_hvps=4 * 15,  # 15 Lanczos steps on the 4 global batches (fits each probe's share)
        tol=3e-3,  # phi needs lambda to a few per mille, not to rounding
        trace=False,
        density=not args.quick,
    )
    if rank == 0:
        print(auto.report)

    step, epoch = 0, 0
    while step < steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            if step == steps:
                break
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(ddp_model(x), y)
            loss.backward()
            optimizer.step()
            auto.scheduler.step()  # on every rank: re-estimations are collective
            step += 1
        epoch += 1

    # Full-dataset loss and accuracy, summed over the ranks' shards.
    totals = torch.zeros(3, device=device)
    with torch.no_grad():
        for x, y in DataLoader(dataset, batch_size=1024, sampler=DistributedSampler(dataset)):
            x, y = x.to(device), y.to(device)
            out = model(x)
            totals += torch.stack(
                [
                    F.cross_entropy(out, y, reduction="sum"),
                    (out.argmax(1) == y).sum(),
                    y.new_tensor(len(y)),
                ]
            ).float()
    dist.all_reduce(totals)

    # What auto_uba promises under DDP: the same φ history and learning rates on every rank.
    mine = (
        [(r.step, r.status, r.phi) for r in auto.report.history],
        auto.scheduler.get_last_lr(),
    )
    every = [None] * world_size
    dist.all_gather_object(every, mine)
    identical = all(other == every[0] for other in every)
    if rank == 0:
        print("\nphi history (step, status, phi):")
        for r in auto.report.history:
            print(f"  step {r.step:5d}  {r.status:8s} phi = {r.phi:.4g}  {r.message}")
        print(
            f"\nafter {steps} steps: loss {float(totals[0] / totals[2]):.4f}, "
            f"accuracy {float(totals[1] / totals[2]):.3f}"
        )
        same = "identical" if identical else "DIFFERENT"
        print(f"phi history and learning rates {same} on all {world_size} ranks")
    # Nobody tears the group down while another rank still uses it.
    dist.barrier(device_ids=[local_rank] if use_cuda else None)
    dist.destroy_process_group()
    if not identical:
        raise SystemExit("phi or the learning rates differ across ranks")


if __name__ == "__main__":
    main()

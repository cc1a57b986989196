"""A data-parallel CPU training loop for `memprof profile --nproc-per-node 2` (DDP over gloo, MLP, Adam).

torchrun --standalone --nproc-per-node 2 scripts/examples/train_ddp.py
memprof profile --nproc-per-node 2 scripts/examples/train_ddp.py -- --steps 5
"""

import argparse

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel


class MLP(nn.Module):
    def __init__(self, hidden: int = 512):
        super().__init__()
        self.fc1 = nn.Linear(784, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 10)

    def forward(self, x):
        h = F.relu(self.fc1(x.flatten(1)))
        h = F.relu(self.fc2(h))
        return self.out(h)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)
    model = DistributedDataParallel(MLP())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    # rank 1 takes a larger batch, so the ranks' peaks differ
    batch = args.batch_size * (2 if rank == 1 else 1)
    for _step in range(args.steps):
        x = torch.randn(batch, 1, 28, 28)
        y = torch.randint(0, 10, (batch,))
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    print(f"rank {rank}: final loss {loss.item():.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

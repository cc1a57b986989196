"""Steps that read tensor values, written the way users write them (not memprof's zoo)."""

import torch
import torch.nn.functional as F
from torch import nn


class ScaleByMax(nn.Module):
    """Normalises by the batch's largest value, read with .item() in forward."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(128, 512)
        self.b = nn.Linear(512, 10)

    def forward(self, x):
        s = x.abs().max().item()  # reads a value
        return self.b(torch.relu(self.a(x / (s + 1e-6))))


class ClipLoss(nn.Module):
    """A loss that reads its own value (.item()) to rescale itself."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 10))

    def forward(self, x):
        return self.net(x)

    @staticmethod
    def memprof_loss(out, target):
        loss = F.cross_entropy(out, target)
        if loss.item() > 5.0:
            loss = loss * 0.5
        return loss


class ClipLoss2(ClipLoss):
    """ClipLoss with the batch hook that gives its loss a target."""

    @staticmethod
    def memprof_batch(batch_size, device, dtype):
        x = torch.randn(batch_size, 128, device=device, dtype=dtype)
        return x, torch.randint(0, 10, (batch_size,), device=device)


class Top2MoE(nn.Module):
    """Top-2 routing over four experts with torch.where and index_add_ (data-dependent sizes)."""

    def __init__(self, d=64, e=4):
        super().__init__()
        self.gate = nn.Linear(d, e)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Linear(4 * d, d)) for _ in range(e)
        )
        self.head = nn.Linear(d, 10)

    def forward(self, x):  # (batch, time, d)
        flat = x.reshape(-1, x.shape[-1])
        w, idx = self.gate(flat).softmax(-1).topk(2, -1)
        out = torch.zeros_like(flat)
        for i, ex in enumerate(self.experts):
            rows, k = torch.where(idx == i)
            out.index_add_(0, rows, ex(flat[rows]) * w[rows, k, None])
        return self.head(out.view_as(x).mean(1))

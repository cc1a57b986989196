"""Small reference models: the seeds' models, a GPT-style token model, a UNet, shared weights.

Used by the tests, the validation scripts and the configs in ``configs/``; also a
handy ``memprof estimate memprof.zoo:GPT --model-kwargs ...``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------- seeds
def mnist_mlp() -> nn.Module:
    """Seed 002: Flatten -> Linear(784, 128) -> ReLU -> Linear(128, 10): 101,770 parameters."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


def cifar_mlp() -> nn.Module:
    """Seed 002, CIFAR-10 variant with 3*32*32 inputs: 394,634 parameters."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3072, 128), nn.ReLU(), nn.Linear(128, 10))


class Cruncher(nn.Module):
    """Seed 000: ``num_layers`` bias-free Linear(D, D), then Linear(D, 1) (bias-free too)."""

    def __init__(self, dim: int = 1024, num_layers: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(num_layers))
        self.final = nn.Linear(dim, 1, bias=False)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.final(x).squeeze(-1)


def seed004_convstack() -> nn.Module:
    """Seed 004: Conv(3,64,3) ReLU(inplace) Conv(64,64,3) ReLU(inplace) MaxPool(2) Conv(64,128,3), padding 1.

    112,576 parameters; at 1x3x682x700 its module outputs are 336.0896 MB.
    """
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1),
    )


# --------------------------------------------------------------------------- transformer
class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.fc_proj = nn.Linear(4 * n_embd, n_embd)
        self.n_head = n_head
        self.dropout = dropout

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.attn(self.ln_1(x)).split(c, dim=2)
        q = q.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        k = k.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        x = x + self.proj(y)
        x = x + self.fc_proj(F.gelu(self.fc(self.ln_2(x))))
        return x


class GPT(nn.Module):
    """A GPT-2-style decoder on token ids; the output head shares the embedding weight."""

    def __init__(
        self,
        vocab_size: int = 50304,
        block_size: int = 1024,
        n_layer: int = 12,
        n_head: int = 12,
        n_embd: int = 768,
        dropout: float = 0.0,
        tied: bool = True,
    ):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        if tied:
            self.head.weight = self.wte.weight

    def forward(self, idx):
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


# --------------------------------------------------------------------------- UNet
class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """A classic 4-level UNet; outputs per-pixel class logits."""

    def __init__(self, in_channels: int = 3, num_classes: int = 2, base: int = 32):
        super().__init__()
        widths = [base, base * 2, base * 4, base * 8]
        self.downs = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.downs.append(_DoubleConv(cin, w))
            cin = w
        self.bottleneck = _DoubleConv(widths[-1], widths[-1] * 2)
        self.ups = nn.ModuleList()
        self.up_convs = nn.ModuleList()
        cin = widths[-1] * 2
        for w in reversed(widths):
            self.ups.append(nn.ConvTranspose2d(cin, w, 2, stride=2))
            self.up_convs.append(_DoubleConv(w * 2, w))
            cin = w
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x):
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for up, conv, skip in zip(self.ups, self.up_convs, reversed(skips), strict=False):
            x = up(x)
            x = conv(torch.cat([skip, x], dim=1))
        return self.head(x)


# --------------------------------------------------------------------------- shared weights
class SharedLinear(nn.Module):
    """One Linear applied ``repeats`` times (torchinfo #144: saved tensors grow with every use)."""

    def __init__(self, dim: int = 256, repeats: int = 20):
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.shared = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, 10)
        self.repeats = repeats

    def forward(self, x):
        x = self.inp(x)
        for _ in range(self.repeats):
            x = torch.tanh(self.shared(x))
        return self.out(x)


# --------------------------------------------------------------------------- CUDA-behaviour probes
def dropout_mlp(dim: int = 1024, layers: int = 4, p: float = 0.1) -> nn.Module:
    """``layers`` x (Linear, ReLU, Dropout(p)) then a small head: CUDA keeps a 1-byte mask per dropped
    element, the CPU a float noise tensor (issue #17). ``p=0`` gives the same net without dropout."""
    body: list[nn.Module] = []
    for _ in range(layers):
        body += [nn.Linear(dim, dim), nn.ReLU()]
        if p:
            body.append(nn.Dropout(p))
    return nn.Sequential(*body, nn.Linear(dim, 8))


class SoftmaxAttention(nn.Module):
    """Multi-head self-attention with an explicit softmax (no SDPA): under AMP, CUDA runs the softmax in
    fp32 and keeps its T x T output in fp32; input (T, dim) per sample."""

    def __init__(self, dim: int = 256, heads: int = 4, layers: int = 2):
        super().__init__()
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(layers))
        self.out = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.heads = heads

    def forward(self, x):
        b, t, c = x.shape
        for qkv, out in zip(self.qkv, self.out, strict=True):
            q, k, v = (y.view(b, t, self.heads, c // self.heads).transpose(1, 2) for y in qkv(x).split(c, dim=2))
            att = (q @ k.transpose(-2, -1) / math.sqrt(c // self.heads)).softmax(-1)
            x = x + out((att @ v).transpose(1, 2).reshape(b, t, c))
        return x


class PaddedMaskAttention(nn.Module):
    """SDPA with an explicit boolean padding mask (B x 1 x T x T, the last quarter of each sequence
    masked), as Hugging Face models build one for padded batches: CUDA runs the memory-efficient
    kernel (flash takes no mask) and keeps an additive copy of the mask; input (T, dim) per sample."""

    def __init__(self, dim: int = 256, heads: int = 4, layers: int = 2, dropout: float = 0.0):
        super().__init__()
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(layers))
        self.out = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.heads = heads
        self.dropout = dropout

    def forward(self, x):
        b, t, c = x.shape
        keep = torch.ones(b, 1, t, t, dtype=torch.bool, device=x.device)
        keep[..., (3 * t) // 4 :] = False
        p = self.dropout if self.training else 0.0
        for qkv, out in zip(self.qkv, self.out, strict=True):
            q, k, v = (y.view(b, t, self.heads, c // self.heads).transpose(1, 2) for y in qkv(x).split(c, dim=2))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)
            x = x + out(y.transpose(1, 2).reshape(b, t, c))
        return x


def gpt_param_count(vocab_size: int, block_size: int, n_layer: int, n_embd: int, tied: bool = True) -> int:
    """Parameters of :class:`GPT`, by formula (for sizing configs)."""
    per_block = 12 * n_embd * n_embd + 13 * n_embd
    total = vocab_size * n_embd + block_size * n_embd + n_layer * per_block + 2 * n_embd
    return total + (0 if tied else vocab_size * n_embd)


__all__ = [
    "mnist_mlp",
    "cifar_mlp",
    "Cruncher",
    "seed004_convstack",
    "GPT",
    "UNet",
    "SharedLinear",
    "dropout_mlp",
    "SoftmaxAttention",
    "PaddedMaskAttention",
    "gpt_param_count",
    "math",
]

"""Small reference models: the seeds' models, GPT, UNet, shared weights, recurrent LMs, and the validation zoo's.

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
    """A stack of square layers (seed 000 named it "Cruncher"): ``num_layers`` bias-free Linear(D, D), then
    Linear(D, 1) (bias-free too); the four-part rule's reference model."""

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


# --------------------------------------------------------------------------- recurrent
class RecurrentLM(nn.Module):
    """Embedding -> nn.LSTM / nn.GRU / nn.RNN -> Linear over the vocabulary, on token ids (B x T).

    ``kind``: "LSTM", "GRU", "RNN" (tanh) or "RNN_RELU"; every option of the recurrent layers is
    exposed. ``packed=True`` runs the layer on a packed sequence whose lengths are
    T, T-1, T-2, T-3, T, ... (so the batch holds padding), then pads the output back.
    """

    def __init__(
        self,
        vocab_size: int = 1000,
        embed: int = 128,
        hidden: int = 256,
        num_layers: int = 2,
        kind: str = "LSTM",
        bidirectional: bool = False,
        proj_size: int = 0,
        dropout: float = 0.0,
        batch_first: bool = True,
        bias: bool = True,
        packed: bool = False,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed)
        options: dict = dict(num_layers=num_layers, bidirectional=bidirectional, dropout=dropout, bias=bias)
        options["batch_first"] = batch_first
        if proj_size:
            options["proj_size"] = proj_size
        if kind == "RNN_RELU":
            options["nonlinearity"] = "relu"
        layer = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN, "RNN_RELU": nn.RNN}[kind]
        self.rnn = layer(embed, hidden, **options)
        self.head = nn.Linear((proj_size or hidden) * (2 if bidirectional else 1), vocab_size)
        self.batch_first = batch_first
        self.packed = packed

    def forward(self, tokens):
        x = self.embed(tokens)
        if not self.batch_first:
            x = x.transpose(0, 1)
        if self.packed:
            batch, steps = tokens.shape
            lengths = torch.tensor([max(1, steps - i % 4) for i in range(batch)])
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=self.batch_first, enforce_sorted=False)
            y, _ = self.rnn(packed)
            y, _ = nn.utils.rnn.pad_packed_sequence(y, batch_first=self.batch_first, total_length=steps)
        else:
            y, _ = self.rnn(x)
        if not self.batch_first:
            y = y.transpose(0, 1)
        return self.head(y)


def _mlp(cin: int, hidden: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, hidden), nn.GELU(), nn.Linear(hidden, cout))


# --------------------------------------------------------------------------- data-dependent steps
def _item_loss(output, target):
    """Cross-entropy against class 0, rescaled when it is large: the step reads the loss's value."""
    loss = F.cross_entropy(output, torch.zeros(output.shape[0], dtype=torch.long, device=output.device))
    if loss.item() > 100.0:  # .item() in the loss: fake tensors have no value to compare
        loss = loss / 10
    return loss


class ItemLossMLP(nn.Module):
    """An MLP whose loss calls ``.item()`` (a common logging/clipping pattern)."""

    memprof_loss = staticmethod(_item_loss)

    def __init__(self, dim: int = 256, hidden: int = 1024, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.net(x))


class MaskedSelectMLP(nn.Module):
    """Keeps only the rows whose activation is positive (a boolean mask: ``nonzero`` underneath)."""

    def __init__(self, dim: int = 256, hidden: int = 1024, classes: int = 10):
        super().__init__()
        self.inp = nn.Linear(dim, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        flat = h.reshape(-1, h.shape[-1])
        kept = flat[flat.mean(-1) > flat.mean()]  # data-dependent number of rows
        pooled = torch.relu(self.mid(kept)).mean(0, keepdim=True)
        return self.head(h + pooled)


class TopOneMoE(nn.Module):
    """Token-level mixture of experts with top-1 routing: each expert runs on the tokens routed to it."""

    def __init__(self, vocab_size: int = 1000, dim: int = 128, experts: int = 4, hidden: int = 512, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.routers = nn.ModuleList(nn.Linear(dim, experts) for _ in range(layers))
        self.experts = nn.ModuleList(_mlp(dim, hidden, dim) for _ in range(layers * experts))
        self.per_layer = experts
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, tokens):
        x = self.embed(tokens)
        b, t, d = x.shape
        for i, router in enumerate(self.routers):
            flat = x.reshape(b * t, d)
            gate = torch.softmax(router(flat), dim=-1)
            weight, choice = gate.max(dim=-1)
            out = torch.zeros_like(flat)
            for e in range(self.per_layer):
                idx = (choice == e).nonzero().squeeze(-1)  # dynamic routing: data-dependent sizes
                if idx.numel():
                    expert = self.experts[i * self.per_layer + e]
                    out = out.index_add(0, idx, expert(flat[idx]) * weight[idx, None])
            x = x + out.reshape(b, t, d)
        return self.head(self.norm(x))


def _padding(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``src_key_padding_mask`` of a padded batch: True at positions past each sequence's length."""
    return torch.arange(tokens.shape[1], device=tokens.device)[None, :] >= lengths[:, None]


def _padded_tokens(batch_size: int, t: int, vocab_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens and lengths from ``t // 2`` to ``t``."""
    tokens = torch.randint(0, vocab_size, (batch_size, t), device=device)
    return tokens, torch.randint(t // 2, t + 1, (batch_size,), device=device)


class PaddedEncoder(nn.Module):
    """A transformer encoder classifier over padded token batches (``src_key_padding_mask`` from lengths).

    Takes ``(tokens, lengths)``; memprof builds both with :meth:`memprof_batch` (lengths from
    ``seq_len // 2`` to ``seq_len``). Training runs the masked math path; in eval mode PyTorch's
    fast path packs the padded batch into a nested tensor, which reads the mask's values, and runs
    each layer as one fused op (``torch._transformer_encoder_layer_fwd``). ``padding=False`` passes
    no mask: in eval the fused layers then run on the dense batch.
    """

    seq_len = 128

    def __init__(
        self,
        vocab_size: int = 8192,
        dim: int = 256,
        heads: int = 4,
        layers: int = 4,
        classes: int = 4,
        activation: str = "relu",
        padding: bool = True,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(1, self.seq_len, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.1, activation=activation, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(dim, classes)
        self.vocab_size = vocab_size
        self.padding = padding

    def forward(self, tokens, lengths):
        t = tokens.shape[1]
        pad = _padding(tokens, lengths)
        x = self.encoder(self.embed(tokens) + self.pos[:, :t], src_key_padding_mask=pad if self.padding else None)
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        return self.head((x * keep).sum(1) / keep.sum(1))

    @staticmethod
    def memprof_batch(batch_size: int, device, dtype):
        tokens, lengths = _padded_tokens(batch_size, PaddedEncoder.seq_len, 8192, device)
        labels = torch.randint(0, 4, (batch_size,), device=device)
        return (tokens, lengths), labels


class PaddedAttention(nn.Module):
    """Blocks of ``nn.MultiheadAttention`` with a ``key_padding_mask``, layer norm and a GELU MLP over
    padded token batches, masked mean pooling. In eval, ``nn.MultiheadAttention`` runs PyTorch's fused
    ``torch._native_multi_head_attention``; in training the masked math path. Takes ``(tokens, lengths)``."""

    seq_len = 128

    def __init__(self, vocab_size: int = 8192, dim: int = 256, heads: int = 8, layers: int = 2, classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.attn = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.mlps = nn.ModuleList(_mlp(dim, 2 * dim, dim) for _ in range(layers))
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens, lengths):
        pad = _padding(tokens, lengths)
        x = self.embed(tokens)
        for attn, norm, mlp in zip(self.attn, self.norms, self.mlps, strict=True):
            a, _ = attn(x, x, x, key_padding_mask=pad)
            x = norm(x + a)
            x = x + mlp(x)
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        return self.head((x * keep).sum(1) / keep.sum(1))

    @staticmethod
    def memprof_batch(batch_size: int, device, dtype):
        tokens, lengths = _padded_tokens(batch_size, PaddedAttention.seq_len, 8192, device)
        return (tokens, lengths), torch.randint(0, 4, (batch_size,), device=device)


class PaddedDecoder(nn.Module):
    """A sequence-to-sequence language model: ``nn.TransformerDecoder`` over padded target batches with a
    causal ``tgt_mask``, ``tgt_key_padding_mask`` and ``memory_key_padding_mask`` (the memory is an
    embedded padded source batch); padded target positions are ignored by the loss (-100).
    Takes ``(source, source_lengths, target, target_lengths)``."""

    src_len, tgt_len = 96, 64

    def __init__(self, vocab_size: int = 4096, dim: int = 256, heads: int = 4, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        layer = nn.TransformerDecoderLayer(dim, heads, 4 * dim, dropout=0.1, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.lm_head = nn.Linear(dim, vocab_size)

    def forward(self, src, src_lengths, tgt, tgt_lengths):
        t = tgt.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=tgt.device).triu(1)  # True: not attended
        y = self.decoder(
            self.embed(tgt),
            self.embed(src),
            tgt_mask=causal,
            tgt_key_padding_mask=_padding(tgt, tgt_lengths),
            memory_key_padding_mask=_padding(src, src_lengths),
            tgt_is_causal=True,
        )
        return self.lm_head(y)

    @staticmethod
    def memprof_loss(output, target):
        return F.cross_entropy(output.flatten(0, 1), target.flatten(), ignore_index=-100)

    @staticmethod
    def memprof_batch(batch_size: int, device, dtype):
        src, src_lengths = _padded_tokens(batch_size, PaddedDecoder.src_len, 4096, device)
        tgt, tgt_lengths = _padded_tokens(batch_size, PaddedDecoder.tgt_len, 4096, device)
        target = tgt.masked_fill(_padding(tgt, tgt_lengths), -100)
        return (src, src_lengths, tgt, tgt_lengths), target


# --------------------------------------------------------------------------- vision and generative
class MLPMixer(nn.Module):
    """MLP-Mixer (Tolstikhin et al. 2021): patch embedding, then token-mixing and channel-mixing MLPs."""

    def __init__(
        self,
        image_size: int = 64,
        patch: int = 8,
        dim: int = 256,
        depth: int = 6,
        token_hidden: int = 128,
        channel_hidden: int = 1024,
        classes: int = 100,
    ):
        super().__init__()
        tokens = (image_size // patch) ** 2
        self.stem = nn.Conv2d(3, dim, patch, stride=patch)
        self.norm1 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.token_mlp = nn.ModuleList(_mlp(tokens, token_hidden, tokens) for _ in range(depth))
        self.norm2 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.channel_mlp = nn.ModuleList(_mlp(dim, channel_hidden, dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)  # B x tokens x dim
        blocks = zip(self.norm1, self.token_mlp, self.norm2, self.channel_mlp, strict=True)
        for norm1, token_mlp, norm2, channel_mlp in blocks:
            x = x + token_mlp(norm1(x).transpose(1, 2)).transpose(1, 2)
            x = x + channel_mlp(norm2(x))
        return self.head(self.norm(x).mean(1))


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(tdim, cout)
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class _Attention2d(nn.Module):
    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.norm = nn.GroupNorm(8, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        self.heads = heads

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        y = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.out(y.transpose(-1, -2).reshape(b, c, h, w))


class DiffusionUNet(nn.Module):
    """A DDPM-style noise-prediction UNet: residual blocks with a time embedding, attention at low resolution.

    Takes ``(noisy images, timesteps)``; :meth:`memprof_batch` draws both and the noise to predict
    (the loss is MSE against it).
    """

    image_size = 32

    def __init__(self, channels: int = 3, base: int = 64, mults: tuple = (1, 2, 2), attention_at: int = 2):
        super().__init__()
        tdim = base * 4
        self.time = nn.Sequential(nn.Linear(base, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.base = base
        self.stem = nn.Conv2d(channels, base, 3, padding=1)
        widths = [base * m for m in mults]
        self.down = nn.ModuleList()
        self.down_attention = nn.ModuleList()
        self.pools = nn.ModuleList()
        cin = base
        for i, w in enumerate(widths):
            self.down.append(_ResBlock(cin, w, tdim))
            self.down_attention.append(_Attention2d(w) if i >= attention_at else nn.Identity())
            self.pools.append(nn.Conv2d(w, w, 3, stride=2, padding=1) if i < len(widths) - 1 else nn.Identity())
            cin = w
        self.mid1 = _ResBlock(cin, cin, tdim)
        self.mid_attention = _Attention2d(cin)
        self.mid2 = _ResBlock(cin, cin, tdim)
        self.up = nn.ModuleList()
        self.up_attention = nn.ModuleList()
        self.ups = nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            self.up.append(_ResBlock(cin + w, w, tdim))
            self.up_attention.append(_Attention2d(w) if i >= attention_at else nn.Identity())
            self.ups.append(nn.Upsample(scale_factor=2, mode="nearest") if i > 0 else nn.Identity())
            cin = w
        self.out = nn.Sequential(nn.GroupNorm(8, cin), nn.SiLU(), nn.Conv2d(cin, channels, 3, padding=1))

    def _embed(self, t):
        half = self.base // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return self.time(torch.cat([args.sin(), args.cos()], dim=1))

    def forward(self, x, t):
        temb = self._embed(t)
        h = self.stem(x)
        skips = []
        for block, attention, pool in zip(self.down, self.down_attention, self.pools, strict=True):
            h = attention(block(h, temb))
            skips.append(h)
            h = pool(h)
        h = self.mid2(self.mid_attention(self.mid1(h, temb)), temb)
        for block, attention, up in zip(self.up, self.up_attention, self.ups, strict=True):
            h = attention(block(torch.cat([h, skips.pop()], dim=1), temb))
            h = up(h)
        return self.out(h)

    @staticmethod
    def memprof_batch(batch_size: int, device, dtype):
        size = DiffusionUNet.image_size
        x = torch.randn(batch_size, 3, size, size, device=device, dtype=dtype)
        t = torch.randint(0, 1000, (batch_size,), device=device)
        noise = torch.randn(batch_size, 3, size, size, device=device, dtype=dtype)
        return (x, t), noise


def _dcgan_generator(latent: int, width: int) -> nn.Module:
    return nn.Sequential(
        nn.ConvTranspose2d(latent, width * 4, 4, 1, 0, bias=False),
        nn.BatchNorm2d(width * 4),
        nn.ReLU(True),
        nn.ConvTranspose2d(width * 4, width * 2, 4, 2, 1, bias=False),
        nn.BatchNorm2d(width * 2),
        nn.ReLU(True),
        nn.ConvTranspose2d(width * 2, width, 4, 2, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(True),
        nn.ConvTranspose2d(width, 3, 4, 2, 1, bias=False),
        nn.Tanh(),
    )


def _dcgan_discriminator(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 4, 2, 1, bias=False),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(width, width * 2, 4, 2, 1, bias=False),
        nn.BatchNorm2d(width * 2),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(width * 2, width * 4, 4, 2, 1, bias=False),
        nn.BatchNorm2d(width * 4),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(width * 4, 1, 4, 1, 0, bias=False),
        nn.Flatten(),
    )


def _gan_loss(output, target):
    return F.binary_cross_entropy_with_logits(output, target)


class GANGeneratorStep(nn.Module):
    """A DCGAN generator step: ``D(G(z))`` against "real" labels, the discriminator frozen (32×32 images)."""

    memprof_loss = staticmethod(_gan_loss)

    def __init__(self, latent: int = 100, width: int = 64):
        super().__init__()
        self.generator = _dcgan_generator(latent, width)
        self.discriminator = _dcgan_discriminator(width)
        self.discriminator.requires_grad_(False)
        self.latent = latent

    def forward(self, z):
        return self.discriminator(self.generator(z))

    @staticmethod
    def memprof_batch(batch_size: int, device, dtype):
        z = torch.randn(batch_size, 100, 1, 1, device=device, dtype=dtype)
        return z, torch.ones(batch_size, 1, device=device, dtype=dtype)


class GANDiscriminatorStep(nn.Module):
    """A DCGAN discriminator step: real images and ``G(z).detach()`` against their labels, the generator frozen."""

    memprof_loss = staticmethod(_gan_loss)

    def __init__(self, latent: int = 100, width: int = 64):
        super().__init__()
        self.generator = _dcgan_generator(latent, width)
        self.generator.requires_grad_(False)
        self.discriminator = _dcgan_discriminator(width)

    def forward(self, z, real):
        with torch.no_grad():
            fake = self.generator(z)
        return self.discriminator(torch.cat([real, fake], dim=0))

    @staticmethod
    def memprof_batch(batch_size: int, device, dtype):
        z = torch.randn(batch_size, 100, 1, 1, device=device, dtype=dtype)
        real = torch.randn(batch_size, 3, 32, 32, device=device, dtype=dtype)
        labels = torch.cat([torch.ones(batch_size, 1, device=device), torch.zeros(batch_size, 1, device=device)])
        return (z, real), labels.to(dtype)


# --------------------------------------------------------------------------- graphs
class GraphConvNet(nn.Module):
    """A GCN-style node classifier in plain torch: messages gathered along edges, summed with ``index_add``.

    The batch is ``batch_size`` graphs of ``nodes`` nodes and ``nodes * degree`` random edges,
    merged into one disconnected graph (node features, edge index); the loss is node classification.
    """

    nodes = 256
    degree = 8

    def __init__(self, features: int = 64, hidden: int = 256, layers: int = 3, classes: int = 8):
        super().__init__()
        dims = [features] + [hidden] * layers
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.head = nn.Linear(hidden, classes)

    def forward(self, x, edges):
        src, dst = edges[0], edges[1]
        ones = torch.ones(src.shape[0], device=x.device, dtype=x.dtype)
        degree = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype).index_add(0, dst, ones).clamp(min=1)
        for layer in self.layers:
            h = layer(x)
            messages = h.index_select(0, src)  # gather
            x = torch.relu(torch.zeros_like(h).index_add(0, dst, messages) / degree[:, None] + h)  # scatter-sum
        return self.head(x)

    @staticmethod
    def memprof_batch(batch_size: int, device, dtype):
        n, e = GraphConvNet.nodes, GraphConvNet.nodes * GraphConvNet.degree
        x = torch.randn(batch_size * n, 64, device=device, dtype=dtype)
        offsets = (torch.arange(batch_size, device=device) * n).repeat_interleave(e)
        edges = torch.randint(0, n, (2, batch_size * e), device=device) + offsets
        labels = torch.randint(0, 8, (batch_size * n,), device=device)
        return (x, edges), labels


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
    "RecurrentLM",
    "ItemLossMLP",
    "MaskedSelectMLP",
    "TopOneMoE",
    "PaddedEncoder",
    "MLPMixer",
    "DiffusionUNet",
    "GANGeneratorStep",
    "GANDiscriminatorStep",
    "GraphConvNet",
    "dropout_mlp",
    "SoftmaxAttention",
    "PaddedMaskAttention",
    "gpt_param_count",
    "math",
]

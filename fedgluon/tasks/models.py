"""Small models that declare their head and embeddings for the layer-wise geometry.

Each model has ``parameter_roles``: fnmatch patterns on parameter names → role (``head``,
``embedding``; see :mod:`fedgluon.lmo.geometry`). Everything else gets its role from its shape.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """``in → hidden… → out`` with ReLU; ``head`` is the last linear layer."""

    parameter_roles = {"head.weight": "head"}

    def __init__(self, in_features: int, hidden: tuple[int, ...] = (128, 128), out_features: int = 10,
                 bias: bool = True):
        super().__init__()
        dims = (in_features, *hidden)
        self.body = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(dims[-1], out_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        for layer in self.body:
            x = F.relu(layer(x))
        return self.head(x)


class SmallCNN(nn.Module):
    """A small airbench-style CNN: conv blocks (conv → BatchNorm → GELU → max-pool), then a head.

    BatchNorm normalises with each batch's own statistics, in training and in evaluation alike
    (``track_running_stats=False``): fedgluon's models always run in training mode, so running
    statistics would be updated in place and never read. Without them the model has no buffers, and
    client blocks compute its gradients in vmapped calls and step in threads like any other model's."""

    parameter_roles = {"head.weight": "head"}

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: tuple[int, ...] = (32, 64),
                 image_size: int = 28):
        super().__init__()
        blocks, c = [], in_channels
        for w in widths:
            blocks += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w, track_running_stats=False),
                       nn.GELU(), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*blocks)
        side = image_size // 2 ** len(widths)
        self.head = nn.Linear(c * side * side, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim, bias=False)
        self.fc_out = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=2)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """A NanoGPT-style character model: token + position embeddings, pre-LN blocks, untied head."""

    parameter_roles = {"tok_emb.weight": "embedding", "pos_emb.weight": "embedding", "head.weight": "head"}

    def __init__(self, vocab_size: int, context: int = 64, dim: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.context = context
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        for name, p in self.named_parameters():
            if name.endswith("fc_out.weight") or name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers))

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.shape[1]
        if T > self.context:
            raise ValueError(f"sequence length {T} exceeds the context {self.context}")
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

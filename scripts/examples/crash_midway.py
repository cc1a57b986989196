"""A script that fails half-way: memprof still reports what ran, and exits 1 as python would."""

import torch
import torch.nn as nn

model = nn.Linear(1024, 1024)
for step in range(10):
    x = torch.randn(256, 1024)
    if step == 5:
        x = x[:, :1000]  # a bad batch: wrong width
    out = model(x)
    out.sum().backward()

"""A training loop with a classic leak: every loss is kept *with its autograd graph*."""

import torch
import torch.nn as nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
losses = []
for _step in range(30):
    x = torch.randn(64, 784)
    y = torch.randint(0, 10, (64,))
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward(retain_graph=True)
    opt.step()
    losses.append(loss)  # the bug: losses.append(loss.item()) keeps only a float
print(f"mean loss {sum(x.item() for x in losses) / len(losses):.3f}")

"""Recurrent models written the way users write them (not memprof's zoo): cells in a loop, a tagger, an
Elman RNN, a projected bidirectional LSTM."""

import torch
from torch import nn


class CellLoop(nn.Module):
    """An LSTMCell feeding a GRUCell, unrolled in Python over the sequence."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(500, 64)
        self.cell = nn.LSTMCell(64, 128)
        self.gcell = nn.GRUCell(128, 96)
        self.out = nn.Linear(96, 500)

    def forward(self, x):
        e = self.emb(x)
        h = c = e.new_zeros(x.shape[0], 128)
        g = e.new_zeros(x.shape[0], 96)
        outs = []
        for t in range(x.shape[1]):
            h, c = self.cell(e[:, t], (h, c))
            g = self.gcell(h, g)
            outs.append(self.out(g))
        return torch.stack(outs, 1).mean(1)


class Tagger(nn.Module):
    """A 2-layer bidirectional GRU tagger, sequence-first, with an explicit initial state and dropout."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(1000, 100)
        self.rnn = nn.GRU(100, 150, num_layers=2, bidirectional=True, dropout=0.3)
        self.fc = nn.Linear(300, 17)

    def forward(self, x):  # x: (batch, time)
        e = self.emb(x.t())
        h0 = torch.zeros(4, x.shape[0], 150)
        y, _ = self.rnn(e, h0)
        return self.fc(y).mean(0)


class Elman(nn.Module):
    """A 3-layer ReLU RNN classifying from the last hidden state."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(32, 200, num_layers=3, nonlinearity="relu", batch_first=True)
        self.fc = nn.Linear(200, 5)

    def forward(self, x):
        _, h = self.rnn(x)
        return self.fc(h[-1])


class ProjLSTM(nn.Module):
    """A 2-layer bidirectional LSTM with projections (proj_size)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(40, 256, num_layers=2, proj_size=64, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.fc(y[:, -1])

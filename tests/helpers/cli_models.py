"""A `pkg.module:function` source for the CLI tests: returns (model, example_args)."""
import torch


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def make():
    return TwoLayer().eval(), (torch.randn(2, 5, 16),)

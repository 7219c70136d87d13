"""FakeQuantLinear: an nn.Linear whose weight is quantized and dequantized on every forward,
with gradients through the rounding (straight-through estimator) and learnable scales.

Per group of `group` consecutive input channels of each output row (the QMATMUL layout,
compiler/quant_layout.py):

    q = clamp(round(w / s) + z, qmin, qmax);    w_hat = (q - z) * s

int4: q in 0..15 with an integer zero point z (asymmetric; 8 when symmetric); int8: q in
-127..127, z = 0, one scale per row. Rounding passes its gradient straight through
(d round(x)/dx := 1); the clamp does not, so weights outside the grid's range get no
gradient from it. The scale is a parameter: autograd through the expression above gives
LSQ's scale gradient (round(w/s) - w/s inside the range, q - z at its ends; Esser et al.,
2020) without hand-written backward code. Zero points stay fixed at their RTN values
(integers, as the layout stores them); scales and zeros start from llmc's own RTN
(passes/quant/rtn.py), so an untrained FakeQuantLinear computes what `--method rtn` compiles.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..passes.quant.rtn import rtn

MIN_SCALE = 1e-8  # a scale pushed to zero or below by the optimizer would divide by zero


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


class FakeQuantLinear(nn.Module):
    """Drop-in for nn.Linear during QAT; shares the linear's weight and bias parameters."""

    def __init__(self, linear: nn.Linear, bits: int, group: int, symmetric: bool):
        super().__init__()
        n, k = linear.weight.shape
        self.in_features, self.out_features = k, n
        self.bits, self.group, self.symmetric = bits, (k if bits == 8 else group), (bits == 8 or symmetric)
        self.weight = linear.weight
        self.bias = linear.bias
        qz = rtn(linear.weight.detach().to(torch.float64).cpu().numpy(), bits, self.group, self.symmetric,
                 np.float32)
        self.weight_scale = nn.Parameter(torch.tensor(qz.scales, dtype=torch.float32, device=linear.weight.device))
        zeros = qz.zeros if qz.zeros is not None else np.full(qz.scales.shape, 8.0 if bits == 4 else 0.0)
        self.register_buffer("weight_zero", torch.tensor(zeros, dtype=torch.float32, device=linear.weight.device))

    @property
    def qrange(self) -> tuple[int, int]:
        return (-127, 127) if self.bits == 8 else (0, 15)

    def effective_scale(self) -> torch.Tensor:
        return self.weight_scale.clamp_min(MIN_SCALE)

    def codes(self) -> torch.Tensor:
        """The integer codes [N, K] the current weight and scales give (no gradient)."""
        with torch.no_grad():
            w = self.weight.reshape(self.out_features, -1, self.group)
            s, z = self.effective_scale().unsqueeze(-1), self.weight_zero.unsqueeze(-1)
            return torch.clamp(torch.round(w / s) + z, *self.qrange).reshape(self.out_features, -1)

    def fake_weight(self) -> torch.Tensor:
        w = self.weight.reshape(self.out_features, -1, self.group)
        s, z = self.effective_scale().unsqueeze(-1), self.weight_zero.unsqueeze(-1)
        q = torch.clamp(round_ste(w / s) + z, *self.qrange)
        return ((q - z) * s).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.fake_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}, "
                f"group={self.group}, {'symmetric' if self.symmetric else 'asymmetric'}")


__all__ = ["FakeQuantLinear", "round_ste"]

"""The quantization methods against numpy references: layout round trips, RTN's exactness
properties, GPTQ and AWQ lower output error than RTN on their calibration inputs."""
from __future__ import annotations

import numpy as np
import pytest

from llmc.compiler.quant_layout import dequantize, pack_int4, unpack_int4
from llmc.passes.quant.awq import awq_scales
from llmc.passes.quant.gptq import gptq
from llmc.passes.quant.rtn import rtn


def test_int4_pack_layout_and_round_trip():
    q = np.array([[1, 2, 15, 0]], np.uint8)
    p = pack_int4(q)
    assert p.tolist() == [[0x21, 0x0F]]  # k=0 low nibble, k=1 high nibble
    r = np.random.default_rng(0).integers(0, 16, (7, 64))
    np.testing.assert_array_equal(unpack_int4(pack_int4(r)), r)
    with pytest.raises(ValueError):
        pack_int4(np.array([[16, 0]]))


@pytest.mark.parametrize("bits,group,sym", [(8, 64, True), (4, 32, False), (4, 16, True)])
def test_rtn_codes_and_dequantize(bits, group, sym):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((12, 64))
    qz = rtn(w, bits, group, sym, np.float32)
    lo, hi = (-127, 127) if bits == 8 else (0, 15)
    assert qz.q.min() >= lo and qz.q.max() <= hi
    packed = qz.q.astype(np.int8) if bits == 8 else pack_int4(qz.q)
    wd = dequantize(packed, qz.scales, qz.zeros, bits, group)
    np.testing.assert_allclose(wd, qz.dequantize(group, bits))
    # round to nearest: the error of every element is at most half a step of its group's scale
    step = np.repeat(qz.scales, group, axis=1)
    assert np.all(np.abs(wd - w) <= 0.5 * step + 1e-9)


def _layer(seed=0, n=48, k=128, rows=512):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)  # correlated input channels
    x = rng.standard_normal((rows, k)) @ mix * np.exp(rng.standard_normal(k))
    return rng.standard_normal((n, k)), x


@pytest.mark.parametrize("bits,group,act_order", [(4, 32, False), (4, 64, True), (8, 128, False)])
def test_gptq_output_error_below_rtn(bits, group, act_order):
    w, x = _layer()
    ref = x @ w.T
    e_rtn = np.linalg.norm(x @ rtn(w, bits, group, False).dequantize(group, bits).T - ref)
    qz = gptq(w, x.T @ x, bits, group, False, act_order=act_order)
    assert qz.q.min() >= (-127 if bits == 8 else 0) and qz.q.max() <= (127 if bits == 8 else 15)
    e_gptq = np.linalg.norm(x @ qz.dequantize(group, bits).T - ref)
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)


def test_awq_output_error_not_above_rtn():
    w, x = _layer(seed=2)
    ref = x @ w.T
    s, alpha, qz = awq_scales(w, x, np.abs(x).mean(0), 4, 32, False)
    wq = qz.dequantize(32, 4) / s
    e_awq = np.linalg.norm(x @ wq.T - ref)
    e_rtn = np.linalg.norm(x @ rtn(w, 4, 32, False).dequantize(32, 4).T - ref)
    assert e_awq <= e_rtn and alpha > 0  # activations with outlier channels: scaling helps

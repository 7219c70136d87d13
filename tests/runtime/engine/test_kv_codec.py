"""The quantized KV cache's rows (runtime/engine/kv_codec.py): codes and scale against an
independent computation, error bounds of the round trip, zero rows, and the names."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from llmc.errors import LLMCError
from llmc.runtime.engine.kv_codec import SCALE_BYTES, decode, encode, storage, storage_name


def _rows(seed, shape=(5, 3, 16)):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 30, shape[:-1] + (1,)).astype(np.float32)
    x[0, 0] = 0.0  # an all-zero row
    return x


def test_int8_rows_hold_rounded_codes_and_the_row_scale():
    x = _rows(0)
    rows = encode(x, "int8")
    assert rows.dtype == np.uint8 and rows.shape == (5, 3, 16 + SCALE_BYTES)
    scale = np.ascontiguousarray(rows[..., 16:]).view(np.float32)[..., 0]
    amax = np.abs(x).max(-1)
    np.testing.assert_allclose(scale, amax / 127, rtol=1e-6)
    assert scale[0, 0] == 0
    codes = rows[..., :16].view(np.int8).astype(np.int64)
    want = np.rint(x.astype(np.float64) / np.where(amax > 0, amax / 127, 1)[..., None])
    assert np.abs(codes - want).max() <= 1 and (codes == want).mean() > 0.99  # f32 vs f64 division ties
    assert np.abs(codes).max() == 127
    back = decode(rows, "int8")
    assert np.all(np.abs(back - x) <= scale[..., None] / 2 * (1 + 1e-5) + 1e-12)
    assert not back[0, 0].any()


def test_fp8_rows_are_e4m3_codes_of_the_scaled_row():
    x = _rows(1)
    rows = encode(x, "float8_e4m3fn")
    scale = np.ascontiguousarray(rows[..., 16:]).view(np.float32)[..., 0]
    amax = np.abs(x).max(-1)
    np.testing.assert_allclose(scale, amax / 448, rtol=1e-6)
    safe = np.where(scale > 0, scale, 1)[..., None]
    want = (x / safe).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    np.testing.assert_array_equal(rows[..., :16], want)
    back = decode(rows, "float8_e4m3fn")
    bound = np.maximum(np.abs(x) * 2.0 ** -4, scale[..., None] * 2.0 ** -10)  # 3 mantissa bits; subnormals
    assert np.all(np.abs(back - x) <= bound * (1 + 1e-5))
    assert np.isfinite(back).all() and not back[0, 0].any()


def test_decode_gives_the_asked_dtype_and_survives_a_strided_view():
    x = _rows(2)
    rows = encode(x, "int8")
    picked = rows[:, ::2]  # a non-contiguous view, as a gather of pages gives
    np.testing.assert_array_equal(decode(picked, "int8"), decode(rows, "int8")[:, ::2])
    assert decode(rows, "int8", np.float64).dtype == np.float64


def test_storage_and_names():
    assert storage("int8", 64) == ("uint8", 68) and storage("float8_e4m3fn", 64) == ("uint8", 68)
    assert storage("bfloat16", 64) == ("bfloat16", 64)
    assert storage_name("fp8") == "float8_e4m3fn" and storage_name("int8") == "int8" and storage_name(None) is None
    with pytest.raises(LLMCError, match="unknown KV cache dtype 'int4'"):
        storage_name("int4")

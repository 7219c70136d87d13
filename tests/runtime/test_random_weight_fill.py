"""A perf artifact's omitted weights are filled on load with tiled random values
(runtime/gpu.py random_weight_values): cheap for every dtype, no NaNs, 2:4 along both axes."""
import numpy as np
import pytest

from llmc.runtime.gpu import random_blocks, random_weight_values


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.float16, np.float32])
def test_values_are_random_2to4_and_finite(dtype):
    v = random_weight_values((64, 1024), dtype, random_blocks(0))
    assert v.shape == (64, 1024) and v.dtype == np.dtype(dtype)
    assert np.isfinite(v.astype(np.float64)).all()
    assert len(np.unique(v)) > 16  # random values, not a constant (integer codes included)
    nz = v != 0
    assert nz[:, 0::4].any() and nz[:, 1::4].any() and not nz[:, 2::4].any() and not nz[:, 3::4].any()
    assert nz[0::4].any() and nz[1::4].any() and not nz[2::4].any() and not nz[3::4].any()


def test_float_values_have_the_stated_spread():
    v = random_weight_values((256, 4096), np.float32, random_blocks(0))
    kept = v[0::4, 0::4]
    assert 0.018 < kept.std() < 0.022


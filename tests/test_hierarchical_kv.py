"""QuantSpec's hierarchical INT4/INT8 codes (quasar.kv.hierarchical) against float64."""
import pytest
import torch

from quasar.kv.hierarchical import dequantize, dequantize_upper, quantize


@pytest.mark.parametrize("dim,shape", [(-2, (3, 2, 128, 16)), (-1, (3, 2, 5, 128)), (-1, (1, 1, 1, 7))])
def test_two_level_error_bounds(dim, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64) * torch.rand(shape[:-1] + (1,), dtype=torch.float64) * 4
    c = quantize(x, dim)
    assert c.upper.dtype == torch.uint8 and int(c.upper.max()) <= 15 and int(c.lower.max()) <= 15
    s = c.scale.double()
    e4 = (dequantize_upper(c, torch.float64) - x).abs()
    e8 = (dequantize(c, torch.float64) - x).abs()
    assert bool((e4 <= s / 2 + 1e-9).all())
    assert bool((e8 <= s / 16 + 1e-9).all())
    assert e8.mean() < e4.mean() / 8                    # the lower plane adds ~4 bits
    # the group's extremes: min is exact in both views, max within one upper step's rounding
    assert torch.allclose(dequantize(c, torch.float64).amin(dim), x.amin(dim), atol=1e-9)


def test_constant_group_is_exact():
    x = torch.full((2, 4, 16), 0.375, dtype=torch.float64)       # exact in fp32 (the codes are computed in fp32)
    x[1] = -2.5
    c = quantize(x, -1)
    assert bool((c.scale == 0).all()) and bool((c.upper == 0).all()) and bool((c.lower == 8).all())
    assert torch.equal(dequantize(c, torch.float64), x) and torch.equal(dequantize_upper(c, torch.float64), x)


def test_group_edges_are_independent():
    """Each group has its own scale: a huge value in one group does not coarsen its neighbour."""
    x = torch.randn(2, 8, 64, dtype=torch.float64)
    x[0, :, 3] = 1000.0
    c = quantize(x, -2)                                   # groups along dim -2 (8 values)
    e8 = (dequantize(c, torch.float64) - x).abs()
    assert e8[1].max() < 0.05                             # the other group is unaffected
    assert e8[0, :, 3].max() < 1e-6                       # a constant column of 1000s: exact

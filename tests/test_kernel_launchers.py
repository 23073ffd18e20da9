"""Host-side helpers of the Triton launchers (vosgan.kernels._host, the bn_act view cache)."""

import pytest
import torch
import triton
from vosgan.kernels import _host
from vosgan.kernels import bn_act as K


@pytest.mark.parametrize("b", [1, 2, 7, 16, 32, 1000])
def test_cdiv_matches_triton(b):
    for a in [*range(0, 300), 4095, 4096, 4097, 2**31 - 1, 2**40 + 3]:
        assert _host.cdiv(a, b) == triton.cdiv(a, b), (a, b)


def test_next_power_of_2_matches_triton():
    for n in [*range(0, 3000), 2**20 - 1, 2**20, 2**20 + 1, 2**33 + 5]:
        assert _host.next_power_of_2(n) == triton.next_power_of_2(n), n


def test_view_cache_keys_on_layout():
    """One view per shape, strides and element size; channels_last_3d gets its own tiling."""
    y = torch.empty(2, 12, 3, 5, 7)
    v = K.view_of(y)
    assert K.view_of(torch.empty(2, 12, 3, 5, 7)) is v  # another tensor, same layout
    cl = K.view_of(y.contiguous(memory_format=torch.channels_last_3d))
    assert cl is not v and cl.cl and not v.cl
    assert K.view_of(y.half()) is not v  # element size
    assert K.view_of(y, min_programs=4) is not v
    fresh = K._View(y)
    assert (fresh.shape, fresh.strides, fresh.block_c, fresh.block_s) == (
        v.shape,
        v.strides,
        v.block_c,
        v.block_s,
    )


def test_view_cache_is_bounded():
    K._VIEWS.clear()
    for t in range(1, 1100):
        K.view_of(torch.empty(1, 2, t, 1, 1))
    assert 0 < len(K._VIEWS) <= 1024

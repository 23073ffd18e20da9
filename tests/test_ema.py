"""The moving average of D's weights (vosgan.ema): its arithmetic, warm-up and buffers."""

import pytest
import torch
from torch import nn

from vosgan.ema import WeightAverage, ema_decay


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(2, 3, 3), nn.BatchNorm3d(3), nn.LeakyReLU(0.2))


def test_decay_warms_up_then_holds():
    assert ema_decay(0.99, 1) == pytest.approx(2 / 11)
    assert ema_decay(0.99, 80) == pytest.approx(81 / 90)
    assert ema_decay(0.99, 891) == 0.99  # (1 + t) / (10 + t) passes 0.99 at t = 891
    assert ema_decay(0.5, 1) == 2 / 11 and ema_decay(0.5, 10) == 0.5


def test_average_follows_the_recurrence_and_copies_integer_buffers():
    net = _net()
    avg = WeightAverage(net, 0.9)
    assert not avg.module.training
    assert not any(p.requires_grad for p in avg.module.parameters())
    expected = {k: v.clone().double() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(1, 31):
        opt.zero_grad()
        net(torch.randn(4, 2, 3, 5, 5)).square().mean().backward()  # BN stats move too
        opt.step()
        avg.update(net, step)
        d = ema_decay(0.9, step)
        for k, v in net.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v.double() if v.is_floating_point() else v
    got = avg.state_dict()
    assert got["1.num_batches_tracked"] == net[1].num_batches_tracked == 30
    for k, v in expected.items():
        if got[k].is_floating_point():
            torch.testing.assert_close(got[k].double(), v, rtol=0, atol=1e-6, msg=k)
    # the average trails the weights: it is not a copy of them
    assert not torch.equal(got["0.weight"], net[0].weight)


def test_the_copy_is_independent_and_mismatches_are_refused():
    net = _net()
    avg = WeightAverage(net, 0.99)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    assert not torch.equal(avg.module[0].weight, net[0].weight)
    with pytest.raises(ValueError, match="state_dict keys differ"):
        avg.update(nn.Sequential(nn.Conv3d(2, 3, 3)), 1)
    for bad in (0.0, 1.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="decay must be in"):
            WeightAverage(net, bad)

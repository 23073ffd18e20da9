import itertools

import pytest
import torch

from vosgan.config import ModelConfig
from vosgan.evaluate import predict
from vosgan.models import Discriminator
from vosgan.refine import colour_bilateral, refine_segmentation


def _bilateral_by_hand(values, guide, radius, sigma, step):
    """Pixel by pixel: the definition in colour_bilateral's docstring, clamping at the edges."""
    b, _, t, h, w = values.shape
    out = torch.empty(b, 1, t, h, w)
    for n, k, y, x in itertools.product(range(b), range(t), range(h), range(w)):
        num = den = 0.0
        for dy, dx in itertools.product(range(-radius, radius + 1, step), repeat=2):
            qy, qx = min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)
            dist = (guide[n, :, k, qy, qx] - guide[n, :, k, y, x]).square().sum()
            weight = torch.exp(-dist / (2 * sigma**2))
            num, den = num + weight * values[n, 0, k, qy, qx], den + weight
        out[n, 0, k, y, x] = num / den
    return out


@pytest.mark.parametrize("radius, step", [(0, 1), (1, 1), (2, 2), (3, 3), (4, 2)])
def test_colour_bilateral_matches_its_definition(radius, step):
    g = torch.Generator().manual_seed(radius)
    values = torch.rand(2, 1, 2, 5, 7, generator=g)
    guide = torch.rand(2, 3, 2, 5, 7, generator=g) * 2 - 1
    out = colour_bilateral(values, guide, radius, 0.4, step)
    assert out.shape == values.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, _bilateral_by_hand(values, guide, radius, 0.4, step))


def test_colour_bilateral_never_crosses_a_colour_edge():
    """Two colours side by side: each side's result depends on its own values only."""
    g = torch.Generator().manual_seed(0)
    values = torch.rand(1, 1, 2, 6, 9, generator=g)
    guide = torch.zeros(1, 3, 2, 6, 9)
    guide[..., 4:] = 1.0  # colour distance^2 3: weight exp(-150) at sigma 0.1
    changed = values.clone()
    changed[..., 4:] += 5.0
    out, out_changed = (colour_bilateral(v, guide, 4, 0.1) for v in (values, changed))
    torch.testing.assert_close(out[..., :4], out_changed[..., :4])
    torch.testing.assert_close(out[..., 4:] + 5.0, out_changed[..., 4:])
    with pytest.raises(ValueError, match="sigma"):
        colour_bilateral(values, guide, sigma=0.0)
    with pytest.raises(ValueError, match="does not match"):
        colour_bilateral(values, guide[..., :4])
    with pytest.raises(ValueError, match="multiple of step"):
        colour_bilateral(values, guide, radius=3, step=2)  # the centre would not be a tap


def test_refine_segmentation_follows_the_model_config():
    g = torch.Generator().manual_seed(3)
    prob = torch.rand(2, 1, 3, 8, 8, generator=g)
    video = torch.rand(2, 3, 3, 8, 8, generator=g) * 2 - 1
    assert refine_segmentation(prob, video, ModelConfig(seg_refine=0.0)) is prob  # off
    cfg = ModelConfig(seg_refine=0.3, seg_refine_radius=2)
    torch.testing.assert_close(
        refine_segmentation(prob, video, cfg), colour_bilateral(prob, video, 2, 0.3)
    )


def test_predict_returns_the_refined_segmentation_and_the_heads():
    D = Discriminator(ModelConfig(size=16, frames=16, d_channels=4, seg_refine_radius=2)).eval()
    video = torch.rand(2, 3, 16, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        pred = predict(D, video)
        head = torch.sigmoid(D(video).seg_logit)
    torch.testing.assert_close(pred["seg_head"], head)
    torch.testing.assert_close(pred["seg"], colour_bilateral(head, video, 2, D.cfg.seg_refine))
    assert not torch.allclose(pred["seg"], head)
    assert set(predict(D, video, flow=False)) == {"seg", "seg_head"}

from dataclasses import replace

import pytest
import torch

from vosgan.config import ConfigError, ModelConfig, load
from vosgan.models import Discriminator, Generator, interpolate_trajectory
from vosgan.ops.composite import composite_reference

CFG = load(
    "cpu-small", {"model.g_channels": "32", "model.d_channels": "4", "model.gru_hidden": "12"}
).model


STREAMS = pytest.mark.parametrize("fg_stream", ["conv3d", "sprite"])


@STREAMS
def test_generator_shapes_ranges_and_composite(fg_stream):
    G = Generator(replace(CFG, fg_stream=fg_stream))
    out = G(*G.sample_latents(2))
    T, S = CFG.frames, CFG.size
    assert out.video.shape == (2, 3, T, S, S) and out.fg.shape == (2, 3, T, S, S)
    assert out.mask.shape == (2, 1, T, S, S) and out.bg.shape == (2, 3, S, S)
    assert 0 <= out.mask.min() and out.mask.max() <= 1 and out.fg.abs().max() <= 1
    torch.testing.assert_close(out.video, composite_reference(out.fg, out.mask, out.bg))


@STREAMS
def test_generator_background_is_static_and_foreground_moves(fg_stream):
    G = Generator(replace(CFG, fg_stream=fg_stream)).eval()
    z_c, anchors = G.sample_latents(2)
    out = G(z_c, anchors)
    other = G(z_c, torch.randn_like(anchors))  # same content, other motion
    torch.testing.assert_close(out.bg, other.bg)  # background depends on content only
    assert not torch.allclose(out.mask, other.mask)


def test_discriminator_shapes_and_dense_switch():
    D = Discriminator(CFG)
    x = torch.rand(2, 3, CFG.frames, CFG.size, CFG.size) * 2 - 1
    out = D(x)
    assert out.logit.shape == (2,)
    assert out.seg_logit.shape == (2, 1, CFG.frames, CFG.size, CFG.size)
    assert out.flow.shape == (2, 2, CFG.frames - 1, CFG.size, CFG.size)
    light = D(x, dense=False)
    assert light.seg_logit is None and light.flow is None
    torch.testing.assert_close(light.logit, out.logit)


@STREAMS
def test_gradients_reach_every_parameter(fg_stream):
    G, D = Generator(replace(CFG, fg_stream=fg_stream)), Discriminator(CFG)
    with torch.no_grad():  # the flow head starts at zero (identity warp), which blocks the
        D.flow_head.weight.normal_(std=0.01)  # gradient to its decoder until the first step
    out = G(*G.sample_latents(2))
    d = D(out.video)
    (d.logit.sum() + d.seg_logit.mean() + d.flow.mean()).backward()
    for name, p in list(G.named_parameters()) + list(D.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name  # every weight is on a path to the loss


def test_sprite_moves_by_the_offset_its_path_gives():
    G = Generator(replace(CFG, fg_stream="sprite")).eval()
    sprite = G.sprite
    z_c, anchors = G.sample_latents(1)
    states = torch.randn(1, 2, CFG.gru_hidden)

    def at(dx: float, dy: float) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            sprite.path.weight.zero_()
            sprite.path.bias.copy_(torch.atanh(torch.tensor([dx, dy]) / sprite.reach))
        return sprite(z_c, anchors[:, 0], states)

    f0, m0 = at(0.0, 0.0)
    f, m = at(3.0, -2.0)  # 3 px right, 2 px up: pixel (y, x) shows the sprite at (y + 2, x - 3)
    assert m0.sum() > 1 and (m0 > 0).any()
    torch.testing.assert_close(m[..., :-2, 3:], m0[..., 2:, :-3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f[..., :-2, 3:], f0[..., 2:, :-3], atol=1e-5, rtol=1e-5)
    _, out = at(12.0, 0.0)  # past the right edge: part of the sprite leaves, nothing wraps
    assert out.sum() < 0.97 * m0.sum() and out[..., :3].abs().max() == 0


@pytest.mark.parametrize("mode", ["linear", "slerp"])
def test_trajectory_passes_through_anchors(mode):
    anchors = torch.randn(3, 3, 5)
    path = interpolate_trajectory(anchors, 9, mode)  # steps 0, 4, 8 land on the anchors
    assert path.shape == (3, 9, 5)
    for step, k in ((0, 0), (4, 1), (8, 2)):
        torch.testing.assert_close(path[:, step], anchors[:, k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flow_decoder", ["shared", "separate"])
def test_flow_decoder_modes(flow_decoder):
    D = Discriminator(replace(CFG, flow_decoder=flow_decoder, flow_encoder="shared"))
    x = torch.rand(2, 3, CFG.frames, CFG.size, CFG.size) * 2 - 1
    out = D(x)
    assert out.flow.abs().max() == 0  # the flow starts at the identity warp in both modes
    keys = D.state_dict().keys()
    assert any(k.startswith("flow_decoder.") for k in keys) == (flow_decoder == "separate")
    assert D.dense_head.out_channels == (1 if flow_decoder == "separate" else 3)
    if flow_decoder == "separate":  # the segmentation does not depend on the flow's decoder
        with torch.no_grad():
            for p in D.flow_decoder.parameters():
                p.add_(1.0)
            D.flow_head.weight.add_(0.1)
        again = D(x)
        torch.testing.assert_close(again.seg_logit, out.seg_logit)
        assert again.flow.abs().max() > 0
        out = again
    no_flow = D(x, flow=False)  # the same segmentation and logit, and no flow
    assert no_flow.flow is None
    torch.testing.assert_close(no_flow.seg_logit, out.seg_logit)
    torch.testing.assert_close(no_flow.logit, out.logit)


@pytest.mark.parametrize(
    "net, fields, message",
    [
        (Generator, {"size": 24, "frames": 8}, "model.size must be a power of two"),
        (Generator, {"size": 16, "frames": 6}, "model.frames must be a positive multiple of 4"),
        (Generator, {"fg_stream": "x"}, r"model.fg_stream must be one of \['conv3d', 'sprite'\]"),
        (Generator, {"anchors": 1}, "model.anchors must be >= 2"),
        (Discriminator, {"flow_decoder": "x"}, "model.flow_decoder must be one of"),
        (
            Discriminator,
            {"size": 32, "frames": 24},
            "model.frames must be a positive multiple of 16",
        ),
        (Discriminator, {"size": 8, "frames": 16}, "model.size must be >= 16"),
    ],
)
def test_models_refuse_configs_they_cannot_build(net, fields, message):
    with pytest.raises(ConfigError, match=message):
        net(ModelConfig(**fields))


def test_sprite_stream_takes_fewer_frames_than_the_3d_stream_needs():
    """The 3D stream doubles T with H and W (T >= 32 at 128x128); the sprite stream draws each
    frame in 2D and builds at 128x128 with T = 16."""
    cfg = ModelConfig(size=128, frames=16, fg_stream="sprite", g_channels=64, gru_hidden=16)
    out = Generator(cfg)(*Generator(cfg).sample_latents(1))
    assert out.video.shape == (1, 3, 16, 128, 128)
    with pytest.raises(ConfigError, match="multiple of 32"):
        Generator(ModelConfig(size=128, frames=16))


def test_generator_checks_inputs_and_takes_an_empty_batch():
    G = Generator(CFG)
    z_c, anchors = G.sample_latents(2)
    with pytest.raises(ValueError, match=r"z_c must be \(B, 100\) \(model.z_content\)"):
        G(z_c[:, :9], anchors)
    with pytest.raises(ValueError, match="anchors must be"):
        G(z_c, anchors[:, :1])
    with pytest.raises(ValueError, match="z_c has batch 2 but anchors has batch 1"):
        G(z_c, anchors[:1])
    out = G(z_c[:0], anchors[:0])
    T, S = CFG.frames, CFG.size
    assert out.video.shape == (0, 3, T, S, S) and out.bg.shape == (0, 3, S, S)


@pytest.mark.parametrize("shape", [(2, 3, 24, 32, 32), (2, 3, 16, 20, 20), (2, 4, 16, 32, 32)])
def test_discriminator_checks_the_input_shape(shape):
    D = Discriminator(CFG)
    with pytest.raises(ValueError, match="T, H, W positive multiples of 16"):
        D(torch.randn(*shape))


def test_flow_encoder_of_its_own_takes_only_the_flow_losses():
    D = Discriminator(replace(CFG, flow_decoder="separate", flow_encoder="separate"))
    assert any(k.startswith("flow_encoder.") for k in D.state_dict())
    x = torch.rand(2, 3, CFG.frames, CFG.size, CFG.size) * 2 - 1
    out = D(x)
    with torch.no_grad():  # the flow encoder's features reach the flow head...
        D.flow_head.weight.normal_(0, 0.1)
    flow = D(x).flow
    (flow.square().sum()).backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in D.encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in D.flow_encoder.parameters())
    with torch.no_grad():  # ... and nothing else: the logit and segmentation ignore them
        for p in D.flow_encoder.parameters():
            p.add_(0.5)
    again = D(x)
    torch.testing.assert_close(again.seg_logit, out.seg_logit)
    torch.testing.assert_close(again.logit, out.logit)
    assert (again.flow - flow).abs().max() > 0

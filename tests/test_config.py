import json

import pytest

from vosgan import config as C


def test_presets_validate_and_shapes():
    small, paper = C.load("cpu-small"), C.load("paper")
    assert (small.model.size, small.model.frames) == (32, 16)
    assert (paper.model.size, paper.model.frames) == (64, 32)
    assert paper.model.first_frames == 2 and paper.model.up_stages == 4
    assert small.model.first_frames == 2 and small.model.up_stages == 3


def test_overrides_are_typed():
    cfg = C.load(
        "cpu-small",
        C.parse_overrides(
            [
                "--model.gru_hidden=96",
                "--train.steps",
                "7",
                "--loss.adversarial=hinge",
                "--data.cache=true",
            ]
        ),
    )
    assert cfg.model.gru_hidden == 96 and cfg.train.steps == 7
    assert cfg.loss.adversarial == "hinge" and cfg.data.cache is True


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.nope": "1"}, "unknown config key 'model.nope'"),
        ({"nosection.x": "1"}, "unknown config key"),
        ({"model.size": "abc"}, "model.size must be int"),
        ({"model.size": "48"}, "power of two"),
        ({"train.steps": "0"}, "train.steps must be >= 1"),
        ({"loss.adversarial": "wgan"}, "loss.adversarial must be one of"),
        ({"data.cache": "maybe"}, "data.cache must be a boolean"),
        ({"optim.beta1": "1.5"}, "optim.beta1"),
        ({"optim.lr_dense": "-1"}, "optim.lr_dense must be finite and >= 0"),
        ({"model.frames": "20"}, "model.frames must be a positive multiple"),
        ({"optim.lr_g": "inf"}, "optim.lr_g must be finite and > 0, got inf"),
        ({"optim.lr_d": "nan"}, "optim.lr_d must be finite and > 0, got nan"),
        ({"optim.lr_dense": "nan"}, "optim.lr_dense must be finite and >= 0"),
        ({"optim.beta2": "nan"}, "optim.beta2 must be in"),
        ({"loss.flow": "nan"}, "loss.flow must be finite and >= 0, got nan"),
        ({"loss.r1": "inf"}, "loss.r1 must be finite and >= 0, got inf"),
        ({"loss.motion_seg": "-1"}, "loss.motion_seg must be finite and >= 0, got -1"),
        ({"loss.motion_seg_start": "-5"}, "loss.motion_seg_start must be >= 0, got -5"),
        ({"loss.motion_span": "-1"}, "loss.motion_span must be >= 0, got -1"),
        ({"loss.motion_camera": "median"}, "loss.motion_camera must be one of"),
        ({"model.flow_scale": "-inf"}, "model.flow_scale must be finite, got -inf"),
        ({"train.d_ema": "1"}, r"train.d_ema must be in \[0, 1\) \(0 = off\), got 1.0"),
        ({"train.d_ema": "-0.1"}, "train.d_ema must be in"),
        ({"train.d_ema": "nan"}, "train.d_ema must be in .* got nan"),
        (
            {"model.flow_decoder": "shared"},
            "model.flow_encoder=separate needs model.flow_decoder=separate",
        ),
        ({"train.device": "bogus"}, "train.device must be auto, cpu, cuda or cuda:N"),
        ({"train.device": "cuda:x"}, "train.device must be auto, cpu, cuda or cuda:N"),
        ({"data.batch_size": "1"}, r"data.batch_size / train.grad_accum \(1 / 1\) must be >= 2"),
        (
            {"data.batch_size": "4", "train.grad_accum": "4"},
            r"data.batch_size / train.grad_accum \(4 / 4\) must be >= 2",
        ),
    ],
)
def test_bad_values_are_named(overrides, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load("cpu-small", overrides)


def test_edge_values_are_accepted():
    # lr_dense 0 means "lr_d"; a device is only checked against this machine when training
    cfg = C.load(
        "cpu-small",
        {"optim.lr_dense": "0", "train.device": "cuda:7", "loss.flow": "0", "data.batch_size": "2"},
    )
    assert cfg.optim.lr_dense == 0 and cfg.train.device == "cuda:7"
    assert C.load("cpu-small", {"train.d_ema": "0"}).train.d_ema == 0  # off


def test_unknown_preset_and_bad_cli_argument():
    with pytest.raises(C.ConfigError, match="unknown preset"):
        C.load("huge")
    with pytest.raises(C.ConfigError, match="unrecognised argument"):
        C.parse_overrides(["--steps=3"])


def test_json_round_trip():
    cfg = C.load("paper", {"model.gru_hidden": "128", "loss.r1": "0.5"})
    again = C.from_dict(json.loads(cfg.to_json()))
    assert again == cfg


def test_configs_saved_before_a_field_keep_their_behaviour():
    """A checkpoint written before loss.motion_seg (model.flow_encoder) existed trained without
    it: resuming it must not switch the motion pseudo-labels (D's flow encoder) on; a new config
    keeps the default."""
    saved = json.loads(C.load("cpu-small").to_json())
    assert C.from_dict(saved).loss.motion_seg == C.LossConfig().motion_seg > 0
    del saved["loss"]["motion_seg"]
    assert C.from_dict(saved).loss.motion_seg == 0.0
    # and D's flow read the shared encoder before model.flow_encoder existed
    assert C.from_dict(saved).model.flow_encoder == C.ModelConfig().flow_encoder == "separate"
    del saved["model"]["flow_encoder"]
    assert C.from_dict(saved).model.flow_encoder == "shared"
    # and the pseudo-labels read frame t's outgoing flow alone before loss.motion_span existed
    assert C.from_dict(saved).loss.motion_span == C.LossConfig().motion_span == 2
    del saved["loss"]["motion_span"]
    assert C.from_dict(saved).loss.motion_span == 0
    # and D's segmentation was evaluated unrefined before model.seg_refine existed
    assert C.from_dict(saved).model.seg_refine == C.ModelConfig().seg_refine > 0
    del saved["model"]["seg_refine"]
    assert C.from_dict(saved).model.seg_refine == 0.0
    # and the pseudo-labels read D's flow uncompensated before loss.motion_camera existed
    assert C.from_dict(saved).loss.motion_camera == C.LossConfig().motion_camera == "auto"
    del saved["loss"]["motion_camera"]
    assert C.from_dict(saved).loss.motion_camera == "none"
    # and no moving average of D's weights was kept before train.d_ema existed
    assert C.from_dict(saved).train.d_ema == C.TrainConfig().d_ema > 0
    del saved["train"]["d_ema"]
    assert C.from_dict(saved).train.d_ema == 0.0

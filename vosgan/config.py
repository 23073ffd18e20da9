"""One source of truth for every setting: frozen dataclasses, presets, typed CLI overrides.

``--section.key=value`` overrides a field (``--model.gru_hidden=128``, ``--train.steps=200``);
unknown keys, wrong types and invalid values are rejected with a message naming the field.
Fields marked [paper] follow the paper; everything else is our choice (see README, "Method").
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal


class ConfigError(ValueError):
    """An invalid configuration value, named by its ``section.key``."""


@dataclass(frozen=True)
class ModelConfig:
    size: int = 32  # frame height = width
    frames: int = 16  # T
    z_content: int = 100  # content (background) latent [paper: two latent spaces]
    z_motion: int = 32  # motion latent space dimension d_m
    anchors: int = 3  # K points the motion trajectory passes through [paper: trajectory]
    interpolation: Literal["linear", "slerp"] = "linear"
    gru_hidden: int = 64  # trajectory encoder state size [paper: RNN encoder]
    g_channels: int = 64  # channels of G's first stage (halved each stage)
    d_channels: int = 16  # channels of D's first stage (doubled each stage)
    flow_scale: float = 1.0  # D's flow head output is multiplied by this (pixels)
    mask_bias: float = -2.0  # initial bias of G's mask logit: masks start at sigmoid(-2) = 0.12
    # D's flow head gets its own U-Net decoder instead of sharing the segmentation decoder.
    flow_decoder: Literal["shared", "separate"] = "separate"
    # [ours] ... and, with "separate", its own encoder too, trained by the flow losses alone.
    flow_encoder: Literal["shared", "separate"] = "separate"
    # G's foreground: "conv3d", the paper's 3D transposed-conv stream, or "sprite", one 2D
    # sprite translated along a path read from the GRU states (models.generator.SpriteForeground).
    fg_stream: Literal["conv3d", "sprite"] = "conv3d"
    # [ours] D's segmentation as evaluated (held-out IoU, sample grids, real video): the head's
    # probability averaged over pixels of similar colour within seg_refine_radius px of the same
    # frame (refine.refine_segmentation: weight exp(-|dRGB|^2 / 2 sigma^2), sigma = seg_refine
    # in [-1, 1] units, taps every 2 px; 0 turns it off). Training is unchanged. The head marks
    # a rim around moving sprites (it works from half-resolution features); the average snaps
    # its mask to their edges. The frame-difference baseline is scored with the same
    # refinement. Chosen on training-split clips (four default runs: IoU 0.465-0.507 raw,
    # 0.548-0.613 at radius 6, 0.543-0.607 at 4, sigma 0.1); held-out: see README.
    seg_refine: float = 0.1
    seg_refine_radius: int = 6

    @property
    def up_stages(self) -> int:
        """Number of x2 upsampling stages from 4x4 to ``size``."""
        return int(math.log2(self.size // 4))

    @property
    def first_frames(self) -> int:
        """Temporal size of G's first foreground stage (``frames / 2**up_stages``)."""
        return self.frames // 2**self.up_stages


@dataclass(frozen=True)
class LossConfig:
    adversarial: Literal["nonsaturating", "hinge"] = "nonsaturating"
    mask_sparsity: float = 0.1  # lambda_m * mean|m| (VGAN's 0.1)
    segmentation: float = 1.0  # BCE(D seg of fake, G mask) [paper: G's masks supervise D]
    # Flow-warping photometric loss on real videos [paper: motion estimation]. 20, not 1: D's
    # encoder is shared with the real/fake and segmentation heads, whose gradients otherwise
    # swamp the warping loss's (flow-only D, 300 steps, with a frozen G's fakes: foreground EPE
    # 1.02 px at weight 1, 0.81 px at 20, with model.flow_decoder=separate; zero flow 1.11).
    # Default run (cpu-small, 1000 steps, one run each; segmentation IoU, foreground EPE):
    # shared decoder, weight 1: 0.075, 1.107 px; shared, 20: 0.087, 1.107 px; separate, 20:
    # 0.228, 1.040 px, and in a second run (CI dry run, also with fused Adam) 0.126, 1.047 px
    # (zero flow: 1.114 px). Run-to-run spread is large; the flow gain repeats.
    flow: float = 20.0
    # Relative weight of the same loss on fake videos. 0 by default: on G's early, temporally
    # noisy videos a uniform half-pixel flow lowers the loss (bilinear warping blurs the noise),
    # and D learned that offset and applied it to real video (cpu-small run, step 500: flow EPE
    # 0.42 px vs 0.12 px for zero flow).
    flow_fake: float = 0.0
    flow_smoothness: float = 1.0  # edge-aware first-order smoothness of D's flow (0.05 x flow)
    # 3x3 binomial blur of both frames before the warping loss. Without it, bilinear warping's
    # own smoothing of sensor noise is rewarded: D learned a uniform sub-pixel flow on the static
    # background (flow-only training, 400 steps: background-dominated EPE 0.32 px unblurred,
    # 0.13 px blurred; zero flow 0.12 px).
    photometric_blur: bool = True
    smoothness_edge: float = 10.0  # edge-awareness: weight exp(-edge * |dI|)
    charbonnier_eps: float = 1e-3
    r1: float = 0.0  # R1 gradient penalty weight (0 disables)
    r1_every: int = 16  # lazy regularisation interval
    consistency: float = 0.0  # G-side: BCE(D seg of fake, m) pulled toward agreement
    # Class-balanced segmentation BCE: foreground pixels weighted (1 - mu) / mu, mu the batch's
    # mean G mask (clamped to [0.02, 0.5]), as in HED's class-balanced loss. Without it a
    # compact-sprite G's D stays unsure of real foregrounds (mean probability 0.36-0.38 there).
    seg_balance: bool = False
    # [ours] Motion pseudo-labels: from step motion_seg_start (D's flow has learned something by
    # then), D's segmentation of each *real* clip is also trained (BCE, this weight) toward what
    # D's own flow on it says moves: |u| above the clip's Otsu threshold (losses.motion_mask),
    # detached. Still no label. Without it D segments what G's foregrounds look like, not what
    # moves: on real clips frozen in time its IoU hardly drops. Default run, Intel box, seeds
    # 0-3, D's flow on the shared encoder: final IoU 0.165/0.231/0.188/0.173 at 0,
    # 0.336/0.364/0.343/0.387 at 1. With the flow's own encoder (model.flow_encoder), whose
    # pseudo-labels are better (pooled IoU 0.46-0.47), weight 1 left D's segmentation below
    # them (0.350/0.382 on seeds 0/1); 3 gives 0.457/0.357/0.463/0.455 on seeds 0-3
    # (SEGMENTATION.md), 0.485/0.493/0.482/0.508 with motion_span=2.
    motion_seg: float = 3.0
    motion_seg_start: int = 1000
    # [ours] Frame t's pseudo-label reads the smallest speed of D's flow over the 2k frame
    # pairs between frames t-k and t+k (losses.motion_mask); 0 reads frame t's outgoing flow
    # alone. D's flow bleeds 1-2 px past the sprites (three quarters of the Otsu mask's false
    # positives lie within 2 px of them); ahead of and behind a moving sprite that bleed lasts
    # a frame pair or two, so the minimum drops it. On 128 training-split clips, D's flow from
    # four finished runs: Otsu mask IoU 0.466-0.490 at k=0, 0.490-0.515 at 1, 0.527-0.557 at 2,
    # 0.511-0.545 at 3 (on the true flow, which does not bleed: 0.868 / 0.746 / 0.533 / 0.383,
    # since the minimum thins a moving mask). Default run, seeds 0-3: final IoU
    # 0.457/0.357/0.463/0.455 at k=0, 0.485/0.493/0.482/0.508 at k=2 (SEGMENTATION.md).
    motion_span: int = 2
    # [ours] Before Otsu's cut, the speed can be averaged over pixels of similar colour within
    # motion_guide_radius px in the same frame (refine.colour_bilateral, sigma = motion_guide;
    # 0 turns it off). The pseudo-labels gain (128 training-split clips, D's flow from four
    # finished runs, span 2: Otsu mask IoU 0.527-0.557 without, 0.616-0.658 at radius 4 and
    # sigma 0.1), but D's segmentation did not follow them (seed 0: final IoU 0.480 against
    # 0.485; with model.seg_refine 0.543 against 0.576 on training-split clips). Off.
    motion_guide: float = 0.0
    motion_guide_radius: int = 4
    # [ours] Camera motion: the pseudo-labels read D's flow minus the affine field that best
    # fits it per frame pair (losses.camera_motion, a robust least-squares fit), i.e. what moves
    # against the camera. "auto": on for real video (data.source a path), off for the synthetic
    # clips, whose camera never moves. DAVIS 2016 (11 sequences, centre 32x32 crops of 16-frame
    # windows, D of a 1000-step DAVIS run): pooled IoU of the pseudo-labels with the ground truth
    # 0.082 uncompensated, 0.125 minus each pair's median flow, 0.184 minus the affine fit.
    motion_camera: Literal["auto", "none", "affine"] = "auto"


@dataclass(frozen=True)
class OptimConfig:
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    # D's decoders and dense heads (segmentation, flow); 0 = lr_d. The supervised ceiling
    # (python -m vosgan.ceiling) learns much faster with a higher rate: 0.446 -> 0.653 IoU
    # after 1000 steps at 2e-4 -> 1e-3 (cpu-small). Default run (3000 steps, one run each):
    # held-out IoU 0.182 -> 0.333, foreground flow EPE 0.776 -> 0.738 px.
    lr_dense: float = 1e-3
    beta1: float = 0.5
    beta2: float = 0.999


@dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"  # "synthetic" or a path (real video: issue #6)
    train_clips: int = 8192
    val_clips: int = 64
    seed: int = 0
    batch_size: int = 8
    num_workers: int = 0
    # Keep each synthetic clip in memory once rendered (rendering is ~20% of a cpu-small step;
    # the default run reads each clip about 3 times). Off for `paper`: 4.3 GB at 8192 clips.
    cache: bool = True
    # Real video (data.source = a path; see vosgan.data.build). Ignored for "synthetic".
    decoder: Literal["auto", "dali", "pyav", "cache"] = "auto"  # cache: a prepared clip cache
    stride: int = 1  # frame step inside a clip (used when fps is 0)
    fps: float = 0.0  # resample clips to this frame rate; 0 keeps the native rate (and stride)
    short: Literal["loop", "pad", "skip"] = "loop"  # videos shorter than a clip
    crop: Literal["center", "random"] = "center"  # square crop after the short-side resize
    flip: bool = False  # random horizontal flip (seeded per clip)
    sampling: Literal["seeded", "random"] = "seeded"  # seeded: clip i is a pure function of i
    split_list: str = "auto"  # UCF-101 split lists: "auto" (01 if present), "none", "1".."3"


@dataclass(frozen=True)
class TrainConfig:
    # The default run: 9.1-13.2 minutes of training in CI dry runs on 2 Intel Xeon cores,
    # 3.4-3.8 on 2 AMD EPYC (Zen 5) cores. Measured (cpu-small, a 3000-step run of an early
    # default): held-out segmentation IoU 0.189 / 0.165 / 0.253 / 0.297 / 0.331 / 0.333 at steps
    # 500..3000, against 0.272 for the frame-difference baseline; foreground flow EPE 0.729 px at
    # step 2500 (zero flow 1.114). Steps 2500-3000 added 0.002 IoU and 2 minutes.
    steps: int = 2500
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, off on CPU
    log_every: int = 20
    eval_every: int = 500
    sample_every: int = 250
    checkpoint_every: int = 200
    eval_clips: int = 64
    # Large presets on one GPU: split each step's batch into grad_accum micro-batches (BatchNorm
    # then normalises per micro-batch), and recompute the 3D blocks' activations in backward.
    grad_accum: int = 1
    checkpoint_activations: bool = False
    # Under torchrun: BatchNorm over the global batch (else each rank's share).
    sync_bn: bool = False
    compile: bool = False  # torch.compile G and D (--compile)
    # 3D conv weights and real clips in torch.channels_last_3d. On an H100 (bf16, paper preset)
    # cuDNN spent 18% of the fused step's GPU time converting NCDHW tensors to NDHWC and back.
    # auto: on with --fused on CUDA.
    channels_last: Literal["auto", "on", "off"] = "auto"
    # Capture the whole training step (D and G updates, both Adam steps) as CUDA graphs and replay
    # them: no per-kernel launch cost on the host (vosgan.train_graph). CUDA only; not with
    # train.compile, train.amp=fp16 (GradScaler syncs) or torchrun. auto: on with --fused on
    # CUDA where it can be (vosgan.train_run.step_options says why not, where not).
    cuda_graph: Literal["auto", "on", "off"] = "auto"
    # Evaluation, samples and exports read a moving average of D's weights with this decay
    # (vosgan.ema; 0 = D's own weights). Training never reads it. Default run, AMD box, seeds
    # 0-3, held-out IoU: 0.678 / 0.686 / 0.666 / 0.656 against 0.651 / 0.668 / 0.607 / 0.595
    # for D's own weights; 0.99 scored best on training-split clips (0.647 mean; 0.995: 0.646,
    # 0.998: 0.644; D's own: 0.604).
    d_ema: float = 0.99


@dataclass(frozen=True)
class Config:
    preset: str = "cpu-small"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


PRESETS: dict[str, Config] = {
    # Sized so the default run finishes in minutes on 2 CPU cores.
    "cpu-small": Config(),
    # The paper's resolution and VGAN-sized channels (a training step: about 116 GFLOP per clip,
    # G and D forward and backward, by torch's FLOP counter; benchmarks/RESULTS.md).
    "paper": Config(
        preset="paper",
        model=ModelConfig(size=64, frames=32, gru_hidden=256, g_channels=512, d_channels=64),
        optim=OptimConfig(lr_dense=0.0),  # the lr_dense gain was measured at cpu-small only
        data=DataConfig(batch_size=32, val_clips=256, cache=False),
        train=TrainConfig(
            steps=60_000,
            eval_every=2000,
            sample_every=2000,
            checkpoint_every=2000,
            log_every=50,
            eval_clips=256,
        ),
    ),
}

SECTIONS = ("model", "loss", "optim", "data", "train")


#: how a boolean may be spelt (CLI or JSON), for bool fields and auto/on/off switches alike
_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True}
_BOOL_WORDS |= {"0": False, "false": False, "no": False, "off": False}


def _coerce(name: str, raw: Any, hint: Any) -> Any:
    """Convert ``raw`` (a string from the CLI or a JSON value) to the field type ``hint``."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        word = str(raw).lower()
        if {"on", "off"} <= set(choices) and word in _BOOL_WORDS:  # true/false: earlier configs
            return "on" if _BOOL_WORDS[word] else "off"
        if raw not in choices:
            raise ConfigError(f"{name} must be one of {list(choices)}, got {raw!r}")
        return raw
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in _BOOL_WORDS:
            return _BOOL_WORDS[str(raw).lower()]
        raise ConfigError(f"{name} must be a boolean (true/false), got {raw!r}")
    try:
        if hint is int:
            if isinstance(raw, float) or (isinstance(raw, str) and not raw.lstrip("-").isdigit()):
                raise ValueError
            return int(raw)
        if hint is float:
            return float(raw)
        if hint is str:
            return str(raw)
    except ValueError:
        raise ConfigError(f"{name} must be {hint.__name__}, got {raw!r}") from None
    raise ConfigError(f"{name}: unsupported field type {hint!r}")


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Return ``cfg`` with ``{"section.key": value}`` overrides applied, type-checked."""
    by_section: dict[str, dict[str, Any]] = {}
    for key, raw in overrides.items():
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name:
            raise ConfigError(
                f"unknown config key {key!r}; keys look like <section>.<field> with "
                f"section one of {list(SECTIONS)}"
            )
        sub = getattr(cfg, section)
        hints = typing.get_type_hints(type(sub))
        if name not in hints:
            known = ", ".join(f.name for f in fields(sub))
            raise ConfigError(f"unknown config key {key!r}; {section} has: {known}")
        by_section.setdefault(section, {})[name] = _coerce(key, raw, hints[name])
    new = replace(cfg, **{s: replace(getattr(cfg, s), **kv) for s, kv in by_section.items()})
    validate(new)
    return new


def parse_overrides(args: list[str]) -> dict[str, str]:
    """``["--model.size=64", "--train.steps", "10"]`` -> ``{"model.size": "64", ...}``."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(
                f"unrecognised argument {arg!r} (overrides look like --section.key=value)"
            )
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg} needs a value")
            key, value = arg[2:], args[i + 1]
            i += 1
        out[key] = value
        i += 1
    return out


def validate_model(m: ModelConfig, net: Literal["G", "D"] | None = None) -> None:
    """Reject model settings the networks cannot be built with or run at, naming the field.

    ``net``: ``"G"`` checks what :class:`~vosgan.models.Generator` needs, ``"D"`` what
    :class:`~vosgan.models.Discriminator` needs, ``None`` both (as :func:`validate` does).
    """
    hints = typing.get_type_hints(ModelConfig)
    for f in fields(m):
        hint = hints[f.name]
        value = getattr(m, f.name)
        if typing.get_origin(hint) is Literal and value not in typing.get_args(hint):
            raise ConfigError(
                f"model.{f.name} must be one of {list(typing.get_args(hint))}, got {value!r}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"model.{f.name} must be finite, got {value}")
    if m.size < 8 or m.size & (m.size - 1):
        raise ConfigError(f"model.size must be a power of two >= 8, got {m.size}")
    if m.seg_refine < 0:
        raise ConfigError(f"model.seg_refine must be >= 0 (0 = off), got {m.seg_refine}")
    if m.seg_refine_radius < 0 or m.seg_refine_radius % 2:
        raise ConfigError(
            "model.seg_refine_radius must be even and >= 0 (taps every 2 px), got "
            f"{m.seg_refine_radius}"
        )
    if net != "D":
        stages = m.up_stages
        # the 3D stream doubles T with H and W; the sprite stream draws every frame in 2D
        if m.fg_stream == "conv3d" and (m.frames % 2**stages or m.frames < 2**stages):
            raise ConfigError(
                f"model.frames must be a positive multiple of {2**stages} "
                f"(2**up_stages for model.size={m.size}, model.fg_stream=conv3d), got {m.frames}"
            )
        for name in ("z_content", "z_motion", "anchors", "gru_hidden", "g_channels"):
            if getattr(m, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(m, name)}")
        if m.anchors < 2:
            raise ConfigError(
                f"model.anchors must be >= 2 (a trajectory needs two points), got {m.anchors}"
            )
        if m.g_channels % 2 ** (stages - 1):
            raise ConfigError(
                f"model.g_channels must be divisible by {2 ** (stages - 1)}, got {m.g_channels}"
            )
    if net != "G":
        # D's 4 stride-2 stages halve T, H, W four times and its U-Net decoder doubles them back.
        if m.frames % 2**4 or m.frames < 2**4:
            raise ConfigError(
                f"model.frames must be a positive multiple of 16 (D has 4 stride-2 stages), "
                f"got {m.frames}"
            )
        if m.size < 2**4:
            raise ConfigError(f"model.size must be >= 16 (D has 4 stride-2 stages), got {m.size}")
        if m.d_channels < 1:
            raise ConfigError(f"model.d_channels must be >= 1, got {m.d_channels}")
        if m.flow_encoder == "separate" and m.flow_decoder != "separate":
            raise ConfigError(
                "model.flow_encoder=separate needs model.flow_decoder=separate (the flow's own "
                "encoder feeds its own decoder); with flow_decoder=shared set flow_encoder=shared"
            )


def validate(cfg: Config) -> None:
    """Reject values no run can use, naming the field."""
    d, t = cfg.data, cfg.train
    validate_model(cfg.model)
    for section, names in (
        ("data", ("train_clips", "val_clips", "batch_size")),
        (
            "train",
            (
                "steps",
                "log_every",
                "eval_every",
                "sample_every",
                "checkpoint_every",
                "eval_clips",
                "grad_accum",
            ),
        ),
        ("loss", ("r1_every",)),
    ):
        for name in names:
            if getattr(getattr(cfg, section), name) < 1:
                raise ConfigError(
                    f"{section}.{name} must be >= 1, got {getattr(getattr(cfg, section), name)}"
                )
    for name, seed in (("data.seed", d.seed), ("train.seed", t.seed)):
        # numpy's SeedSequence takes no negative seed; batch_indices seeds with seed * 1_000_003
        if not 0 <= seed < 2**32:
            raise ConfigError(f"{name} must be in [0, 2**32), got {seed}")
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {d.num_workers}")
    if d.stride < 1:
        raise ConfigError(f"data.stride must be >= 1, got {d.stride}")
    if d.fps < 0 or not math.isfinite(d.fps):
        raise ConfigError(f"data.fps must be >= 0 (0 = native frame rate), got {d.fps}")
    if d.split_list not in ("auto", "none", "1", "2", "3"):
        raise ConfigError(f"data.split_list must be auto, none, 1, 2 or 3, got {d.split_list!r}")
    if d.source != "synthetic" and not d.source.strip():
        raise ConfigError("data.source must be 'synthetic' or a dataset path, got ''")
    # Written "not (ok)" so that NaN, which fails every comparison, is rejected too.
    for name in ("lr_g", "lr_d"):
        if not (math.isfinite(lr := getattr(cfg.optim, name)) and lr > 0):
            raise ConfigError(f"optim.{name} must be finite and > 0, got {lr}")
    if not (math.isfinite(cfg.optim.lr_dense) and cfg.optim.lr_dense >= 0):
        raise ConfigError(
            f"optim.lr_dense must be finite and >= 0 (0 = lr_d), got {cfg.optim.lr_dense}"
        )
    if not 0 <= t.d_ema < 1:  # also rejects NaN
        raise ConfigError(f"train.d_ema must be in [0, 1) (0 = off), got {t.d_ema}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(cfg.optim, name) < 1:
            raise ConfigError(f"optim.{name} must be in [0, 1), got {getattr(cfg.optim, name)}")
    for f in fields(cfg.loss):
        value = getattr(cfg.loss, f.name)
        if isinstance(value, float) and not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"loss.{f.name} must be finite and >= 0, got {value}")
    if cfg.loss.motion_guide_radius < 0 or cfg.loss.motion_guide_radius % 2:
        raise ConfigError(
            "loss.motion_guide_radius must be even and >= 0 (taps every 2 px), got "
            f"{cfg.loss.motion_guide_radius}"
        )
    if cfg.loss.motion_span < 0:
        raise ConfigError(f"loss.motion_span must be >= 0, got {cfg.loss.motion_span}")
    if cfg.loss.motion_seg_start < 0:
        raise ConfigError(f"loss.motion_seg_start must be >= 0, got {cfg.loss.motion_seg_start}")
    if cfg.loss.charbonnier_eps <= 0:
        raise ConfigError(f"loss.charbonnier_eps must be > 0, got {cfg.loss.charbonnier_eps}")
    for section in SECTIONS:  # every other float field
        for f in fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section}.{f.name} must be finite, got {value}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device):
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {t.device!r}")
    if d.batch_size % t.grad_accum:
        raise ConfigError(
            f"data.batch_size ({d.batch_size}) must be divisible by train.grad_accum "
            f"({t.grad_accum})"
        )
    if d.batch_size // t.grad_accum < 2:
        raise ConfigError(
            f"data.batch_size / train.grad_accum ({d.batch_size} / {t.grad_accum}) must be >= 2: "
            "BatchNorm needs at least 2 clips per micro-batch"
        )
    if t.cuda_graph == "on" and t.compile:
        raise ConfigError("train.cuda_graph=on and train.compile exclude each other (choose one)")
    if t.cuda_graph == "on" and t.amp == "fp16":
        raise ConfigError(
            "train.cuda_graph=on needs train.amp bf16, auto or off: fp16's GradScaler reads its "
            "inf check on the host every step, which a CUDA graph cannot do"
        )
    if t.eval_clips > d.val_clips:
        raise ConfigError(
            f"train.eval_clips ({t.eval_clips}) must be <= data.val_clips ({d.val_clips})"
        )


#: Fields whose default changed what training does, with the value that reproduces configs
#: saved before they existed: resuming such a checkpoint must not switch them on mid-run.
BEFORE_FIELD: dict[str, Any] = {
    "loss.motion_seg": 0.0,
    "model.flow_encoder": "shared",
    "loss.motion_span": 0,
    "model.seg_refine": 0.0,  # evaluation, not training: an old run's numbers stay comparable
    "loss.motion_camera": "none",
    "train.d_ema": 0.0,  # an old run resumes as it trained, evaluating D's own weights
}


def changed_fields(a: Config, b: Config) -> dict[str, tuple[Any, Any]]:
    """Every field whose value differs between ``a`` and ``b``: ``{"loss.r1": (1.0, 0.5)}``."""
    da, db = a.to_dict(), b.to_dict()
    return {
        f"{s}.{k}": (v, db[s].get(k))
        for s in SECTIONS
        for k, v in da[s].items()
        if v != db[s].get(k)
    }


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a :class:`Config` from :meth:`Config.to_dict` output (e.g. a checkpoint); a
    field it lacks takes its :data:`BEFORE_FIELD` value, else the preset's default."""
    preset = data.get("preset", "cpu-small")
    base = PRESETS.get(preset, PRESETS["cpu-small"])
    flat = {f"{s}.{k}": v for s in SECTIONS for k, v in data.get(s, {}).items()}
    return replace(apply_overrides(base, {**BEFORE_FIELD, **flat}), preset=preset)


def load(preset: str = "cpu-small", overrides: dict[str, Any] | None = None) -> Config:
    """The preset ``preset`` with ``overrides`` applied and validated."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return apply_overrides(PRESETS[preset], overrides or {})

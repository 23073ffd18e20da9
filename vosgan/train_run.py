"""What a training run holds and how its models are built and wrapped (DDP, compile, sync BN).

Used by :mod:`vosgan.train`: :class:`Run` (models, optimisers, step; what a checkpoint saves),
:func:`build_run` (models with fused ops, synchronized BN and activation checkpointing as
configured) and :func:`wrap_models` (the DDP and ``torch.compile`` wrappers each phase calls).
"""

from __future__ import annotations

import argparse
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from vosgan import backend, checkpoint, cli, distributed
from vosgan.config import Config, ConfigError
from vosgan.distributed import DistEnv
from vosgan.ema import WeightAverage
from vosgan.losses import VosGanLoss
from vosgan.models import Discriminator, Generator
from vosgan.nn import fuse_modules
from vosgan.nn.checkpointing import checkpoint_blocks


def resolve_device(name: str) -> torch.device:
    """``train.device`` on this machine: ``"auto"`` -> CUDA when available, else CPU; ``cpu``,
    ``cuda`` or ``cuda:N``, checked to exist (:func:`vosgan.cli.device`)."""
    try:
        return cli.device(name)
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(f"train.device: {exc}") from None


def amp_dtype(policy: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``train.amp``: auto = bf16 on CUDA, off on CPU; fp16 needs CUDA."""
    if policy == "off" or (policy == "auto" and device.type != "cuda"):
        return None
    if policy in ("auto", "bf16"):
        return torch.bfloat16
    if device.type != "cuda":
        raise ConfigError("train.amp=fp16 needs a CUDA device (use bf16 or off on CPU)")
    return torch.float16


def configure_backends(device: torch.device) -> None:
    """The trainer's CUDA settings (process-wide): TF32 for float32 matmuls and convolutions, and
    cuDNN autotuning (the shapes of a run never change). No-op on CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


@dataclass
class Run:
    """Everything a training run holds; what a checkpoint saves and restores.

    ``G``/``D`` are the plain modules (saved, sampled, evaluated). The training phases call them
    through wrappers set by :func:`wrap_models`: ``g_train`` and ``d_train`` (DDP under torchrun,
    then ``torch.compile`` with ``train.compile``), ``d_r1`` (DDP, never compiled: R1 needs double
    backward) and ``d_frozen`` (the plain D, maybe compiled: the G step's pass through D, whose
    parameters take no gradient then and must not trigger DDP's reduction).
    ``d_ema`` is the moving average of D's weights (``train.d_ema``; None when off), which
    :attr:`d_eval` gives evaluation and samples.
    """

    cfg: Config
    device: torch.device
    G: Generator
    D: Discriminator
    loss: VosGanLoss
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    env: DistEnv = field(default_factory=DistEnv)
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    g_train: nn.Module | None = None
    d_train: nn.Module | None = None
    d_r1: nn.Module | None = None
    d_frozen: nn.Module | None = None
    idle_dense: bool = False  # under DDP, no loss reads D's dense heads (see wrap_models)
    channels_last: bool = False  # train.channels_last as resolved (step_options)
    cuda_graph: bool = False  # train.cuda_graph as resolved (step_options)
    d_ema: WeightAverage | None = None

    @property
    def d_eval(self) -> Discriminator:
        """The D that evaluation, samples and exports read: the average when kept, else D."""
        return self.D if self.d_ema is None else self.d_ema.module

    def state(self) -> dict[str, Any]:
        ema = {} if self.d_ema is None else {"D_ema": self.d_ema.state_dict()}
        return {
            "format": checkpoint.FORMAT,
            "config": self.cfg.to_dict(),
            "step": self.step,
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": checkpoint.rng_state(),
            "data_position": self.step,
            "history": self.history,
            **ema,
        }

    def load(self, ckpt: dict[str, Any]) -> None:
        diff = checkpoint.model_config_diff(checkpoint.checkpoint_config(ckpt), self.cfg)
        if diff:
            raise ValueError(
                f"checkpoint {ckpt['path']} was trained with a different model config: "
                + "; ".join(diff)
            )
        self.G.load_state_dict(ckpt["G"])
        self.D.load_state_dict(ckpt["D"])
        if self.d_ema is not None:
            if "D_ema" not in ckpt:
                say(self.env, f"train.d_ema: {ckpt['path']} has no average; it starts here")
            self.d_ema.load_state_dict(ckpt.get("D_ema", ckpt["D"]))
        for opt, key in ((self.opt_g, "opt_g"), (self.opt_d, "opt_d")):
            # this run's choices (--fused, train.cuda_graph), not the saved ones
            mine = [{k: g[k] for k in ("fused", "capturable")} for g in opt.param_groups]
            opt.load_state_dict(ckpt[key])
            for group, flags in zip(opt.param_groups, mine, strict=True):
                group.update(flags)
            match_state_layouts(opt)
        self.scaler.load_state_dict(ckpt["scaler"])
        checkpoint.set_rng_state(ckpt["rng"])
        if self.env.enabled and self.device.type == "cuda" and "cuda" in ckpt["rng"]:
            # Every rank's GPU generator runs in lockstep with rank 0's (cuda:0); restore that one.
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][0], self.device)
        self.step = ckpt["step"]
        self.history = ckpt.get("history", [])

    def latents(self) -> tuple[Tensor, Tensor]:
        """This rank's slice of the global batch's latents (every rank draws all of them)."""
        part = distributed.local_slice(self.cfg.data.batch_size, self.env)
        z_c, anchors = self.G.sample_latents(self.cfg.data.batch_size, self.device)
        return z_c[part], anchors[part]


def say(env: DistEnv, msg: str) -> None:
    if env.is_main:
        print(msg)


@dataclass(frozen=True)
class StepOptions:
    """``train.channels_last`` and ``train.cuda_graph`` (auto/on/off) as they apply to a run:
    ``why`` says, for each, what decided it."""

    channels_last: bool
    cuda_graph: bool
    why: dict[str, str]


def step_options(
    cfg: Config, device: torch.device, fused: bool, env: DistEnv = distributed.SINGLE
) -> StepOptions:
    """Resolve ``train.channels_last`` / ``train.cuda_graph``. ``auto`` turns each on with
    ``fused`` on CUDA (on an H100 the paper step took 43.8 ms fused, 40.4 ms also in
    channels_last_3d, 36.9 ms also replayed from CUDA graphs, against 56.4 ms for the reference:
    benchmarks/RESULTS.md); a CUDA graph also needs one process, no ``train.compile``, no fp16
    and no activation checkpointing (not tried under capture). ``on`` with a CPU device is refused
    (:class:`ConfigError`)."""
    t, cuda = cfg.train, device.type == "cuda"
    if t.cuda_graph == "on" and not cuda:
        raise ConfigError(f"train.cuda_graph needs a CUDA device (train.device is {device})")
    why = {}
    if t.channels_last != "auto":
        cl = t.channels_last == "on"
        why["channels_last"] = f"train.channels_last={t.channels_last}"
    else:
        cl = fused and cuda
        why["channels_last"] = (
            "auto: cuDNN's bf16 3D convolutions without layout conversions"
            if cl
            else "auto: "
            + ("not --fused" if not fused else f"{device.type} (it is for cuDNN's convolutions)")
        )
    if t.cuda_graph != "auto":
        graph = t.cuda_graph == "on"
        why["cuda_graph"] = f"train.cuda_graph={t.cuda_graph}"
    else:
        blockers = [
            reason
            for blocked, reason in (
                (not fused, "not --fused"),
                (not cuda, f"CUDA graphs need a GPU, this run is on {device.type}"),
                (env.enabled, "torchrun: DDP's gradient reductions are not captured"),
                (t.compile, "train.compile"),
                (t.amp == "fp16", "train.amp=fp16: its GradScaler reads the inf check on the host"),
                (t.checkpoint_activations, "train.checkpoint_activations: not tried in a graph"),
            )
            if blocked
        ]
        graph = not blockers
        why["cuda_graph"] = "auto: " + (
            "the step replayed from CUDA graphs, one launch" if graph else blockers[0]
        )
    return StepOptions(cl, graph, why)


def build_run(
    cfg: Config, device: torch.device, fused: bool, env: DistEnv = distributed.SINGLE
) -> Run:
    """Models, loss and optimisers on ``device``; with ``fused``, every fused op swapped in;
    ``train.channels_last`` and ``train.cuda_graph`` resolved by :func:`step_options`."""
    opts = step_options(cfg, device, fused, env)
    torch.manual_seed(cfg.train.seed)
    G, D = Generator(cfg.model).to(device), Discriminator(cfg.model).to(device)
    loss = VosGanLoss(cfg.loss, real_video=cfg.data.source != "synthetic").to(device)
    if cfg.train.sync_bn and env.enabled:
        # Before fusing: a block whose BN is synchronized is not fused (the fused BN kernel
        # computes per-rank statistics): those blocks keep the reference BatchNorm.
        n = distributed.convert_sync_batchnorm(G)[1] + distributed.convert_sync_batchnorm(D)[1]
        say(env, f"sync_bn: {n} BatchNorm layer(s) normalise over all {env.world_size} ranks")
    if fused:
        replaced = fuse_modules(G) + fuse_modules(D) + fuse_modules(loss)
        say(env, f"--fused: {len(replaced)} module(s) switched to fused implementations")
        for op in backend.OPS:
            choice = backend.choose(op, device)
            why = "" if choice.fused else f" ({choice.reason})"
            say(env, f"  {op:<16} {'fused: ' + choice.impl if choice.fused else 'reference'}{why}")
        for name in ("channels_last", "cuda_graph"):
            on = getattr(opts, name)
            say(env, f"  {name:<16} {'on' if on else 'off'} ({opts.why[name]})")
    if opts.channels_last:
        n = to_channels_last_3d(G) + to_channels_last_3d(D)
        say(env, f"channels_last: {n} 3D conv weight(s) in torch.channels_last_3d")
    if cfg.train.checkpoint_activations:
        flow = [
            b for name in ("flow_encoder", "flow_decoder") for b in getattr(D, name, None) or []
        ]
        n = checkpoint_blocks([*getattr(G, "foreground", []), *D.encoder, *D.decoder, *flow])
        say(env, f"checkpoint_activations: {n} block(s) recompute their activations in backward")
    o = cfg.optim
    # --fused also takes Adam's fused (single-kernel) step: both steps 9.1 -> 2.3 ms per training
    # step at cpu-small (2.19 M parameters, 1 thread, 2-core dev box). A CUDA graph needs Adam's
    # step counter on the GPU (capturable).
    adam = {"betas": (o.beta1, o.beta2), "fused": fused, "capturable": opts.cuda_graph}
    opt_g = torch.optim.Adam(G.parameters(), lr=o.lr_g, **adam)
    opt_d = torch.optim.Adam(d_param_groups(D, o.lr_dense), lr=o.lr_d, **adam)
    scaler = torch.amp.GradScaler(
        device.type, enabled=amp_dtype(cfg.train.amp, device) == torch.float16
    )
    return Run(
        cfg,
        device,
        G,
        D,
        loss,
        opt_g,
        opt_d,
        scaler,
        env,
        channels_last=opts.channels_last,
        cuda_graph=opts.cuda_graph,
        d_ema=WeightAverage(D, cfg.train.d_ema) if cfg.train.d_ema > 0 else None,
    )


def to_channels_last_3d(model: nn.Module) -> int:
    """Store every 5-D parameter of ``model`` (the 3D conv weights) in
    ``torch.channels_last_3d``, in place; returns how many were converted. Convolutions then
    produce channels-last outputs, which BatchNorm, the fused BN + activation and elementwise ops
    keep. (``Module.to(memory_format=torch.channels_last_3d)`` fails on the 4-D 2D-conv weights.)
    """
    n = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 5 and not p.is_contiguous(memory_format=torch.channels_last_3d):
                p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
                n += 1
    return n


def match_state_layouts(opt: torch.optim.Optimizer) -> None:
    """Give each optimiser state tensor its parameter's strides (a checkpoint saved with another
    ``train.channels_last``). Fused Adam steps parameters and states as flat buffers:
    with a channels-last parameter and contiguous states it updated the wrong elements (torch
    2.13, CPU: weights off by up to 0.16 after one step at lr 0.1; foreach Adam was right)."""
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in opt.state.get(p, {}).items():
                if isinstance(v, Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    opt.state[p][k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def d_param_groups(D: nn.Module, lr_dense: float) -> list[dict[str, Any]]:
    """D's parameters for its optimiser: one group, or with ``lr_dense > 0`` two, the encoder and
    real/fake head at the optimiser's rate and everything else (decoders, dense heads) at
    ``lr_dense``."""
    if lr_dense <= 0:
        return [{"params": list(D.parameters())}]
    trunk = ("encoder.", "real_fake.")
    return [
        {"params": [p for n, p in D.named_parameters() if n.startswith(trunk)]},
        {"params": [p for n, p in D.named_parameters() if not n.startswith(trunk)], "lr": lr_dense},
    ]


def wrap_models(run: Run) -> None:
    """Set the phase wrappers of :class:`Run` (after any checkpoint is loaded into G and D)."""
    g_ddp: nn.Module = run.G
    d_ddp: nn.Module = run.D
    if run.env.enabled:
        # broadcast_buffers=False: BN's running statistics play no part in training-mode forwards,
        # and rank 0's (the ones saved and evaluated) evolve the same with or without the
        # broadcast, which would cost a collective per forward (3-4 per step per model).
        # find_unused_parameters stays off: the G step uses every G parameter, and the D step
        # every D parameter (its R1 pass joins the same backward). If no loss reads D's dense
        # heads, train_step adds them to the loss times 0 (idle_dense): DDP's unused-parameter
        # search cannot be used here, as it marks parameters ready once per forward and the
        # D step runs 2-3 forwards before its backward.
        ids = [run.device.index] if run.device.type == "cuda" else None
        kw: dict[str, Any] = {"device_ids": ids}
        # torch >= 2.13 renamed the switch (it still syncs the buffers once at construction).
        new_name = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        kw["forward_sync_buffers" if new_name else "broadcast_buffers"] = False
        c = run.cfg.loss
        run.idle_dense = not (c.segmentation > 0 or c.flow > 0 or c.flow_smoothness > 0)
        g_ddp = DistributedDataParallel(run.G, **kw)
        d_ddp = DistributedDataParallel(run.D, **kw)
    run.d_r1 = d_ddp
    if run.cfg.train.compile:
        if run.device.type == "cpu":
            say(
                run.env,
                "--compile on CPU: measured 0.96x eager at cpu-small after a 116 s "
                "warm-up (2-core dev box, under load); it is meant for GPUs",
            )
        run.g_train, run.d_train = torch.compile(g_ddp), torch.compile(d_ddp)
        run.d_frozen = torch.compile(run.D) if run.env.enabled else run.d_train
    else:
        run.g_train, run.d_train, run.d_frozen = g_ddp, d_ddp, run.D

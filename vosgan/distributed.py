"""Multi-process training under ``torchrun``: process group, per-rank slices, synchronized BN.

``torchrun --nproc_per_node N -m vosgan.train ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`env_from_environ` reads them and :func:`init` starts
the process group (NCCL on CUDA, gloo on CPU). Every rank computes the same global batch of step
``s`` (indices and latents) and takes its contiguous slice :func:`local_slice`, so N processes see
exactly the data one process would.

:class:`SyncBatchNorm` normalises with the statistics of the *global* batch. It is written with
differentiable all-reduces (two passes: mean, then centred second moment), so it runs on CPU
(gloo) and CUDA (NCCL) alike and supports double backward (R1); ``torch.nn.SyncBatchNorm`` is
GPU-only and its backward is not differentiable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vosgan.config import ConfigError

#: torchrun's variables; all of them must be present for a distributed run.
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job (``world_size == 1``: an ordinary single-process run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, writes samples and checkpoints, and evaluates."""
        return self.rank == 0


SINGLE = DistEnv()  #: a single-process run


def env_from_environ(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read torchrun's variables; a plain ``python -m`` run (none of them set) is single-process."""
    environ = os.environ if environ is None else environ
    present = [k for k in TORCHRUN_VARS if k in environ]
    if not present:
        return DistEnv()
    missing = [k for k in TORCHRUN_VARS if k not in environ]
    if missing:
        raise ConfigError(
            f"distributed launch: {', '.join(present)} set but {', '.join(missing)} missing; "
            "launch with torchrun --nproc_per_node N -m vosgan.train ..."
        )
    try:
        rank, world, local = (int(environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise ConfigError(
            "distributed launch: RANK, WORLD_SIZE and LOCAL_RANK must be integers, got "
            f"{environ['RANK']!r}, {environ['WORLD_SIZE']!r}, {environ['LOCAL_RANK']!r}"
        ) from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(
            f"distributed launch: bad RANK={rank} / WORLD_SIZE={world} / LOCAL_RANK={local}"
        )
    return DistEnv(rank, world, local)


def rank_device(env: DistEnv, device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for CUDA runs (one GPU per process)."""
    if not env.enabled or device.type != "cuda":
        return device
    if device.index not in (None, env.local_rank):
        raise ConfigError(
            f"train.device={device} under torchrun: each rank uses cuda:LOCAL_RANK; "
            "use train.device=cuda or auto (restrict GPUs with CUDA_VISIBLE_DEVICES)"
        )
    if env.local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"LOCAL_RANK={env.local_rank} but only {torch.cuda.device_count()} "
            "CUDA device(s) are visible"
        )
    torch.cuda.set_device(env.local_rank)
    return torch.device("cuda", env.local_rank)


_control_group: dist.ProcessGroup | None = None


def init(env: DistEnv, device: torch.device) -> None:
    """Join the process group (blocks until every rank has arrived).

    With NCCL, a second (gloo) group carries the per-step control flag of :func:`any_rank`, so
    reading it never waits for the GPU.
    """
    global _control_group
    if env.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # Rank 0 evaluates and writes samples while the others wait in their next collective:
        # allow that for 30 minutes (NCCL's default is 10).
        dist.init_process_group(
            backend, rank=env.rank, world_size=env.world_size, timeout=timedelta(minutes=30)
        )
        _control_group = dist.new_group(backend="gloo") if backend == "nccl" else None


def teardown(env: DistEnv) -> None:
    """Wait for every rank, then leave the process group (no-op when single-process)."""
    if env.enabled and dist.is_initialized():
        dist.barrier(group=_control_group)
        abort(env)


def abort(env: DistEnv) -> None:
    """Leave the process group without waiting for the other ranks (after an error here)."""
    global _control_group
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()
        _control_group = None


def local_slice(global_batch: int, env: DistEnv) -> slice:
    """This rank's contiguous share of a global batch (the batch must divide evenly)."""
    if global_batch % env.world_size:
        raise ConfigError(
            f"data.batch_size={global_batch} must be divisible by the number of processes "
            f"({env.world_size})"
        )
    n = global_batch // env.world_size
    return slice(env.rank * n, (env.rank + 1) * n)


def mean_over_ranks(x: Tensor) -> Tensor:
    """The element-wise mean of ``x`` over all ranks (``x`` itself when single-process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (e.g. a Ctrl-C seen by one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control_group)
    return bool(t.item())


class _AllReduceSum(torch.autograd.Function):
    """Differentiable (any order) sum over ranks: the backward of a sum-all-reduce is one too."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001 - torch's ctx
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        return _AllReduceSum.apply(grad)


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of all ranks; same parameters, buffers and ``state_dict``.

    ``x (B, C, ...)`` with ``B`` the rank's share. Training mode under an initialised process group:
    ``mean = sum_ranks sum(x) / N``, ``var = sum_ranks sum((x - mean)^2) / N`` (biased, two
    all-reduces of ``C`` (+1) floats), running statistics updated as ``nn.BatchNorm`` does (unbiased
    variance). Otherwise it is exactly ``F.batch_norm``. Statistics in fp32; output in ``x.dtype``.
    Gradients: DDP averages the parameter gradients over ranks and the all-reduces route the
    statistics' gradients to every rank, so the result is the single-process gradient.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm: input must be (B, C, ...), got {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        sync = (
            self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        )
        if not sync:
            return super().forward(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = (1, c) + (1,) * (x.dim() - 2)
        xf = x.float()
        count = xf.new_full((1,), float(x.numel() // c))
        sums = _AllReduceSum.apply(torch.cat([xf.sum(dims), count]))
        n = sums[c].detach()
        mean = sums[:c] / n
        centred = xf - mean.view(shape)
        var = _AllReduceSum.apply(centred.square().sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                unbiased = var.detach() * (n / (n - 1).clamp_min(1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> tuple[nn.Module, int]:
    """Replace every ``nn.BatchNorm1d/2d/3d`` in ``module`` with :class:`SyncBatchNorm` sharing
    its parameters and buffers (``state_dict`` unchanged). Returns ``(module, count)``."""
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        new = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new, 1
    count = 0
    for name, child in module.named_children():
        new, n = convert_sync_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
        count += n
    return module, count

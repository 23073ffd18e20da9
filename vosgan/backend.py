"""Which implementation each op runs: decided once, overridable, observable.

``python -m vosgan.backend [DEVICE]`` prints the whole report. Overrides (environment variables):

- ``VOSGAN_IMPL=reference`` forces the plain PyTorch reference for every op;
- ``VOSGAN_IMPL_<OP>=reference|<impl>`` (e.g. ``VOSGAN_IMPL_GRU=reference``) for one op.

Every ``vosgan.ops.<op>`` module exposes ``fused_impl(device) -> (name | None, reason)``: the
fused implementation that ``impl="auto"`` picks on that device, or ``None`` and the reason why the
reference runs. A fallback warns once, with that reason, through :func:`warn_once`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import warnings
from dataclasses import dataclass
from functools import cache

import torch

from vosgan import cli

#: op name -> the ``vosgan.ops`` module implementing it.
OPS: dict[str, str] = {
    "composite": "vosgan.ops.composite",
    "flow_warp_loss": "vosgan.ops.flow_warp",
    "conv3d_block": "vosgan.ops.conv3d_block",
    "gru": "vosgan.ops.gru",
}

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Emit ``message`` as a ``UserWarning`` the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


@dataclass(frozen=True)
class OpChoice:
    """The implementation an op runs on one device, and why."""

    op: str
    impl: str  # "reference" or the fused implementation's name ("triton", "numba", "cpp", ...)
    reason: str

    @property
    def fused(self) -> bool:
        return self.impl != "reference"


def forced_impl(op: str) -> str | None:
    """The implementation forced for ``op`` by environment variable, or ``None``."""
    return os.environ.get(f"VOSGAN_IMPL_{op.upper()}") or os.environ.get("VOSGAN_IMPL") or None


def choose(op: str, device: torch.device | str) -> OpChoice:
    """Decide which implementation ``op`` runs on ``device`` (cached per op and device type)."""
    return _choose(op, torch.device(device).type)


def forget_choices() -> None:
    """Decide every op's implementation again at its next call (e.g. in a forked child whose
    fused kernels cannot run)."""
    _choose.cache_clear()


@cache
def _choose(op: str, device_type: str) -> OpChoice:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known ops: {sorted(OPS)}")
    forced = forced_impl(op)
    if forced == "reference":
        return OpChoice(op, "reference", "forced by environment variable")
    module = importlib.import_module(OPS[op])
    name, reason = module.fused_impl(torch.device(device_type))
    if forced is not None and forced != name:
        raise RuntimeError(
            f"VOSGAN_IMPL{'_' + op.upper() if os.environ.get(f'VOSGAN_IMPL_{op.upper()}') else ''}"
            f"={forced!r} asks for an implementation of {op!r} that is not available on "
            f"{device_type}: {reason}"
        )
    if name is None:
        return OpChoice(op, "reference", reason)
    return OpChoice(op, name, reason)


def check_triton_device(op: str, device: torch.device) -> None:
    """Raise ``ValueError`` naming ``op`` unless Triton can read ``device``'s memory: CUDA
    tensors, or CPU tensors under the interpreter (``TRITON_INTERPRET=1``)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"{op}: impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), "
            f"got {device.type}"
        )


def cuda_name(device: torch.device | str | None = None) -> str:
    """The name of CUDA device ``device`` (``cuda:N``: device N, not the current one), of the
    current CUDA device for ``None``, ``"cuda"`` or a CPU device; ``"no CUDA device"`` without
    one."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    dev = torch.device(device) if device is not None else None
    return torch.cuda.get_device_name(dev if dev is not None and dev.type == "cuda" else None)


def triton_mode(device: torch.device | str | None = None) -> tuple[str, str]:
    """Triton's state: ("gpu" | "interpreter" | "absent", detail); the detail names the GPU
    ``device`` (:func:`cuda_name`)."""
    try:
        import triton
    except ImportError as exc:  # reported, never swallowed
        return "absent", f"import failed: {exc}"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "interpreter", f"triton {triton.__version__}, TRITON_INTERPRET=1 (CPU tensors)"
    if torch.cuda.is_available():
        return "gpu", f"triton {triton.__version__} on {cuda_name(device)}"
    return "absent", f"triton {triton.__version__} installed, but no CUDA device"


def _probe(module: str, attr: str = "__version__") -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - the report must show any import failure
        return f"not available ({type(exc).__name__}: {exc})"
    return f"available ({getattr(mod, attr, 'unknown version')})"


def extension_status() -> tuple[bool, str]:
    """Whether the C++ extension ``vosgan._C`` loads, and why not."""
    try:
        importlib.import_module("vosgan._C")
    except ImportError as exc:
        return False, f"vosgan._C not importable ({exc}); reinstall with a C++ compiler"
    return True, "vosgan._C loaded"


def report(device: torch.device | str | None = None) -> str:
    """A multi-line report of the platform and of every op's implementation on ``device``."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lines = [
        f"python   {sys.version.split()[0]} on {platform.machine()}, {os.cpu_count()} CPUs",
        f"torch    {torch.__version__}; {cuda_name(dev)}; device for this report: {dev}",
        f"triton   {': '.join(triton_mode(dev))}",
        f"C++ ext  {extension_status()[1]}",
        f"numba    {_probe('numba')}",
        f"DALI     {_probe('nvidia.dali')}",
        f"cupy     {_probe('cupy')}",
        f"PyAV     {_probe('av')}",
        "ops:",
    ]
    for op in OPS:
        c = choose(op, dev)
        lines.append(f"  {op:<16} {c.impl:<10} {c.reason}")
    from vosgan import config  # here: vosgan.train_run imports this module
    from vosgan.train_run import step_options

    opts = step_options(config.load(), dev, fused=True)
    lines.append("training step with --fused (default config, one process):")
    for name in ("channels_last", "cuda_graph"):
        lines.append(f"  {name:<16} {'on' if getattr(opts, name) else 'off':<10} {opts.why[name]}")
    lines.append(
        "GPU kernel choices in effect (environment variables; README, 'Running on a GPU'):"
    )
    lines += [f"  {name:<25} {value}" for name, value in _gpu_knobs()]
    return "\n".join(lines)


def _gpu_knobs() -> list[tuple[str, str]]:
    """The process's kernel layout and form choices that environment variables set, as the
    modules read them (so a benchmark row can say what ran)."""
    knobs = []
    for var, module, attr in (
        ("VOSGAN_FLOW_WARP_DX", "vosgan.kernels.flow_warp", "DX_MODE"),
        ("VOSGAN_COMPOSITE_T_SPLIT", "vosgan.kernels.composite", "T_SPLIT"),
        ("VOSGAN_CUDA_CONV", "vosgan.ops.conv3d_forms", "CUDA_FORMS"),
    ):
        try:
            value = getattr(importlib.import_module(module), attr)
        except ImportError as exc:  # no Triton: the kernels do not load
            value = f"not available ({exc})"
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        knobs.append((var, str(value)))
    return knobs


def main(argv: list[str] | None = None) -> int:
    """Print :func:`report` for the device given on the command line."""
    p = argparse.ArgumentParser(
        prog="python -m vosgan.backend",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "device",
        nargs="?",
        type=cli.device,
        default="auto",
        help="the device to report on: auto (default: CUDA when available, else CPU), cpu, "
        "cuda or cuda:N",
    )
    print(report(p.parse_args(argv).device))
    return 0


if __name__ == "__main__":
    sys.exit(main())

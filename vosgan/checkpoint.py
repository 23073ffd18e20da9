"""Full-state checkpoints, written atomically, and the RNG state that makes resume exact."""

from __future__ import annotations

import glob
import hashlib
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vosgan import cli
from vosgan import config as config_mod
from vosgan.config import Config, ConfigError

FORMAT = "vosgan-checkpoint-v1"
LAST = "last.pt"


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``
    (:func:`vosgan.cli.write_atomic`).

    A crash or Ctrl-C at any moment leaves either the old file or the new one, never half of one.
    """
    cli.write_atomic(path, lambda fh: torch.save(obj, fh))


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop draws from."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """Load a vosgan checkpoint file (or a run folder's latest), with errors that name the file.

    ``mmap=True`` maps the tensors instead of reading them (for a look at the config).
    """
    path = Path(path)
    if path.is_dir():
        found = latest_in(path)
        if found is None:
            raise FileNotFoundError(
                f"no checkpoint in run folder {path} (expected {path}/checkpoints/{LAST})"
            )
        path = found
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not readable"
        raise ValueError(
            f"checkpoint {path} is not readable ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a vosgan checkpoint (no '{FORMAT}' marker)")
    ckpt["path"] = str(path)
    return ckpt


def checkpoint_config(ckpt: dict[str, Any]) -> Config:
    """The resolved config a checkpoint was trained with."""
    try:
        return config_mod.from_dict(ckpt["config"])
    except ConfigError as exc:
        raise ValueError(f"checkpoint {ckpt.get('path')} holds an invalid config: {exc}") from exc


#: Fields a resumed run may set differently from its checkpoint: how long, how often it logs,
#: where the data lives and how it is read, and how the step runs (device, precision, memory and
#: speed switches). Anything else (the model, losses, optimiser, the data's sampling, seeds)
#: defines the run: changing it mid-run would leave a config.json that does not say what trained.
RESUMABLE = frozenset(
    {
        *(f"train.{k}" for k in ("steps", "log_every", "eval_every", "sample_every")),
        *(f"train.{k}" for k in ("checkpoint_every", "eval_clips", "device", "amp", "compile")),
        *(f"train.{k}" for k in ("channels_last", "cuda_graph", "checkpoint_activations")),
        *(f"train.{k}" for k in ("grad_accum", "sync_bn")),
        *(f"data.{k}" for k in ("source", "num_workers", "cache", "decoder")),
    }
)


def resume_config(path: str | os.PathLike, overrides: dict[str, Any]) -> Config:
    """The config a run resumed from checkpoint ``path`` continues with: the checkpoint's own,
    with ``overrides`` applied to :data:`RESUMABLE` fields; any other changed field is refused,
    naming it (``"loss.r1: 1.0 != 0.5"``)."""
    saved = checkpoint_config(load_checkpoint(path, mmap=True))
    cfg = config_mod.apply_overrides(saved, overrides)
    changed = config_mod.changed_fields(saved, cfg)
    fixed = [f"{k}: {a!r} != {b!r}" for k, (a, b) in changed.items() if k not in RESUMABLE]
    if fixed:
        raise ConfigError(
            f"resuming {path} continues its run with the config it was trained with; these "
            "fields define the run and cannot change mid-run: " + "; ".join(fixed) + " (a resume "
            "may change train.steps, the intervals, where and how the data is read, and the "
            "device, precision and speed switches: RESUMABLE in vosgan/checkpoint.py)"
        )
    return cfg


def latest_in(run_dir: str | os.PathLike) -> Path | None:
    """``<run_dir>/checkpoints/last.pt`` if it exists."""
    path = Path(run_dir) / "checkpoints" / LAST
    return path if path.exists() else None


def find_resume(resume: str, out: str | None, preset: str, runs_root: str = "runs") -> Path | None:
    """Resolve ``--resume``: a checkpoint file, a run folder, or ``auto``.

    ``auto`` continues ``out`` when given (starting fresh if it holds no checkpoint yet), else the
    most recently modified ``runs/<preset>-*`` folder with a checkpoint (fresh if none).
    """
    if resume != "auto":
        path = Path(resume)
        if path.is_dir():
            found = latest_in(path)
            if found is None:
                raise FileNotFoundError(f"--resume {resume}: no checkpoint in {path}/checkpoints/")
            return found
        if not path.exists():
            raise FileNotFoundError(f"--resume {resume}: no such file or folder")
        return path
    if out is not None:
        return latest_in(out)
    candidates = [latest_in(d) for d in glob.glob(os.path.join(runs_root, f"{preset}-*"))]
    candidates = [c for c in candidates if c is not None]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def model_config_diff(a: Config, b: Config) -> list[str]:
    """Model fields whose values differ between two configs: ``["size: 32 != 64", ...]``."""
    changed = config_mod.changed_fields(a, b)
    return [f"{k}: {x!r} != {y!r}" for k, (x, y) in changed.items() if k.startswith("model.")]


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file (read in 1 MiB chunks): checkpoints and extractors in protocols."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

"""Argument types shared by the command-line tools.

Each is an ``argparse`` ``type=``: a bad value raises :class:`argparse.ArgumentTypeError`, which
argparse reports as ``error: argument --flag: <message>`` with exit status 2, so every message
names the flag. Paths are checked before any work starts, so a tool never computes for minutes
and then fails on where to write.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch


def device(value: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` on this machine."""
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a device: expected auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{value!r}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{value!r}: this machine has no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return dev


def add_device(parser: argparse.ArgumentParser) -> None:
    """Add the ``--device`` flag every tool shares (:func:`device`, default ``auto``)."""
    parser.add_argument(
        "--device",
        type=device,
        default="auto",
        help="auto (default: CUDA when available, else CPU), cpu, cuda or cuda:N",
    )


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer ``>= low``."""

    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {n}")
        return n

    return parse


def finite_float(low: float = -math.inf, strict: bool = False) -> Callable[[str], float]:
    """A finite float ``>= low`` (``> low`` with ``strict``)."""

    def parse(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
        if not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {value!r}")
        if x < low or (strict and x == low):
            raise argparse.ArgumentTypeError(
                f"must be {'>' if strict else '>='} {low:g}, got {x:g}"
            )
        return x

    return parse


def _writable_from(path: Path, parent: Path) -> None:
    """Raise (naming ``path``) unless ``parent`` or its nearest existing ancestor is a folder we
    can create files in."""
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: {parent} is a file, not a folder")
    try:  # the only reliable test (root passes os.access; /proc and read-only mounts do not)
        tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OSError as exc:
        raise argparse.ArgumentTypeError(
            f"{path}: cannot create files under {parent} ({exc.strerror})"
        ) from None


def out_dir(value: str) -> Path:
    """An output folder: may exist (as a folder) or not yet; its place must be writable."""
    if not value.strip():
        raise argparse.ArgumentTypeError("empty path")
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file, expected a folder")
    _writable_from(path, path)
    return path


def out_file(*suffixes: str) -> Callable[[str], Path]:
    """An output file ending in one of ``suffixes`` (any, if none given): not a folder, in a
    place where it can be written."""

    def parse(value: str) -> Path:
        if not value.strip():
            raise argparse.ArgumentTypeError("empty path")
        path = Path(value)
        if suffixes and path.suffix not in suffixes:
            raise argparse.ArgumentTypeError(
                f"must end in {', '.join(suffixes)}, got {path.name!r}"
            )
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{path} is a folder, expected a file")
        _writable_from(path, path.parent)
        return path

    return parse


def add_json(parser: argparse.ArgumentParser, what: str) -> None:
    """Add the ``--json FILE`` flag of the tools that print a result: ``what`` names it."""
    parser.add_argument(
        "--json",
        type=out_file(".json"),
        default=None,
        help=f"also write {what} to this .json file (its folder is created)",
    )


def write_atomic(
    path: str | os.PathLike, data: str | bytes | Callable[[BinaryIO], None], fsync: bool = True
) -> Path:
    """Write ``path`` whole or not at all, creating its folder; returns it as a ``Path``.

    ``data`` is text (written as UTF-8), bytes, or a callable that writes the file's content to
    the binary file object it is given (``lambda fh: np.savez(fh, ...)``, ``torch.save``). It
    goes to a temporary file in the same folder, flushed to disk, then renamed over ``path``
    (``os.replace``): a crash, Ctrl-C or a failing writer leaves the old file (or none), never
    half of one, and the temporary file is removed. ``fsync=False`` skips the flush to disk (for
    many small files, e.g. one mask per frame: still never half a file after Ctrl-C or an
    exception, though a power loss may lose the newest).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for everyone to read
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-Inf) replaced by ``None`` (JSON ``null``),
    through nested dicts, lists and tuples: standard JSON has no NaN (``json.dumps`` would
    write the non-standard ``NaN`` token that strict parsers reject)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: Path | None, obj: Any) -> None:
    """Write ``obj`` as indented, standard JSON to ``path`` (a ``--json`` value) atomically
    (:func:`write_atomic`), creating its folder; non-finite floats become ``null``
    (:func:`json_safe`). Nothing when ``path`` is None."""
    if path is not None:
        write_atomic(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")

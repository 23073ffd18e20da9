"""Test configuration: Triton runs in interpreter mode on machines without a GPU."""

import os
import threading
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    # Must happen before any kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

# ../shared/data beside the checkout; VOSGAN_SHARED_DATA names another copy (a GPU lease carries
# one: benchmarks/gpu_session.sh)
SHARED_DATA = os.environ.get("VOSGAN_SHARED_DATA") or os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data"
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory: pytest.TempPathFactory):
    """A cpu-small checkpoint after 2 training steps (batch 2) on the synthetic data (read-only:
    tests that change a checkpoint make their own)."""
    from vosgan import train

    out = tmp_path_factory.mktemp("ckpt") / "run"
    assert (
        train.main(
            [
                "--out",
                str(out),
                "--train.steps=2",
                "--train.device=cpu",
                "--data.batch_size=2",
                "--data.train_clips=4",
                "--data.val_clips=2",
                "--train.eval_clips=2",
            ]
        )
        == 0
    )
    return out / "checkpoints" / "last.pt"


class HolderLock:
    """Stand-in for the numba launcher's ``LAUNCH_LOCK``: a real lock that records which thread
    holds it, so a test can check that every launch ran under the lock of its own thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.holder: int | None = None

    def __enter__(self) -> None:
        self._lock.acquire()
        self.holder = threading.get_ident()

    def __exit__(self, *exc: object) -> None:
        self.holder = None
        self._lock.release()


def usage_error(main, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """``main(argv)`` stops in argparse with exit status 2 (a usage error); its stderr."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def watch_launches(monkeypatch: pytest.MonkeyPatch, module: Any, kernel: str) -> list:
    """Swap the numba launch lock for a :class:`HolderLock` and wrap ``module.kernel``; returns
    the list that gets ``(size of the kernel's first argument, lock held by this thread)`` per
    launch."""
    from vosgan.ops._numba import launch

    lock, seen, original = HolderLock(), [], getattr(module, kernel)

    def spy(*args: Any) -> Any:
        seen.append((args[0].size, lock.holder == threading.get_ident()))
        return original(*args)

    monkeypatch.setattr(launch, "LAUNCH_LOCK", lock)
    monkeypatch.setattr(module, kernel, spy)
    return seen


@pytest.fixture
def no_tf32():
    """fp32 convolutions and matmuls in full precision on CUDA (TF32 off), restored after."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def tiny_config(**overrides):
    """The cpu-small preset shrunk to 16x16x16 clips and a few channels (R1 every 2nd step),
    for tests that train a few steps."""
    from vosgan import config  # after TRITON_INTERPRET is set above

    return config.load(
        "cpu-small",
        {
            "model.size": 16,
            "model.frames": 16,
            "model.g_channels": 16,
            "model.d_channels": 4,
            "model.gru_hidden": 16,
            "loss.r1": 1.0,
            "loss.r1_every": 2,
            **overrides,
        },
    )


def far_view(shape: tuple[int, ...], strides: tuple[int, ...], device: str) -> torch.Tensor:
    """A float16 view of ``shape`` whose ``strides`` reach past 2**31 elements, filled with
    randn: only its own elements are written, so the rest of the (4+ GiB) storage stays
    untouched virtual memory. Tests of the kernels' 64-bit offsets use it."""
    extent = 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
    try:
        storage = torch.empty(extent, dtype=torch.float16, device=device)
    except (RuntimeError, MemoryError) as exc:
        pytest.skip(f"cannot reserve {2 * extent / 2**30:.1f} GiB: {exc}")
    view = storage.as_strided(shape, strides)
    view.copy_(torch.randn(shape, device=device))
    return view

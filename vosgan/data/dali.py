"""DALI decoding backends: ``fn.decoders.video`` on the CPU (VP9/VP8/MJPEG) and on the GPU (NVDEC).

The clip contract, error types and backend choice are in :mod:`vosgan.data.decode`; this module
is imported only when a DALI backend is used. Why the decoder operator and not
``fn.readers.video``: the dataset picks the frames of every clip (a pure function of the clip
index, so training resumes exactly), and the decoder takes those indices per sample, while a
reader would iterate over sequences of its own choosing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vosgan.data.decode import (
    DALI_CPU_CODECS,
    DALI_GPU_CODECS,
    Decoder,
    ShortVideoError,
    VideoError,
    VideoInfo,
    _check_indices,
    dali_status,
    probe,
    upright,
)

#: pipelines built before a fork, in the forked process: destroying one there hangs (its threads
#: stayed in the parent; DALI 2.4, tested), so they are kept here, never used or freed
_INHERITED: list[Any] = []


class DaliDecoder(Decoder):
    """DALI ``fn.decoders.video`` on ``device`` ``"cpu"`` or ``"gpu"`` (mixed: NVDEC).

    Encoded file bytes and per-sample frame indices are fed through ``fn.external_source``;
    one pipeline per process (built lazily, and again in a forked loader worker; a pickled
    decoder leaves it behind) decodes up to ``max_batch`` files per run. DALI ignores the display
    matrix (DALI 2.4's CPU decoder, tested): frames are turned upright here, as PyAV's are.

    Args:
        device: ``"cpu"`` (VP9/VP8/MJPEG only) or ``"gpu"``.
        max_batch: most files per pipeline run; num_threads: DALI CPU threads.
    """

    def __init__(self, device: str = "cpu", max_batch: int = 8, num_threads: int = 2) -> None:
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        if max_batch < 1 or num_threads < 1:
            raise ValueError(
                f"max_batch and num_threads must be >= 1, got {max_batch}, {num_threads}"
            )
        ok, why = dali_status(device)
        if not ok:
            raise RuntimeError(f"DALI {device} decoding unavailable: {why}")
        self.device, self.max_batch, self.num_threads = device, max_batch, num_threads
        self.name = f"dali-{device}"
        self._pipe: Any = None
        self._pipe_pid = 0  # the process _pipe was built in
        self._info: dict[str, VideoInfo] = {}  # probed once per file

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers started by spawn/forkserver
        return {**self.__dict__, "_pipe": None, "_pipe_pid": 0}

    def _pipeline(self) -> Any:
        """This process's pipeline: built on first use, and again after a fork."""
        if self._pipe is not None and self._pipe_pid != os.getpid():
            _INHERITED.append(self._pipe)  # the parent's pipeline would hang a forked worker
            self._pipe = None
        if self._pipe is None:
            ok, why = dali_status(self.device)
            if not ok:
                raise RuntimeError(f"DALI {self.device} decoding unavailable: {why}")
            self._pipe, self._pipe_pid = self._build(), os.getpid()
        return self._pipe

    def _build(self) -> Any:
        from nvidia.dali import fn, pipeline_def, types

        video_op = getattr(fn.decoders, "video", None) or fn.experimental.decoders.video
        if self.device == "gpu":
            import torch

            device_id, op_device = torch.cuda.current_device(), "mixed"
        else:
            device_id, op_device = None, "cpu"

        @pipeline_def(
            batch_size=self.max_batch,
            num_threads=self.num_threads,
            device_id=device_id,
            prefetch_queue_depth=1,
            exec_dynamic=True,
        )
        def pipe() -> Any:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            return video_op(encoded, frames=frames, device=op_device)

        p = pipe()
        p.build()
        return p

    def read_many(
        self, requests: Sequence[tuple[str | Path, Sequence[int]]], size: int | None = None
    ) -> list[np.ndarray]:
        """Frames at the stored resolution whatever ``size`` says (see :class:`Decoder`)."""
        out: list[np.ndarray] = []
        for k in range(0, len(requests), self.max_batch):
            out.extend(self._run(requests[k : k + self.max_batch]))
        return out

    def _run(self, requests: Sequence[tuple[str | Path, Sequence[int]]]) -> list[np.ndarray]:
        encoded, frames, infos = [], [], []
        for path, indices in requests:
            if str(path) not in self._info:  # probe rejects missing/empty/unreadable files
                self._info[str(path)] = probe(path)
            info = self._info[str(path)]
            idx = _check_indices(indices)
            if max(idx) >= info.frames:
                raise ShortVideoError(path, info.frames, max(idx))
            allowed = DALI_GPU_CODECS if self.device == "gpu" else DALI_CPU_CODECS
            if info.codec not in allowed:
                raise VideoError(
                    path,
                    f"codec {info.codec} is not supported by {self.name} "
                    f"(supported: {sorted(allowed)})",
                )
            encoded.append(np.fromfile(path, np.uint8))
            frames.append(np.asarray(idx, np.int32))
            infos.append(info)
        pipe = self._pipeline()
        pipe.feed_input("encoded", encoded)
        pipe.feed_input("frames", frames)
        try:
            (video,) = pipe.run()
        except RuntimeError as exc:
            self._pipe = None  # a failed DALI pipeline cannot be reused
            names = ", ".join(str(p) for p, _ in requests)
            raise VideoError(names, f"DALI decoding failed ({exc})") from None
        if self.device == "gpu":
            video = video.as_cpu()
        result = []
        for k, (path, _) in enumerate(requests):
            clip = np.asarray(video[k])
            if clip.shape[1:] != (*infos[k].stored_size, 3):
                raise VideoError(path, f"DALI returned frames of shape {clip.shape[1:]}")
            result.append(upright(clip, infos[k].rotation))
        return result

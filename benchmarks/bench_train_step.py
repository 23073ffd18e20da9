"""Full training step (one D update + one G update): reference path vs ``--fused``.

Presets: ``cpu-small`` at its default batch (8) and ``paper``; on CPU the paper preset runs at
batch 2 (a batch-32 step takes minutes on 2 cores), on a GPU at its full batch (32) under bf16
autocast.

Phase: the benchmark holds ``run.step`` (the trainer advances it, the benchmark does not), so one
kind of step is timed throughout. Most cases time step 0's: no motion-seg loss (it starts at
``loss.motion_seg_start``, 1000 in both presets) and no R1 (``loss.r1`` is 0 in both presets;
with it on, R1 would join every ``loss.r1_every``-th step, step 0 included). The
``cpu-small-cpu-mseg`` case sets ``run.step`` to ``loss.motion_seg_start``: the step of the rest
of training, with D's segmentation of real clips on its own flow (``--phase motion-seg`` side by
side).

Every provider gets the same warm-up before it is timed: :data:`WARMUP_STEPS` steps (the fused
provider's checked first step counts as one; compiled and graphed steps take
:data:`WARMUP_STEPS_COMPILED`), one step for peak memory, one under the FLOP counter where it
counts, then one warm-up round of pytest-benchmark. Each row records in ``extra_info``:

- ``gflop_per_step``: FLOPs of one step of this provider counted with torch's
  ``FlopCounterMode`` (the fused CPU sub-pixel convs count their extra border FLOPs), and
  ``model_gflop_per_step``, the reference path's count, which ``tflops`` divides by the median
  (so the achieved rate of both providers is comparable); on an H100/H200 also
  ``frac_bf16_peak`` (of the card's dense bf16 peak, :func:`bf16_peak_tflops`: 989 TFLOP/s on
  SXM H100/H200, 756 on H100 PCIe, 835 on H100/H200 NVL).
- on a GPU ``gpu_kernel_ms``: the GPU kernel time of one step (torch.profiler, 3 more steps), so
  that a median well above it shows host-side time (launches, Python) rather than GPU work.
- peak memory of one step: on a GPU ``peak_mem_mb`` (``torch.cuda.max_memory_allocated`` above
  the memory held before the step); on CPU ``peak_rss_delta_mb``, the peak resident set size
  above the one before the step (freed heap pages returned with glibc's ``malloc_trim`` first,
  then the peak reset through ``/proc/self/clear_refs``; Linux only). Memory the allocator
  still reuses without faulting pages in is not seen, so it is a lower bound.
- ``threads``: torch's intra-op threads (set ``OMP_NUM_THREADS`` to choose).
- ``ops``: what each op ran (``vosgan.backend``'s choice, e.g. ``gru:cpp``; ``op:reference``
  where ``--fused`` falls back for that op), ``reference`` for the other providers.
- ``phase``: the step timed (``run.step``, and whether R1 and the motion-seg loss ran).
- ``loadavg``: ``os.getloadavg()`` after the timed rounds, and ``iqr_over_median`` of the rounds:
  a shared machine's load shows in both (``benchmarks/report.py`` flags rows above 0.2 as noisy).

Before the fused provider is timed, its first step is checked against the reference path's
(:func:`check_fused_step`: every loss part and parameter gradient).

Run: ``pytest benchmarks/bench_train_step.py --benchmark-only``. Side by side in one process:
``python benchmarks/bench_train_step.py [--preset cpu-small] [--rounds 30] [--providers ...]``
(default reference and fused; on a GPU also ``fused-cl``, ``fused-cl-graph``, ``reference-graph``)
runs the providers' steps taking turns, the order rotated every round, and prints medians of wall
time and of process CPU time (which a loaded machine inflates less; it means little with more
than one thread, where idle OpenMP/numba workers spin, or on a GPU, where the sync spins), and on
a GPU each step's kernel time. ``--profile N`` then prints, for each provider, torch.profiler's
table of the ops and kernels that took the most device time over ``N`` more steps (CPU time on
CPU).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable

import pytest
import torch
from reference_check import Tol, check
from torch.utils.flop_counter import FlopCounterMode

from vosgan import backend, config, train
from vosgan.train import amp_dtype, build_run, configure_backends

CUDA = torch.cuda.is_available()
#: case id -> (preset, device, batch or None for the preset's own, timed rounds, phase)
CASES = {
    "cpu-small-cpu": ("cpu-small", "cpu", None, 7, "step0"),
    "cpu-small-cpu-mseg": ("cpu-small", "cpu", None, 7, "motion-seg"),
    "paper-cpu": ("paper", "cpu", 2, 3, "step0"),
}
if CUDA:
    CASES |= {
        "cpu-small-cuda": ("cpu-small", "cuda", None, 30, "step0"),
        "paper-cuda": ("paper", "cuda", None, 20, "step0"),
    }
#: ``run.step`` of each phase: the first step, or the first with the motion-seg loss.
PHASES = ("step0", "motion-seg")
#: Steps before timing, the same for every provider (the fused one's checked step included);
#: compiled steps recompile over their first steps, graphed ones capture after eager steps.
WARMUP_STEPS, WARMUP_STEPS_COMPILED = 2, 3
#: provider -> (--fused, config overrides, GPU only). Beside the reference path and --fused (both
#: eager, NCDHW): the reference path under torch.compile; --fused in channels_last_3d; --fused in
#: channels_last_3d replayed from CUDA graphs, which is what --fused runs on a GPU by default
#: (train.channels_last / train.cuda_graph auto); the reference path from CUDA graphs.
_EAGER = {"train.channels_last": "off", "train.cuda_graph": "off"}
PROVIDERS = {
    "reference": (False, _EAGER, False),
    "fused": (True, _EAGER, False),
    "compile": (False, {**_EAGER, "train.compile": "true"}, True),
    "fused-cl": (True, {**_EAGER, "train.channels_last": "on"}, True),
    "fused-cl-graph": (True, {"train.channels_last": "on", "train.cuda_graph": "on"}, True),
    "reference-graph": (False, {**_EAGER, "train.cuda_graph": "on"}, True),
}
#: Dense bf16 TFLOP/s by a substring of ``torch.cuda.get_device_name()``, first match wins: the
#: PCIe and NVL cards before the SXM ones ("NVIDIA H100 80GB HBM3", "NVIDIA H200").
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
)
_MODEL_FLOPS: dict[tuple[str, str, int, str], float] = {}  # (preset, device, batch, phase)
_LIBC = ctypes.CDLL("libc.so.6") if platform.system() == "Linux" else None


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model
            )
    return f"CPU {model} x{os.cpu_count()}"


def bf16_peak_tflops(device_name: str) -> float | None:
    """The card's dense bf16 peak (:data:`BF16_PEAK_TFLOPS`), None for a card not listed."""
    return next((v for k, v in BF16_PEAK_TFLOPS if k in device_name), None)


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_memory_mb(step: Callable[[], None], device: str) -> tuple[str, float]:
    """(key, MB): the step's peak memory above what was held before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        return "peak_mem_mb", (torch.cuda.max_memory_allocated() - before) / 2**20
    if _LIBC is None or not os.path.exists("/proc/self/clear_refs"):
        step()
        return "peak_rss_delta_mb (not measured: needs Linux /proc)", float("nan")
    gc.collect()
    _LIBC.malloc_trim(0)  # hand freed heap pages back, so that reusing them shows in the RSS
    before = _rss_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM (peak RSS) to the current RSS
        f.write("5")
    step()
    return "peak_rss_delta_mb", _rss_mb("VmHWM") - before


def _make_step(
    preset: str,
    device: str,
    batch: int | None,
    provider: str = "reference",
    amp: str | None = None,
    phase: str = "step0",
):
    """``(cfg, step, run)`` of ``provider`` (:data:`PROVIDERS`): ``step()`` runs one training
    step (the trainer's, :func:`vosgan.train.make_step`) and returns its loss parts. ``phase``
    (:data:`PHASES`): ``run.step`` is 0, or ``loss.motion_seg_start``; it stays there."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    fused, extra, _ = PROVIDERS[provider]
    overrides = {} if batch is None else {"data.batch_size": batch}
    overrides |= extra
    if amp is not None:
        overrides["train.amp"] = amp
    cfg = config.load(preset, overrides)
    dev = torch.device(device)
    configure_backends(dev)  # as the trainer runs (cuDNN autotuning, TF32)
    run = build_run(cfg, dev, fused)
    if phase == "motion-seg":
        run.step = cfg.loss.motion_seg_start
    train.wrap_models(run)  # the phase wrappers (compile; plain modules otherwise)
    train_one = train.make_step(run, train.autocast_for(run))
    m = cfg.model
    gen = torch.Generator().manual_seed(0)
    real = torch.rand(cfg.data.batch_size, 3, m.frames, m.size, m.size, generator=gen) * 2 - 1
    real = real.to(dev)

    def step() -> dict[str, torch.Tensor]:
        parts = train_one(real)
        if device == "cuda":
            torch.cuda.synchronize()
        return parts

    return cfg, step, run


def _first_step(step: Callable[[], dict], run) -> dict[str, torch.Tensor]:
    """One step from the seeded state: its loss parts and the gradient of every G and D
    parameter (``.grad`` holds that step's gradients: both updates zero them first)."""
    torch.manual_seed(0)  # the latents
    res = {k: v.detach().clone() for k, v in step().items()}
    for name, model in (("G", run.G), ("D", run.D)):
        for n, p in model.named_parameters():
            if p.grad is not None:
                res[f"{name}.{n}.grad"] = p.grad.detach().clone()
    return res


#: Gradient tolerance of the fused step's check, a fraction of each gradient's max (fp32, CPU),
#: widened per gradient to twice its rounding scale (:func:`_rounding_scale`). Some first-step
#: gradients are ill-conditioned: on the AMD EPYC box (2026-11-27) a 1e-7 relative perturbation
#: of G's initial weights moved the reference's own D decoder gradients by up to 6.1e-3 of their
#: max, and the fused step's differed from the reference's by up to 2.3e-3 there (the fused GRU
#: alone, in the reference step, took it past 1e-4); every other gradient moved by at most
#: about 4e-6 of its max, so 1e-4 still binds there. At ``paper`` with batch 2 (BatchNorm over 2
#: samples) the perturbation moves gradients by 3e-2, and under bf16 autocast rounding dominates:
#: there only the loss parts are compared (the same fused ops are checked at cpu-small, and by
#: the tests).
GRAD_TOL = 1e-4
#: The relative perturbation of G's initial weights that measures the rounding scale.
JITTER = 1e-7


def _rounding_scale(
    preset: str, device: str, batch: int | None, want: dict[str, torch.Tensor], phase: str
) -> dict[str, float]:
    """How far each first-step gradient of the reference (``want``, from :func:`_first_step`)
    moves when G's initial weights are multiplied by ``1 + u``, ``u`` uniform in +-``JITTER``
    (seeded): the max absolute change per gradient, the scale at which rounding differences
    upstream show up in it."""
    _, step, run = _make_step(preset, device, batch, phase=phase)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in run.G.parameters():
            u = torch.rand(p.shape, generator=gen).to(p.device) * 2 - 1
            p.mul_(1 + JITTER * u)
    moved = _first_step(step, run)
    return {k: (moved[k] - v).abs().max().item() for k, v in want.items() if k.endswith(".grad")}


def check_fused_step(
    preset: str, device: str, batch: int | None, step, run, phase: str = "step0"
) -> None:
    """The fused run's first step (``step``/``run``, fresh from ``build_run``, in ``phase``)
    against the reference path's from the same initial weights and latents: every loss part and
    every parameter gradient (gradients at ``cpu-small`` on CPU only, see ``GRAD_TOL``). fp32 (CPU):
    loss parts within 1e-4, each gradient within ``GRAD_TOL`` of its max or twice its rounding
    scale, whichever is larger; bf16 autocast (CUDA): at most 2x the error of the reference path
    against the reference in fp32, plus 1e-2 of the max."""
    want = _first_step(*_make_step(preset, device, batch, phase=phase)[1:])
    exact = None
    if device == "cuda":
        exact = _first_step(*_make_step(preset, device, batch, amp="off", phase=phase)[1:])
    got = _first_step(step, run)
    what = f"train step {preset} fused {device} {phase}"
    losses = [k for k in want if not k.endswith(".grad")]
    e = {k: exact[k] for k in losses} if exact is not None else None
    check(
        what,
        {k: got[k] for k in losses},
        {k: want[k] for k in losses},
        Tol(1e-4, 1e-6),
        exact=e,
        floor=1e-2,
    )
    if preset != "cpu-small" or device != "cpu":
        return
    scale = _rounding_scale(preset, device, batch, want, phase)
    assert {k for k in got if k.endswith(".grad")} == scale.keys(), what
    for k, s in scale.items():
        atol = max(GRAD_TOL * want[k].abs().max().item(), 2 * s)
        check(what, {k: got[k]}, {k: want[k]}, Tol(0, atol))


def _ops(device: str) -> str:
    """What each op ran under ``--fused``: ``vosgan.backend``'s per-op choice on ``device``
    (``op:reference`` where that op falls back)."""
    return "; ".join(f"{op}:{backend.choose(op, device).impl}" for op in backend.OPS)


def phase_info(run) -> str:
    """What kind of step ``run`` takes at its (held) ``run.step``."""
    r1, motion_seg = train.step_phase(run)
    return (
        f"run.step={run.step} (held): R1 {'on' if r1 else 'off'}, "
        f"motion-seg loss {'on' if motion_seg else 'off'}"
    )


def _flops(step: Callable[[], None]) -> float:
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", list(CASES))
def test_train_step(benchmark, case: str, provider: str) -> None:
    preset, device, batch, rounds, phase = CASES[case]
    fused, _, gpu_only = PROVIDERS[provider]
    if provider == "compile" and device == "cpu":
        pytest.skip("--compile on CPU: inductor takes minutes on the 2-core box (0.96x measured)")
    if gpu_only and device == "cpu":
        pytest.skip("channels_last_3d and CUDA graphs are for the GPU (CPU: oneDNN picks layouts)")
    cfg, step, run = _make_step(preset, device, batch, provider, phase=phase)
    b = cfg.data.batch_size
    if fused:  # its first step, before timing (also the first warm-up step)
        check_fused_step(preset, device, batch, step, run, phase)
    # Warm-up: numba/Triton compilation, oneDNN/cuDNN primitive selection; under torch.compile
    # also the recompilations of the first steps (D runs with and without parameter gradients);
    # with CUDA graphs the eager steps before the capture, and the capture.
    graph = run.cuda_graph
    if graph:  # a replay allocates nothing: count the warm-up steps and the capture instead
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    warm = WARMUP_STEPS_COMPILED if provider == "compile" or graph else WARMUP_STEPS
    for _ in range(warm - int(fused)):  # the same for every provider
        step()
    if graph:
        mem_key, mem_mb = "peak_mem_mb", (torch.cuda.max_memory_allocated() - held) / 2**20
    else:
        mem_key, mem_mb = _peak_memory_mb(step, device)
    key = (preset, device, b, phase)
    if key not in _MODEL_FLOPS:  # the reference path's count, also when selected alone
        _MODEL_FLOPS[key] = _flops(
            step if provider == "reference" else _make_step(preset, device, batch, phase=phase)[1]
        )
    # Compiled and graphed steps are not counted themselves: the counter's dispatch mode would
    # recompile one and sees no ops in a graph's replay.
    flops = _flops(step) if fused and not graph else _MODEL_FLOPS[key]
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: the step ran as a plain test
        return
    stats = benchmark.stats.stats
    median = stats.median
    m = cfg.model
    info = {
        "device": _device_name(device),
        "torch": torch.__version__,
        "provider": provider,
        "shape": f"B={b}, 3x{m.frames}x{m.size}x{m.size}",
        "threads": torch.get_num_threads(),
        "amp": str(amp_dtype(cfg.train.amp, torch.device(device))),
        "gflop_per_step": flops / 1e9,
        "model_gflop_per_step": _MODEL_FLOPS[key] / 1e9,
        "tflops": _MODEL_FLOPS[key] / median / 1e12,
        mem_key: mem_mb,
        "ops": _ops(device) if fused else "reference",
        "phase": phase_info(run),
        "warmup_steps": warm + 1,  # + pytest-benchmark's warm-up round
        "iqr_over_median": stats.iqr / median,
        "loadavg": [round(v, 2) for v in os.getloadavg()],
    }
    if preset == "paper" and device == "cpu":
        full = config.load(preset).data.batch_size
        info["note"] = f"paper preset at batch {b} on CPU (full batch {full} on GPU)"
    peak = bf16_peak_tflops(info["device"])
    if device == "cuda":
        info["cudnn_benchmark"] = torch.backends.cudnn.benchmark
        info["gpu_kernel_ms"] = gpu_kernel_ms(step, 3)
        if peak is not None:
            info["frac_bf16_peak"] = info["tflops"] / peak
    benchmark.extra_info.update(info)


def gpu_kernel_ms(step: Callable[[], None], steps: int) -> float:
    """GPU kernel time of one call of ``step`` in ms (torch.profiler, the mean of ``steps``
    calls): next to the wall-time median, how much of a step the GPU is busy; the rest is the
    host launching work (or idle gaps)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
    return sum(e.self_device_time_total for e in prof.key_averages()) / steps / 1e3


def profile_steps(step: Callable[[], None], device: str, steps: int, rows: int = 25) -> str:
    """torch.profiler's table of ``steps`` more calls of ``step``: the ``rows`` ops and kernels
    with the most self time on ``device`` (CUDA kernel time on a GPU, CPU time on CPU)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


def main() -> None:
    p = argparse.ArgumentParser(description="reference vs --fused training step, interleaved")
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--device", default="cpu")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="profile N more steps")
    p.add_argument(
        "--phase",
        choices=PHASES,
        default="step0",
        help="the step timed: step 0's, or one with the motion-seg loss (default: %(default)s)",
    )
    p.add_argument(
        "--providers",
        default="reference,fused",
        help="comma-separated, the baseline first; compile is pytest's only (default: %(default)s)",
    )
    args = p.parse_args()
    names = args.providers.split(",")
    choices = [n for n in PROVIDERS if n != "compile"]
    for name in names:
        if name not in choices:
            p.error(f"--providers: {name!r} is not one of {', '.join(choices)}")
        if PROVIDERS[name][2] and not args.device.startswith("cuda"):
            p.error(f"--providers: {name} needs --device cuda")
    steps = {}
    for name in names:
        try:
            _, step, run = _make_step(args.preset, args.device, args.batch, name, phase=args.phase)
            fused = PROVIDERS[name][0]
            if fused:  # its first step: counts as the first of the warm-up steps
                check_fused_step(args.preset, args.device, args.batch, step, run, args.phase)
            for _ in range(3 - int(fused)):  # warm-up (compilation, primitive caches, graphs)
                step()
        except Exception as exc:  # the other providers are still worth timing
            if name == names[0]:
                raise
            print(f"{name}: left out, it failed: {type(exc).__name__}: {exc}")
            continue
        steps[name] = step
    names = list(steps)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for i in range(args.rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:  # rotate the order
            t0, c0 = time.perf_counter(), time.process_time()
            steps[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    print(
        f"{_device_name(args.device)}, torch {torch.__version__}, {torch.get_num_threads()} "
        f"thread(s), preset {args.preset}, {args.rounds} interleaved rounds; {phase_info(run)}; "
        f"os.getloadavg() = {os.getloadavg()[0]:.1f}"
    )
    base = names[0]
    for kind, t in (("wall", wall), ("cpu", cpu)):
        ref = statistics.median(t[base])
        cells = [f"{base} {ref * 1e3:.1f} ms (min {min(t[base]) * 1e3:.1f})"]
        for name in names[1:]:
            med = statistics.median(t[name])
            cells.append(
                f"{name} {med * 1e3:.1f} ms (min {min(t[name]) * 1e3:.1f}): {ref / med:.3f}x "
                f"median, {min(t[base]) / min(t[name]):.3f}x min"
            )
        print(f"  {kind}: " + "; ".join(cells))
    if args.device.startswith("cuda"):  # the GPU's busy time; the rest of the wall time is host
        busy = {name: gpu_kernel_ms(step, 3) for name, step in steps.items()}
        print("  GPU kernel time: " + "; ".join(f"{n} {ms:.1f} ms" for n, ms in busy.items()))
    for name, step in steps.items() if args.profile > 0 else ():
        print(f"\n{name} step, {args.profile} steps profiled:")
        print(profile_steps(step, args.device, args.profile))


if __name__ == "__main__":
    main()

"""train.cuda_graph: the training step captured as CUDA graphs (vosgan.train_graph)."""

import contextlib
import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import requires_cuda, tiny_config

from vosgan import config, train
from vosgan.config import ConfigError
from vosgan.distributed import SINGLE, DistEnv
from vosgan.train_graph import GraphedTrainStep, check_graphable
from vosgan.train_run import step_options


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train.compile": "true"}, "train.cuda_graph=on and train.compile exclude each other"),
        ({"train.amp": "fp16"}, "fp16's GradScaler reads its inf check on the host"),
    ],
)
def test_config_refuses_what_a_graph_cannot_capture(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config.load("cpu-small", {"train.cuda_graph": "true", **overrides})


CUDA = torch.device("cuda")  # step_options only reads the device type: no GPU needed


@pytest.mark.parametrize(
    ("overrides", "fused", "device", "env", "want"),
    [
        ({}, True, CUDA, SINGLE, (True, True, "auto: cuDNN's", "auto: the step replayed")),
        ({}, False, CUDA, SINGLE, (False, False, "auto: not --fused", "auto: not --fused")),
        (
            {},
            True,
            "cpu",
            SINGLE,
            (False, False, "cpu (it is for cuDNN", "need a GPU, this run is on cpu"),
        ),
        ({}, True, CUDA, DistEnv(0, 2, 0), (True, False, "auto: cuDNN's", "torchrun")),
        ({"train.compile": "true"}, True, CUDA, SINGLE, (True, False, "", "auto: train.compile")),
        ({"train.amp": "fp16"}, True, CUDA, SINGLE, (True, False, "", "train.amp=fp16")),
        (
            {"train.checkpoint_activations": "true"},
            True,
            CUDA,
            SINGLE,
            (True, False, "", "checkpoint"),
        ),
        ({"train.cuda_graph": "false"}, True, CUDA, SINGLE, (True, False, "", "cuda_graph=off")),
        (
            {"train.channels_last": "on"},
            False,
            "cpu",
            SINGLE,
            (True, False, "channels_last=on", ""),
        ),
    ],
)
def test_step_options_resolve_auto(overrides, fused, device, env, want):
    """auto turns channels_last and CUDA graphs on with --fused on CUDA, and says why not where
    not; on/off (and their boolean spellings) are taken as given."""
    opts = step_options(config.load("cpu-small", overrides), torch.device(device), fused, env)
    cl, graph, cl_why, graph_why = want
    assert (opts.channels_last, opts.cuda_graph) == (cl, graph)
    assert cl_why in opts.why["channels_last"]
    assert graph_why in opts.why["cuda_graph"]


def test_cpu_run_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match=r"train.cuda_graph needs a CUDA device \(.*cpu\)"):
        train.build_run(tiny_config(**{"train.cuda_graph": True}), torch.device("cpu"), False)
    run = train.build_run(tiny_config(), torch.device("cpu"), False)
    assert not run.cuda_graph
    with pytest.raises(ConfigError) as err:
        check_graphable(run)
    assert "a CUDA device" in str(err.value)
    assert "G's Adam with capturable=True" in str(err.value)
    assert "D's Adam with capturable=True" in str(err.value)


def test_make_step_is_plain_train_step_without_the_option():
    run = train.build_run(tiny_config(), torch.device("cpu"), False)
    train.wrap_models(run)
    step = train.make_step(run, contextlib.nullcontext())
    assert not isinstance(step, GraphedTrainStep)
    parts = step(torch.rand(4, 3, 16, 16, 16) * 2 - 1)
    assert {"d_total", "g_total"} <= set(parts)


def _steps(
    cuda_graph: bool, fused: bool, cl: bool, n: int, **overrides
) -> tuple[list[dict], dict, object]:
    """``n`` steps of the tiny config (plus ``overrides``) on CUDA in fp32 (R1 every second
    step), each on its own batch: the loss parts of every step, the final weights, and the step
    callable."""
    cfg = tiny_config(
        **{
            "train.cuda_graph": cuda_graph,
            "train.channels_last": cl,
            "train.amp": "off",
            "data.batch_size": 4,
            **overrides,
        }
    )
    run = train.build_run(cfg, torch.device("cuda"), fused=fused)
    train.wrap_models(run)
    step = train.make_step(run, train.autocast_for(run))
    gen = torch.Generator().manual_seed(3)
    logs = []
    for _ in range(n):
        real = (torch.rand(4, 3, 16, 16, 16, generator=gen) * 2 - 1).cuda()
        logs.append({k: v.item() for k, v in step(real).items()})
        run.step += 1
    weights = {**run.G.state_dict(), **{f"D.{k}": v for k, v in run.D.state_dict().items()}}
    return logs, weights, step


@requires_cuda
@pytest.mark.parametrize(
    ("fused", "cl"), [(False, False), (True, False), (True, True)], ids=["reference", "fused", "cl"]
)
def test_graph_replays_train_like_eager(fused, cl, no_tf32):
    """Eight steps: each phase (R1 or not) runs eagerly twice, is captured, then replayed. The
    replays see each step's new batch and fresh latents: the losses follow the eager run's to
    1e-3 (atomics in cuDNN's and the Triton backward kernels leave rounding differences), and
    so do the weights, within what Adam makes of rounding: a gradient element near zero whose
    sign flips moves its weight by up to 2 lr per step. On an H100 1.8% of the fused run's
    weights ended more than 1e-4 from the eager run's (all within 2 lr per step); a replay
    without the optimizer step would leave most of them 4 steps of about lr behind."""
    n, lr = 8, 2e-4
    eager_logs, eager_w, _ = _steps(False, fused, cl, n)
    graph_logs, graph_w, step = _steps(True, fused, cl, n)
    assert step.captured == [(False, False), (True, False)]  # (R1, motion_seg)
    for i, (a, b) in enumerate(zip(eager_logs, graph_logs, strict=True)):
        assert a.keys() == b.keys(), i
        for name in a:
            assert b[name] == pytest.approx(a[name], rel=1e-3, abs=1e-5), (i, name)
    assert len({round(log["d_total"], 6) for log in graph_logs[4:]}) == 4  # not a stale replay
    far = total = 0
    for name, w in eager_w.items():
        if w.is_floating_point():
            diff = (graph_w[name].float() - w.float()).abs()
            assert diff.max().item() <= 2 * lr * n + 1e-5, name
            far += (diff > 1e-4).sum().item()
            total += diff.numel()
    assert far <= 0.05 * total  # the few sign flips, not a different training run


@requires_cuda
@pytest.mark.parametrize("camera", ["none", "affine"])
def test_motion_pseudo_labels_start_a_graph_of_their_own(no_tf32, camera):
    """Without R1, steps 0-2 are one phase and steps 3-7 (loss.motion_seg_start=3) another:
    each runs eagerly twice and is captured, and the replays, motion pseudo-labels included
    (a histogram, argmax and gather inside the graph; with ``affine`` also the camera's
    least-squares fit and its k-th value cut), follow the eager run's losses."""
    extra = {
        "loss.r1": 0.0,
        "loss.motion_seg": 1.0,
        "loss.motion_seg_start": 3,
        "loss.motion_camera": camera,
    }
    eager_logs, _, _ = _steps(False, True, False, 8, **extra)
    graph_logs, _, step = _steps(True, True, False, 8, **extra)
    assert step.captured == [(False, False), (False, True)]
    assert ["d_motion_seg" in log for log in graph_logs] == [False] * 3 + [True] * 5
    for i, (a, b) in enumerate(zip(eager_logs, graph_logs, strict=True)):
        for name in a:
            assert b[name] == pytest.approx(a[name], rel=1e-3, abs=1e-5), (i, name)


@requires_cuda
def test_graph_refuses_a_new_clip_shape(no_tf32):
    cfg = tiny_config(**{"train.cuda_graph": True, "train.amp": "off"})
    run = train.build_run(cfg, torch.device("cuda"), fused=False)
    train.wrap_models(run)
    step = train.make_step(run, contextlib.nullcontext())
    for _ in range(6):  # each phase: two eager runs, then its capture
        step(torch.rand(4, 3, 16, 16, 16, device="cuda"))
        run.step += 1
    assert step.captured == [(False, False), (True, False)]  # (R1, motion_seg)
    with pytest.raises(ValueError, match="every step's clips must keep one shape and dtype"):
        step(torch.rand(6, 3, 16, 16, 16, device="cuda"))


def test_switches_take_booleans():
    """auto/on/off switches read true/false too (config.json files of earlier versions)."""
    cfg = config.load("cpu-small", {"train.channels_last": False, "train.cuda_graph": "yes"})
    assert (cfg.train.channels_last, cfg.train.cuda_graph) == ("off", "on")
    with pytest.raises(ConfigError, match=r"cuda_graph must be one of \['auto', 'on', 'off'\]"):
        config.load("cpu-small", {"train.cuda_graph": "sometimes"})


def test_bench_providers_are_valid_configs(monkeypatch):
    """The train-step benchmark's GPU-only providers never run in CI: their overrides at least
    load, and resolve on CUDA to what their names say."""
    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench_dir))  # bench_train_step imports reference_check
    spec = importlib.util.spec_from_file_location("bench_ts", bench_dir / "bench_train_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for name, (fused, overrides, _) in bench.PROVIDERS.items():
        for preset in ("cpu-small", "paper"):
            opts = step_options(config.load(preset, overrides), CUDA, fused)
            assert opts.channels_last == ("-cl" in name), name
            assert opts.cuda_graph == name.endswith("-graph"), name

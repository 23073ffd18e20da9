"""Training loop: short runs of the cpu-small preset, resume equivalence, failure handling, CLIs."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, requires_cuda, tiny_config

from vosgan import checkpoint, config, evaluate, train
from vosgan.config import ConfigError

# cpu-small with a tiny batch and dataset: a few seconds per run.
FAST = [
    "--data.batch_size=2",
    "--data.train_clips=16",
    "--data.val_clips=4",
    "--train.eval_clips=4",
    "--train.log_every=1",
    "--train.eval_every=1000",
    "--train.sample_every=1000",
]


def run(tmp_path, *extra, name="run"):
    return train.main([*FAST, "--out", str(tmp_path / name), *extra])


def weights(path):
    ckpt = checkpoint.load_checkpoint(path)
    return ckpt, {
        **{f"G.{k}": v for k, v in ckpt["G"].items()},
        **{f"D.{k}": v for k, v in ckpt["D"].items()},
        **{f"D_ema.{k}": v for k, v in ckpt["D_ema"].items()},
    }


def test_run_folder_contents(tmp_path):
    assert run(tmp_path, "--train.steps=2", "--train.checkpoint_every=1") == 0
    out = tmp_path / "run"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["preset"] == "cpu-small" and cfg["train"]["steps"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 2 and 0 <= metrics["iou"] <= 1 and metrics["num_clips"] == 4
    assert (out / "samples" / "step_000002.mp4").stat().st_size > 0
    assert (out / "samples" / "step_000002.gif").stat().st_size > 0
    assert any((out / "tb").iterdir())
    ckpt = checkpoint.load_checkpoint(out)
    assert ckpt["step"] == 2 and ckpt["data_position"] == 2
    assert {"G", "D", "D_ema", "opt_g", "opt_d", "scaler", "rng", "config", "history"} <= set(ckpt)
    assert not list((out / "checkpoints").glob(".*tmp*"))  # no temporary files left behind


def test_r1_and_hinge_through_fused_modules(tmp_path, capsys):
    # R1 runs on steps 0 and 2 only, and needs double backward through D's fused blocks; the
    # G-side consistency term reads D's segmentation; the motion pseudo-labels start at step 1.
    # First one step per log row, then three steps in one row: the log average must cope with
    # losses missing on some steps.
    args = [
        "--loss.r1=1.0",
        "--loss.r1_every=2",
        "--loss.adversarial=hinge",
        "--loss.consistency=0.5",
        "--loss.motion_seg=0.5",
        "--loss.motion_seg_start=1",
        "--loss.motion_span=1",
        "--fused",
    ]
    assert run(tmp_path, "--train.steps=3", *args) == 0
    fused = re.search(r"--fused: (\d+) module\(s\) switched", capsys.readouterr().out)
    assert fused and int(fused[1]) > 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").open()]
    present = [("d_r1" in r, "g_consistency" in r, "d_motion_seg" in r) for r in rows]
    assert present == [(True, True, False), (False, True, True), (True, True, True)]
    assert all(r["d_r1"] >= 0 for r in rows if "d_r1" in r)
    assert run(tmp_path, "--train.steps=3", "--train.log_every=3", *args, name="one_row") == 0
    (row,) = [json.loads(line) for line in (tmp_path / "one_row" / "log.jsonl").open()]
    assert "d_r1" in row and checkpoint.load_checkpoint(tmp_path / "one_row")["step"] == 3


CL3D = torch.channels_last_3d


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_channels_last_trains_the_same_function(fused, device, no_tf32):
    """train.channels_last changes the layout of the 3D conv weights and clips, not what is
    computed: the losses agree to 1e-5 and the first step's gradients to 1e-4 of their max (the
    convolutions sum in another order). On CUDA this runs cuDNN's channels-last kernels and the
    Triton BN + activation on channels-last activations."""
    weights5d = []
    logs, _, grads = _tiny_run(fused=fused, device=device)
    cl_logs, _, cl_grads = _tiny_run(
        fused=fused,
        channels_last=True,
        device=device,
        probe=lambda run: weights5d.extend(p for p in run.D.parameters() if p.dim() == 5),
    )
    assert all(p.is_contiguous(memory_format=CL3D) for p in weights5d)
    assert any(not p.is_contiguous() for p in weights5d)  # the layout did change
    for a, b in zip(logs, cl_logs, strict=True):
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    for name, grad in grads.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(cl_grads[name], grad, rtol=1e-4, atol=1e-4 * scale, msg=name)


def test_resume_across_channels_last_matches_optimizer_state_layouts():
    """Adam's states saved by a channels_last run take the strides of the resuming run's
    parameters (fused/foreach Adam steps them as flat buffers, which must share one layout)."""
    runs = [
        train.build_run(tiny_config(**{"train.channels_last": cl}), torch.device("cpu"), False)
        for cl in (True, False)
    ]
    train.wrap_models(runs[0])
    real = torch.rand(4, 3, 16, 16, 16) * 2 - 1
    train.train_step(runs[0], real, contextlib.nullcontext())
    state = runs[0].state()
    runs[1].load({**state, "path": "in memory"})
    checked = 0
    for opt in (runs[1].opt_g, runs[1].opt_d):
        for p, st in opt.state.items():
            for v in st.values():
                if v.shape == p.shape:
                    assert v.stride() == p.stride()
                    checked += p.dim() == 5 and not p.is_contiguous(memory_format=CL3D)
    assert checked > 0  # states that were channels-last, now contiguous like their parameters
    saved = state["opt_d"]["state"][0]["exp_avg"]
    torch.testing.assert_close(runs[1].opt_d.state_dict()["state"][0]["exp_avg"], saved)


def test_resume_gives_the_same_weights(tmp_path):
    assert run(tmp_path, "--train.steps=4", name="straight") == 0
    assert run(tmp_path, "--train.steps=2", name="split") == 0
    assert run(tmp_path, "--train.steps=4", "--resume", "auto", name="split") == 0
    a_ckpt, a = weights(tmp_path / "straight")
    b_ckpt, b = weights(tmp_path / "split")
    assert a_ckpt["step"] == b_ckpt["step"] == 4
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_existing_run_is_never_overwritten(tmp_path, capsys):
    assert run(tmp_path, "--train.steps=1") == 0
    before = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    assert run(tmp_path, "--train.steps=1") == 2
    assert "already holds a run" in capsys.readouterr().err
    # nor by resuming another checkpoint into it
    (tmp_path / "other.pt").write_bytes(before)
    assert run(tmp_path, "--train.steps=2", "--resume", str(tmp_path / "other.pt")) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == before


def test_leftovers_of_a_failed_run_are_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"  # what a run that failed before its first checkpoint leaves
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "log.jsonl").write_text('{"step": 1}\n')
    assert run(tmp_path, "--train.steps=1") == 2
    assert f"--out {out} is not empty" in capsys.readouterr().err
    assert (out / "config.json").read_text() == "{}"
    assert (out / "log.jsonl").read_text() == '{"step": 1}\n'
    # --resume auto says "continue this folder": it starts afresh there (no checkpoint yet)
    assert train.parse_args([*FAST, "--out", str(out), "--resume", "auto"])[1:] == (
        out,
        False,
        None,
    )


@pytest.mark.parametrize("where", ["", "file", "/proc/vosgan-run"])
def test_bad_out_is_refused_by_argparse(tmp_path, monkeypatch, capsys, where):
    monkeypatch.chdir(tmp_path)  # --out "" would mean this folder
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SystemExit) as exc:
        train.main([*FAST, "--train.steps=1", "--out", where])
    assert exc.value.code == 2 and "argument --out: " in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_resume_with_nothing_to_train(tmp_path, capsys):
    assert run(tmp_path, "--train.steps=2") == 0
    for steps in (1, 2):  # the checkpoint at step 2 holds the final evaluation: nothing to do
        assert run(tmp_path, f"--train.steps={steps}", "--resume", "auto") == 2
        err = capsys.readouterr().err
        assert f"train.steps={steps} <= the checkpoint's step 2: nothing to train" in err
    # A checkpoint at its last step without the final evaluation (Ctrl-C at the last step):
    # resuming at the same train.steps runs just that evaluation.
    ckpt_path = tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt = checkpoint.load_checkpoint(ckpt_path)
    del ckpt["path"]
    ckpt["history"] = []
    checkpoint.save_atomic(ckpt, ckpt_path)
    (tmp_path / "run" / "metrics.json").unlink()
    assert run(tmp_path, "--train.steps=2", "--resume", "auto") == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["step"] == 2
    assert [h["step"] for h in checkpoint.load_checkpoint(ckpt_path)["history"]] == [2]


def test_resume_rejects_a_different_model(tmp_path, capsys):
    assert run(tmp_path, "--train.steps=1") == 0
    code = run(tmp_path, "--train.steps=2", "--resume", "auto", "--model.gru_hidden=32")
    assert code == 2 and "model.gru_hidden: 64 != 32" in capsys.readouterr().err


def test_resume_continues_with_the_checkpoints_config(tmp_path, capsys):
    """Overrides of the first run carry over without being repeated; fields that define the run
    (losses, optimiser, seeds, sampling) cannot change; steps, intervals and data reading can."""
    out = tmp_path / "run"
    assert run(tmp_path, "--train.steps=1", "--loss.adversarial=hinge", "--optim.lr_d=1e-3") == 0
    for extra, refused in [
        (["--optim.lr_d=5e-5"], "optim.lr_d: 0.001 != 5e-05"),
        (["--loss.adversarial=nonsaturating"], "loss.adversarial: 'hinge' != 'nonsaturating'"),
        (["--data.seed=3"], "data.seed: 0 != 3"),
        (["--preset", "paper"], "--preset paper: "),
    ]:
        code = train.main(["--out", str(out), "--resume", "auto", "--train.steps=2", *extra])
        assert code == 2 and refused in capsys.readouterr().err, extra
    resumed = ["--out", str(out), "--resume", "auto", "--train.steps=2", "--train.log_every=2"]
    assert train.main(resumed) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["loss"]["adversarial"] == "hinge" and saved["optim"]["lr_d"] == 1e-3
    assert saved["data"]["batch_size"] == 2 and saved["train"]["log_every"] == 2
    ckpt = checkpoint.load_checkpoint(out)
    assert ckpt["step"] == 2 and [g["lr"] for g in ckpt["opt_d"]["param_groups"]] == [1e-3] * len(
        ckpt["opt_d"]["param_groups"]
    )


def test_resume_of_a_loose_checkpoint_needs_out(tmp_path, capsys):
    assert run(tmp_path, "--train.steps=1") == 0
    loose = tmp_path / "downloads" / "step1.pt"
    loose.parent.mkdir()
    loose.write_bytes((tmp_path / "run" / "checkpoints" / "last.pt").read_bytes())
    with pytest.raises(ConfigError, match="not inside a run's checkpoints/ folder; pass --out"):
        train.parse_args(["--resume", str(loose), "--train.steps=2"])
    assert sorted(p.name for p in loose.parent.iterdir()) == ["step1.pt"]
    cfg, out, _, resume = train.parse_args(
        ["--resume", str(loose), "--train.steps=2", "--out", str(tmp_path / "new")]
    )
    assert (out, resume, cfg.data.batch_size) == (tmp_path / "new", loose, 2)


def test_resume_cuts_the_log_back_to_the_checkpoint(tmp_path):
    """Rows a killed run logged after its last checkpoint are logged again, not twice."""
    assert run(tmp_path, "--train.steps=2") == 0
    log = tmp_path / "run" / "log.jsonl"
    with log.open("a") as fh:  # what a run killed at step 4, checkpointed at 2, leaves
        fh.write('{"step": 3, "d_total": 1.0}\n{"step": 4, "d_total": 1.0}\n{"step": 5, "d_')
    assert run(tmp_path, "--train.steps=4", "--resume", "auto") == 0
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[2]["d_total"] != 1.0


def test_data_workers_leave_ctrl_c_to_the_trainer(tmp_path):
    """SIGINT reaches the DataLoader workers too (the terminal signals the process group); they
    ignore it, so the batch the trainer waits for still arrives and the trainer checkpoints."""
    cfg = config.load("cpu-small", {"data.batch_size": 2, "data.train_clips": 8, "train.steps": 6})
    cfg = config.apply_overrides(cfg, {"data.num_workers": 1})
    it = train.batches(cfg, 0, torch.device("cpu"))
    next(it)
    for worker in it._workers:
        os.kill(worker.pid, signal.SIGINT)
    assert [next(it)["video"].shape[0] for _ in range(5)] == [2] * 5


@pytest.mark.parametrize(
    "args, message",
    [
        (["--resume", "/nonexistent/ckpt.pt"], "no such file or folder"),
        (["--model.size=48"], "model.size must be a power of two"),
        (["--data", "/some/videos"], "/some/videos: no such file or folder"),
        (["--bogus.key=1"], "unknown config key"),
        (["--train.grad_accum=3"], "data.batch_size (2) must be divisible by train.grad_accum (3)"),
        (["--data.batch_size=1"], "data.batch_size / train.grad_accum (1 / 1) must be >= 2"),
        (["--optim.lr_g=inf"], "optim.lr_g must be finite and > 0, got inf"),
        (["--data.seed=-1"], "data.seed must be in [0, 2**32), got -1"),
        (["--train.device=bogus"], "train.device must be auto, cpu, cuda or cuda:N"),
        (["--train.device=cuda:99"], "train.device: 'cuda:99': this machine has"),
        (["--data", "empty"], "data.source {tmp}/empty: no videos"),
        (["--data", "garbage"], "none of the 1 videos is usable"),
        (["--data.batch_size=32"], "data.batch_size=32 is larger than data.train_clips=16"),
        (
            ["--train.cuda_graph=true", "--train.device=cpu"],
            "train.cuda_graph needs a CUDA device (train.device is cpu)",
        ),
    ],
)
def test_bad_input_gets_a_clear_error(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "a.mp4").write_text("not a video")
    args = [str(tmp_path / a) if a in ("empty", "garbage") else a for a in args]
    assert run(tmp_path, "--train.steps=1", *args) == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # checked before the run folder is made


def test_each_process_needs_two_clips_per_micro_batch(monkeypatch):
    # Under torchrun each rank's share of data.batch_size feeds BatchNorm (checked before
    # joining the process group: no rendezvous happens here).
    env = {
        "RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "x",
        "MASTER_PORT": "1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = config.load("cpu-small", {"data.batch_size": "2"})
    with pytest.raises(
        ConfigError, match="each of the 2 processes gets 1 clips of data.batch_size"
    ):
        train.train(cfg, Path("unused"))


def test_help_explains_config_overrides(capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "--section.key=value" in out and "--train.steps=200" in out
    assert "optim: lr_g, lr_d, lr_dense, beta1, beta2" in out


def test_unreadable_checkpoint_is_named(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt is not readable"):
        checkpoint.load_checkpoint(bad)


@pytest.mark.parametrize("bad_step", [2, 0])
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys, bad_step):
    real_step = train.train_step

    def poisoned(run_, real, autocast):
        parts = real_step(run_, real, autocast)
        if run_.step == bad_step:  # 0-based step index
            parts["g_adv"] = torch.tensor(float("nan"))
        return parts

    monkeypatch.setattr(train, "train_step", poisoned)
    assert run(tmp_path, "--train.steps=5", "--train.checkpoint_every=2") == 2
    err = capsys.readouterr().err
    assert f"loss g_adv is nan at step {bad_step + 1}" in err
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    if bad_step == 2:
        assert f"The last good checkpoint, {ckpt}, is kept" in err
        assert checkpoint.load_checkpoint(tmp_path / "run")["step"] == 2
    else:
        assert f"No checkpoint was written to {ckpt.parent} yet" in err and not ckpt.exists()


def test_ctrl_c_finishes_the_step_and_checkpoints(tmp_path, monkeypatch):
    real_step = train.train_step

    def interrupted(run_, real, autocast):
        parts = real_step(run_, real, autocast)
        if run_.step == 1:
            signal.raise_signal(signal.SIGINT)  # as if the user pressed Ctrl-C mid-step
        return parts

    monkeypatch.setattr(train, "train_step", interrupted)
    with pytest.raises(SystemExit) as exc:
        run(tmp_path, "--train.steps=6", "--train.checkpoint_every=100")
    assert exc.value.code == 130
    assert checkpoint.load_checkpoint(tmp_path / "run")["step"] == 2


def test_batch_indices_are_a_function_of_the_step():
    a = [train.batch_indices(s, 4, 10, seed=3) for s in range(6)]
    assert a == [train.batch_indices(s, 4, 10, seed=3) for s in range(6)]
    assert sorted(a[0] + a[1]) == sorted(set(a[0] + a[1]))  # no repeats inside an epoch
    assert a[0] != a[2]  # a new permutation each epoch (2 batches per epoch)
    with pytest.raises(ConfigError, match="batch_size=11 is larger"):
        train.batch_indices(0, 11, 10, seed=0)


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=300
    )


def test_evaluate_and_generate_clis(tmp_path):
    assert run(tmp_path, "--train.steps=1") == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    res = cli(
        "vosgan.evaluate",
        "--checkpoint",
        str(ckpt),
        "--clips",
        "2",
        "--json",
        str(tmp_path / "e.json"),
    )
    assert res.returncode == 0, res.stderr
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["num_clips"] == 2 and {"iou", "epe", "baseline_iou", "baseline_epe"} <= set(
        result
    )
    for suffix in (".gif", ".mp4", ".pt"):
        res = cli(
            "vosgan.generate",
            "--checkpoint",
            str(tmp_path / "run"),
            "--num",
            "2",
            "--out",
            str(tmp_path / f"s{suffix}"),
        )
        assert res.returncode == 0, res.stderr
        assert (tmp_path / f"s{suffix}").stat().st_size > 0
    assert torch.load(tmp_path / "s.pt")["video"].shape == (2, 3, 16, 32, 32)
    res = cli("vosgan.evaluate", "--checkpoint", str(tmp_path / "missing.pt"))
    assert res.returncode == 2 and "does not exist" in res.stderr
    res = cli("vosgan.generate", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x.avi"))
    assert res.returncode == 2 and "argument --out: must end in" in res.stderr


def test_d_weight_average_is_saved_evaluated_and_optional(tmp_path):
    """train.d_ema: the checkpoint holds the average beside D's weights; the run's own final
    evaluation and `evaluate` score the average, `--trained-weights` D's weights; 0 keeps none."""
    assert run(tmp_path, "--train.steps=3") == 0
    ckpt = checkpoint.load_checkpoint(tmp_path / "run")
    assert ckpt["D_ema"].keys() == ckpt["D"].keys()
    assert not torch.equal(ckpt["D_ema"]["real_fake.weight"], ckpt["D"]["real_fake.weight"])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    scores = {}
    for name, flags in (("avg", []), ("trained", ["--trained-weights"])):
        out = tmp_path / f"{name}.json"
        argv = ["--checkpoint", str(tmp_path / "run"), "--json", str(out), *flags]
        assert evaluate.main(argv) == 0
        scores[name] = json.loads(out.read_text())
    assert scores["avg"]["d_weights"] == "D_ema" and scores["trained"]["d_weights"] == "D"
    assert scores["avg"]["epe"] == pytest.approx(metrics["epe"], rel=1e-6)
    assert scores["trained"]["epe"] != pytest.approx(metrics["epe"], rel=1e-6)
    _, _, D, _ = evaluate.load_models(tmp_path / "run", torch.device("cpu"), average=False)
    torch.testing.assert_close(D.state_dict(), dict(ckpt["D"]), rtol=0, atol=0)

    assert run(tmp_path, "--train.steps=1", "--train.d_ema=0", name="off") == 0
    off = checkpoint.load_checkpoint(tmp_path / "off")
    assert "D_ema" not in off
    _, _, D, _ = evaluate.load_models(tmp_path / "off", torch.device("cpu"))
    torch.testing.assert_close(D.state_dict(), dict(off["D"]), rtol=0, atol=0)


def test_backend_report_cli():
    res = cli("vosgan.backend")
    assert res.returncode == 0, res.stderr
    for word in ("torch", "triton", "C++ ext", "numba", "DALI", "cupy", "composite", "gru"):
        assert word in res.stdout


def _tiny_run(
    k=1,
    checkpointing=False,
    frozen_bn=False,
    probe=None,
    batch=4,
    channels_last=False,
    fused=False,
    device="cpu",
    **overrides,
):
    cfg = tiny_config(
        **{
            "data.batch_size": batch,
            "train.grad_accum": k,
            "train.checkpoint_activations": checkpointing,
            "train.channels_last": channels_last,
            **overrides,
        }
    )
    run = train.build_run(cfg, torch.device(device), fused=fused)
    if frozen_bn:  # BN on its running statistics: every sample's loss is independent of the rest
        for m in [*run.G.modules(), *run.D.modules()]:
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    train.wrap_models(run)
    if probe is not None:
        probe(run)
    real = torch.rand(batch, 3, 16, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    real = real.to(device)
    logs, named = [], [*run.G.named_parameters("G"), *run.D.named_parameters("D")]
    for _ in range(3):  # R1 on steps 0 and 2
        logs.append(train.train_step(run, real, contextlib.nullcontext()))
        if run.step == 0:  # what the first D and G updates were computed from
            grads = {name: p.grad.clone() for name, p in named}
        run.step += 1
    state = {
        **{f"G.{k}": v for k, v in run.G.state_dict().items()},
        **{f"D.{k}": v for k, v in run.D.state_dict().items()},
    }
    return logs, state, grads


def test_grad_accumulation_equals_the_big_batch():
    # BatchNorm normalises each micro-batch with its own statistics, so accumulation differs from
    # the big batch by design; with BN on fixed statistics the two are the same function, and
    # must agree to float rounding: the losses to rtol 2e-5, the first step's gradients to
    # rtol 1e-4, the weights after 3 Adam steps as bounded below.
    big_logs, big, big_grads = _tiny_run(k=1, frozen_bn=True, batch=8)
    acc_logs, acc, acc_grads = _tiny_run(k=4, frozen_bn=True, batch=8)
    for a, b in zip(big_logs, acc_logs, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=2e-5, atol=1e-7, msg=name)
    for name, grad in big_grads.items():  # the first step's gradients, before Adam rescales them
        scale = grad.abs().max().item()
        torch.testing.assert_close(acc_grads[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
    for name in big:
        # Adam moves a weight by at most about lr = 2e-4 per step whatever its gradient, so a
        # near-zero gradient whose rounding differs can flip a whole step: bound every weight by
        # the 3 steps taken and almost all by 1e-6 (measured: all of them, today).
        diff = (acc[name].float() - big[name].float()).abs()
        assert diff.max() <= 3 * 2e-4 and (diff > 1e-6).float().mean() < 0.01, name
    # and with BN in training mode the difference is real (the test above can fail)
    _, ghost, _ = _tiny_run(k=2)
    _, plain, _ = _tiny_run(k=1)
    assert any((ghost[n] - plain[n]).abs().max() > 1e-4 for n in plain)


def _count_conv_calls(counts):
    """A probe for :func:`_tiny_run`: counts the calls of every conv in D's encoder blocks."""

    def probe(run):
        for block in run.D.encoder:
            for m in block.modules():
                if isinstance(m, torch.nn.Conv3d):
                    m.register_forward_hook(lambda *_: counts.append(1))

    return probe


@pytest.mark.parametrize("flow_fake", [0.0, 0.5])
def test_d_computes_the_fakes_flow_only_when_a_loss_reads_it(flow_fake):
    # The separate flow decoder is half of D's dense work; with loss.flow_fake = 0 (the default)
    # nothing reads its output on the fakes, so each D step runs it on the real clips alone, and
    # the G step's pass through D (dense here, for the consistency term) never runs it.
    calls = []

    def probe(run):
        run.D.flow_head.register_forward_hook(lambda *_: calls.append(1))

    logs, _, _ = _tiny_run(probe=probe, **{"loss.flow_fake": flow_fake, "loss.consistency": 0.5})
    assert len(calls) == len(logs) * (2 if flow_fake > 0 else 1)
    assert all(torch.isfinite(x["d_flow"]) for x in logs)


def test_activation_checkpointing_changes_nothing():
    # Recomputation replays the same ops on the same inputs (running statistics restored): the
    # gradients, the R1 double backward and BN's running statistics are bitwise the same.
    plain_calls, ck_calls = [], []
    logs, plain, _ = _tiny_run(probe=_count_conv_calls(plain_calls))
    ck_logs, ck, _ = _tiny_run(checkpointing=True, probe=_count_conv_calls(ck_calls))
    # and the blocks really recompute: every encoder conv that ran with grad runs again in backward
    assert len(ck_calls) > len(plain_calls) > 0
    for name in plain:
        torch.testing.assert_close(ck[name], plain[name], rtol=0, atol=0, msg=name)
    assert [sorted(x) for x in logs] == [sorted(x) for x in ck_logs]


def _write_mp4(path, frames=20, size=(40, 48), seed=0):
    import av

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size[0], size[1], 3), dtype=np.uint8)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.height, stream.width, stream.pix_fmt = size[0], size[1], "yuv420p"
        for t in range(frames):  # a bright square moving right over a static texture
            img = base.copy()
            img[10:20, 2 + t : 12 + t] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


REAL = [
    "--model.size=16",
    "--model.frames=16",
    "--model.g_channels=16",
    "--model.d_channels=4",
    "--model.gru_hidden=16",
    "--data.batch_size=2",
    "--data.train_clips=4",
    "--data.val_clips=2",
    "--train.eval_clips=2",
    "--train.steps=2",
    "--train.log_every=1",
]


def test_training_on_a_folder_of_videos(tmp_path, capsys):
    pytest.importorskip("av")
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(2):
        _write_mp4(videos / f"v{i}.mp4", seed=i)
    out = tmp_path / "run"
    assert train.main([*REAL, "--data", str(videos), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "segmentation IoU skipped: the data has no masks" in printed
    assert "flow EPE skipped: real video has no ground-truth flow" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_clips"] == 2 and "iou" not in metrics and "epe" not in metrics
    assert (out / "samples" / "step_000002.mp4").stat().st_size > 0
    assert checkpoint.load_checkpoint(out)["step"] == 2
    assert len((out / "log.jsonl").read_text().splitlines()) == 2


def test_training_on_frames_with_masks_scores_iou(tmp_path, capsys):
    seq = os.path.join(SHARED_DATA, "davis2016", "blackswan")
    if not os.path.isdir(seq):
        pytest.skip(f"shared real data not found at {SHARED_DATA}")
    out = tmp_path / "run"
    assert train.main([*REAL, "--data", seq, "--out", str(out)]) == 0
    assert "flow EPE skipped" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["iou"] <= 1 and 0 <= metrics["baseline_iou"] <= 1
    assert metrics["skipped"] == ["flow EPE skipped: real video has no ground-truth flow"]
    # the evaluate CLI scores the checkpoint on its own (real) validation clips, like training
    assert evaluate.main(["--checkpoint", str(out), "--json", str(tmp_path / "e.json")]) == 0
    again = json.loads((tmp_path / "e.json").read_text())
    assert again["iou"] == pytest.approx(metrics["iou"]) and "epe" not in again


def test_lr_dense_gives_d_decoders_their_own_rate():
    from vosgan.models import Discriminator
    from vosgan.train_run import d_param_groups

    D = Discriminator(config.load("cpu-small").model)
    assert len(d_param_groups(D, 0.0)) == 1
    trunk, dense = d_param_groups(D, 1e-3)
    opt = torch.optim.Adam([trunk, dense], lr=2e-4)
    assert [g["lr"] for g in opt.param_groups] == [2e-4, 1e-3]
    names = {id(p): n for n, p in D.named_parameters()}
    assert all(names[id(p)].startswith(("encoder.", "real_fake.")) for p in trunk["params"])
    assert any(names[id(p)].startswith("dense_head.") for p in dense["params"])
    assert any(names[id(p)].startswith("flow_encoder.") for p in dense["params"])
    assert len(trunk["params"]) + len(dense["params"]) == len(list(D.parameters()))

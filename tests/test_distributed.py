"""torchrun DDP on CPU (gloo, 2 processes) against single-process runs with the same global batch.

What is compared, and why these tolerances:

- Ranks: after training, rank 0's and rank 1's G and D parameters are bitwise identical (DDP hands
  every rank the same averaged gradient, and Adam is deterministic).
- With ``train.sync_bn=true`` a 2-process run computes the single-process run's function exactly
  (same clips and latents per step, BatchNorm over the global batch), after 4 steps with a lazy
  R1 pass and a resume in the middle. The only differences are float reduction order (all-reduce
  of two half-batch gradients vs one batch; SyncBatchNorm's two-pass statistics vs the native
  kernel), about 1e-6 relative on the losses. So every logged loss (each step's mean over the
  global batch) matches the single-process log to ``rel=5e-4``, and BatchNorm's running
  statistics match to ``rtol=1e-4``. Parameters: Adam's normalised steps move a weight by at
  most about ``lr = 2e-4`` per step whatever its gradient, so a near-zero gradient whose
  rounding differs can flip a whole step; every weight is bounded by the 4 steps taken
  (``4 * lr``) and all but 1% of each tensor's elements by ``2e-5``, a tenth of one step.
- Without sync_bn each rank normalises over its own half of the batch, which is what one process
  does with ``train.grad_accum=2``: that pair is compared with the same tolerances except the
  running statistics (rank 0's see half the batch). The 2-process side also recomputes its
  activations (``train.checkpoint_activations=true``), and no loss reads D's dense heads, so
  DDP must cope with parameters outside the loss (``find_unused_parameters`` stays off:
  ``train_step`` adds the idle heads to D's loss times 0).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from vosgan import checkpoint, train
from vosgan.models import Discriminator, Generator

TINY = [
    "--model.size=16",
    "--model.frames=16",
    "--model.g_channels=16",
    "--model.d_channels=4",
    "--model.gru_hidden=16",
    "--data.batch_size=4",
    "--data.train_clips=16",
    "--data.val_clips=4",
    "--train.eval_clips=4",
    "--train.log_every=1",
    "--train.eval_every=1000",
    "--train.sample_every=1000",
    "--train.device=cpu",
    "--loss.r1=1",
    "--loss.r1_every=2",
    "--optim.lr_dense=0",  # one learning rate (2e-4) for all of D: the tolerances below use it
]

# Runs vosgan.train.main under torchrun and saves this rank's G and D, to compare ranks.
WORKER = """
import sys, torch
from vosgan import train
runs = []
wrap = train.wrap_models
train.wrap_models = lambda run: (runs.append(run), wrap(run))[1]
code = train.main(sys.argv[2:])
if code or not runs:
    sys.exit(code or 1)
run = runs[0]
state = {**{"G." + k: v for k, v in run.G.state_dict().items()},
         **{"D." + k: v for k, v in run.D.state_dict().items()}}
torch.save(state, f"{sys.argv[1]}/rank{run.env.rank}.pt")
sys.exit(code)
"""


def torchrun(tmp_path, *args, nproc=2):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(worker),
        str(tmp_path),
        *TINY,
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k != "clips_per_s"} for r in rows}


def params(path):
    ckpt = checkpoint.load_checkpoint(path)
    return {f"{m}.{k}": v for m in ("G", "D") for k, v in ckpt[m].items() if v.is_floating_point()}


def assert_ranks_identical(tmp_path, buffers):
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    names = {n for n in r0 if buffers or "running_" not in n}
    for name in sorted(names):
        torch.testing.assert_close(r0[name], r1[name], rtol=0, atol=0, msg=name)


def assert_same_run(ddp_dir, single_dir, buffers=False):
    a, b = losses(ddp_dir), losses(single_dir)
    assert sorted(a) == sorted(b)
    for step in a:
        assert a[step].keys() == b[step].keys(), step
        for name in a[step]:
            # rel 5e-4: summation order differs (all-reduce vs accumulation) and Adam rescales
            # near-zero gradients; with loss.flow=20 the R1 norm at step 3 moved by 1.1e-4.
            assert a[step][name] == pytest.approx(b[step][name], rel=5e-4, abs=1e-6), (step, name)
    pa, pb = params(ddp_dir), params(single_dir)
    for name in pa:
        if "running_" in name:  # without sync_bn rank 0's statistics see half the batch
            if buffers:
                torch.testing.assert_close(pa[name], pb[name], rtol=1e-4, atol=1e-6, msg=name)
        else:
            # Adam moves a weight by at most about lr per step, whatever its gradient, so a
            # near-zero gradient whose rounding differs can flip a whole step: bound every
            # weight by the 4 steps taken (4 * lr) and almost all by a tenth of one step.
            diff = (pa[name] - pb[name]).abs()
            assert diff.max() <= 4 * 2e-4, (name, diff.max().item())
            assert (diff > 2e-5).float().mean() < 0.01, (name, (diff > 2e-5).sum().item())


def test_sync_bn_ddp_matches_one_process_and_resumes(tmp_path):
    out = tmp_path / "ddp"
    res = torchrun(tmp_path, "--train.sync_bn=true", "--train.steps=2", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = train.parse_args(TINY)[0].model
    bns = [
        m
        for net in (Generator(cfg), Discriminator(cfg))
        for m in net.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    assert f"sync_bn: {len(bns)} BatchNorm layer(s)" in res.stdout
    assert_ranks_identical(tmp_path, buffers=True)
    res = torchrun(
        tmp_path, "--train.sync_bn=true", "--train.steps=4", "--out", str(out), "--resume", "auto"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("resumed from") == 1  # rank 0 alone prints
    assert_ranks_identical(tmp_path, buffers=True)
    assert train.main([*TINY, "--train.steps=4", "--out", str(tmp_path / "one")]) == 0
    assert_same_run(out, tmp_path / "one", buffers=True)
    # rank 0 alone writes the run folder; the final evaluation ran once
    assert checkpoint.load_checkpoint(out)["step"] == 4
    assert json.loads((out / "metrics.json").read_text())["step"] == 4


def test_ddp_without_sync_bn_is_accumulation_over_rank_shares(tmp_path):
    out = tmp_path / "ddp"
    # no loss reads D's dense heads here: DDP must still reduce the idle decoders' gradients
    idle = ["--loss.segmentation=0", "--loss.flow=0", "--loss.flow_smoothness=0"]
    res = torchrun(
        tmp_path, "--train.steps=3", "--train.checkpoint_activations=true", *idle, "--out", str(out)
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert_ranks_identical(tmp_path, buffers=False)
    one = tmp_path / "accum"
    assert (
        train.main([*TINY, "--train.steps=3", "--train.grad_accum=2", *idle, "--out", str(one)])
        == 0
    )
    assert_same_run(out, one)


def test_errors_name_the_rank(tmp_path):
    # a batch of 3 cannot be split over 2 processes: every rank says so, naming itself.
    res = torchrun(tmp_path, "--train.steps=1", "--data.batch_size=3", "--out", str(tmp_path / "r"))
    assert res.returncode != 0
    # The first rank to fail makes torchrun stop the other, which may not get to print.
    said = [
        rank
        for rank in (0, 1)
        if f"error (rank {rank} of 2): data.batch_size=3 must be "
        "divisible by the number of processes (2)" in res.stderr
    ]
    assert said, res.stderr[-2000:]


def test_ctrl_c_under_torchrun_checkpoints_once_all_ranks_agree(tmp_path):
    # Ctrl-C reaches the torchrun agent, which forwards SIGINT to the workers: they agree on the
    # step to stop at, rank 0 writes the checkpoint, and all leave the process group together.
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "vosgan.train",
        *TINY,
        "--train.steps=1000",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    log = out / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=120)
    assert "interrupted at step" in stdout
    step = int(stdout.split("interrupted at step ")[1].split(";")[0])
    assert 2 <= step < 1000
    assert checkpoint.load_checkpoint(out)["step"] == step

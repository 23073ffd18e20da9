"""torch.compile: every fused op traces as one graph (``fullgraph=True``), and ``--compile`` trains.

The ops are registered with ``torch.library`` (fake/shape functions and autograd), so dynamo and
AOT autograd see each as one opaque node. The checks run forward and backward through
``aot_eager`` (dynamo + AOT autograd on fake tensors: where graph breaks and missing fake or
autograd registrations show, in well under a second per op) and compare with the eager op; one op
also goes through inductor's CPU code generation (about 8 s cold), with its cache in tmp_path.
"""

import json

import pytest
import torch

from vosgan import train
from vosgan.ops import composite, conv3d_block, flow_warp, gru

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_dynamo(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _leaves(*shapes, gen):
    return [torch.randn(*s, generator=gen).requires_grad_(True) for s in shapes]


def check_compiles(fn, inputs, backend="aot_eager", rtol=1e-5, atol=1e-6):
    """``fn(*inputs)`` compiled with fullgraph=True equals eager, forward and every gradient."""
    twin = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    got, want = compiled(*inputs), fn(*twin)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    got.float().square().sum().backward()
    want.float().square().sum().backward()
    for i, (a, b) in enumerate(zip(inputs, twin, strict=True)):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=atol, msg=f"grad {i}")


def fused(op_module):
    impl, why = op_module.fused_impl(CPU)
    if impl is None:
        pytest.skip(f"{op_module.__name__}: no fused CPU implementation here ({why})")
    return impl


def test_composite_fullgraph_inductor():
    impl = fused(composite)
    gen = torch.Generator().manual_seed(0)
    inputs = _leaves((2, 3, 4, 5, 7), (2, 1, 4, 5, 7), (2, 3, 5, 7), gen=gen)
    with torch.no_grad():
        inputs[1].sigmoid_()
    check_compiles(
        lambda f, m, b: composite.composite(f, m, b, impl=impl), inputs, backend="inductor"
    )


def test_flow_warp_loss_fullgraph():
    impl = fused(flow_warp)
    gen = torch.Generator().manual_seed(1)
    x, flow = _leaves((2, 3, 4, 6, 7), (2, 2, 3, 6, 7), gen=gen)
    check_compiles(lambda x, f: flow_warp.flow_warp_loss(x, f, impl=impl), [x, flow])


def test_gru_fullgraph():
    impl = fused(gru)
    gen = torch.Generator().manual_seed(2)
    x, h0, w_ih, w_hh, b_ih, b_hh = _leaves(
        (3, 5, 4), (3, 6), (18, 4), (18, 6), (18,), (18,), gen=gen
    )
    check_compiles(lambda *a: gru.gru(*a, impl=impl)[0], [x, h0, w_ih, w_hh, b_ih, b_hh])


def test_bn_act_fullgraph():
    pytest.importorskip("triton")  # a Triton kernel: on the GPU, else interpreted on CPU tensors
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(3)
    y, weight, bias = (
        t.detach().to(dev).requires_grad_() for t in _leaves((2, 3, 2, 3, 5), (3,), (3,), gen=gen)
    )
    # Compiled, bn_act updates the running statistics with its own torch ops (not the eager
    # kernels' in-place update): check them against nn.BatchNorm3d after one training step.
    rm = torch.randn(3, generator=gen).to(dev)
    rv = torch.rand(3, generator=gen).add(0.5).to(dev)
    bn = torch.nn.BatchNorm3d(3, momentum=0.1).to(dev)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
        bn.running_mean.copy_(rm)
        bn.running_var.copy_(rv)
    # rm, rv as inputs: the compiled call updates these, the eager twin its clones.
    check_compiles(
        lambda y, w, b, m, v: conv3d_block.bn_act(y, w, b, m, v, impl="triton"),
        [y, weight, bias, rm, rv],
    )
    bn(y.detach())  # nn.BatchNorm3d's own running-stat update, the reference
    torch.testing.assert_close(rm, bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv, bn.running_var, rtol=1e-5, atol=1e-6)
    # Eval: normalised with the running statistics, which stay exactly as they are.
    rm_before, rv_before = rm.clone(), rv.clone()
    bn.eval()
    evaluate = torch.compile(
        lambda y: conv3d_block.bn_act(y, weight, bias, rm, rv, training=False, impl="triton"),
        fullgraph=True,
        backend="aot_eager",
    )
    with torch.no_grad():
        got = evaluate(y.detach() * 2 - 1)
        want = torch.nn.functional.leaky_relu(bn(y.detach() * 2 - 1), 0.2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rm, rm_before, rtol=0, atol=0)
    torch.testing.assert_close(rv, rv_before, rtol=0, atol=0)


def test_compile_flag_trains_like_eager(tmp_path, monkeypatch):
    # inductor would spend minutes compiling G and D on 2 cores; aot_eager traces the same
    # graphs (fused ops, the R1 step on the uncompiled D, D frozen in the G step) in seconds.
    real_compile = torch.compile
    compiled = []  # what train_run handed to torch.compile: G, D (and D frozen if distributed)

    def compile_aot_eager(m, **kw):
        compiled.append(m)
        return real_compile(m, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    args = [
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
        "--loss.r1=1",
        "--loss.r1_every=2",
        "--fused",
    ]
    assert train.main([*args, "--compile", "--out", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "config.json").read_text())["train"]["compile"]
    assert len(compiled) >= 2  # --compile really compiled G and D
    n_compiled = len(compiled)
    assert train.main([*args, "--out", str(tmp_path / "e")]) == 0
    assert len(compiled) == n_compiled  # and without it nothing is compiled
    logs = [
        [json.loads(line) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
        for d in ("c", "e")
    ]
    for a, b in zip(*logs, strict=True):
        for name in a:
            if name != "clips_per_s":
                assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-6), name

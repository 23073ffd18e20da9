"""Fused GRU (vosgan._C, ``vosgan.ops.gru``, ``vosgan.nn.FusedGRU``) against ``nn.GRU``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

from vosgan import backend
from vosgan.nn import FusedGRU, fuse_modules
from vosgan.ops import gru as gru_ops
from vosgan.ops.gru import gru, gru_reference

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
requires_ext = pytest.mark.skipif(gru_ops._C is None, reason=f"no vosgan._C: {gru_ops._EXT_ERROR}")

# (B, T, n_in, H): B=1, T=1, H not a multiple of 8, n_in=1.
ODD_SHAPES = [(1, 1, 3, 5), (2, 7, 5, 13), (3, 4, 1, 9), (5, 3, 8, 24)]


def _pair(n_in: int, H: int, device: str = "cpu", bias: bool = True) -> tuple[nn.GRU, FusedGRU]:
    ref = nn.GRU(n_in, H, batch_first=True, bias=bias).to(device)
    fused = FusedGRU(n_in, H, bias=bias, device=device)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _raw_args(
    B: int, T: int, n_in: int, H: int, w_ih: float = 1.0, w_hh: float = 1.0, bias: float = 1.0
) -> list[torch.Tensor]:
    """Random ``(x, h0, w_ih, w_hh, b_ih, b_hh)`` for the functional op, weights scaled."""
    return [
        torch.randn(B, T, n_in),
        torch.randn(B, H),
        torch.randn(3 * H, n_in) * w_ih,
        torch.randn(3 * H, H) * w_hh,
        torch.randn(3 * H) * bias,
        torch.randn(3 * H) * bias,
    ]


def _grads(module: nn.Module, x: torch.Tensor, h0: torch.Tensor | None, seed: int) -> list:
    x = x.detach().clone().requires_grad_()
    h0 = None if h0 is None else h0.detach().clone().requires_grad_()
    out, h_n = module(x, h0)
    g = torch.Generator(device=x.device).manual_seed(seed)
    g_out = torch.randn(out.shape, generator=g, device=x.device, dtype=out.dtype)
    g_h = torch.randn(h_n.shape, generator=g, device=x.device, dtype=out.dtype)
    module.zero_grad()
    ((out * g_out).sum() + (h_n * g_h).sum()).backward()
    grads = [x.grad] + ([h0.grad] if h0 is not None else [])
    return [out, h_n, *grads, *[p.grad for p in module.parameters()]]


def test_extension_loads_on_cpu() -> None:
    # CI builds the extension; a missing one must fail here, not skip every test below.
    assert gru_ops._C is not None, gru_ops._EXT_ERROR
    assert gru_ops.fused_impl(torch.device("cpu"))[0] == "cpp"
    assert "gru              cpp" in backend.report("cpu")


@requires_ext
@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("with_h0", [False, True])
def test_forward_and_all_grads_match_nn_gru(shape: tuple[int, ...], with_h0: bool) -> None:
    B, T, n_in, H = shape
    ref, fused = _pair(n_in, H)
    x = torch.randn(B, T, n_in)
    h0 = torch.randn(1, B, H) if with_h0 else None
    expected, got = _grads(ref, x, h0, 1), _grads(fused, x, h0, 1)
    assert len(got) == len(expected) == 4 + 3 + with_h0
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=1e-4)


@requires_ext
@pytest.mark.parametrize("shape", [(64, 4, 8, 130), (200, 3, 5, 33)])
def test_parallel_tasks_split_batch_and_units(shape: tuple[int, ...]) -> None:
    """Shapes big enough for several at::parallel_for tasks at two threads (the per-task batch
    and unit slices, and the sliced bias sums); ODD_SHAPES run as one task."""
    B, T, n_in, H = shape
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ref, fused = _pair(n_in, H)
        x, h0 = torch.randn(B, T, n_in), torch.randn(1, B, H)
        expected, got = _grads(ref, x, h0, 2), _grads(fused, x, h0, 2)
    finally:
        torch.set_num_threads(threads)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=5e-5, rtol=1e-4)


@requires_ext
def test_ops_called_directly_check_devices_and_dtypes() -> None:
    """A meta tensor among CPU ones dispatches to the fake kernel, which must refuse it rather
    than return uninitialised memory; gru_backward refuses integer tensors."""
    x, h0, *w = _raw_args(2, 3, 4, 5)
    with pytest.raises(RuntimeError, match="every argument must be torch.float32 on cpu"):
        torch.ops.vosgan.gru_forward(x, h0, w[0], w[1].to("meta"), w[2], w[3])
    out, ws = torch.ops.vosgan.gru_forward(x, h0, *w)
    with pytest.raises(RuntimeError, match="every argument must be torch.float32 on cpu"):
        torch.ops.vosgan.gru_backward(out, x, h0.to("meta"), w[0], w[1], ws)
    ints = [t.long() for t in (out, x, h0, w[0], w[1])]
    with pytest.raises(RuntimeError, match="x has dtype Long; supported"):
        torch.ops.vosgan.gru_backward(*ints, ws)


def test_cuda_blocker_follows_the_kernels_shared_memory() -> None:
    """12 U H bytes of shared memory per block, U the smallest power of two (<= 16) giving at
    most one block per SM: the largest H is 869 on an A100, 1210 on an H100."""
    from types import SimpleNamespace

    devices = {
        0: SimpleNamespace(multi_processor_count=108, shared_memory_per_block_optin=166912),
        1: SimpleNamespace(multi_processor_count=132, shared_memory_per_block_optin=232448),
    }
    blocker = gru_ops.cuda_blocker.__wrapped__
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "get_device_properties", lambda i: devices[i])
        for index, fits, too_big in ((0, 869, 870), (1, 1210, 1211)):
            devices[index].name = f"device {index}"
            assert blocker(torch.float32, fits, index) is None
            assert blocker(torch.bfloat16, 64, index) is None
            why = blocker(torch.float32, too_big, index)
            assert f"hidden size {too_big} needs {12 * 16 * too_big} bytes" in why
        assert "float64 runs the reference" in blocker(torch.float64, 64, 0)


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_autocast_output_has_the_inputs_dtype(w_dtype: torch.dtype, x_dtype: torch.dtype) -> None:
    """As nn.GRU on CPU: under autocast the outputs have the input's dtype, whatever the
    parameters' (the op's autocast kernel computes in float32)."""
    ref, fused = (m.to(w_dtype) for m in _pair(3, 6))
    x = torch.randn(2, 4, 3, dtype=x_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = ref(x), fused(x)
    assert [t.dtype for t in got] == [t.dtype for t in want] == [x_dtype] * 2
    torch.testing.assert_close(got[0], want[0], atol=3e-2, rtol=3e-2)


# Run in a child process: the gate-loop clone is picked once per process.
_ISA_CHILD = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from vosgan import _C
    from vosgan.nn import FusedGRU
    print(_C.gru_cpu_isa())
    torch.manual_seed(0)
    # H=40: full vectors and a tail in every gate loop; the odd shapes of this file too.
    for B, T, n_in, H in [(4, 6, 3, 40), (1, 1, 3, 5), (2, 7, 5, 13), (5, 3, 8, 24)]:
        ref = nn.GRU(n_in, H, batch_first=True)
        fused = FusedGRU(n_in, H)
        fused.load_state_dict(ref.state_dict())
        x = torch.randn(B, T, n_in)
        got, want = [], []
        for module, grads in ((ref, want), (fused, got)):
            xi = x.clone().requires_grad_()
            out, h_n = module(xi)
            (out.square().sum() + h_n.sum()).backward()
            grads += [out, h_n, xi.grad, *[p.grad for p in module.parameters()]]
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)
    """
)


@requires_ext
def test_every_gate_loop_clone_matches_nn_gru() -> None:
    # The CPU gate loops are compiled for AVX2+FMA and for the baseline ISA (what CPUs without
    # AVX2 run); VOSGAN_GRU_ISA picks one, so both are checked on this machine.
    for isa in ["avx2", "base"]:
        if isa == "avx2" and gru_ops._C.gru_cpu_isa() != "avx2":
            continue  # this CPU has no AVX2
        env = {**os.environ, "VOSGAN_GRU_ISA": isa, "OMP_NUM_THREADS": "1"}
        run = subprocess.run(
            [sys.executable, "-c", _ISA_CHILD], env=env, capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.split()[0] == isa
    env = {**os.environ, "VOSGAN_GRU_ISA": "avx1024"}
    code = "import torch, vosgan.ops.gru as g; print(g.fused_impl(torch.device('cpu'))[1])"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "VOSGAN_GRU_ISA=avx1024 is not a gate-loop clone this CPU runs" in run.stdout


HAS_ONEDNN = gru_ops._C is not None and gru_ops._C.gru_cpu_gemm().startswith("oneDNN")
requires_onednn = pytest.mark.skipif(not HAS_ONEDNN, reason="torch has no usable oneDNN here")


def _forward_and_grads(shape: tuple[int, ...], engine: str, monkeypatch) -> tuple[list, list]:
    """nn.GRU's and FusedGRU's outputs and gradients at ``shape``, the fused GRU's GEMMs run by
    ``engine`` (VOSGAN_GRU_GEMM)."""
    B, T, n_in, H = shape
    torch.manual_seed(3)
    ref, fused = _pair(n_in, H)
    x, h0 = torch.randn(B, T, n_in), torch.randn(1, B, H)
    monkeypatch.setenv("VOSGAN_GRU_GEMM", engine)
    return _grads(ref, x, h0, 4), _grads(fused, x, h0, 4)


@requires_ext
@pytest.mark.parametrize("engine", ["blas", pytest.param("onednn", marks=requires_onednn)])
@pytest.mark.parametrize("shape", [*ODD_SHAPES, (33, 20, 7, 70)])
def test_both_gemm_engines_match_nn_gru(shape: tuple[int, ...], engine: str, monkeypatch) -> None:
    # (33, 20, 7, 70): the input projection runs in chunks of 18 steps, the last one short.
    expected, got = _forward_and_grads(shape, engine, monkeypatch)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=1e-4)


@requires_ext
@requires_onednn
def test_auto_engine_picks_onednn_from_the_size_up(monkeypatch) -> None:
    # Step GEMMs (2, 256) @ (256, 768) are below the threshold, (16, 256) @ (256, 768) above it;
    # the two engines round differently at both sizes.
    for shape, picked in [((2, 5, 32, 256), "blas"), ((16, 5, 32, 256), "onednn")]:
        runs = {e: _forward_and_grads(shape, e, monkeypatch)[1] for e in ("blas", "onednn")}
        auto = _forward_and_grads(shape, "auto", monkeypatch)[1]
        other = "blas" if picked == "onednn" else "onednn"
        assert all(torch.equal(a, b) for a, b in zip(auto, runs[picked], strict=True)), shape
        assert not all(torch.equal(a, b) for a, b in zip(auto, runs[other], strict=True)), shape
    # torch's own switch for oneDNN turns the engine off too.
    with torch.backends.mkldnn.flags(enabled=False):
        auto = _forward_and_grads((16, 5, 32, 256), "auto", monkeypatch)[1]
        assert all(torch.equal(a, b) for a, b in zip(auto, runs["blas"], strict=True))
        with pytest.raises(RuntimeError, match="torch.backends.mkldnn.enabled is False"):
            _forward_and_grads((16, 5, 32, 256), "onednn", monkeypatch)


@requires_ext
def test_bad_gemm_engine_is_named(monkeypatch) -> None:
    with pytest.raises(RuntimeError, match="VOSGAN_GRU_GEMM=mkl is not an engine"):
        _forward_and_grads((2, 3, 4, 5), "mkl", monkeypatch)


@requires_ext
def test_no_bias_and_unbatched_input() -> None:
    ref, fused = _pair(4, 6, bias=False)
    x = torch.randn(2, 3, 4)
    expected, got = _grads(ref, x, None, 2), _grads(fused, x, None, 2)
    assert len(got) == len(expected) == 5  # out, h_n, dx, dW_ih, dW_hh
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=1e-4)
    xu, hu = torch.randn(5, 4), torch.randn(1, 6)
    for e, g in zip(ref(xu, hu), fused(xu, hu), strict=True):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, atol=2e-5, rtol=1e-4)


@requires_ext
def test_gradcheck_float64() -> None:
    B, T, n_in, H = 2, 3, 3, 5
    args = _raw_args(B, T, n_in, H, w_ih=0.5, w_hh=0.5)
    args = [a.double().requires_grad_() for a in args]
    assert torch.autograd.gradcheck(lambda *a: gru(*a, impl="cpp"), args)
    assert torch.autograd.gradcheck(gru_reference, args)


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype: torch.dtype) -> None:
    B, T, n_in, H = 2, 3, 4, 5
    args = _raw_args(B, T, n_in, H)
    args = [a.to(dtype).requires_grad_() for a in args]
    torch.library.opcheck(torch.ops.vosgan.gru_forward.default, args)
    with torch.no_grad():
        _, ws = torch.ops.vosgan.gru_forward(*args)
    bwd = [torch.randn(B, T, H, dtype=dtype), *[a.detach() for a in args[:4]], ws]
    torch.library.opcheck(torch.ops.vosgan.gru_backward.default, bwd)


@requires_ext
def test_double_backward_raises() -> None:
    fused = FusedGRU(3, 4)
    out, _ = fused(torch.randn(2, 3, 3))
    (g,) = torch.autograd.grad(out.sum(), fused.weight_hh_l0, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


@requires_ext
def test_torch_compile_smoke(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    ref, fused = _pair(4, 6)
    x = torch.randn(2, 5, 4)

    def step(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out, h_n = m(x)
        return torch.tanh(out).sum() + h_n.sum()

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(fused, x)
    loss.backward()
    ref_loss = step(ref, x)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused.weight_hh_l0.grad, ref.weight_hh_l0.grad, atol=1e-5, rtol=1e-4)


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_cpu(dtype: torch.dtype) -> None:
    # flash-attention rule: error vs the fp32 reference <= 2x the reference's own error in dtype,
    # for out, h_T and every gradient (the C++ op's low-precision backward included).
    B, T, n_in, H = 3, 6, 8, 24
    args = _raw_args(B, T, n_in, H, w_ih=0.3, w_hh=0.3, bias=0.1)
    g_out, g_h = torch.randn(B, T, H), torch.randn(B, H)

    def run(fn, inputs):
        inputs = [a.detach().clone().requires_grad_() for a in inputs]
        out, h_t = fn(*inputs)
        loss = (out * g_out.to(out.dtype)).sum() + (h_t * g_h.to(out.dtype)).sum()
        return [out, h_t, *torch.autograd.grad(loss, inputs)]

    low = [a.to(dtype) for a in args]
    exact = run(gru_reference, [a.float() for a in low])  # fp32 on the same rounded inputs
    base = run(gru_reference, low)
    got = run(lambda *a: gru(*a, impl="cpp"), low)
    names = ("out", "h_t", "dx", "dh0", "dW_ih", "dW_hh", "db_ih", "db_hh")
    for name, a, r, e in zip(names, got, base, exact, strict=True):
        assert a.dtype == dtype, name
        err, ref_err = (a.float() - e).abs().max(), (r.float() - e).abs().max()
        assert err <= 2 * ref_err + 1e-6, f"{name}: {err} vs ref {ref_err}"


@requires_ext
def test_state_dict_round_trip_and_fuser() -> None:
    model = nn.Sequential(
        nn.GRU(4, 6, batch_first=True),
        nn.GRU(4, 6),
        nn.GRU(4, 6, batch_first=True, num_layers=2),
        nn.GRU(4, 6, batch_first=True, bidirectional=True),
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [model[0].weight_ih_l0, model[0].bias_hh_l0]
    calls = []
    model[0].register_forward_hook(lambda *_: calls.append("hook"))
    replaced = fuse_modules(model, ops={"gru"})
    assert replaced == ["0: GRU -> FusedGRU (gru)"]
    assert isinstance(model[0], FusedGRU) and type(model[1]) is nn.GRU
    assert model[0].weight_ih_l0 is params[0] and model[0].bias_hh_l0 is params[1]
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k])
    back = nn.GRU(4, 6, batch_first=True)
    back.load_state_dict(model[0].state_dict())
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(model[0](x)[0], back(x)[0], atol=2e-5, rtol=1e-4)
    assert calls == ["hook"]  # the nn.GRU's hooks carry over


def test_rejects_unsupported_settings() -> None:
    with pytest.raises(ValueError, match="num_layers"):
        FusedGRU(4, 6, num_layers=2)
    with pytest.raises(ValueError, match="bidirectional"):
        FusedGRU(4, 6, bidirectional=True)
    with pytest.raises(ValueError, match="batch_first"):
        FusedGRU(4, 6, batch_first=False)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(2, 3, 4), [3, 2], batch_first=True)
    with pytest.raises(TypeError, match="PackedSequence"):
        FusedGRU(4, 6)(packed)
    with pytest.raises(ValueError, match="hx must have shape"):
        FusedGRU(4, 6)(torch.randn(2, 3, 4), torch.randn(2, 6))
    # the module's argument names, not the op's (h0, w_ih)
    with pytest.raises(TypeError, match="FusedGRU: hx is torch.float64 on cpu but the weights"):
        FusedGRU(4, 6)(torch.randn(2, 3, 4), torch.randn(1, 2, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match="FusedGRU: input is torch.float64 on cpu but the weights"):
        FusedGRU(4, 6)(torch.randn(2, 3, 4, dtype=torch.float64))


def test_input_validation_names_the_argument() -> None:
    H = 5
    x, h0 = torch.randn(2, 3, 4), torch.randn(2, H)
    w = [torch.randn(3 * H, 4), torch.randn(3 * H, H), torch.randn(3 * H), torch.randn(3 * H)]
    with pytest.raises(ValueError, match="w_ih must have shape"):
        gru(x, h0, torch.randn(3 * H, 3), *w[1:])
    with pytest.raises(ValueError, match="h0 must have shape"):
        gru(x, torch.randn(3, H), *w)
    with pytest.raises(TypeError, match="b_hh has dtype"):
        gru(x, h0, *w[:3], w[3].double())
    with pytest.raises(ValueError, match="w_hh is on meta"):
        gru(x, h0, w[0], w[1].to("meta"), *w[2:])
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        gru(x.long(), h0, *w)
    if gru_ops._C is not None:  # the C++ op checks on its own when called directly
        with pytest.raises(RuntimeError, match="x must be contiguous"):
            torch.ops.vosgan.gru_forward(x.transpose(0, 1), h0[:1].expand(3, H).contiguous(), *w)
        # Messages with numbers in them: built without iostreams (a stream formatting a number
        # crashed the H200 machine's build of the module; csrc/README.md).
        with pytest.raises(RuntimeError, match=r"w_hh must be \(3H, H\), got shape \[15, 4\]"):
            torch.ops.vosgan.gru_forward(x, h0, w[0], w[1][:, :4], *w[2:])
        with pytest.raises(RuntimeError, match=r"h0 must have shape \[2, 5\], got \[3, 5\]"):
            torch.ops.vosgan.gru_forward(x, torch.randn(3, H), *w)
        with pytest.raises(RuntimeError, match="h0 has dtype Double but x has dtype Float"):
            torch.ops.vosgan.gru_forward(x, h0.double(), *w)


def test_fallback_warns_once_with_reason(monkeypatch) -> None:
    monkeypatch.setattr(gru_ops, "_C", None)
    monkeypatch.setattr(gru_ops, "_EXT_ERROR", "vosgan._C not importable (simulated)")
    monkeypatch.setattr(backend, "_warned", set())
    backend._choose.cache_clear()
    try:
        assert "simulated" in backend.report("cpu")
        fused = FusedGRU(3, 4)
        x = torch.randn(2, 3, 3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, _ = fused(x)
            fused(x)
        msgs = [str(w.message) for w in caught if "gru" in str(w.message)]
        assert len(msgs) == 1 and "simulated" in msgs[0]
        ref = nn.GRU(3, 4, batch_first=True)
        ref.load_state_dict(fused.state_dict())
        torch.testing.assert_close(out, ref(x)[0], atol=2e-5, rtol=1e-4)
        with pytest.raises(RuntimeError, match="simulated"):
            gru(x, None, fused.weight_ih_l0, fused.weight_hh_l0, impl="cpp")
    finally:
        backend._choose.cache_clear()


@requires_cuda
@requires_ext
@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape", [(1, 1, 3, 5), (3, 7, 5, 13), (16, 16, 32, 256), (64, 9, 32, 300), (5, 4, 16, 1000)]
)
def test_cuda_matches_cudnn(shape: tuple[int, ...]) -> None:
    assert gru_ops.fused_impl(torch.device("cuda"))[0] == "cuda"
    B, T, n_in, H = shape
    ref, fused = _pair(n_in, H, "cuda")
    x, h0 = torch.randn(B, T, n_in, device="cuda"), torch.randn(1, B, H, device="cuda")
    with torch.backends.cudnn.flags(allow_tf32=False):
        expected = _grads(ref, x, h0, 3)
    got = _grads(fused, x, h0, 3)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-3)


@requires_cuda
@requires_ext
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision(dtype: torch.dtype) -> None:
    B, T, n_in, H = 8, 12, 32, 128
    args = _raw_args(B, T, n_in, H, w_ih=0.2, w_hh=0.1, bias=0.1)
    args = [a.cuda() for a in args]
    exact, _ = gru_reference(*[a.double() for a in args])
    low = [a.to(dtype) for a in args]
    ref_err = (gru_reference(*low)[0].double() - exact).abs().max()
    out, _ = gru(*low, impl="cuda")
    assert out.dtype == dtype
    assert (out.double() - exact).abs().max() <= 2 * ref_err + 1e-6


@requires_cuda
@requires_ext
@pytest.mark.gpu
def test_cuda_opcheck_and_compile() -> None:
    B, T, n_in, H = 2, 3, 4, 5
    args = _raw_args(B, T, n_in, H)
    args = [a.cuda().requires_grad_() for a in args]
    torch.library.opcheck(torch.ops.vosgan.gru_forward.default, args)
    fused = FusedGRU(n_in, H, device="cuda")
    out = torch.compile(lambda x: fused(x)[0].sum(), fullgraph=True)(args[0])
    out.backward()
    assert fused.weight_hh_l0.grad is not None


@requires_ext
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_op_under_autocast_runs_in_float32(device: str) -> None:
    # Autocast reaches custom ops. The ops' AutocastCPU/AutocastCUDA kernels cast half/bfloat16
    # arguments up to float32 and keep autocast away from the drivers' GEMMs, which it would
    # otherwise cast down (a bfloat16 input projection handed to the float32 recurrence).
    args = [a.to(device) for a in _raw_args(3, 4, 5, 6, w_hh=0.5)]
    x_low = args[0].to(torch.bfloat16).requires_grad_()
    g = torch.randn(3, 4, 6, device=device, dtype=torch.bfloat16)
    want, ws = torch.ops.vosgan.gru_forward(x_low.detach().float(), *args[1:])
    want_grads = torch.ops.vosgan.gru_backward(g.float(), x_low.detach().float(), *args[1:4], ws)
    with torch.autocast(device, dtype=torch.bfloat16):
        out, _ = torch.ops.vosgan.gru_forward(x_low, *args[1:])
        grads = torch.ops.vosgan.gru_backward(g, x_low.detach(), *args[1:4], ws)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want)
    for got, exp in zip(grads, want_grads, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, exp)
    out.backward(g.float())
    assert x_low.grad is not None and x_low.grad.dtype == torch.bfloat16

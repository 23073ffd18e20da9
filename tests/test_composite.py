"""Mask compositing: Triton (interpreter on CPU) and numba against the reference.

Shapes are tiny and odd (B=1, T=2, H*W not a multiple of any block) so the interpreter runs a
handful of programs; one plane (33 x 35 = 1155 pixels) spans several forward and backward blocks.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import far_view, requires_cuda, watch_launches
from vosgan.kernels.composite import bwd_block, bwd_t_chunk, composite_bwd, fwd_block

from vosgan.nn import MaskComposite, fuse_modules
from vosgan.ops.composite import (
    composite,
    composite_backward_op,
    composite_backward_reference,
    composite_op,
    composite_reference,
    fused_impl,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ["triton", "numba"] if DEV == "cpu" else ["triton"]
SHAPES = [(1, 3, 2, 5, 7), (2, 3, 3, 33, 35), (1, 1, 2, 3, 3), (1, 5, 2, 4, 9), (1, 3, 1, 1, 1)]


def _inputs(shape, dtypes=(torch.float32,) * 3, device=DEV, grad=True):
    bsz, c, t, h, w = shape
    f = torch.randn(bsz, c, t, h, w).tanh().to(device, dtypes[0])
    m = torch.randn(bsz, 1, t, h, w).sigmoid().to(device, dtypes[1])
    b = torch.randn(bsz, c, h, w).tanh().to(device, dtypes[2])
    return [x.requires_grad_(grad) for x in (f, m, b)]


def _run(fn, f, m, b, g):
    v = fn(f, m, b)
    return (v, *torch.autograd.grad(v, (f, m, b), g))


def _err(a, ref):
    return (a.double() - ref.double()).abs().max().item()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_fp32(impl, shape):
    f, m, b = _inputs(shape)
    g = torch.randn(f.shape, device=DEV)
    got = _run(lambda *a: composite(*a, impl=impl), f, m, b, g)
    want = _run(composite_reference, f, m, b, g)
    for name, x, y in zip(("v", "df", "dm", "db"), got, want, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape, name
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=name)


LOW = [torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "shape", [(2, 3, 0, 4, 4), (0, 3, 2, 4, 4), (2, 0, 3, 4, 5)], ids=["T0", "B0", "C0"]
)
def test_empty_shapes(impl, shape):
    """Empty inputs give empty outputs; db (T = 0) and dm (C = 0) are empty sums: zeros."""
    f, m, b = _inputs(shape)
    v = composite(f, m, b, impl=impl)
    df, dm, db = torch.autograd.grad(v, (f, m, b), torch.ones_like(v))
    assert v.shape == f.shape and df.shape == f.shape and dm.shape == m.shape
    assert db.shape == b.shape and not db.any() and not dm.any()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_error_rule(impl, dtype):
    """Error vs the fp64 reference is at most 2x that of the reference run in ``dtype``."""
    f, m, b = _inputs((1, 3, 2, 33, 35), (dtype,) * 3)
    g = torch.randn(f.shape, device=DEV).to(dtype)
    got = _run(lambda *a: composite(*a, impl=impl), f, m, b, g)
    low = _run(composite_reference, f, m, b, g)
    hi = [x.detach().double().requires_grad_() for x in (f, m, b)]
    exact = _run(composite_reference, *hi, g.double())
    for name, x, lo, ex in zip(("v", "df", "dm", "db"), got, low, exact, strict=True):
        assert x.dtype == dtype, name
        assert _err(x, ex) <= 2 * _err(lo, ex) + 1e-6, name


@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_dtypes_follow_result_type(impl):
    """AMP case: low-precision f and b with an fp32 mask give an fp32 v, gradients per input."""
    low = torch.bfloat16 if DEV == "cuda" else torch.float16
    f, m, b = _inputs((1, 3, 2, 5, 7), (low, torch.float32, low))
    g = torch.randn(f.shape, device=DEV)
    got = _run(lambda *a: composite(*a, impl=impl), f, m, b, g)
    want = _run(composite_reference, f, m, b, g)
    hi = [x.detach().double().requires_grad_() for x in (f, m, b)]
    exact = _run(composite_reference, *hi, g.double())
    assert [x.dtype for x in got] == [torch.float32, low, torch.float32, low]
    for name, x, y, ex in zip(("v", "df", "dm", "db"), got, want, exact, strict=True):
        assert x.dtype == y.dtype, name
        if x.dtype == torch.float32:  # computed in fp32 from the same inputs: no fp16 rounding
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=name)
        else:  # rounded to f's and b's dtype: the 2x-error rule vs fp64
            assert _err(x, ex) <= 2 * _err(y, ex) + 1e-6, name


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs(impl):
    """f, m as channel slices of one conv output (strided: no copy on Triton), b with transposed
    planes and an expanded (all-stride-0) incoming gradient (both copied)."""
    bsz, c, t, h, w = 2, 3, 2, 5, 7
    results = []
    for fn in (lambda *a: composite(*a, impl=impl), composite_reference):
        torch.manual_seed(1)
        y = torch.randn(bsz, c + 1, t, h, w, device=DEV, requires_grad=True)
        bt = torch.randn(bsz, c, w, h, device=DEV, requires_grad=True)
        f, m, b = y[:, :c], y[:, c:], bt.transpose(-1, -2)
        assert not (f.is_contiguous() or b.is_contiguous())
        v = fn(f, m, b)
        v.sum().backward()
        results.append((v, y.grad, bt.grad))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("impl", IMPLS)
def test_double_backward_gradcheck(impl):
    """fp64 gradcheck and gradgradcheck of the fused op (double backward via reference ops)."""
    f, m, b = (x.detach().double().requires_grad_() for x in _inputs((1, 2, 2, 2, 3)))
    fn = lambda *a: composite(*a, impl=impl)
    assert torch.autograd.gradcheck(fn, (f, m, b), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (f, m, b), fast_mode=True)


def test_reference_gradcheck_fp64():
    f, m, b = (x.detach().double().requires_grad_() for x in _inputs((1, 3, 2, 3, 5), device="cpu"))
    assert torch.autograd.gradcheck(composite_reference, (f, m, b))
    assert torch.autograd.gradgradcheck(composite_reference, (f, m, b))
    g = torch.randn(f.shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(composite_backward_reference, (g, f, m, b))


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck(impl):
    f, m, b = _inputs((1, 3, 2, 5, 7))
    torch.library.opcheck(composite_op, (f, m, b, impl))
    g = torch.randn(f.shape, device=DEV)
    args = (g, *(x.detach() for x in (f, m, b)), impl)
    torch.library.opcheck(composite_backward_op, args)


@pytest.mark.parametrize("impl", [*IMPLS, "auto"])
def test_torch_compile_fullgraph(impl):
    """The op traces (fake implementations) and its backward runs inside a compiled graph."""
    f, m, b = _inputs((1, 3, 2, 5, 7))
    fn = torch.compile(
        lambda f, m, b: composite(f, m, b, impl=impl).square().mean(),
        fullgraph=True,
        backend="aot_eager",
    )
    loss = fn(f, m, b)
    got = torch.autograd.grad(loss, (f, m, b))
    want = torch.autograd.grad(composite_reference(f, m, b).square().mean(), (f, m, b))
    torch.testing.assert_close(loss, composite_reference(f, m, b).square().mean())
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y)


def test_validation_names_the_argument():
    f, m, b = _inputs((1, 3, 2, 5, 7), device="cpu", grad=False)
    with pytest.raises(ValueError, match="m must be"):
        composite(f, m[:, :, :1], b)
    with pytest.raises(ValueError, match="b must be"):
        composite(f, m, b[..., :4])
    with pytest.raises(ValueError, match="f must be"):
        composite(f[0], m, b)
    with pytest.raises(TypeError, match="m has dtype"):
        composite(f, (m > 0.5), b)
    with pytest.raises(ValueError, match="unknown impl"):
        composite(f, m, b, impl="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="numba"):
            composite(f.to("meta"), m.to("meta"), b.to("meta"), impl="numba")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    f, m, b = _inputs((1, 3, 2, 5, 7), device="cpu", grad=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        composite(f, m, b, impl="triton")


def test_auto_dispatch_and_module(monkeypatch):
    monkeypatch.delenv("VOSGAN_IMPL", raising=False)
    monkeypatch.delenv("VOSGAN_IMPL_COMPOSITE", raising=False)
    name, reason = fused_impl(torch.device("cpu"))
    assert name == "numba", reason
    if torch.cuda.is_available():
        assert fused_impl(torch.device("cuda"))[0] == "triton"
    module = MaskComposite(impl="reference")
    assert module.state_dict() == {}

    class G(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.comp = module

    model = G()
    assert any("comp" in line for line in fuse_modules(model, {"composite"}))
    assert model.comp.impl == "auto"
    f, m, b = _inputs((1, 3, 2, 5, 7), device="cpu", grad=False)
    torch.testing.assert_close(model.comp(f, m, b), composite_reference(f, m, b))


def test_numba_concurrent_calls(monkeypatch):
    """Python threads calling the numba path at once get the right answers; two launch parallel
    kernels (f of GRAIN elements), two the one-thread path, each holding the launch lock."""
    from vosgan.ops._numba import composite as nb
    from vosgan.ops._numba import launch

    seen = watch_launches(monkeypatch, nb, "composite_fwd_kernel")
    shapes = [(1, 4, 2, 64, 64), (2, 3, 4, 9, 11)] * 2  # f of 32768 = GRAIN and 2376 elements
    cases = [_inputs(s, device="cpu", grad=False) for s in shapes]
    assert cases[0][0].numel() == launch.GRAIN > cases[1][0].numel()
    barrier = threading.Barrier(4)

    def work(args):
        barrier.wait()
        return [composite(*args, impl="numba") for _ in range(3)]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, cases))
    for args, outs in zip(cases, results, strict=True):
        for v in outs:
            torch.testing.assert_close(v, composite_reference(*args))
    assert sorted(n for n, _ in seen) == [2376] * 6 + [launch.GRAIN] * 6
    assert all(held for _, held in seen)


@pytest.mark.parametrize(
    "dtypes", [(torch.float32,) * 3, (torch.float16, torch.float32, torch.float16)]
)
@pytest.mark.parametrize("t_split", [1, 2, 3, 9, "auto", "off"])
def test_backward_with_t_split_matches_reference(dtypes, t_split):
    # T=5 in 1, 3 (2 + 2 + 1 frames), 2 (3 + 2) or 5 chunks (9 asks for more than T); on CPU
    # "auto" knows no SM count and keeps one chunk. The chunks' db parts are summed in fp32.
    f, m, b = _inputs((2, 3, 5, 5, 7), dtypes, grad=False)
    g = torch.randn(f.shape, device=f.device).to(f.dtype)
    got = composite_bwd(g, f, m, b, t_split=t_split)
    want = composite_backward_reference(g.double(), f.double(), m.double(), b.double())
    tol = 1e-5 if dtypes[0] == torch.float32 else 2e-3
    for name, x, y, like in zip(("df", "dm", "db"), got, want, (f, m, b), strict=True):
        assert x.dtype == like.dtype and x.shape == y.shape, name
        torch.testing.assert_close(x.double(), y, rtol=tol, atol=tol, msg=name)


def test_t_split_policy():
    # 128 programs (B=8, 16 one-warp blocks of a 64x64 plane) on 132 SMs: 5 chunks wanted,
    # 4 frames each; enough programs already: one chunk; a number: that many chunks at most.
    assert bwd_t_chunk(16, 128, "auto", 132) == 4
    assert bwd_t_chunk(16, 1024, "auto", 132) == 16
    assert bwd_t_chunk(16, 128, "auto", None) == 16
    assert bwd_t_chunk(16, 128, "off", 132) == 16
    assert bwd_t_chunk(5, 1, 3, None) == 2
    assert bwd_t_chunk(5, 1, "9", None) == 1
    assert bwd_t_chunk(0, 1, "auto", 132) == 1
    env = {**os.environ, "VOSGAN_COMPOSITE_T_SPLIT": "fast"}
    code = "import vosgan.kernels.composite"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode != 0
    assert (
        "VOSGAN_COMPOSITE_T_SPLIT must be off, auto or a positive number, got 'fast'" in run.stderr
    )


# --- Ahead-of-time compilation for real GPUs (no GPU needed) ---------------------------------

_SCALARS = ("N", "T")
_FWD = (
    "f_ptr",
    "m_ptr",
    "b_ptr",
    "v_ptr",
    *_SCALARS,
    "sf_b",
    "sf_c",
    "sf_t",
    "sm_b",
    "sm_t",
    "sb_b",
    "sb_c",
)
_BWD = (
    "g_ptr",
    "f_ptr",
    "m_ptr",
    "b_ptr",
    "df_ptr",
    "dm_ptr",
    "db_ptr",
    *_SCALARS,
    "T_CHUNK",
    "sg_b",
    "sg_c",
    "sg_t",
    "sf_b",
    "sf_c",
    "sf_t",
    "sm_b",
    "sm_t",
    "sb_b",
    "sb_c",
)
# (kernel, pointer dtypes in argument order, block, warps) with the launchers' block choices:
# every kernel in fp32 and in the AMP mix (bf16 f/b, fp32 m -> fp32 v and fp32 dL/dv), which has
# both 16-bit (bf16; fp16 loads have the same width) and 32-bit loads and stores.
_BF16_MIX_BWD = ("fp32", "bf16", "fp32", "bf16", "bf16", "fp32", "bf16")
_VARIANTS = [
    ("composite_fwd_kernel", ("fp32",) * 4, *fwd_block(4096)),
    ("composite_fwd_kernel", ("bf16", "fp32", "bf16", "fp32"), *fwd_block(4096)),
    ("composite_bwd_kernel", ("fp32",) * 7, *bwd_block(4)),
    ("composite_bwd_kernel", _BF16_MIX_BWD, *bwd_block(2)),
]


def _aot(kernel, ptrs, block, warps, arch):
    from vosgan import aot

    names = _FWD if kernel == "composite_fwd_kernel" else _BWD
    sig = {n: (f"*{ptrs[i]}" if n.endswith("_ptr") else "i32") for i, n in enumerate(names)}
    consts = {"C": 3, "BLOCK": block, "FP64": False}
    if kernel == "composite_bwd_kernel":
        consts["C_PAD"] = 4
    sig.update(dict.fromkeys(consts, "constexpr"))
    # Pointers, N and the strides are 16-divisible at VOS-GAN shapes (N = 64 * 64); T is not.
    aligned = tuple(i for i, n in enumerate(names) if n not in ("T", "T_CHUNK"))
    return aot.compile_kernel(
        "vosgan.kernels.composite", kernel, sig, consts, arch=arch, aligned=aligned, num_warps=warps
    )


@pytest.fixture(scope="module")
def aot_reports():
    jobs = [(v, arch) for v in _VARIANTS for arch in (80, 90)]
    with ThreadPoolExecutor(2) as pool:  # each compile is a subprocess
        reports = list(pool.map(lambda j: _aot(*j[0], j[1]), jobs))
    return dict(zip(((v[0], v[1], arch) for v, arch in jobs), reports, strict=True))


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("variant", _VARIANTS, ids=lambda v: f"{v[0][10:13]}-{'-'.join(v[1][:2])}")
def test_aot_no_spills_vectorised(aot_reports, variant, arch):
    r = aot_reports[(variant[0], variant[1], arch)]
    assert r.registers > 0 and r.spill_stores == 0 and r.spill_loads == 0, r
    assert r.vector_loads > 0, "no ld.global.v4 on 16-byte aligned inputs"
    # Every streaming load of f, g (and b) is 128-bit, cache hints included.
    hinted = re.findall(r"ld\.global\.L1::evict_\w+(?:\.\S+)*?\.v4", r.ptx)
    assert hinted, "eviction-hinted loads are not vectorised"
    if variant[0] == "composite_bwd_kernel":
        # sum over C stays in registers: no shared-memory round trip or barrier per frame.
        assert "bar.sync" not in r.ptx and "st.shared" not in r.ptx


# --- GPU only -------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_paper_shape(dtype):
    f, m, b = _inputs((8, 3, 32, 64, 64), (dtype,) * 3, device="cuda")
    g = torch.randn(f.shape, device="cuda", dtype=dtype)
    got = _run(lambda *a: composite(*a, impl="triton"), f, m, b, g)
    hi = [x.detach().double().requires_grad_() for x in (f, m, b)]
    exact = _run(composite_reference, *hi, g.double())
    low = _run(composite_reference, f, m, b, g)
    for name, x, lo, ex in zip(("v", "df", "dm", "db"), got, low, exact, strict=True):
        assert _err(x, ex) <= 2 * _err(lo, ex) + 1e-5, name


@requires_cuda
@pytest.mark.gpu
def test_gpu_inductor_and_autocast():
    f, m, b = _inputs((2, 3, 4, 64, 64), device="cuda")
    fn = torch.compile(lambda f, m, b: composite(f, m, b, impl="triton").sum(), fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = fn(f.bfloat16(), m, b.bfloat16())
    torch.testing.assert_close(loss, composite_reference(f.bfloat16(), m, b.bfloat16()).sum())
    loss.backward()
    assert f.grad is not None and f.grad.dtype == torch.float32


def test_offsets_past_2_31_elements():
    """A time-major view whose frame stride times t passes 2**31 elements: the kernels' 64-bit
    offsets read and write the right frames (32-bit ones wrapped to memory before the tensor)."""
    stride_t = 2**30 + 64
    f = far_view((1, 2, 3, 8, 8), (128, 64, stride_t, 8, 1), DEV).requires_grad_()
    m = torch.rand(1, 1, 3, 8, 8, device=DEV, dtype=torch.float16, requires_grad=True)
    b = torch.randn(1, 2, 8, 8, device=DEV, dtype=torch.float16, requires_grad=True)
    g = torch.randn(1, 2, 3, 8, 8, device=DEV, dtype=torch.float16)
    got = _run(lambda *a: composite(*a, impl="triton"), f, m, b, g)
    want = _run(composite_reference, f, m, b, g)
    for name, x, y in zip(("v", "df", "dm", "db"), got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=2e-3, atol=2e-3, msg=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_uses_the_references_arithmetic(impl):
    """m * f + (1 - m) * b, not b + m (f - b): a mask of exactly 1 returns f exactly (a saturated
    sigmoid is 1.0 in fp32) and an infinite background stays infinite, as in the reference."""
    f = torch.tensor([1e-3, 1.0, 0.5, -2.0], device=DEV).view(1, 1, 1, 1, 4)
    m = torch.tensor([1.0, 0.5, 0.5, 0.0], device=DEV).view(1, 1, 1, 1, 4)
    b = torch.tensor([1e4, float("inf"), -float("inf"), 3.0], device=DEV).view(1, 1, 1, 4)
    got = composite(f, m, b, impl=impl)
    assert torch.equal(got, composite_reference(f, m, b))
    assert got.flatten().tolist()[:3] == [f.flatten()[0].item(), float("inf"), -float("inf")]

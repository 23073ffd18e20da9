"""Ahead-of-time compilation of Triton kernels for real GPUs, on a machine without one.

``compile_kernel`` compiles one ``@triton.jit`` kernel for ``sm_80``/``sm_90`` in a subprocess (so
it works even when this process runs Triton in interpreter mode), assembles the PTX with Triton's
bundled ``ptxas`` and reports registers, spills (and, from the SASS, whether any spill sits inside
a loop) and whether global loads are vectorised.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass

_SCRIPT = r"""
import json, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib
spec = json.loads(sys.argv[1])
fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
attrs = {(i,): [["tt.divisibility", 16]] for i in spec["aligned"]}
src = ASTSource(fn=fn, signature=spec["signature"], constexprs=spec["constexprs"], attrs=attrs)
k = triton.compile(src, target=GPUTarget("cuda", spec["arch"], 32),
                   options={"num_warps": spec["num_warps"]})
open(spec["ptx_out"], "w").write(k.asm["ptx"])
"""


@dataclass(frozen=True)
class AotReport:
    """What ``ptxas -v`` says about one kernel compiled for one architecture."""

    kernel: str
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    vector_loads: int  # 128-bit global loads: ld.global[.<qualifiers, cache hints>].v4
    ptx: str
    #: local-memory loads/stores (LDL/STL) inside a loop of the SASS, -1 without cuobjdump
    loop_spill_ops: int = -1

    def spills_ok(self, outside_loops: int = 16) -> bool:
        """No spill inside a loop, and at most ``outside_loops`` bytes each way outside them
        (strictly none where the SASS could not be read)."""
        if self.loop_spill_ops < 0:
            return self.spill_stores == 0 and self.spill_loads == 0
        worst = max(self.spill_stores, self.spill_loads)
        return self.loop_spill_ops == 0 and 0 <= worst <= outside_loops


def _bindir() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def loop_local_memory_ops(sass: str) -> int:
    """LDL/STL instructions of ``sass`` (``cuobjdump -sass`` text) that lie inside a loop, a
    loop being the span from a backward branch's target to the branch."""
    code = [
        (int(m.group(1), 16), m.group(2))
        for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)
    ]
    loops = []
    for addr, ins in code:
        br = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", ins)
        if br and int(br.group(1), 16) < addr:
            loops.append((int(br.group(1), 16), addr))
    return sum(
        1
        for addr, ins in code
        if re.search(r"\b(?:LDL|STL)\b", ins) and any(lo <= addr <= hi for lo, hi in loops)
    )


def _ptxas() -> str:
    bindir = _bindir()
    # Triton >= 3.9 writes PTX ISA 9.x, which only its newer bundled ptxas (CUDA 13) reads; that
    # one also assembles sm_80/sm_90, so prefer it.
    for name in ("ptxas-blackwell", "ptxas"):
        path = os.path.join(bindir, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"no ptxas in {bindir}")


def compile_kernel(
    module: str,
    kernel: str,
    signature: dict[str, str],
    constexprs: dict[str, int | float | bool] | None = None,
    arch: int = 90,
    aligned: tuple[int, ...] = (),
    num_warps: int = 4,
    workdir: str | None = None,
) -> AotReport:
    """Compile ``module.kernel`` for ``sm_<arch>`` and assemble it with ``ptxas -v``.

    Args:
        module: importable module holding the kernel (e.g. ``"vosgan.kernels.composite"``).
        kernel: the ``@triton.jit`` function's name.
        signature: argument name -> Triton type (``"*fp32"``, ``"i32"``, ``"constexpr"``...).
        constexprs: values of the ``constexpr`` arguments.
        arch: 80 (A100) or 90 (H100/H200).
        aligned: indices of arguments known to be 16-byte aligned / divisible by 16.
        num_warps: warps per program.
        workdir: folder for the PTX (default: a temporary one).
    """
    import tempfile

    workdir = workdir or tempfile.mkdtemp(prefix="vosgan-aot-")
    ptx_path = os.path.join(workdir, f"{kernel}_sm{arch}.ptx")
    spec = {
        "module": module,
        "kernel": kernel,
        "signature": signature,
        "constexprs": constexprs or {},
        "arch": arch,
        "aligned": list(aligned),
        "num_warps": num_warps,
        "ptx_out": ptx_path,
    }
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(spec)], env=env, capture_output=True, text=True
    )
    if run.returncode != 0:
        raise RuntimeError(f"AOT compile of {module}.{kernel} for sm_{arch} failed:\n{run.stderr}")
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    cubin = os.path.join(workdir, f"{kernel}_sm{arch}.cubin")
    res = subprocess.run(
        [_ptxas(), "-v", "--gpu-name", gpu, ptx_path, "-o", cubin],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed on {ptx_path}:\n{res.stderr}")
    info = res.stderr + res.stdout
    regs = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    ptx = open(ptx_path).read()
    loop_spills = -1
    cuobjdump = os.path.join(_bindir(), "cuobjdump")
    if os.path.exists(cuobjdump):
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True)
        if sass.returncode == 0:
            loop_spills = loop_local_memory_ops(sass.stdout)
    return AotReport(
        kernel=kernel,
        arch=arch,
        registers=int(regs.group(1)) if regs else -1,
        spill_stores=int(spills.group(1)) if spills else -1,
        spill_loads=int(spills.group(2)) if spills else -1,
        vector_loads=len(re.findall(r"ld\.global(?:\.[\w:]+)*\.v4", ptx)),
        ptx=ptx,
        loop_spill_ops=loop_spills,
    )

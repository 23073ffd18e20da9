"""The tree is ruff-clean (ruff ships with the ``test`` extra)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_check():
    res = subprocess.run(
        [sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True, cwd=ROOT
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_ruff_format():
    res = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", str(ROOT)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_no_test_argument_is_named_benchmark():
    """pytest-benchmark treats a test argument called ``benchmark`` as its fixture and stops the
    whole session when it is anything else (it did, on a GPU, for a GPU-only test that CI skips).
    Benchmarks under benchmarks/ take the real fixture; tests/ has no use for the name."""
    import ast

    offenders = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                if "benchmark" in [a.arg for a in node.args.args]:
                    offenders.append(f"{path.name}::{node.name}")
    assert not offenders, offenders

"""benchmarks/bench_conv3d_block.py's block list is read from the models, so it stays theirs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from vosgan.config import PRESETS
from vosgan.models.discriminator import Discriminator
from vosgan.models.generator import Generator
from vosgan.nn.conv3d_block import _match


@pytest.fixture(scope="module")
def blocks():
    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(bench_dir))  # it imports reference_check
    spec = importlib.util.spec_from_file_location(
        "bench_blocks", bench_dir / "bench_conv3d_block.py"
    )
    module = importlib.util.module_from_spec(spec)
    mp.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    yield module
    mp.undo()


def _shapes_of_a_real_forward(preset: str, block_shape) -> set[tuple]:
    """Every fusable block's :func:`block_shape` in one CPU forward of the preset's models."""
    cfg = PRESETS[preset].model
    torch.manual_seed(0)
    g, d = Generator(cfg), Discriminator(cfg)
    seen: set[tuple] = set()
    for model in (g, d):
        for module in model.modules():
            if isinstance(_match(module), type):
                module.register_forward_pre_hook(lambda m, args: seen.add(block_shape(m, args[0])))
    with torch.no_grad():
        d(g(*g.sample_latents(1)).video)
    return seen


def test_cpu_small_blocks_are_the_models(blocks):
    real = _shapes_of_a_real_forward("cpu-small", blocks.block_shape)
    assert {c[1:] for c in blocks.CPU_SMALL} == real
    assert len({c[0] for c in blocks.CPU_SMALL}) == len(blocks.CPU_SMALL)  # one name each


def test_paper_blocks(blocks):
    names = {c[0]: c[1:] for c in blocks.PAPER}
    # G's 3D stream from the joined (2 x 512)-channel 4x4 maps; D's encoder and U-Net decoder
    assert names["G.foreground.0"] == (True, "relu", 1024, 256, (2, 4, 4))
    assert names["D.encoder.1"] == (False, "lrelu", 64, 128, (16, 32, 32))
    assert names["D.decoder.2"] == (True, "relu", 256, 64, (8, 16, 16))
    assert (
        sorted(n.rsplit(".", 1)[0] for n in names)
        == ["D.decoder"] * 3 + ["D.encoder"] * 3 + ["G.foreground"] * 3
    )
    assert blocks.block_gflop(blocks.PAPER[0], batch=2) == pytest.approx(
        2 * 2 * 1024 * 256 * 64 * 32 / 1e9
    )

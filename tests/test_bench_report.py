"""benchmarks/report.py: pytest-benchmark JSON -> the generated block of RESULTS.md."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "bench_report", Path(__file__).resolve().parents[1] / "benchmarks" / "report.py"
)
report = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(report)


def _bench(func: str, params: dict, median: float, iqr: float, extra: dict) -> dict:
    ids = "-".join(str(v) for v in params.values())
    return {
        "group": None,
        "name": f"{func}[{ids}]",
        "fullname": f"benchmarks/bench_train_step.py::{func}[{ids}]",
        "params": params,
        "param": ids,
        "extra_info": extra,
        "stats": {
            "min": median * 0.9,
            "max": median * 1.2,
            "median": median,
            "iqr": iqr,
            "q1": median - iqr / 2,
            "q3": median + iqr / 2,
            "rounds": 5,
            "mean": median,
            "stddev": iqr,
            "iterations": 1,
        },
    }


def _fixture(tmp_path: Path) -> Path:
    # the reference row and the paper row name no provider: it comes from their bool `fused`
    # parameter (False -> "reference", True -> "fused"); the other fused row names it
    info = {"device": "CPU x86_64 x2", "torch": "2.13.0+cpu", "shape": "B=8, 3x16x32x32"}
    data = {
        "machine_info": {"cpu": {"brand_raw": "AMD EPYC"}, "python_version": "3.11.9"},
        "datetime": "2026-11-25T12:00:00.000000",
        "benchmarks": [
            _bench(
                "test_train_step",
                {"preset": "cpu-small", "fused": False},
                0.250,
                0.010,
                {**info, "gflop_per_step": 8.4},
            ),
            _bench(
                "test_train_step",
                {"preset": "cpu-small", "fused": True},
                0.200,
                0.004,
                {**info, "provider": "fused", "gflop_per_step": 8.4, "peak_rss_mb": 512.0},
            ),
            _bench(
                "test_train_step",
                {"preset": "paper", "fused": True},
                1.5,
                0.1,
                {**info, "shape": "B=2, 3x32x64x64"},
            ),
            _bench("test_loader", {"provider": "cache"}, 0.030, 0.002, {}),
        ],
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    return path


def test_table_rows_and_ratios(tmp_path):
    rows = report.load_rows([_fixture(tmp_path)])
    report.add_ratios(rows)
    table = report.render(rows)
    lines = [ln for ln in table.splitlines() if ln.startswith("| test_")]
    assert len(lines) == 4
    ref, fused, paper, loader = lines
    assert "| reference | 250.000 | 10.000 | 5 | ref |" in ref
    assert "| fused | 200.000 | 4.000 | 5 | 1.25x |" in fused  # 250 / 200
    assert "peak_rss_mb=512" in fused and "gflop_per_step=8.4" in fused
    assert "torch 2.13.0+cpu" in fused and "2026-11-25" in fused
    assert "| preset=cpu-small |" in fused and "| B=8, 3x16x32x32 |" in fused
    assert "| 1500.000 | 100.000 | 5 | - |" in paper  # no reference in its case
    assert "| - | AMD EPYC | cache |" in loader  # device from machine_info
    assert table.startswith("### bench_train_step.py")


def test_reference_override(tmp_path):
    rows = report.load_rows([_fixture(tmp_path)])
    report.add_ratios(rows, reference="fused")
    by = {(r["case"], r["provider"]): r for r in rows}
    assert by[("preset=cpu-small", "reference")]["speedup"] == pytest.approx(0.8)
    assert by[("preset=paper", "fused")]["speedup"] == pytest.approx(1.0)


def test_out_rewrites_only_its_block(tmp_path):
    results = _fixture(tmp_path)
    md = tmp_path / "RESULTS.md"
    begin, end = report.markers("cpu")
    gpu_begin, gpu_end = report.markers("gpu-h100")
    hand = "# Measured results\n\nHand-written notes | with a pipe.\n\n"
    gpu = f"{gpu_begin}\n| GPU row measured on an H100 |\n{gpu_end}\n"
    md.write_text(f"{hand}{begin}\nstale row\n{end}\n\nMore notes after.\n\n{gpu}")
    assert report.main([str(results), "--out", str(md)]) == 0
    text = md.read_text()
    assert text.startswith(hand) and "stale row" not in text
    assert f"{end}\n\nMore notes after.\n\n{gpu}" in text
    assert text.count("| test_train_step |") == 3
    assert report.main([str(results), "--out", str(md)]) == 0
    assert md.read_text() == text  # idempotent


def test_out_appends_a_missing_block_and_reports_bad_input(tmp_path, capsys):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Notes\n")
    assert report.main([str(_fixture(tmp_path)), "--out", str(md), "--section", "run2"]) == 0
    text = md.read_text()
    begin, end = report.markers("run2")
    assert text.startswith("# Notes\n\n" + begin) and text.endswith(end + "\n")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"results": []}))
    assert report.main([str(bad), "--out", str(md)]) == 2
    assert "no 'benchmarks' list" in capsys.readouterr().err
    md.write_text(f"{end}\n{begin}\n")  # end before begin
    assert report.main([str(_fixture(tmp_path)), "--out", str(md), "--section", "run2"]) == 2
    assert "unbalanced" in capsys.readouterr().err


def _run(path: Path, day: str, benches: list[dict]) -> Path:
    data = {"machine_info": {}, "datetime": f"2026-11-{day}T12:00:00", "benchmarks": benches}
    path.write_text(json.dumps(data))
    return path


def test_ratios_stay_within_each_run(tmp_path):
    """Two runs of the same cases (two JSON files): each fused row is divided into its own run's
    reference (2.00x in both), never another run's."""
    info = {"device": "CPU x2", "shape": "s"}
    runs = [
        _run(
            tmp_path / f"run{day}.json",
            day,
            [
                _bench("test_train_step", {"case": "c", "fused": False}, ref, 0.0, info),
                _bench("test_train_step", {"case": "c", "fused": True}, ref / 2, 0.0, info),
            ],
        )
        for day, ref in (("25", 3.0), ("26", 1.0))
    ]
    rows = report.load_rows(runs)
    report.add_ratios(rows)
    fused = [r for r in rows if r["provider"] == "fused"]
    assert [r["speedup"] for r in fused] == [pytest.approx(2.0), pytest.approx(2.0)]
    table = report.render(rows)
    assert table.count("| 2.00x |") == 2 and "6.00x" not in table


def test_duplicate_provider_in_a_case_is_an_error(tmp_path, capsys):
    bench = _bench("test_train_step", {"case": "c", "fused": True}, 1.0, 0.0, {})
    path = _run(tmp_path / "dup.json", "25", [bench, {**bench, "name": "other"}])
    assert report.main([str(path)]) == 2
    assert "two 'fused' rows" in capsys.readouterr().err


def test_noisy_rows_and_their_ratios_are_flagged(tmp_path):
    """IQR above 0.2 of the median: the row's IQR and every speed-up it enters say noisy."""
    benches = [
        _bench("test_train_step", {"case": "c", "fused": False}, 1.0, 0.5, {}),  # 0.5: noisy
        _bench("test_train_step", {"case": "c", "fused": True}, 0.5, 0.05, {}),  # 0.1: quiet
        _bench("test_train_step", {"case": "d", "fused": False}, 1.0, 0.1, {}),
        _bench("test_train_step", {"case": "d", "fused": True}, 0.5, 0.1, {}),  # 0.2: quiet
    ]
    rows = report.load_rows([_run(tmp_path / "r.json", "25", benches)])
    report.add_ratios(rows)
    lines = [ln for ln in report.render(rows).splitlines() if ln.startswith("| test_")]
    assert "| 500.000 noisy | 5 | ref |" in lines[0]
    assert "| 50.000 | 5 | 2.00x (noisy) |" in lines[1]
    assert "noisy" not in lines[2] + lines[3]

"""Turn pytest-benchmark ``--benchmark-json`` output into the Markdown tables of RESULTS.md.

``python benchmarks/report.py results.json [more.json ...] [--out benchmarks/RESULTS.md]
[--section NAME]``

One row per benchmark and provider: the benchmark (test function), its case (the parameters
other than the provider), shape, device, provider, median and inter-quartile range in ms, rounds,
the speed-up against the reference provider of the same case in the same run (input file:
``reference``, ``eager``, ``nn_gru``, ... or ``--reference NAME``), the benchmark's remaining
``extra_info`` (peak memory, FLOPs, ...), the versions and the run date. One table per benchmark
file. A row whose IQR is more than :data:`NOISY` of its median is marked ``noisy``, and so is
a speed-up that involves one.

With ``--out``, only the block between ``<!-- generated:begin NAME -->`` and
``<!-- generated:end NAME -->`` (``NAME`` = ``--section``, default ``cpu``) is rewritten; the
hand-written notes and every other block (e.g. GPU rows from a lent machine, under their own
section name) stay as they are. A file without that block gets it appended at its end. Without
``--out`` the block is printed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Provider names taken as the baseline of a case, first match wins.
REFERENCE_PROVIDERS = ("reference", "eager", "nn_gru", "nn.GRU", "native", "scipy", "torch")
#: Parameter names that name the provider rather than the case.
PROVIDER_PARAMS = ("provider", "fused", "backend", "impl")
#: extra_info keys shown in their own column (or not at all); every other key goes to "extras".
_OWN_COLUMNS = {"device", "provider", "shape", "torch", "triton", "numpy", "numba", "date"}
#: IQR / median above which a row's timing is flagged as noisy (a loaded machine, a warm-up
#: still in the rounds).
NOISY = 0.2


class ReportError(ValueError):
    """An input file is not pytest-benchmark JSON; the message names the file."""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "/")


def _provider(bench: dict[str, Any]) -> str:
    info, params = bench.get("extra_info") or {}, bench.get("params") or {}
    if "provider" in info:
        return str(info["provider"])
    for key in PROVIDER_PARAMS:
        if key in params:
            value = params[key]
            if key == "fused" and isinstance(value, bool):
                return "fused" if value else "reference"
            return str(value)
    return "-"


def _case(bench: dict[str, Any]) -> str:
    params = bench.get("params") or {}
    parts = [f"{k}={_fmt(v)}" for k, v in params.items() if k not in PROVIDER_PARAMS]
    return ", ".join(parts) or "-"


def load_rows(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Flatten the benchmarks of every JSON file into row dicts (times in ms)."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ReportError(f"{path}: cannot read pytest-benchmark JSON ({exc})") from exc
        if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
            raise ReportError(
                f"{path}: no 'benchmarks' list; was it written by pytest --benchmark-json?"
            )
        machine = data.get("machine_info") or {}
        cpu = (machine.get("cpu") or {}).get("brand_raw") or machine.get("machine", "?")
        date = str(data.get("datetime", "?"))[:10]
        for bench in data["benchmarks"]:
            stats, info = bench.get("stats") or {}, bench.get("extra_info") or {}
            if "median" not in stats:
                raise ReportError(f"{path}: benchmark {bench.get('name')!r} has no stats.median")
            fullname = bench.get("fullname") or bench.get("name", "?")
            file = fullname.split("::")[0]
            versions = [
                f"{k} {info[k]}" for k in ("torch", "triton", "numpy", "numba") if k in info
            ]
            iqr = stats.get("iqr")
            rows.append(
                {
                    "source": str(path),  # the run: ratios never mix two input files
                    "file": Path(file).name,
                    "benchmark": re.sub(r"\[.*\]$", "", fullname.split("::")[-1]),
                    "case": _case(bench),
                    "shape": _fmt(info.get("shape", "-")),
                    "device": _fmt(info.get("device", cpu)),
                    "provider": _provider(bench),
                    "median_ms": stats["median"] * 1e3,
                    "iqr_ms": iqr * 1e3 if iqr is not None else None,
                    "rounds": stats.get("rounds", "?"),
                    "extras": ", ".join(
                        f"{k}={_fmt(v)}" for k, v in info.items() if k not in _OWN_COLUMNS
                    ),
                    "versions": ", ".join(versions)
                    or f"python {machine.get('python_version', '?')}",
                    "date": date,
                }
            )
    return rows


def _noisy(row: dict[str, Any]) -> bool:
    iqr = row.get("iqr_ms")
    return iqr is not None and row["median_ms"] > 0 and iqr / row["median_ms"] > NOISY


def add_ratios(rows: list[dict[str, Any]], reference: str | None = None) -> None:
    """Set ``row["speedup"]`` = reference median / row median within each case of each run
    (input file; else None), ``row["noisy"]`` (:data:`NOISY`) and ``row["speedup_noisy"]`` (the
    row or its reference is noisy). Raises :class:`ReportError` when a case of one run has two
    rows of the same provider: which one is the baseline would be a guess."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        key = (
            row.get("source"),
            row["file"],
            row["benchmark"],
            row["case"],
            row["shape"],
            row["device"],
        )
        groups.setdefault(key, []).append(row)
    names = (reference,) if reference else REFERENCE_PROVIDERS
    for key, members in groups.items():
        by_provider: dict[str, dict[str, Any]] = {}
        for r in members:
            if r["provider"] in by_provider:
                raise ReportError(
                    f"{key[0]}: {key[2]} [{key[3]}] has two '{r['provider']}' rows (shape "
                    f"{key[4]}, device {key[5]}); give each its own case or provider"
                )
            by_provider[r["provider"]] = r
        base = next((by_provider[n] for n in names if n in by_provider), None)
        for row in members:
            row["speedup"] = base["median_ms"] / row["median_ms"] if base else None
            row["is_reference"] = row is base
            row["noisy"] = _noisy(row)
            row["speedup_noisy"] = base is not None and (row["noisy"] or _noisy(base))


_HEADER = (
    "| benchmark | case | shape | device | provider | median ms | IQR ms | rounds "
    "| vs reference | extras | versions | date |\n" + "|---" * 12 + "|"
)


def render(rows: list[dict[str, Any]]) -> str:
    """Markdown: one table per benchmark file, the reference row first in each case of each
    run."""
    out: list[str] = []
    files = list(dict.fromkeys(r["file"] for r in rows))
    for file in files:
        mine = [r for r in rows if r["file"] == file]

        def case(r: dict[str, Any]) -> tuple:  # one case of one run (input file)
            return r["benchmark"], r["case"], r["shape"], r["device"], r.get("source")

        order = {key: i for i, key in enumerate(dict.fromkeys(map(case, mine)))}
        mine.sort(key=lambda r: (order[case(r)], not r.get("is_reference")))
        out += [f"### {file}", "", _HEADER]
        for r in mine:
            iqr = f"{r['iqr_ms']:.3f}" if r["iqr_ms"] is not None else "-"
            iqr += " noisy" if r.get("noisy") else ""
            speed = (
                "ref"
                if r.get("is_reference")
                else (f"{r['speedup']:.2f}x" if r.get("speedup") is not None else "-")
            )
            if r.get("speedup_noisy") and not r.get("is_reference"):
                speed += " (noisy)"
            out.append(
                f"| {r['benchmark']} | {r['case']} | {r['shape']} | {r['device']} | "
                f"{r['provider']} | {r['median_ms']:.3f} | {iqr} | {r['rounds']} | "
                f"{speed} | {r['extras'] or '-'} | {r['versions']} | {r['date']} |"
            )
        out.append("")
    return "\n".join(out).rstrip("\n")


def markers(section: str) -> tuple[str, str]:
    return f"<!-- generated:begin {section} -->", f"<!-- generated:end {section} -->"


def splice(document: str, section: str, body: str) -> str:
    """``document`` with the ``section`` block's content replaced by ``body`` (appended at the
    end when the block is absent); everything outside the block is returned unchanged."""
    begin, end = markers(section)
    block = f"{begin}\n{body}\n{end}"
    i, j = document.find(begin), document.find(end)
    if i < 0 and j < 0:
        sep = (
            ""
            if not document or document.endswith("\n\n")
            else ("\n" if document.endswith("\n") else "\n\n")
        )
        return f"{document}{sep}{block}\n"
    if i < 0 or j < i:
        raise ReportError(f"section {section!r}: unbalanced markers {begin!r} / {end!r}")
    return document[:i] + block + document[j + len(end) :]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", type=Path, help="pytest --benchmark-json output file(s)")
    p.add_argument("--out", type=Path, help="Markdown file whose generated block is rewritten")
    p.add_argument("--section", default="cpu", help="name of the generated block (default cpu)")
    p.add_argument(
        "--reference",
        help="baseline provider name (default: the first of "
        f"{', '.join(REFERENCE_PROVIDERS)} present in a case)",
    )
    args = p.parse_args(argv)
    if not re.fullmatch(r"[\w.-]+", args.section):
        p.error(f"--section must be letters, digits, '.', '_' or '-', got {args.section!r}")
    try:
        rows = load_rows(args.json)
        add_ratios(rows, args.reference)
        body = render(rows)
        if args.out is None:
            print(body)
            return 0
        text = args.out.read_text() if args.out.exists() else ""
        args.out.write_text(splice(text, args.section, body))
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: section {args.section!r}, {len(rows)} row(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

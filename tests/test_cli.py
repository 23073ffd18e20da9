"""vosgan.cli: the argument types every tool shares; argparse names the flag in each error."""

import argparse
import json

import numpy as np
import pytest
import torch

from vosgan import cli


def parse(kind, value):
    p = argparse.ArgumentParser(exit_on_error=False)
    p.add_argument("--x", type=kind)
    return p.parse_args(["--x", value]).x


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("bogus", "'bogus' is not a device: expected auto, cpu, cuda or cuda:N"),
        ("meta", "'meta': expected auto, cpu, cuda or cuda:N"),
        *([] if torch.cuda.is_available() else [("cuda:0", "this machine has no CUDA device")]),
    ],
)
def test_device_errors_name_the_flag(value, message):
    with pytest.raises(argparse.ArgumentError, match=rf"argument --x: .*{message}"):
        parse(cli.device, value)


def test_device_values():
    assert parse(cli.device, "cpu") == torch.device("cpu")
    assert parse(cli.device, "auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_numbers():
    assert parse(cli.int_at_least(1), "3") == 3
    assert parse(cli.finite_float(0, strict=True), "1e-3") == 1e-3
    assert parse(cli.finite_float(0), "0") == 0
    for kind, value, message in [
        (cli.int_at_least(1), "0", "must be >= 1, got 0"),
        (cli.int_at_least(1), "1.5", "expected an integer, got '1.5'"),
        (cli.finite_float(0, strict=True), "0", "must be > 0, got 0"),
        (cli.finite_float(0), "-1", "must be >= 0, got -1"),
        (cli.finite_float(), "nan", "must be a finite number, got 'nan'"),
        (cli.finite_float(), "inf", "must be a finite number, got 'inf'"),
        (cli.finite_float(), "x", "expected a number, got 'x'"),
    ]:
        with pytest.raises(argparse.ArgumentError, match=message):
            parse(kind, value)


def test_output_paths(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert parse(cli.out_dir, str(tmp_path / "new" / "deep")) == tmp_path / "new" / "deep"
    assert not (tmp_path / "new").exists()  # checked, not created
    assert parse(cli.out_file(".json"), str(tmp_path / "sub" / "m.json")).name == "m.json"
    for kind, value, message in [
        (cli.out_dir, "", "empty path"),
        (cli.out_dir, str(afile), "is a file, expected a folder"),
        (cli.out_dir, "/proc/vosgan-test", "cannot create files under /proc"),
        (cli.out_file(".json"), str(tmp_path), "must end in .json"),
        (cli.out_file(), str(tmp_path), "is a folder, expected a file"),
        (cli.out_file(".json"), str(afile / "m.json"), "afile is a file, not a folder"),
    ]:
        with pytest.raises(argparse.ArgumentError, match=message):
            parse(kind, value)


def test_add_device():
    p = argparse.ArgumentParser(exit_on_error=False)
    cli.add_device(p)
    assert p.parse_args([]).device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert p.parse_args(["--device", "cpu"]).device == torch.device("cpu")


def test_write_atomic_text_bytes_and_writer(tmp_path):
    assert cli.write_atomic(tmp_path / "new" / "a.txt", "héllo") == tmp_path / "new" / "a.txt"
    assert (tmp_path / "new" / "a.txt").read_text(encoding="utf-8") == "héllo"
    cli.write_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    cli.write_atomic(tmp_path / "c.npz", lambda fh: np.savez(fh, x=np.arange(3)))
    assert np.load(tmp_path / "c.npz")["x"].tolist() == [0, 1, 2]  # no .npz.npz
    assert (tmp_path / "c.npz").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "c.npz", "new"]


def test_write_atomic_failure_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")

    def fails(fh):
        fh.write(b"half of a new fi")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        cli.write_atomic(path, fails)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_write_json_is_standard_json(tmp_path):
    nan, inf = float("nan"), float("inf")
    obj = {"auc": nan, "n": 3, "x": [1.5, -inf, {"y": (inf, "nan")}], "ok": None}
    path = tmp_path / "sub" / "r.json"
    cli.write_json(path, obj)

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    got = json.loads(path.read_text(), parse_constant=refuse)
    assert got == {"auc": None, "n": 3, "x": [1.5, None, {"y": [None, "nan"]}], "ok": None}
    cli.write_json(None, obj)  # no --json: nothing
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]

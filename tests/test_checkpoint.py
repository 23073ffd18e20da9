import random

import numpy as np
import pytest
import torch

from vosgan import checkpoint


def test_save_atomic_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    checkpoint.save_atomic({"a": 1}, path)

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_atomic({"a": 2}, path)
    monkeypatch.undo()
    assert torch.load(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_rng_state_round_trip():
    state = checkpoint.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    checkpoint.set_rng_state(state)
    torch.testing.assert_close(torch.rand(3), a[0])
    assert np.array_equal(np.random.rand(3), a[1]) and random.random() == a[2]


def test_not_a_vosgan_checkpoint(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="not a vosgan checkpoint"):
        checkpoint.load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint in run folder"):
        checkpoint.load_checkpoint(tmp_path)

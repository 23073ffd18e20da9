import pytest
import torch

from vosgan import backend


@pytest.fixture(autouse=True)
def _fresh_choices():
    backend._choose.cache_clear()
    yield
    backend._choose.cache_clear()


def test_every_op_picks_its_cpu_fast_path_with_a_reason():
    # numba is a core dependency and `pip install` builds the C++ extension: on a CPU every op
    # has a fused path, so a reference here means an install or availability check is broken.
    expected = {"composite": "numba", "flow_warp_loss": "numba", "conv3d_block": "subpixel"}
    expected["gru"] = "cpp"
    for op in backend.OPS:
        choice = backend.choose(op, "cpu")
        assert choice.op == op and choice.reason
        assert (choice.impl, choice.fused) == (expected[op], True), choice


def test_environment_forces_the_reference(monkeypatch):
    monkeypatch.setenv("VOSGAN_IMPL", "reference")
    assert all(not backend.choose(op, "cpu").fused for op in backend.OPS)
    monkeypatch.delenv("VOSGAN_IMPL")
    monkeypatch.setenv("VOSGAN_IMPL_GRU", "reference")
    backend._choose.cache_clear()
    assert backend.choose("gru", "cpu").reason == "forced by environment variable"


def test_forcing_an_unavailable_impl_is_an_error(monkeypatch):
    monkeypatch.setenv("VOSGAN_IMPL_COMPOSITE", "warp-drive")
    with pytest.raises(RuntimeError, match="VOSGAN_IMPL_COMPOSITE='warp-drive'"):
        backend.choose("composite", torch.device("cpu"))


def test_unknown_op():
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        backend.choose("nope", "cpu")


def test_warn_once(recwarn):
    backend.warn_once("test-key-unique", "first")
    backend.warn_once("test-key-unique", "second")
    assert [str(w.message) for w in recwarn] == ["first"]


def test_triton_impl_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    # Without the interpreter Triton cannot read CPU memory: each op names itself and the cause.
    from vosgan.ops.composite import composite
    from vosgan.ops.flow_warp import flow_warp_loss

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    f, m, b = torch.rand(1, 3, 2, 4, 4), torch.rand(1, 1, 2, 4, 4), torch.rand(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"composite: impl='triton' needs CUDA tensors"):
        composite(f, m, b, impl="triton")
    with pytest.raises(ValueError, match=r"flow_warp_loss: impl='triton' needs CUDA tensors"):
        flow_warp_loss(f, torch.zeros(1, 2, 1, 4, 4), impl="triton")
    backend.check_triton_device("op", torch.device("cuda"))  # CUDA tensors: no error
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backend.check_triton_device("op", torch.device("cpu"))  # the interpreter reads CPU memory


def test_cli_reports_on_the_device_given(capsys):
    assert backend.main(["cpu"]) == 0
    out = capsys.readouterr().out
    assert "device for this report: cpu" in out
    # what --fused's training step does about layouts and CUDA graphs here, and why
    assert "cuda_graph       off        auto: CUDA graphs need a GPU, this run is on cpu" in out
    assert "channels_last    off        auto: cpu (it is for cuDNN's convolutions)" in out
    # the kernel choices environment variables make, as the modules read them
    assert "VOSGAN_FLOW_WARP_DX       loop" in out
    assert "VOSGAN_COMPOSITE_T_SPLIT  off" in out
    assert "VOSGAN_CUDA_CONV          transposed=auto, conv=torch, narrow=torch" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--help"], "usage: python -m vosgan.backend [-h] [device]"),
        (["foo"], "argument device: 'foo' is not a device"),
        (["cpu", "extra"], "unrecognized arguments: extra"),
    ],
)
def test_cli_arguments(capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        backend.main(args)
    out = capsys.readouterr()
    assert exc.value.code == (0 if args == ["--help"] else 2)
    assert message in out.out + out.err


def test_the_report_names_the_gpu_it_was_asked_about(monkeypatch):
    """``cuda:1`` is device 1's name, not the current device's (simulated: no GPU needed)."""
    names = {0: "GPU zero", 1: "GPU one"}

    def get_device_name(device=None):
        index = 0 if device is None else torch.device(device).index
        return names[0 if index is None else index]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", get_device_name)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert backend.cuda_name(torch.device("cuda:1")) == "GPU one"
    assert backend.cuda_name("cuda:0") == backend.cuda_name("cpu") == "GPU zero"
    mode, detail = backend.triton_mode(torch.device("cuda:1"))
    assert mode == "gpu" and detail.endswith(" on GPU one")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backend.cuda_name("cuda:1") == "no CUDA device"

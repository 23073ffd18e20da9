"""FVD / KVD / IS: closed forms, float64 references, extractor errors, and the CLI end to end."""

import hashlib
import itertools
import json
import math
import re
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import SHARED_DATA, usage_error

from vosgan import checkpoint, config, fvd
from vosgan.data import SyntheticVideos
from vosgan.data.build import make_dataset
from vosgan.video_metrics import (
    ExtractorError,
    frechet_distance,
    frechet_distance_from_features,
    gaussian_stats,
    inception_score,
    kernel_distance,
    load_torchscript,
    polynomial_mmd2,
    prepare_clips,
)

CPU = torch.device("cpu")


def frechet_reference(f1, f2):
    """The textbook formula with scipy's general matrix square root, float64."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    assert np.abs(np.imag(covmean)).max() < 1e-6
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(covmean)))


def mmd2_loops(x, y, degree=3, coef=1.0):
    """Unbiased MMD^2 written out as explicit sums over pairs."""
    d = x.shape[1]
    k = lambda a, b: (float(np.dot(a, b)) / d + coef) ** degree
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    xy = sum(k(a, b) for a in x for b in y) / (m * n)
    return xx + yy - 2 * xy


# ---- Frechet distance -----------------------------------------------------------------------


@pytest.mark.parametrize("n1,n2,d", [(40, 40, 16), (57, 33, 7), (300, 200, 24)])
def test_frechet_matches_scipy_reference(n1, n2, d):
    rng = np.random.default_rng(n1 + d)
    mix = rng.standard_normal((d, d))
    f1 = rng.standard_normal((n1, d)) @ mix
    f2 = rng.standard_normal((n2, d)) @ (mix + 0.3 * rng.standard_normal((d, d))) + 0.5
    ref = frechet_reference(f1, f2)
    assert frechet_distance_from_features(f1, f2) == pytest.approx(ref, rel=1e-9, abs=1e-9)
    assert frechet_distance_from_features(f2, f1) == pytest.approx(ref, rel=1e-9, abs=1e-9)
    # float32 torch tensors in, float64 statistics inside
    t1, t2 = torch.from_numpy(f1).float(), torch.from_numpy(f2).float()
    ref32 = frechet_reference(t1.double().numpy(), t2.double().numpy())
    assert frechet_distance_from_features(t1, t2) == pytest.approx(ref32, rel=1e-9)


def test_frechet_identical_and_shifted():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((64, 12)) * rng.uniform(0.1, 10, 12)
    assert abs(frechet_distance_from_features(f, f)) < 1e-9 * np.trace(np.cov(f, rowvar=False))
    shift = rng.standard_normal(12)
    assert frechet_distance_from_features(f, f + shift) == pytest.approx(shift @ shift, rel=1e-9)


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(9), rng.standard_normal(9)
    a, b = rng.uniform(0.01, 5, 9), rng.uniform(0.01, 5, 9)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # rotating both Gaussians by the same orthogonal matrix changes nothing
    q, _ = np.linalg.qr(rng.standard_normal((9, 9)))
    got = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_singular_covariances_are_exact():
    # rank-1 covariances along different axes: W2^2 = 1 + 1 (sqrtm of the singular product is 0)
    assert frechet_distance(
        np.zeros(2), np.diag([1.0, 0.0]), np.zeros(2), np.diag([0.0, 1.0])
    ) == pytest.approx(2.0, abs=1e-12)
    # all-constant features (a collapsed generator): |mu diff|^2 + trace of the other covariance
    rng = np.random.default_rng(2)
    real = rng.standard_normal((50, 5))
    collapsed = np.ones((50, 5))
    expected = ((real.mean(0) - 1) ** 2).sum() + np.trace(np.cov(real, rowvar=False))
    assert frechet_distance_from_features(collapsed, real) == pytest.approx(expected, rel=1e-9)


def test_frechet_few_samples_warns():
    rng = np.random.default_rng(3)
    with pytest.warns(UserWarning, match="rank-deficient"):
        value = frechet_distance_from_features(
            rng.standard_normal((6, 10)), rng.standard_normal((30, 10))
        )
    assert math.isfinite(value) and value > 0


def test_frechet_bad_input():
    eye = np.eye(3)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        frechet_distance(np.zeros(3), np.diag([1.0, -0.5, 1.0]), np.zeros(3), eye)
    with pytest.raises(ValueError, match="sigma2 is not symmetric"):
        frechet_distance(np.zeros(3), eye, np.zeros(3), np.triu(np.ones((3, 3))))
    with pytest.raises(ValueError, match=r"sigma1 must be \(3, 3\)"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), eye)
    with pytest.raises(ValueError, match="mu2 must have shape"):
        frechet_distance(np.zeros(3), eye, np.zeros(4), eye)
    with pytest.raises(ValueError, match="at least 2 samples"):
        gaussian_stats(np.ones((1, 3)))
    with pytest.raises(ValueError, match="NaN or Inf"):
        frechet_distance_from_features(np.full((4, 2), np.nan), np.ones((4, 2)))
    with pytest.raises(ValueError, match="2-D"):
        frechet_distance_from_features(np.ones(4), np.ones((4, 1)))
    with pytest.raises(ValueError, match="feature dimensions differ"):
        frechet_distance_from_features(np.ones((4, 2)), np.ones((4, 3)))


# ---- KVD ------------------------------------------------------------------------------------


def test_mmd_hand_computed():
    # d = 1, k(a, b) = (ab + 1)^3: xx pair 1, yy pair 7^3, cross mean (1 + 1 + 27 + 64) / 4
    x, y = np.array([[0.0], [1.0]]), np.array([[2.0], [3.0]])
    assert polynomial_mmd2(x, y) == pytest.approx(1 + 343 - 2 * 93 / 4, rel=1e-15)


def test_mmd_matches_loops_with_unequal_sizes():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((7, 5)), rng.standard_normal((9, 5)) + 0.3
    assert polynomial_mmd2(x, y) == pytest.approx(mmd2_loops(x, y), rel=1e-12)


def test_mmd_is_unbiased():
    rng = np.random.default_rng(5)
    same = np.array(
        [
            polynomial_mmd2(rng.standard_normal((8, 4)), rng.standard_normal((8, 4)))
            for _ in range(3000)
        ]
    )
    sem = same.std() / math.sqrt(len(same))
    assert abs(same.mean()) < 4 * sem  # zero in expectation ...
    assert (same < 0).mean() > 0.2  # ... so it is often negative (a biased one never is)
    # linear kernel: the unbiased estimator's expectation is |mu_x - mu_y|^2 / d exactly
    delta = np.array([1.0, -0.5, 0.0, 2.0])
    lin = np.array(
        [
            polynomial_mmd2(
                rng.standard_normal((6, 4)), rng.standard_normal((6, 4)) + delta, degree=1, coef=0.0
            )
            for _ in range(3000)
        ]
    )
    assert abs(lin.mean() - delta @ delta / 4) < 4 * lin.std() / math.sqrt(len(lin))


def test_kernel_distance_subsets():
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((20, 6)), rng.standard_normal((15, 6)) + 1.0
    mean, std, m = kernel_distance(x, y, num_subsets=1, subset_size=100)
    assert m == 15 and std == 0.0
    got = kernel_distance(x, y, num_subsets=5, subset_size=10, seed=3)
    assert got == kernel_distance(x, y, num_subsets=5, subset_size=10, seed=3)
    assert got[2] == 10 and got[0] > 0
    full, _, _ = kernel_distance(x[:15], y, num_subsets=1, subset_size=15)
    assert full == pytest.approx(polynomial_mmd2(x[:15], y), rel=1e-12)  # row order irrelevant
    with pytest.raises(ValueError, match="subset_size >= 2"):
        kernel_distance(x, y, subset_size=1)


# ---- IS -------------------------------------------------------------------------------------


def test_inception_score_known_cases():
    assert inception_score(np.zeros((20, 5)), splits=2) == pytest.approx((1.0, 0.0), abs=1e-12)
    confident = 60.0 * np.eye(4)[np.arange(48) % 4]  # balanced, certain over 4 classes
    mean, std = inception_score(confident, splits=4)
    assert mean == pytest.approx(4.0, rel=1e-9) and std < 1e-9
    one_class = 60.0 * np.eye(4)[np.zeros(10, int)]  # certain but all the same class
    assert inception_score(one_class, splits=1)[0] == pytest.approx(1.0, abs=1e-9)
    # hand-computed: p = [.5, .5] and [1, 0]; p(y) = [.75, .25]
    kl = (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25) + math.log(1 / 0.75)) / 2
    probs = np.array([[0.5, 0.5], [1.0, 0.0]])
    assert inception_score(probs, 1, probabilities=True)[0] == pytest.approx(math.exp(kl), 1e-12)
    logits = np.log(np.array([[0.5, 0.5], [1 - 1e-12, 1e-12]]))
    assert inception_score(logits, 1)[0] == pytest.approx(math.exp(kl), rel=1e-9)
    rng = np.random.default_rng(7)
    z = rng.standard_normal((30, 6))
    soft = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    assert inception_score(z, 3) == pytest.approx(inception_score(soft, 3, probabilities=True))
    with pytest.raises(ValueError, match="splits must be in"):
        inception_score(z, splits=31)
    # a split of one sample scores exactly 1 (its p(y) is its p(y|x)): at least 2 per split
    with pytest.raises(ValueError, match=r"splits must be in \[1, N/2=15\] \(at least 2"):
        inception_score(z, splits=16)
    assert inception_score(z, splits=15)[0] > 1.0
    with pytest.raises(ValueError, match="not probabilities: values must be >= 0"):
        inception_score(-soft, 1, probabilities=True)
    with pytest.raises(ValueError, match=r"rows summing to 1 .*row sums in \[2, 2\]"):
        inception_score(2 * soft, 1, probabilities=True)
    nearly = soft * (1 + 1e-3)  # low-precision softmax outputs: accepted, renormalised
    assert inception_score(nearly, 3, probabilities=True) == pytest.approx(
        inception_score(soft, 3, probabilities=True)
    )


# ---- extractor loading and input preparation ------------------------------------------------


class TinyExtractor(torch.nn.Module):
    """Colour means/stds and temporal change per channel: 9-d features; checks its input size."""

    def forward(self, x: torch.Tensor, size: int = 8) -> torch.Tensor:
        if x.dim() != 5 or x.shape[-1] != size or x.shape[-2] != size:
            raise RuntimeError("expected (B, 3, T, size, size)")
        motion = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(2, 3, 4))
        return torch.cat([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4)), motion], dim=1)


class TinyClassifier(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 4.0 * torch.cat([x.mean(dim=(2, 3, 4)), -x.mean(dim=(1, 2, 3, 4))[:, None]], 1)


class NaNModel(torch.nn.Module):
    """A broken extractor/classifier: 4-d outputs, all NaN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 4), float("nan"))


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    root = tmp_path_factory.mktemp("scripted")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*torch.jit.script.* is deprecated", DeprecationWarning)
        torch.jit.script(TinyExtractor()).save(str(root / "extractor.pt"))
        torch.jit.script(TinyClassifier()).save(str(root / "classifier.pt"))
        torch.jit.script(NaNModel()).save(str(root / "nan.pt"))
    return root


def test_load_torchscript_errors(tmp_path, scripted):
    with pytest.raises(ExtractorError, match="--extractor is required"):
        load_torchscript(None, "--extractor", CPU)
    with pytest.raises(ExtractorError, match=r"--extractor .*missing\.pt: no such file"):
        load_torchscript(tmp_path / "missing.pt", "--extractor", CPU)
    with pytest.raises(ExtractorError, match=r"--extractor .* is a folder, expected a TorchScript"):
        load_torchscript(tmp_path, "--extractor", CPU)
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ExtractorError, match="--classifier .*not a loadable TorchScript"):
        load_torchscript(tmp_path / "junk.pt", "--classifier", CPU)
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "state.pt")
    with pytest.raises(ExtractorError, match="not a loadable TorchScript"):
        load_torchscript(tmp_path / "state.pt", "--extractor", CPU)
    model = load_torchscript(scripted / "extractor.pt", "--extractor", CPU)
    assert not model.training and model(torch.zeros(2, 3, 4, 8, 8)).shape == (2, 9)


def test_prepare_clips():
    video = torch.rand(2, 3, 4, 6, 10) * 2 - 1
    x = prepare_clips(video, 12)
    assert x.shape == (2, 3, 4, 12, 12) and x.dtype == torch.float32
    # short side 6 -> 12 (x2), long side 10 -> 20, centre crop keeps columns 4..15
    ref = torch.nn.functional.interpolate(
        video.permute(0, 2, 1, 3, 4).reshape(8, 3, 6, 10),
        size=(12, 20),
        mode="bilinear",
        align_corners=False,
    )
    ref = ref[:, :, :, 4:16].reshape(2, 4, 3, 12, 12).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(x, ref)
    # shrinking is antialiased: short side 6 -> 3 (/2), long side 10 -> 5, columns 1..3 kept
    small = torch.nn.functional.interpolate(
        video.permute(0, 2, 1, 3, 4).reshape(8, 3, 6, 10),
        size=(3, 5),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    small = small[:, :, :, 1:4].reshape(2, 4, 3, 3, 3).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(prepare_clips(video, 3), small)
    assert torch.equal(prepare_clips(video, None), video)
    torch.testing.assert_close(prepare_clips(video, None, "[0,1]"), (video + 1) / 2)
    torch.testing.assert_close(prepare_clips(video, None, "[0,255]"), (video + 1) * 127.5)
    with pytest.raises(ValueError, match="value_range"):
        prepare_clips(video, None, "0-1")
    with pytest.raises(ValueError, match=r"video must be \(B, 3, T, H, W\)"):
        prepare_clips(video[:, :2], 8)


# ---- CLI end to end -------------------------------------------------------------------------


def test_cli_end_to_end(tmp_path, scripted, ckpt, capsys):
    ext, cls = scripted / "extractor.pt", scripted / "classifier.pt"
    args = [
        "--checkpoint",
        str(ckpt),
        "--extractor",
        str(ext),
        "--data",
        "synthetic",
        "--num",
        "12",
        "--num-real",
        "14",
        "--batch-size",
        "5",
        "--extractor-size",
        "8",
        "--classifier",
        str(cls),
        "--classifier-kwargs",
        "{}",
        "--is-splits",
        "2",
        "--kvd-subsets",
        "3",
        "--out",
        str(tmp_path / "out"),
        "--save-features",
        "--extractor-kwargs",
        '{"size": 8}',
    ]
    # 12 generated clips, the default --kvd-subset-size 1000: every subset is all 12 (warned)
    with pytest.warns(UserWarning, match=r"--kvd-subset-size 1000 >= 12 clips") as record:
        assert fvd.main(args) == 0, capsys.readouterr().err
    assert sum("--kvd-subset-size" in str(w.message) for w in record) == 1  # once
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    m, p = result["metrics"], result["protocol"]
    assert set(m) == {"fvd", "kvd", "kvd_std", "is_mean", "is_std"}
    assert all(math.isfinite(v) for v in m.values()) and m["fvd"] > 0 and m["is_mean"] >= 1
    assert p["num_generated"] == 12 and p["num_real"] == 14 and p["split"] == "train"
    assert p["frames"] == 16 and p["resolution"] == [32, 32] and p["checkpoint_step"] == 2
    assert p["extractor_input"]["shape"] == ["B", 3, 16, 8, 8] and p["feature_dim"] == 9
    assert p["extractor_sha256"] == hashlib.sha256(ext.read_bytes()).hexdigest()
    assert p["kvd"]["subset_size"] == 12 and p["classifier_output"] == "logits"
    assert p["covariance_full_rank"] is True
    feats = np.load(tmp_path / "out" / "features.npz")
    assert feats["real"].shape == (14, 9) and feats["generated"].shape == (12, 9)
    assert m["fvd"] == pytest.approx(
        frechet_distance_from_features(feats["generated"], feats["real"])
    )
    kvd = kernel_distance(feats["generated"], feats["real"], num_subsets=3, subset_size=12)
    assert (m["kvd"], m["kvd_std"]) == pytest.approx(kvd[:2], rel=1e-12)
    assert (m["is_mean"], m["is_std"]) == pytest.approx(inception_score(feats["logits"], 2))
    # the real features are those of the first 14 synthetic training clips (the checkpoint's
    # data seed), rebuilt here and put through the same extractor
    cfg = checkpoint.checkpoint_config(checkpoint.load_checkpoint(ckpt))
    real = SyntheticVideos(14, 16, 32, seed=cfg.data.seed, split="train").batch(range(14))
    want = TinyExtractor()(prepare_clips(real["video"], 8))
    np.testing.assert_allclose(feats["real"], want.double().numpy(), rtol=1e-5, atol=1e-6)
    assert "FVD" in capsys.readouterr().out


def test_cli_real_video_folder(tmp_path, scripted, ckpt, capsys):
    """Real clips through vosgan.data.build: non-square H.264 files, fewer videos than clips."""
    rng = np.random.default_rng(8)
    folder = tmp_path / "videos"
    folder.mkdir()
    for i in range(3):
        container = av.open(str(folder / f"clip{i}.mp4"), "w")
        stream = container.add_stream("h264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 48, 40, "yuv420p"
        for _ in range(20):
            frame = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
        container.close()
    args = [
        "--checkpoint",
        str(ckpt),
        "--extractor",
        str(scripted / "extractor.pt"),
        "--data",
        str(folder),
        "--split",
        "test",
        "--num",
        "6",
        "--num-real",
        "5",
        "--extractor-size",
        "8",
        "--kvd-subsets",
        "2",
        "--out",
        str(tmp_path / "out"),
        "--save-features",
    ]
    with pytest.warns(UserWarning, match="rank-deficient"):  # 5 and 6 clips, 9-d features
        assert fvd.main(args) == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    p = result["protocol"]
    assert p["covariance_full_rank"] is False
    assert (p["num_real"], p["real_videos"], p["split"], p["data"]) == (5, 3, "test", str(folder))
    assert "is_mean" not in result["metrics"] and result["metrics"]["fvd"] > 0
    # the real features are those of the folder's first 5 test clips (no flip), rebuilt here
    cfg = checkpoint.checkpoint_config(checkpoint.load_checkpoint(ckpt))
    over = {"data.source": str(folder), "data.flip": False}
    real = make_dataset(config.apply_overrides(cfg, over), "test", 5).batch(range(5))
    want = TinyExtractor()(prepare_clips(real["video"], 8))
    feats = np.load(tmp_path / "out" / "features.npz")
    np.testing.assert_allclose(feats["real"], want.double().numpy(), rtol=1e-5, atol=1e-6)


def test_cli_shared_real_clips(tmp_path, scripted, ckpt, capsys):
    """The real clips in ../shared/data/clips (H.264 MP4 and an AVI of assorted sizes)."""
    clips = Path(SHARED_DATA) / "clips"
    if not clips.is_dir():
        pytest.skip(f"shared real data not found at {clips}")
    videos = len(list(clips.glob("*.mp4")) + list(clips.glob("*.avi")))
    args = [
        "--checkpoint",
        str(ckpt),
        "--extractor",
        str(scripted / "extractor.pt"),
        "--data",
        str(clips),
        "--num",
        "12",
        "--num-real",
        "12",
        "--extractor-size",
        "8",
        "--kvd-subsets",
        "2",
        "--out",
        str(tmp_path / "out"),
    ]
    assert fvd.main(args) == 0, capsys.readouterr().err
    p = json.loads((tmp_path / "out" / "metrics.json").read_text())["protocol"]
    assert p["real_videos"] == videos and p["num_real"] == 12


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--extractor", "{tmp}/none.pt"], "--extractor .*none.pt: no such file"),
        ([], "--extractor is required"),
        (["--extractor", "{ext}", "--extractor-size", "16"], "--extractor model failed on input"),
        (["--extractor", "{ext}", "--extractor-kwargs", "[1]"], "must be a JSON object"),
        (["--extractor", "{ext}", "--num", "1"], "--num must be >= 2"),
        (["--extractor", "{ext}", "--data", "{tmp}/nowhere"], "--data .*nowhere: no such"),
        (["--extractor", "{ext}", "--split", "dev"], "--split must be one of"),
        (["--extractor", "{ext}", "--classifier", "{ext}", "--is-splits", "5"], "--is-splits"),
        (  # 4 videos in 3 splits: one split of a single sample (IS exactly 1)
            ["--extractor", "{ext}", "--classifier", "{cls}", "--is-splits", "3"],
            r"--is-splits 3 needs --num >= 6 \(at least 2 generated videos per IS split\), "
            "got --num 4",
        ),
        (["--extractor", "{tmp}"], "--extractor .* is a folder, expected a TorchScript model"),
        (["--extractor", "{nan}"], "--extractor .*nan.pt returned NaN/Inf values for the real"),
        (
            ["--extractor", "{ext}", "--classifier", "{nan}", "--is-splits", "2"],
            "--classifier .*nan.pt returned NaN/Inf values for the generated clips",
        ),
        (  # logits (some negative) passed off as probabilities
            ["--extractor", "{ext}", "--classifier", "{cls}", "--is-splits", "2"]
            + ["--classifier-output", "probs"],
            "--classifier .*classifier.pt with --classifier-output probs: not probabilities",
        ),
    ],
)
def test_cli_bad_input(tmp_path, scripted, ckpt, capsys, extra, message):
    names = {"ext": "extractor.pt", "cls": "classifier.pt", "nan": "nan.pt"}
    extra = [a.format(tmp=tmp_path, **{k: scripted / v for k, v in names.items()}) for a in extra]
    args = [
        "--checkpoint",
        str(ckpt),
        "--num",
        "4",
        "--extractor-size",
        "8",
        "--out",
        str(tmp_path / "o"),
        *extra,
    ]
    assert fvd.main(args) == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--device", "bogus"], "argument --device: 'bogus' is not a device"),
        (["--out", "{tmp}/afile"], "argument --out: .*afile is a file, expected a folder"),
        (["--out", "/proc/vosgan-fvd"], "argument --out: .*cannot create files under /proc"),
    ],
)
def test_cli_bad_arguments_fail_before_any_work(tmp_path, capsys, extra, message):
    (tmp_path / "afile").write_text("")
    args = ["--checkpoint", str(tmp_path / "none.pt"), "--extractor", str(tmp_path / "none.pt")]
    args += ["--out", str(tmp_path / "o"), *(a.format(tmp=tmp_path) for a in extra)]
    assert re.search(message, usage_error(fvd.main, args, capsys))

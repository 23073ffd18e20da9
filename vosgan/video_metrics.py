"""Video generation metrics: FVD, KVD and IS over features of a user-supplied extractor.

- **FVD** (Unterthiner et al., 2018): the Frechet distance between Gaussians fitted to extractor
  features of real and generated clips,
  ``|mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))``.
- **KVD**: the squared maximum mean discrepancy with the polynomial kernel
  ``k(x, y) = (x.y / d + 1)^3``, unbiased estimator, averaged over random subsets: the KID
  definition (Binkowski et al., 2018) applied to video features.
- **IS** (Salimans et al., 2016): ``exp(E_x KL(p(y|x) || p(y)))`` from a classifier's logits, mean
  and standard deviation over splits.

All statistics are computed in float64 with numpy. The feature extractor is a TorchScript file
the user supplies (:func:`load_torchscript`); nothing is ever downloaded.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: Relative tolerance on the negative eigenvalues that rounding leaves in a PSD matrix.
PSD_TOL = 1e-6
#: How far from 1 a row of class probabilities may sum (low-precision softmax outputs).
PROB_TOL = 1e-2


class ExtractorError(ValueError):
    """The extractor/classifier file is missing, unloadable, or returns the wrong thing."""


def _as_features(name: str, x: np.ndarray | Tensor) -> np.ndarray:
    """``(N, D)`` finite float64 array, or a ValueError naming ``name``."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array of features, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or Inf values")
    return x


def gaussian_stats(features: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` of ``features (N, D)``, float64, N >= 2.

    Warns when ``N <= D``: the covariance is then rank-deficient and FVD is biased upwards and
    noisy (compare only numbers computed with the same N).
    """
    x = _as_features("features", features)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"features: a covariance needs at least 2 samples, got {n}")
    if n <= d:
        warnings.warn(
            f"{n} samples for {d}-dim features: the covariance is rank-deficient; "
            "FVD estimates at this N are biased and only comparable at the same N",
            stacklevel=2,
        )
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(d, d)


def _check_cov(name: str, sigma: np.ndarray, d: int) -> np.ndarray:
    sigma = np.asarray(sigma, dtype=np.float64)
    if sigma.shape != (d, d):
        raise ValueError(f"{name} must be ({d}, {d}) to match the mean, got {sigma.shape}")
    if not np.isfinite(sigma).all():
        raise ValueError(f"{name} holds NaN or Inf values")
    scale = max(np.abs(sigma).max(), 1e-300)
    if np.abs(sigma - sigma.T).max() > 1e-8 * scale:
        raise ValueError(f"{name} is not symmetric: not a covariance matrix")
    return (sigma + sigma.T) / 2


def _psd_eigh(name: str, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a symmetric matrix that must be PSD up to rounding.

    Eigenvalues in ``[-PSD_TOL * max|w|, 0)`` are rounding and become 0; a more negative one
    means the matrix is not a covariance (a clear error rather than a silently wrong distance).
    """
    w, v = np.linalg.eigh(a)
    tol = PSD_TOL * max(np.abs(w).max(initial=0.0), 1e-300)
    if w.size and w.min() < -tol:
        raise ValueError(
            f"{name} is not positive semi-definite (eigenvalue {w.min():.3e}, tolerance "
            f"{tol:.1e}): not a covariance matrix"
        )
    return np.clip(w, 0.0, None), v


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Squared Frechet (2-Wasserstein) distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``Tr((S1 S2)^(1/2))`` is computed as ``Tr((A S2 A)^(1/2))`` with ``A = S1^(1/2)`` from a
    symmetric eigen-decomposition: ``S1 S2`` and ``A S2 A`` are similar, and ``A S2 A`` is
    symmetric PSD, so its square root is real and exact even when either covariance is singular
    (fewer samples than dimensions). The general ``scipy.linalg.sqrtm`` route can return complex
    parts or fail on such matrices; here rounding can only leave tiny negative eigenvalues, which
    :func:`_psd_eigh` clips within a tolerance and rejects beyond it.

    Args:
        mu1, mu2: means ``(D,)``; sigma1, sigma2: covariances ``(D, D)``.

    Returns:
        The distance (>= 0 up to rounding) as a Python float.
    """
    mu1 = np.asarray(mu1, dtype=np.float64).reshape(-1)
    mu2 = np.asarray(mu2, dtype=np.float64).reshape(-1)
    d = mu1.shape[0]
    if mu2.shape != (d,):
        raise ValueError(f"mu2 must have shape ({d},) like mu1, got {mu2.shape}")
    if not (np.isfinite(mu1).all() and np.isfinite(mu2).all()):
        raise ValueError("mu1/mu2 hold NaN or Inf values")
    s1, s2 = _check_cov("sigma1", sigma1, d), _check_cov("sigma2", sigma2, d)
    w1, v1 = _psd_eigh("sigma1", s1)
    _psd_eigh("sigma2", s2)  # validation only
    a = (v1 * np.sqrt(w1)) @ v1.T  # S1^(1/2)
    w, _ = _psd_eigh("sigma1^(1/2) sigma2 sigma1^(1/2)", a @ s2 @ a)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.sqrt(w).sum())


def frechet_distance_from_features(
    feats1: np.ndarray | Tensor, feats2: np.ndarray | Tensor
) -> float:
    """:func:`frechet_distance` of Gaussian fits to ``feats1 (N1, D)`` and ``feats2 (N2, D)``."""
    f1, f2 = _as_features("feats1", feats1), _as_features("feats2", feats2)
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature dimensions differ: {f1.shape[1]} vs {f2.shape[1]}")
    return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))


def polynomial_mmd2(x: np.ndarray, y: np.ndarray, degree: int = 3, coef: float = 1.0) -> float:
    """Unbiased squared MMD between samples ``x (m, D)`` and ``y (n, D)``, m, n >= 2.

    Kernel ``k(a, b) = (a.b / D + coef)^degree``; estimator
    ``sum_{i!=j} k(x_i,x_j) / (m(m-1)) + sum_{i!=j} k(y_i,y_j) / (n(n-1)) - 2 mean k(x_i,y_j)``,
    whose expectation is the population MMD^2 (so it can be negative when both samples come from
    the same distribution).
    """
    x, y = _as_features("x", x), _as_features("y", y)
    (m, d), n = x.shape, y.shape[0]
    if y.shape[1] != d:
        raise ValueError(f"feature dimensions differ: {d} vs {y.shape[1]}")
    if m < 2 or n < 2:
        raise ValueError(f"the unbiased MMD needs >= 2 samples per set, got {m} and {n}")
    kxx = (x @ x.T / d + coef) ** degree
    kyy = (y @ y.T / d + coef) ** degree
    kxy = (x @ y.T / d + coef) ** degree
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        - 2.0 * kxy.mean()
    )


def kernel_distance(
    feats1: np.ndarray | Tensor,
    feats2: np.ndarray | Tensor,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float, int]:
    """KVD: :func:`polynomial_mmd2` (degree 3, gamma 1/D, coef 1) averaged over random subsets.

    Each subset draws ``min(subset_size, N1, N2)`` rows of each set without replacement (numpy
    generator seeded with ``seed``), as in the KID definition.

    Returns:
        ``(mean, standard deviation over subsets, subset size used)``.
    """
    f1, f2 = _as_features("feats1", feats1), _as_features("feats2", feats2)
    if num_subsets < 1 or subset_size < 2:
        raise ValueError(
            f"need num_subsets >= 1 and subset_size >= 2, got {num_subsets}, {subset_size}"
        )
    m = min(subset_size, f1.shape[0], f2.shape[0])
    rng = np.random.default_rng(seed)
    values = np.array(
        [
            polynomial_mmd2(
                f1[rng.choice(f1.shape[0], m, replace=False)],
                f2[rng.choice(f2.shape[0], m, replace=False)],
            )
            for _ in range(num_subsets)
        ]
    )
    return float(values.mean()), float(values.std()), m


def inception_score(
    logits: np.ndarray | Tensor, splits: int = 10, probabilities: bool = False
) -> tuple[float, float]:
    """IS = ``exp(mean_x KL(p(y|x) || p(y)))`` per split; mean and std over ``splits`` splits.

    Args:
        logits: classifier outputs ``(N, K)``: logits, or class probabilities when
            ``probabilities`` (>= 0, zeros allowed; each row must sum to 1 within
            :data:`PROB_TOL` and is renormalised).
        splits: the N samples are cut into this many consecutive, near-equal parts, each of at
            least 2 samples (a part of one scores exactly 1: its p(y) is its own p(y|x)).
    """
    x = _as_features("logits", logits)
    n = x.shape[0]
    if not 1 <= splits <= n // 2:
        raise ValueError(
            f"splits must be in [1, N/2={n // 2}] (at least 2 samples per split), got {splits} "
            f"for N={n}"
        )
    if probabilities:
        sums = x.sum(axis=1, keepdims=True)
        if (x < 0).any() or (np.abs(sums - 1) > PROB_TOL).any():
            raise ValueError(
                "not probabilities: values must be >= 0 with rows summing to 1 "
                f"(within {PROB_TOL:g}), got values in [{x.min():.3g}, {x.max():.3g}] and row "
                f"sums in [{sums.min():.3g}, {sums.max():.3g}]"
            )
        p = x / sums
        with np.errstate(divide="ignore"):
            logp = np.log(p)
    else:
        logp = x - x.max(axis=1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
        p = np.exp(logp)
    scores = []
    for part in np.array_split(np.arange(n), splits):
        py = p[part].mean(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(p[part] > 0, p[part] * (logp[part] - np.log(py)), 0.0).sum(axis=1)
        scores.append(math.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def load_torchscript(path: str | Path | None, flag: str, device: torch.device) -> torch.nn.Module:
    """``torch.jit.load`` a user-supplied model in eval mode; errors name the CLI ``flag``.

    Never downloads: a missing or unreadable file is an :class:`ExtractorError` that says what
    was expected.
    """
    if path is None or str(path) == "":
        raise ExtractorError(f"{flag} is required: the path of a TorchScript model file (.pt)")
    p = Path(path)
    if p.is_dir():
        raise ExtractorError(f"{flag} {p} is a folder, expected a TorchScript model file (.pt)")
    if not p.is_file():
        raise ExtractorError(
            f"{flag} {p}: no such file (supply a TorchScript file made with torch.jit.script/"
            "trace(...).save(); nothing is downloaded)"
        )
    try:
        with warnings.catch_warnings():  # the user chose TorchScript; the notice is noise here
            warnings.filterwarnings("ignore", ".*jit.load.* is deprecated", DeprecationWarning)
            model = torch.jit.load(str(p), map_location=device)
    except Exception as exc:  # noqa: BLE001 - any load failure means "not a TorchScript file"
        raise ExtractorError(
            f"{flag} {p} is not a loadable TorchScript file ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); a plain state_dict or pickled "
            "nn.Module will not do: save it with torch.jit.script(model).save(path)"
        ) from exc
    return model.eval()


def prepare_clips(video: Tensor, size: int | None, value_range: str = "[-1,1]") -> Tensor:
    """Videos ``(B, 3, T, H, W)`` in [-1, 1] -> the extractor's input.

    Spatial: with ``size``, each frame's short side is resized (bilinear, antialiased when
    shrinking) to ``size`` and the centre ``size x size`` crop is kept; ``None`` keeps H x W.
    Range: ``"[-1,1]"`` as is, ``"[0,1]"`` as ``(x + 1) / 2``, ``"[0,255]"`` as
    ``(x + 1) * 127.5``. Returns float32 ``(B, 3, T, size, size)``.
    """
    if video.dim() != 5 or video.shape[1] != 3:
        raise ValueError(f"video must be (B, 3, T, H, W), got {tuple(video.shape)}")
    x = video.float()
    if size is not None:
        b, c, t, h, w = x.shape
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        if (nh, nw) != (h, w):
            frames = F.interpolate(
                frames, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1
            )
        top, left = (nh - size) // 2, (nw - size) // 2
        frames = frames[:, :, top : top + size, left : left + size]
        x = frames.reshape(b, t, c, size, size).permute(0, 2, 1, 3, 4)
    if value_range == "[0,1]":
        x = (x + 1) / 2
    elif value_range == "[0,255]":
        x = (x + 1) * 127.5
    elif value_range != "[-1,1]":
        raise ValueError(f"value_range must be '[-1,1]', '[0,1]' or '[0,255]', got {value_range!r}")
    return x.contiguous()


@torch.no_grad()
def run_model(model: torch.nn.Module, x: Tensor, kwargs: Mapping[str, Any], flag: str) -> Tensor:
    """``model(x, **kwargs)`` -> float32 ``(B, D)`` on the CPU, validated (errors name ``flag``)."""
    try:
        out = model(x, **kwargs)
    except Exception as exc:  # noqa: BLE001 - report the input contract with the failure
        raise ExtractorError(
            f"{flag} model failed on input {tuple(x.shape)} {x.dtype} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); check --extractor-size, "
            "--extractor-range and the *-kwargs options"
        ) from exc
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Tensor) or out.dim() < 2 or out.shape[0] != x.shape[0]:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ExtractorError(
            f"{flag} model must return (B, D) features for B={x.shape[0]}, got {shape}"
        )
    return out.flatten(1).float().cpu()


__all__ = [
    "ExtractorError",
    "frechet_distance",
    "frechet_distance_from_features",
    "gaussian_stats",
    "inception_score",
    "kernel_distance",
    "load_torchscript",
    "polynomial_mmd2",
    "prepare_clips",
    "run_model",
]

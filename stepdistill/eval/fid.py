"""FID, KID and precision/recall of generated images against reference images, via torch-fidelity.

* FID, the Frechet Inception Distance (Heusel et al. 2017, "GANs Trained by a Two Time-Scale
  Update Rule Converge to a Local Nash Equilibrium"): the Frechet (2-Wasserstein) distance between
  Gaussians fitted to Inception pool3 features of the two sets.
* KID, the Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs"): the unbiased
  squared MMD with a cubic polynomial kernel on the same features, averaged over random subsets.
* precision / recall (Kynkaanniemi et al. 2019), optional.

Images are float tensors in [-1, 1] (N, C, H, W) with C in {1, 3}, or uint8 in [0, 255]; they
are quantised to uint8 exactly like saved PNGs would be and grayscale is repeated to RGB.

Reference statistics are cached by torch-fidelity itself (``cache=True``, ``input2_cache_name``)
when ``cache_key`` is given. Cache files live in ``cache_dir`` (default
``$STEPDISTILL_CACHE/fidelity_cache``, i.e. ``~/.cache/stepdistill/fidelity_cache``) and are named
``sd-<cache_key>-n<N>-<fingerprint>-<extractor>-features-2048.pt`` /
``...-stat-fid-2048.pt``, where the fingerprint is a hash of the reference uint8 pixels, so a
changed reference set never hits a stale cache. torch-fidelity reads these files with
``torch.load(weights_only=False)``: only point ``cache_dir`` at a folder you trust.

Shipped reference features (:data:`SHIPPED_REF_DIR`, safetensors, keyed by that same name and
pixel fingerprint) seed an empty cache, so the first ``stepdistill eval`` on the Animal-MNIST test
split starts at once; any other reference set is computed once, with a log line and progress bar.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from stepdistill.eval.features import (
    FEATURE_LAYER,
    choose_feature_extractor,
    extractor_kwargs,
    register,
)

KID_SUBSET_SIZE = 1000
#: reference features shipped with the package: ``<cache name>-<extractor>-features-<layer>.safetensors``
SHIPPED_REF_DIR = Path(__file__).resolve().parent.parent / "assets" / "fid_reference"


def default_blas_threads() -> int:
    """BLAS threads for the FID eigen-decomposition / KID kernels: ``$STEPDISTILL_BLAS_THREADS`` or
    ``min(4, cpus // 2)`` (at least 1). OpenBLAS busy-waits, so using every core while a training
    job shares the machine makes a 2048x2048 ``eigvals`` ~10x slower than one thread."""
    env = os.environ.get("STEPDISTILL_BLAS_THREADS")
    if env:
        return max(1, int(env))
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def _blas_limit(n: int | None):
    if n is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


class _UInt8Images(Dataset):
    """torch-fidelity input: a Dataset of uint8 (3, H, W) tensors."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def _as_tensor(images, what: str) -> torch.Tensor:
    if hasattr(images, "images") and not isinstance(images, (torch.Tensor, np.ndarray)):
        images = images.images  # ArrayDataset and friends
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError(f"{what}: the image set is empty")
        images = torch.stack([torch.as_tensor(x) for x in images])
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{what}: expected a tensor (N, C, H, W), got {type(images).__name__}")
    return images


def to_uint8_rgb(images, what: str = "images") -> torch.Tensor:
    """Validate and convert images to uint8 (N, 3, H, W) on CPU.

    Float input must lie in [-1, 1] (values outside are clipped, NaN/inf rejected); uint8 input is
    taken as is. Raises :class:`ValueError` with a message naming ``what`` for unusable input.
    """
    x = _as_tensor(images, what).detach().cpu()
    if x.ndim == 3 and x.shape[0] in (1, 3) and x.shape[1] > 4:
        raise ValueError(f"{what}: expected a batch (N, C, H, W), got one image of shape {tuple(x.shape)}; add a batch dim")
    if x.ndim != 4:
        raise ValueError(f"{what}: expected shape (N, C, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{what}: the image set is empty (shape {tuple(x.shape)})")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"{what}: expected 1 or 3 channels in dim 1 (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"{what}: images of size {x.shape[2]}x{x.shape[3]} are too small")
    if x.dtype != torch.uint8:
        if not (x.is_floating_point()):
            raise ValueError(f"{what}: expected float images in [-1, 1] or uint8, got dtype {x.dtype}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{what}: images contain NaN or infinite values")
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


def _fingerprint(x: torch.Tensor) -> str:
    h = hashlib.sha1(str(tuple(x.shape)).encode())
    h.update(x.numpy().tobytes())
    return h.hexdigest()[:12]


def _cache_name(cache_key: str, ref_u8: torch.Tensor) -> str:
    key = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(cache_key)).strip("_.-") or "ref"
    return f"sd-{key}-n{len(ref_u8)}-{_fingerprint(ref_u8)}"


def private_dir(path: Path) -> Path:
    """Create ``path`` if needed and make it private (mode 0700): torch-fidelity reads its cache files with
    ``torch.load(weights_only=False)``, so nobody else may be able to plant files there."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        os.chmod(path, 0o700)
    except OSError:  # not ours (a shared folder the user chose): leave it, but it is their trust decision
        pass
    return path


def default_cache_dir() -> Path:
    from stepdistill.data import cache_dir

    return cache_dir() / "fidelity_cache"


def _layers(extractor: str, fid: bool, kid: bool, prc: bool) -> dict[str, str]:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    cls = FEATURE_EXTRACTORS_REGISTRY[extractor]
    return {m: cls.get_default_feature_layer_for_metric(m) for m, on in (("fid", fid), ("kid", kid), ("prc", prc)) if on}


def _ref_cached(cache_root: Path, name: str, extractor: str, layers: dict[str, str]) -> bool:
    """Would torch-fidelity skip running the extractor on the reference set?"""
    feats = all((cache_root / f"{name}-{extractor}-features-{l}.pt").exists() for l in set(layers.values()))
    if feats:
        return True
    if set(layers) == {"fid"}:  # FID-only calls only need the cached statistics
        return (cache_root / f"{name}-{extractor}-stat-fid-{layers['fid']}.pt").exists()
    return False


def _seed_from_shipped(cache_root: Path, name: str, extractor: str, layers: set[str],
                       shipped_dir: Path | None = None) -> bool:
    """Copy shipped reference features (safetensors) into the cache as torch-fidelity's files; True if all
    ``layers`` were found. The tensors are loaded without unpickling and written by us."""
    from safetensors.torch import load_file

    shipped_dir = SHIPPED_REF_DIR if shipped_dir is None else Path(shipped_dir)
    srcs = {l: shipped_dir / f"{name}-{extractor}-features-{l}.safetensors" for l in layers}
    if not all(p.is_file() for p in srcs.values()):
        return False
    for l, src in srcs.items():
        dst = cache_root / f"{name}-{extractor}-features-{l}.pt"
        if not dst.exists():
            tmp = dst.with_name(dst.name + f".{os.getpid()}.tmp")
            torch.save(load_file(str(src))["features"], tmp)
            os.replace(tmp, dst)
    return True


def ship_reference_features(ref, cache_key: str, out_dir: str | Path, feature_extractor: str | None = None,
                            cache_dir: str | Path | None = None, batch_size: int = 32) -> list[Path]:
    """Write the reference set's features as safetensors files that :func:`compute_metrics` seeds its cache
    from (how ``assets/fid_reference`` was made). Computes them through torch-fidelity (or its cache)."""
    from safetensors.torch import save_file

    ref_u8 = to_uint8_rgb(ref, "reference images")
    register()
    extractor = choose_feature_extractor(feature_extractor)
    name = _cache_name(cache_key, ref_u8)
    out = compute_metrics(ref_u8[: max(4, min(len(ref_u8), 8))], ref_u8, fid=True, kid=False, prc=True,
                          cache_key=cache_key, cache_dir=cache_dir, feature_extractor=extractor, batch_size=batch_size,
                          return_features=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{extractor}-features-{FEATURE_LAYER}.safetensors"
    save_file({"features": out["ref_features"].contiguous()}, str(path),
              metadata={"cache_key": str(cache_key), "n": str(len(ref_u8)), "extractor": extractor})
    return [path]


def compute_metrics(gen_images, ref, *, fid: bool = True, kid: bool = True, prc: bool = False,
                    cache_key: str | None = None, cache_dir: str | Path | None = None,
                    feature_extractor: str | None = None, batch_size: int = 32, kid_subsets: int = 100,
                    device: str | torch.device | None = None, blas_threads: int | None = -1,
                    verbose: bool = False, return_features: bool = False) -> dict:
    """FID / KID / precision-recall of ``gen_images`` against ``ref`` through torch-fidelity.

    Args:
        gen_images: generated images, float (N, C, H, W) in [-1, 1] or uint8; C in {1, 3}.
        ref: reference images in the same format (or an object with ``.images``, e.g. an
            :class:`~stepdistill.data.ArrayDataset`); must have the same H, W as ``gen_images``
            (1-channel sets are repeated to RGB, so 1 vs 3 channels is allowed).
        fid, kid, prc: which metrics to compute (FID: Heusel et al. 2017; KID: Binkowski et al. 2018).
        cache_key: name of the reference set (e.g. ``"animal_mnist-32-test"``); enables
            torch-fidelity's on-disk cache of reference features/statistics. ``None``: no caching.
        cache_dir: cache root (default ``$STEPDISTILL_CACHE/fidelity_cache``).
        feature_extractor: torch-fidelity extractor name or alias; default
            :func:`~stepdistill.eval.features.choose_feature_extractor` (env ``STEPDISTILL_FEATURE_EXTRACTOR``).
        batch_size: images per extractor forward pass.
        kid_subsets: number of KID subsets; the subset size is ``min(1000, n_gen, n_ref)``.
        device: ``"cuda"`` or ``"cpu"``; default CUDA when available.
        blas_threads: BLAS thread limit while torch-fidelity runs (-1: :func:`default_blas_threads`,
            None: leave unchanged).
        return_features: also return the features the metrics were computed on, ``gen_features`` and
            ``ref_features`` (float tensors (N, D)), e.g. for :mod:`stepdistill.eval.coverage`. Each set
            goes through the network once either way.

    Returns:
        dict with floats ``fid``, ``kid_mean``, ``kid_std`` (those requested), ``precision``,
        ``recall``, ``f_score`` (if ``prc``), plus ``ref_cache_hit`` (bool: reference features came
        from the cache), ``kid_subset_size``, ``n_gen``, ``n_ref`` (ints) and ``feature_extractor`` (str).
    """
    import torch_fidelity

    if not (fid or kid or prc):
        raise ValueError("compute_metrics: ask for at least one of fid, kid, prc")
    gen_u8 = to_uint8_rgb(gen_images, "generated images")
    ref_u8 = to_uint8_rgb(ref, "reference images")
    if gen_u8.shape[-2:] != ref_u8.shape[-2:]:
        raise ValueError(
            f"generated images are {gen_u8.shape[-2]}x{gen_u8.shape[-1]} (HxW) but reference images are "
            f"{ref_u8.shape[-2]}x{ref_u8.shape[-1]}; compare sets at the same resolution "
            "(load or resample the reference set at the generator's resolution)")
    n_gen, n_ref = len(gen_u8), len(ref_u8)
    if min(n_gen, n_ref) < 2:
        raise ValueError(f"need at least 2 images in each set to fit statistics, got {n_gen} generated and {n_ref} reference")
    if prc and min(n_gen, n_ref) < 4:
        raise ValueError(f"precision/recall need at least 4 images per set (k=3 neighbours), got {n_gen} and {n_ref}")

    register()
    extractor = choose_feature_extractor(feature_extractor)
    kid_subset_size = min(KID_SUBSET_SIZE, n_gen, n_ref)
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"

    kwargs = dict(
        input1=_UInt8Images(gen_u8), input2=_UInt8Images(ref_u8), fid=fid, kid=kid, prc=prc,
        feature_extractor=extractor, batch_size=int(batch_size), cuda=cuda,
        kid_subsets=int(kid_subsets), kid_subset_size=kid_subset_size,
        save_cpu_ram=True,  # num_workers=0: no DataLoader worker processes for in-memory tensors
        verbose=verbose, **extractor_kwargs(extractor),
    )
    ref_cache_hit = False
    if cache_key is not None:
        cache_root = private_dir(Path(cache_dir) if cache_dir is not None else default_cache_dir())
        name = _cache_name(cache_key, ref_u8)
        layers = _layers(extractor, fid, kid, prc)
        ref_cache_hit = _ref_cached(cache_root, name, extractor, layers)
        if not ref_cache_hit:  # shipped features (Animal-MNIST test split) seed an empty cache
            wanted = set(layers.values()) | ({FEATURE_LAYER} if return_features else set())
            ref_cache_hit = _seed_from_shipped(cache_root, name, extractor, wanted)
        if not ref_cache_hit:  # minutes on a CPU: say what happens, and show torch-fidelity's progress bars
            import sys

            print(f"computing Inception features of the {n_ref} reference images ({cache_key}) once; "
                  f"cached in {cache_root}", file=sys.stderr, flush=True)
            kwargs["verbose"] = True
        kwargs.update(cache=True, cache_root=str(cache_root), input2_cache_name=name)
    else:
        kwargs.update(cache=False)

    if blas_threads == -1:
        blas_threads = default_blas_threads()
    feats = None
    with _blas_limit(blas_threads):
        if return_features:
            raw, feats = _metrics_and_features(kwargs, extractor)
        else:
            raw = torch_fidelity.calculate_metrics(**kwargs)
    out: dict = {}
    if fid:
        out["fid"] = float(raw[torch_fidelity.KEY_METRIC_FID])
    if kid:
        out["kid_mean"] = float(raw[torch_fidelity.KEY_METRIC_KID_MEAN])
        out["kid_std"] = float(raw[torch_fidelity.KEY_METRIC_KID_STD])
    if prc:
        out["precision"] = float(raw[torch_fidelity.KEY_METRIC_PRECISION])
        out["recall"] = float(raw[torch_fidelity.KEY_METRIC_RECALL])
        out["f_score"] = float(raw[torch_fidelity.KEY_METRIC_F_SCORE])
    out.update(ref_cache_hit=ref_cache_hit, n_gen=n_gen, n_ref=n_ref, feature_extractor=extractor)
    if kid:
        out["kid_subset_size"] = kid_subset_size
    if feats is not None:
        out["gen_features"], out["ref_features"] = feats
    return out


def _metrics_and_features(kwargs: dict, extractor: str) -> tuple[dict, tuple[torch.Tensor, torch.Tensor]]:
    """torch-fidelity's own single-extractor path (``calculate_metrics_one_feature_extractor``: same
    functions, same caches, so the same numbers), keeping the two feature sets it extracts."""
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics_cached, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric
    from torch_fidelity.metric_prc import prc_featuresdict_to_metric
    from torch_fidelity.utils import (create_feature_extractor, extract_featuresdict_from_input_id_cached,
                                      get_cacheable_input_name, resolve_feature_layer_for_metric)

    wanted = [m for m in ("fid", "kid", "prc") if kwargs.get(m)]
    layers = {m: resolve_feature_layer_for_metric(m, **kwargs) for m in wanted}
    fe = create_feature_extractor(extractor, sorted(set(layers.values()) | {FEATURE_LAYER}), **kwargs)
    f1 = extract_featuresdict_from_input_id_cached(1, fe, **kwargs)
    f2 = extract_featuresdict_from_input_id_cached(2, fe, **kwargs)
    raw: dict = {}
    if "fid" in layers:
        stats = [fid_featuresdict_to_statistics_cached(f, get_cacheable_input_name(i, **kwargs), fe, layers["fid"],
                                                       **kwargs) for i, f in ((1, f1), (2, f2))]
        raw.update(fid_statistics_to_metric(*stats, kwargs.get("verbose", False)))
    if "kid" in layers:
        raw.update(kid_featuresdict_to_metric(f1, f2, layers["kid"], **kwargs))
    if "prc" in layers:
        raw.update(prc_featuresdict_to_metric(f1, f2, layers["prc"], **kwargs))
    return raw, (f1[FEATURE_LAYER].float(), f2[FEATURE_LAYER].float())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, blas_threads: int | None = -1) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017):

    ``||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``.

    Uses ``scipy.linalg.sqrtm``; if the product is singular, ``eps`` is added to both diagonals
    (as in the reference TTUR / pytorch-fid code). Tiny imaginary parts from numerical error are
    dropped; large ones raise :class:`ValueError`.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,):
        raise ValueError(f"mean vectors must both have shape ({d},), got {mu1.shape} and {mu2.shape}")
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must both have shape ({d}, {d}), got {sigma1.shape} and {sigma2.shape}")
    diff = mu1 - mu2
    with _blas_limit(default_blas_threads() if blas_threads == -1 else blas_threads):
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            offset = np.eye(d) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm produced a large imaginary component ({np.max(np.abs(covmean.imag)):.3g})")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def feature_statistics(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rowvar=False) of (N, D) features, as FID uses them."""
    f = np.asarray(feats, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {f.shape}")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


@torch.no_grad()
def features(images, feature_extractor: str | None = None, batch_size: int = 32,
             device: str | torch.device | None = None) -> np.ndarray:
    """Inception pool3 features (N, 2048) float32 of images in [-1, 1] (or uint8)."""
    from torch_fidelity.utils import create_feature_extractor

    x = to_uint8_rgb(images, "images")
    register()
    name = choose_feature_extractor(feature_extractor)
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    fe = create_feature_extractor(name, [FEATURE_LAYER], cuda=cuda, verbose=False, **extractor_kwargs(name))
    dev = "cuda" if cuda else "cpu"
    out = [fe(x[i:i + batch_size].to(dev))[0].float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()

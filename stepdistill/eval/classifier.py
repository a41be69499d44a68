"""A small CNN domain classifier for 32x32 one-channel images (Animal-MNIST by default).

It serves two evaluation purposes:

* **class accuracy** of class-conditional samples: a generator conditioned on class ``c``
  should produce images the classifier assigns to ``c`` (:func:`class_accuracy`);
* **cheap features** (its 64-d penultimate layer) for the within-class diversity metric
  in :mod:`stepdistill.eval.diversity`.

Architecture (:class:`SmallCNN`, ~89k parameters)::

    conv3x3(1->16)+BN+ReLU, maxpool2   32 -> 16
    conv3x3(16->32)+BN+ReLU, maxpool2  16 -> 8
    conv3x3(32->64)+BN+ReLU, maxpool2   8 -> 4
    flatten 1024 -> linear 64 (penultimate features) -> ReLU -> dropout -> linear 10

The shipped weights in ``stepdistill/assets/animal_mnist_classifier/`` were produced with
(about 40 s on one CPU thread; bit-identical weights for a given seed and thread count)::

    python -c "from stepdistill.eval.classifier import main_train_classifier; \
main_train_classifier('stepdistill/assets/animal_mnist_classifier', steps=1500, seed=0)"

which trains on ``animal_mnist(32, 'train')`` (9000 images) and reports the accuracy on
``animal_mnist(32, 'test')`` (1000 images, 100 per class); the result is recorded in that
folder's ``config.json`` (``test_accuracy``, ``per_class_test_accuracy``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_CLASSIFIER_DIR = Path(__file__).resolve().parent.parent / "assets" / "animal_mnist_classifier"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class SmallCNN(nn.Module):
    """3 conv blocks + 2 linear layers for (N, in_channels, 32, 32) inputs in [-1, 1]."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, resolution: int = 32,
                 widths: tuple[int, int, int] = (16, 32, 64), feature_dim: int = 64, dropout: float = 0.2):
        super().__init__()
        if resolution % 8 != 0:
            raise ValueError(f"SmallCNN needs a resolution divisible by 8, got {resolution}")
        self.config = dict(num_classes=num_classes, in_channels=in_channels, resolution=resolution,
                           widths=list(widths), feature_dim=feature_dim, dropout=dropout)
        layers, c = [], in_channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c = w
        self.conv = nn.Sequential(*layers)
        self.fc1 = nn.Linear(c * (resolution // 8) ** 2, feature_dim)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(feature_dim, num_classes)

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        want = (cfg["in_channels"], cfg["resolution"], cfg["resolution"])
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"classifier expects images of shape (N, {want[0]}, {want[1]}, {want[2]}), got {tuple(x.shape)}")
        return x.float()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate 64-d features (pre-activation, so never identically zero)."""
        return self.fc1(self.conv(self._check(x)).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(F.relu(self.features(x))))


def _augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random integer translations (pad with background -1) and horizontal flips."""
    n = x.shape[0]
    p = max_shift
    xp = F.pad(x, (p, p, p, p), value=-1.0)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    out = _shift(xp, dy, dx, *x.shape[-2:])
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def _shift(xp: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, h: int, w: int) -> torch.Tensor:
    n, c = xp.shape[:2]
    iy = (dy[:, None] + torch.arange(h)[None])  # (n, h)
    ix = (dx[:, None] + torch.arange(w)[None])  # (n, w)
    bidx = torch.arange(n)[:, None, None]
    # (n, h, w, c) gather via advanced indexing, then back to (n, c, h, w)
    return xp.permute(0, 2, 3, 1)[bidx, iy[:, :, None], ix[:, None, :]].permute(0, 3, 1, 2).contiguous()


def train_classifier(dataset, steps: int = 1500, seed: int = 0, batch_size: int = 128, lr: float = 3e-3,
                     weight_decay: float = 1e-4, augment: bool = True, log_every: int = 0) -> SmallCNN:
    """Train a :class:`SmallCNN` on ``dataset`` (anything with ``.images`` (N,C,H,W) in [-1,1],
    ``.labels`` and ``.class_names``, e.g. :func:`stepdistill.data.animal_mnist`).

    AdamW with a one-cycle learning-rate schedule; random shifts and flips. Deterministic for a
    given ``seed`` (and torch thread count). Returns the model in eval mode, on CPU.
    """
    images, labels = dataset.images.float(), dataset.labels.long()
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"dataset.images must be a non-empty (N, C, H, W) tensor, got shape {tuple(images.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    num_classes = len(getattr(dataset, "class_names", [])) or int(labels.max()) + 1
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = SmallCNN(num_classes=num_classes, in_channels=images.shape[1], resolution=images.shape[-1])
    model.class_names = list(getattr(dataset, "class_names", [str(i) for i in range(num_classes)]))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    n = len(images)
    perm, pos = torch.randperm(n, generator=gen), 0
    for step in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        x, y = images[idx], labels[idx]
        if augment:
            x = _augment(x, gen)
        loss = F.cross_entropy(model(x), y, label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)
    return model.eval()


@torch.no_grad()
def predict(model: SmallCNN, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted class indices for float images in [-1, 1] (uint8 images are rescaled)."""
    images = _as_float_images(images)
    model.eval()
    dev = next(model.parameters()).device
    return torch.cat([model(images[i:i + batch_size].to(dev)).argmax(1).cpu() for i in range(0, len(images), batch_size)])


@torch.no_grad()
def classifier_features(model: SmallCNN, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Penultimate-layer features (N, 64) for images in [-1, 1]."""
    images = _as_float_images(images)
    model.eval()
    dev = next(model.parameters()).device
    return torch.cat([model.features(images[i:i + batch_size].to(dev)).cpu() for i in range(0, len(images), batch_size)])


def _as_float_images(images) -> torch.Tensor:
    images = torch.as_tensor(images)
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    return images.float()


def class_accuracy(model: SmallCNN, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, list[float]]:
    """``(overall accuracy, per-class accuracies)``; per-class entries are ``nan`` for classes absent from ``labels``."""
    labels = torch.as_tensor(labels).long().cpu()
    if len(images) == 0:
        raise ValueError("class_accuracy got an empty set of images")
    if len(images) != len(labels):
        raise ValueError(f"class_accuracy got {len(images)} images but {len(labels)} labels")
    pred = predict(model, images)
    correct = (pred == labels).float()
    k = model.config["num_classes"]
    per_class = [float(correct[labels == c].mean()) if (labels == c).any() else float("nan") for c in range(k)]
    return float(correct.mean()), per_class


def save_classifier(model: SmallCNN, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (architecture, class names, ``extra`` metadata)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME))
    cfg = {"architecture": "SmallCNN", **model.config,
           "class_names": list(getattr(model, "class_names", [])), **(extra or {})}
    (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def load_classifier(folder: str | Path, device: str | torch.device = "cpu") -> SmallCNN:
    """Load a classifier written by :func:`save_classifier`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"classifier file missing: {p} (expected {CONFIG_NAME} and {WEIGHTS_NAME} in {folder})")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("architecture") != "SmallCNN":
        raise ValueError(f"{cfg_path}: unknown architecture {cfg.get('architecture')!r}")
    model = SmallCNN(num_classes=cfg["num_classes"], in_channels=cfg["in_channels"], resolution=cfg["resolution"],
                     widths=tuple(cfg["widths"]), feature_dim=cfg["feature_dim"], dropout=cfg.get("dropout", 0.2))
    model.load_state_dict(load_file(str(w_path)))
    model.class_names = cfg.get("class_names", [])
    model.meta = cfg
    return model.to(device).eval()


_DEFAULT = None


def load_default_classifier(device: str | torch.device = "cpu") -> SmallCNN:
    """The shipped Animal-MNIST classifier (``stepdistill/assets/animal_mnist_classifier``); cached per process."""
    global _DEFAULT
    if _DEFAULT is None:
        if not (DEFAULT_CLASSIFIER_DIR / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"shipped classifier not found in {DEFAULT_CLASSIFIER_DIR}; rebuild it with "
                "main_train_classifier('stepdistill/assets/animal_mnist_classifier', steps=1500, seed=0)")
        _DEFAULT = load_classifier(DEFAULT_CLASSIFIER_DIR)
    return _DEFAULT.to(device)


def main_train_classifier(out_dir: str | Path = DEFAULT_CLASSIFIER_DIR, steps: int = 1500, seed: int = 0,
                          dataset: str = "animal_mnist", resolution: int = 32, threads: int | None = 1) -> dict:
    """Train on ``<dataset>`` split 'train', evaluate on split 'test', save to ``out_dir``.

    Returns the metadata written to ``config.json`` (including ``test_accuracy``). ``threads``
    sets ``torch.set_num_threads`` for reproducibility (None leaves it unchanged).
    """
    from stepdistill.data import load_dataset

    if threads is not None:
        torch.set_num_threads(threads)
    train = load_dataset(dataset, resolution, "train")
    test = load_dataset(dataset, resolution, "test")
    t0 = time.time()
    model = train_classifier(train, steps=steps, seed=seed)
    train_s = time.time() - t0
    acc, per_class = class_accuracy(model, test.images, test.labels)
    meta = {
        "dataset": dataset, "train_split": "train", "test_split": "test", "steps": steps, "seed": seed,
        "train_seconds": round(train_s, 1), "torch_threads": torch.get_num_threads(),
        "test_accuracy": round(acc, 4), "per_class_test_accuracy": [round(a, 4) for a in per_class],
        "reproduce": ("python -c \"from stepdistill.eval.classifier import main_train_classifier; "
                      f"main_train_classifier('{out_dir}', steps={steps}, seed={seed})\""),
    }
    save_classifier(model, out_dir, meta)
    print(f"test accuracy {acc:.4f} ({dataset}, {len(test.labels)} images), trained {steps} steps in {train_s:.0f}s -> {out_dir}")
    return meta


if __name__ == "__main__":  # python -m stepdistill.eval.classifier --out DIR --steps 1500 --seed 0
    import argparse

    ap = argparse.ArgumentParser(description="Train the small domain classifier and report its test accuracy.")
    ap.add_argument("--out", default=str(DEFAULT_CLASSIFIER_DIR))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dataset", default="animal_mnist")
    a = ap.parse_args()
    main_train_classifier(a.out, steps=a.steps, seed=a.seed, dataset=a.dataset)

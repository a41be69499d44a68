"""Video metrics for clips (N, C, F, H, W) in [-1, 1] (Moving Animal-MNIST students and teachers).

* **Per-frame FID** (and precision / recall): every frame is an image, scored with the image FID
  (:func:`stepdistill.eval.metrics.fid_metrics`) against the real clips' frames.
* **Frame class accuracy**: a :class:`~stepdistill.eval.classifier.SmallCNN` trained on real clip frames
  (``assets/moving_animal_mnist_frame_classifier``) should give every frame of a clip the clip's class.
* **Temporal consistency**: ``frame_diff``, the RMS change between consecutive frames (0: a static clip), and
  ``warp_residual``, the RMS change left after the best integer translation of the earlier frame (a brute-force
  flow: search over shifts in [-r, r]^2; our real clips move by whole pixels, so translation explains nearly
  all of their change, and flicker or a shape that morphs does not). Reported next to the real clips' values
  and, in a comparison, the teacher's.
* **Motion diversity**: the silhouette's centroid track (intensity-weighted, per frame) minus its start, as a
  (F, 2) displacement path in pixels; the mean pairwise RMS distance between the paths of clips of the same
  condition. Students that always move the same way score near 0; real clips about the frame size / 4.
* **Collapse detector** (:func:`collapse_flags`): a clip is *static* when its ``frame_diff`` is below
  ``static_tol`` and *solid* when its frames' spatial std is below ``solid_tol``. The training guards use it
  (``trainers/guards.py``) and the eval reports the collapsed fraction.

There is no FVD: FVD needs the I3D network's weights, which are not installed here and not downloadable offline.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..video_stats import check_clips, frames_of, temporal_metrics

FRAME_CLASSIFIER_DIR = Path(__file__).resolve().parent.parent / "assets" / "moving_animal_mnist_frame_classifier"


# -- the frame classifier ------------------------------------------------------------------------------------------
def train_frame_classifier(resolution: int = 16, frames: int = 8, steps: int = 1500, seed: int = 0):
    """A SmallCNN on the frames of Moving Animal-MNIST's train-split clips (each frame labelled with its clip's
    class); returns (model, test accuracy on the test-split clips' frames)."""
    from ..data import ArrayDataset, load_dataset
    from .classifier import class_accuracy, train_classifier

    train = load_dataset("moving_animal_mnist", resolution, "train", 1, frames)
    test = load_dataset("moving_animal_mnist", resolution, "test", 1, frames)
    rep = lambda d: (frames_of(d.images), d.labels.repeat_interleave(frames))  # noqa: E731
    x, y = rep(train)
    model = train_classifier(ArrayDataset(x, y, list(train.class_names)), steps=steps, seed=seed)
    xt, yt = rep(test)
    acc, per = class_accuracy(model, xt, yt)
    return model, acc, per


def main_train_frame_classifier(out_dir: str | Path = FRAME_CLASSIFIER_DIR, steps: int = 1500, seed: int = 0) -> Path:
    """Write the shipped frame classifier (``python -m stepdistill.eval.video``)."""
    from .classifier import save_classifier

    model, acc, per = train_frame_classifier(steps=steps, seed=seed)
    return save_classifier(model, out_dir, extra={"dataset": "moving_animal_mnist", "resolution": 16, "frames": 8,
                                                  "train_split": "train", "steps": steps, "seed": seed,
                                                  "test_accuracy": acc, "per_class_test_accuracy": per})


def frame_accuracy(clips: torch.Tensor, labels: torch.Tensor, classifier=None) -> float:
    """Fraction of frames the frame classifier assigns to their clip's class."""
    from .classifier import class_accuracy, load_classifier

    model = classifier if classifier is not None else load_classifier(FRAME_CLASSIFIER_DIR)
    f = clips.shape[2]
    acc, _ = class_accuracy(model, frames_of(check_clips(clips)), labels.cpu().long().repeat_interleave(f))
    return float(acc)


def evaluate_clips(clips: torch.Tensor, labels: torch.Tensor | None, ref: torch.Tensor, ref_key: str,
                   groups: torch.Tensor | None = None, fid: bool = True) -> dict:
    """Every video metric of ``clips`` against real clips ``ref`` (``ref_key`` names them for the FID cache)."""
    from .metrics import fid_metrics

    out = temporal_metrics(clips, groups)
    if fid:
        m = fid_metrics(frames_of(check_clips(clips)), frames_of(check_clips(ref)), f"{ref_key}-frames", kid=False)
        out.update(frame_fid=m["fid"], frame_precision=m["precision"], frame_recall=m["recall"])
    if labels is not None and FRAME_CLASSIFIER_DIR.is_dir():
        out["frame_class_accuracy"] = frame_accuracy(clips, labels)
    return out


if __name__ == "__main__":
    print(main_train_frame_classifier())

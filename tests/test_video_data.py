"""Moving Animal-MNIST (stepdistill/video_data.py): deterministic clips of the installed silhouettes, three motions,
splits from disjoint source images."""
from __future__ import annotations

import torch

from stepdistill.data import animal_mnist
from stepdistill.video_data import MOTIONS, moving_animal_mnist as _clips

_SOURCES = {}


def moving_animal_mnist(n, split="train", **kw):
    """Clips of ``split``'s silhouettes (what stepdistill.data.moving_clips does for a whole split)."""
    if split not in _SOURCES:
        _SOURCES[split] = animal_mnist(32, split)
    return _clips(n, split=split, source=_SOURCES[split], **kw)


def test_clips_are_deterministic_and_shaped():
    a = moving_animal_mnist(24, frames=8, size=16, split="train", seed=3)
    b = moving_animal_mnist(24, frames=8, size=16, split="train", seed=3)
    assert a.clips.shape == (24, 1, 8, 16, 16) and torch.equal(a.clips, b.clips) and torch.equal(a.labels, b.labels)
    assert a.clips.min() >= -1 and a.clips.max() <= 1 and len(a.class_names) == 10
    c = moving_animal_mnist(24, frames=8, size=16, split="train", seed=4)
    assert not torch.equal(a.clips, c.clips)
    assert set(a.motion.tolist()) <= set(range(len(MOTIONS)))
    # clip i does not depend on how many clips are drawn
    assert torch.equal(moving_animal_mnist(5, frames=8, size=16, seed=3).clips, a.clips[:5])


def test_each_motion_moves_as_described():
    d = moving_animal_mnist(60, frames=10, size=16, seed=0)
    mass = ((d.clips + 1) / 2).sum(dim=(1, 3, 4))                  # (N, F): ink per frame
    step = (d.clips[:, :, 1:] - d.clips[:, :, :-1]).abs().mean(dim=(1, 2, 3, 4))
    for kind in range(3):
        sel = d.motion == kind
        assert sel.any()
        rel = (mass[sel].max(1).values - mass[sel].min(1).values) / mass[sel].mean(1)
        if kind == 1:   # scale: the silhouette grows and shrinks, its centre stays
            assert rel.mean() > 0.2
        else:           # translate / bounce: the whole silhouette stays inside the frame and moves
            assert rel.max() < 0.05 and (step[sel] > 0.01).all()


def test_splits_come_from_the_image_splits():
    """A split's clips are made from that split of the image dataset (the image splits are disjoint, tested in
    tests/test_data.py): passing the split's images as ``source`` gives the same clips."""
    from stepdistill.data import load_dataset

    te = load_dataset("animal_mnist", 32, "test")
    whole = load_dataset("moving_animal_mnist", 16, "test", 1, 8)          # one clip per test silhouette
    assert len(whole) == len(te)
    assert torch.equal(whole.images, _clips(len(te), frames=8, size=16, split="test", source=te).clips)
    assert not torch.equal(moving_animal_mnist(6, split="test", seed=1).clips,
                           moving_animal_mnist(6, split="train", seed=1).clips)
    try:
        _clips(3)
    except ValueError as e:
        assert "moving_clips" in str(e)
    else:
        raise AssertionError("no source: a clear error")

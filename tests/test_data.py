"""Datasets: Animal-MNIST (pinned sha256, pickle-free cache), sklearn digits, image folders."""
from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch

import stepdistill.data as data
from stepdistill.data import ANIMAL_CLASSES, DataError, animal_mnist, digits, image_folder, load_dataset

torch.set_num_threads(1)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("STEPDISTILL_CACHE", str(d))
    return d


class _Spy:
    def __init__(self, real):
        self.real, self.calls = real, 0

    def __call__(self, *a, **k):
        self.calls += 1
        return self.real(*a, **k)


# -- Animal-MNIST ------------------------------------------------------------------------------
def test_animal_mnist_all(fresh_cache):
    ds = animal_mnist(32)
    assert ds.images.shape == (10000, 1, 32, 32)
    assert ds.images.dtype == torch.float32 and ds.labels.dtype == torch.int64
    assert float(ds.images.min()) == -1.0 and float(ds.images.max()) == 1.0
    assert torch.bincount(ds.labels, minlength=10).tolist() == [1000] * 10
    assert ds.num_classes == 10 and ds.class_names == ANIMAL_CLASSES
    assert ds.channels == 1 and ds.resolution == 32 and len(ds) == 10000
    # 28 -> 32 by a 2-pixel black border
    assert torch.all(ds.images[..., :2, :] == -1) and torch.all(ds.images[..., -2:, :] == -1)
    assert torch.all(ds.images[..., :, :2] == -1) and torch.all(ds.images[..., :, -2:] == -1)
    x, y = ds[0]
    assert x.shape == (1, 32, 32) and y.ndim == 0


def test_animal_mnist_split(fresh_cache):
    all_ = animal_mnist(32)
    tr, te = animal_mnist(32, "train"), animal_mnist(32, "test")
    assert len(tr) == 9000 and len(te) == 1000
    assert torch.bincount(tr.labels, minlength=10).tolist() == [900] * 10
    assert torch.bincount(te.labels, minlength=10).tolist() == [100] * 10
    _, labels = data.load_animal_mnist_arrays()
    i_tr, i_te = data._split_indices(labels, "train"), data._split_indices(labels, "test")
    assert len(np.intersect1d(i_tr, i_te)) == 0
    assert len(np.union1d(i_tr, i_te)) == 10000
    # the split datasets are exactly those rows
    torch.testing.assert_close(tr.images, all_.images[torch.from_numpy(i_tr)])
    torch.testing.assert_close(te.images, all_.images[torch.from_numpy(i_te)])
    # note: the split is disjoint by index, but Animal-MNIST itself holds 284 pairs of pixel-identical
    # images (same label), so ~77 test images have an exact copy in train; not checked by content here
    with pytest.raises(DataError, match="split"):
        animal_mnist(32, "validation")


def test_animal_mnist_other_resolution(fresh_cache):
    ds = animal_mnist(16)
    assert ds.images.shape == (10000, 1, 16, 16)
    assert ds.images.min() >= -1 and ds.images.max() <= 1


@pytest.mark.parametrize("bad_file", ["animal_data_version_3.gz", "animal_label_version_3.gz"])
def test_animal_mnist_sha256_mismatch_unpickles_nothing(fresh_cache, monkeypatch, bad_file):
    monkeypatch.setitem(data.ANIMAL_SHA256, bad_file, "0" * 64)
    spy_load, spy_gz = _Spy(pickle.load), _Spy(gzip.open)
    monkeypatch.setattr(pickle, "load", spy_load)
    monkeypatch.setattr(gzip, "open", spy_gz)
    with pytest.raises(DataError) as e:
        data.load_animal_mnist_arrays()
    msg = str(e.value)
    assert bad_file in msg and "sha256" in msg and "0" * 64 in msg
    assert spy_load.calls == 0, "a file was unpickled before every checksum was verified"
    assert spy_gz.calls == 0
    assert not (fresh_cache / "animal_mnist_v3.npz").exists()


def test_animal_mnist_missing_file(fresh_cache, monkeypatch, tmp_path):
    monkeypatch.setattr(data, "_animal_mnist_dir", lambda: tmp_path / "nowhere")
    with pytest.raises(DataError, match="missing"):
        data.load_animal_mnist_arrays()


def test_animal_mnist_npz_cache_used(fresh_cache, monkeypatch):
    images, labels = data.load_animal_mnist_arrays()
    cached = fresh_cache / "animal_mnist_v3.npz"
    assert cached.exists()
    with np.load(cached, allow_pickle=False) as z:  # a plain, pickle-free archive
        assert z["images"].shape == (10000, 28, 28) and z["images"].dtype == np.uint8
    assert not list(fresh_cache.glob("*.tmp*"))

    def boom(*a, **k):
        raise AssertionError("package files touched although the cache exists")

    monkeypatch.setattr(data, "_animal_mnist_dir", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(data, "sha256_file", boom)
    im2, lb2 = data.load_animal_mnist_arrays()
    np.testing.assert_array_equal(im2, images)
    np.testing.assert_array_equal(lb2, labels)
    assert animal_mnist(32).images.shape == (10000, 1, 32, 32)


# -- digits ------------------------------------------------------------------------------------
def test_digits():
    ds = digits(16)
    assert ds.images.shape == (1797, 1, 16, 16)
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    assert float(ds.images.min()) == pytest.approx(-1.0, abs=1e-3) and float(ds.images.max()) > 0.9
    assert set(ds.labels.tolist()) == set(range(10)) and ds.class_names == [str(i) for i in range(10)]
    tr, te = digits(8, "train"), digits(8, "test")
    assert len(tr) + len(te) == 1797 and tr.images.shape[-1] == 8
    assert 0.85 < len(tr) / 1797 < 0.95


# -- image folders -----------------------------------------------------------------------------
def _png(path, value=128, size=(10, 12), mode="L", color=None):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new(mode, size, color if color is not None else value)
    im.save(path)
    return path


def test_image_folder_class_subfolders(tmp_path):
    _png(tmp_path / "cats" / "a.png", 255)
    _png(tmp_path / "cats" / "b.png", 255)
    _png(tmp_path / "dogs" / "c.png", 0)
    _png(tmp_path / "dogs" / "sub" / "d.jpg", 0)   # nested files count for their class
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    ds = image_folder(tmp_path, resolution=8, channels=1)
    assert ds.class_names == ["cats", "dogs"]
    assert ds.images.shape == (4, 1, 8, 8)
    assert ds.labels.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(ds.images[:2], torch.ones(2, 1, 8, 8))
    assert ds.images[2:].max() <= -0.95


def test_image_folder_flat(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png", 40 * i)
    ds = image_folder(tmp_path, resolution=16, channels=1)
    assert ds.images.shape == (3, 1, 16, 16)
    assert ds.labels.tolist() == [0, 0, 0] and ds.num_classes == 1
    assert ds.images.min() >= -1 and ds.images.max() <= 1


def test_image_folder_rgb(tmp_path):
    _png(tmp_path / "x.png", mode="RGB", color=(255, 0, 0))
    _png(tmp_path / "y.png", mode="RGB", color=(90, 90, 90))
    ds = image_folder(tmp_path, resolution=8, channels=3)
    assert ds.images.shape == (2, 3, 8, 8)
    torch.testing.assert_close(ds.images[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    # a grey image stored as RGB is fine with channels=1
    gray = tmp_path / "gray"
    _png(gray / "g.png", mode="RGB", color=(90, 90, 90))
    assert image_folder(gray, resolution=8, channels=1).images.shape == (1, 1, 8, 8)


def test_image_folder_errors(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(DataError, match=str(missing)):
        image_folder(missing)
    a_file = _png(tmp_path / "file.png")
    with pytest.raises(DataError, match=str(a_file)):
        image_folder(a_file)

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("hi")
    with pytest.raises(DataError) as e:
        image_folder(empty)
    assert str(empty) in str(e.value) and "no images" in str(e.value)

    garbage = tmp_path / "garbage"
    _png(garbage / "ok.png")
    bad = garbage / "bad.png"
    bad.write_bytes(b"\x89PNG this is not really a png" + bytes(range(256)))
    with pytest.raises(DataError) as e:
        image_folder(garbage)
    assert str(bad) in str(e.value) and "unreadable" in str(e.value)

    colour = tmp_path / "colour"
    _png(colour / "k" / "gray.png")
    red = _png(colour / "k" / "red.png", mode="RGB", color=(255, 0, 0))
    with pytest.raises(DataError) as e:
        image_folder(colour, channels=1)
    assert str(red) in str(e.value) and "colour" in str(e.value)
    assert image_folder(colour, resolution=8, channels=3).images.shape == (2, 3, 8, 8)

    with pytest.raises(DataError, match="channels"):
        image_folder(colour, channels=2)


def test_data_error_is_value_error_and_names_the_problem(tmp_path):
    """A bad image folder raises DataError, caught as ValueError too, with a message that says what to fix."""
    from stepdistill.frontends.cli import user_error

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError) as e:
        image_folder(empty, resolution=8)
    assert isinstance(e.value, DataError) and str(empty) in str(e.value)
    assert user_error(e.value) == str(e.value)  # the CLI prints exactly this one line


# -- load_dataset ------------------------------------------------------------------------------
def test_load_dataset(tmp_path, fresh_cache):
    assert load_dataset("digits", 8).images.shape == (1797, 1, 8, 8)
    assert len(load_dataset("animal_mnist", 32, "test")) == 1000
    _png(tmp_path / "imgs" / "a.png")
    assert load_dataset(str(tmp_path / "imgs"), 8).images.shape == (1, 1, 8, 8)
    with pytest.raises(DataError) as e:
        load_dataset("imagenet_please", 32)
    assert "imagenet_please" in str(e.value) and "unknown dataset" in str(e.value)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path / "nope" / "x"), 32)


@pytest.mark.parametrize("name", ["animal_mnist", "digits"])
def test_validation_split_is_drawn_from_train_and_disjoint_from_test(name):
    """Checkpoints are picked on ``val`` (inside ``train``), never on ``test``; ``fit`` trains without ``val``."""
    from stepdistill.data import _split_indices, load_animal_mnist_arrays

    if name == "animal_mnist":
        labels = load_animal_mnist_arrays()[1]
    else:
        from sklearn.datasets import load_digits

        labels = load_digits().target
    idx = {s: set(_split_indices(labels, s).tolist()) for s in ("train", "fit", "val", "test")}
    assert not idx["val"] & idx["test"] and not idx["train"] & idx["test"] and not idx["fit"] & idx["val"]
    assert idx["fit"] | idx["val"] == idx["train"]
    assert len(idx["train"]) + len(idx["test"]) == len(labels)
    for c in set(labels.tolist()):  # per class, val is as large as test (100 each for Animal-MNIST)
        n_val = sum(1 for i in idx["val"] if labels[i] == c)
        assert n_val == sum(1 for i in idx["test"] if labels[i] == c) > 0
    if name == "animal_mnist":
        assert len(idx["val"]) == len(idx["test"]) == 1000

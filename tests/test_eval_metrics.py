"""Domain classifier, within-class diversity and CLIP score (stepdistill.eval.classifier/.diversity/.clip_score)."""
import math

import pytest
import torch

from stepdistill.data import animal_mnist
from stepdistill.eval.classifier import (
    class_accuracy,
    classifier_features,
    load_classifier,
    load_default_classifier,
    save_classifier,
    train_classifier,
)
from stepdistill.eval.clip_score import clip_score, clip_scores_per_sample, preprocess_images, tiny_random_clip
from stepdistill.eval.diversity import diversity


@pytest.fixture(scope="module")
def animal_test():
    return animal_mnist(32, "test")


# ----------------------------------------------------------------------------- classifier

def test_shipped_classifier_accuracy(animal_test):
    model = load_default_classifier()
    acc, per_class = class_accuracy(model, animal_test.images, animal_test.labels)
    assert acc > 0.9
    assert len(per_class) == 10 and min(per_class) > 0.8
    assert model.class_names == animal_test.class_names
    assert 50_000 <= sum(p.numel() for p in model.parameters()) <= 100_000
    assert model.meta["test_accuracy"] == pytest.approx(acc, abs=1e-3)  # config.json records what we measure


def test_class_accuracy_on_wrong_labels_and_errors(animal_test):
    model = load_default_classifier()
    acc, per_class = class_accuracy(model, animal_test.images[:50], (animal_test.labels[:50] + 1) % 10)
    assert acc < 0.2
    acc, per_class = class_accuracy(model, animal_test.images[:5], animal_test.labels[:5])
    assert sum(math.isnan(a) for a in per_class) >= 1  # classes absent from the labels
    with pytest.raises(ValueError, match="empty"):
        class_accuracy(model, animal_test.images[:0], animal_test.labels[:0])
    with pytest.raises(ValueError, match="5 images but 4 labels"):
        class_accuracy(model, animal_test.images[:5], animal_test.labels[:4])
    with pytest.raises(ValueError, match=r"shape \(N, 1, 32, 32\)"):
        class_accuracy(model, torch.zeros(2, 1, 16, 16), torch.zeros(2))


def test_train_is_deterministic_and_save_load_roundtrip(tmp_path, animal_test):
    small = type(animal_test)(animal_test.images[:200], animal_test.labels[:200], animal_test.class_names)
    a = train_classifier(small, steps=3, seed=1, batch_size=16)
    b = train_classifier(small, steps=3, seed=1, batch_size=16)
    c = train_classifier(small, steps=3, seed=2, batch_size=16)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    save_classifier(a, tmp_path / "clf", {"note": "test"})
    assert (tmp_path / "clf" / "model.safetensors").is_file() and (tmp_path / "clf" / "config.json").is_file()
    loaded = load_classifier(tmp_path / "clf")
    x = animal_test.images[:8]
    assert torch.equal(a(x), loaded(x)) and loaded.meta["note"] == "test"
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_classifier(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- diversity

def test_diversity_zero_for_identical_images(animal_test):
    x = animal_test.images[:1].repeat(12, 1, 1, 1)
    labels = torch.arange(12) % 3
    for ex in ("classifier", "pixel", "auto"):
        assert diversity(x, labels, extractor=ex) == pytest.approx(0.0, abs=1e-9)


def test_diversity_larger_for_varied_images(animal_test):
    x, y = animal_test.images, animal_test.labels
    collapsed = torch.cat([x[y == c][:1].repeat(10, 1, 1, 1) for c in range(10)])
    varied = torch.cat([x[y == c][:10] for c in range(10)])
    labels = torch.arange(10).repeat_interleave(10)
    d_col = diversity(collapsed, labels)
    d_var, per = diversity(varied, labels, return_per_condition=True)
    assert d_col == pytest.approx(0.0, abs=1e-9)
    assert d_var > 0.05 and set(per) == set(range(10))
    assert diversity(varied, labels, extractor="pixel") > 0.05
    # half-collapsed classes sit in between
    half = torch.cat([torch.cat([x[y == c][:5], x[y == c][:1].repeat(5, 1, 1, 1)]) for c in range(10)])
    assert d_col < diversity(half, labels) < d_var


def test_diversity_extractor_options_and_errors(animal_test):
    x = animal_test.images[:20]
    model = load_default_classifier()
    assert diversity(x, extractor=model) == pytest.approx(diversity(x, extractor="classifier"))
    assert diversity(x, extractor=lambda im: classifier_features(model, im)) == pytest.approx(diversity(x))
    assert classifier_features(model, x).shape == (20, 64)
    with pytest.raises(ValueError, match="at least one condition with 2"):
        diversity(x[:3], torch.arange(3))
    with pytest.raises(ValueError, match="extractor='inception' or 'pixel'"):
        diversity(torch.zeros(4, 3, 32, 32), extractor="classifier")
    with pytest.raises(ValueError, match="unknown diversity extractor"):
        diversity(x, extractor="lpips")


# ----------------------------------------------------------------------------- CLIP score

@pytest.fixture(scope="module")
def tiny_clip():
    return tiny_random_clip(seed=0)


def test_clip_score_tiny_random_is_finite_bounded_deterministic(tiny_clip, animal_test):
    model, tok = tiny_clip
    x = animal_test.images[:6]
    prompts = ["a photo of a cat", "a dog", "a bird", "a red cat", "blue dog", "of"]
    s = clip_score(x, prompts, model, tok)
    assert math.isfinite(s) and 0.0 <= s <= 100.0
    model2, tok2 = tiny_random_clip(seed=0)  # rebuilt from scratch: same weights, same score
    assert clip_score(x, prompts, model2, tok2) == s
    assert clip_score(x, prompts, model, tok) == s
    per = clip_scores_per_sample(x, prompts, model, tok)
    assert per.shape == (6,) and torch.all(per.abs() <= 100.0)
    assert not torch.allclose(per, clip_scores_per_sample(x, ["zebra " * 3] * 6, model, tok))  # depends on prompts
    assert clip_score(x[:2], "a cat", model, tok) == pytest.approx(clip_score(x[:2], ["a cat"] * 2, model, tok))


def test_clip_score_errors(tiny_clip):
    model, tok = tiny_clip
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        clip_score(torch.zeros(2, 1, 32, 32), ["a", "b", "c"], model, tok)
    with pytest.raises(ValueError, match="empty"):
        clip_score(torch.zeros(0, 1, 32, 32), [], model, tok)


def test_preprocess_matches_clip_normalisation():
    x = torch.ones(2, 1, 16, 24)  # white, non-square, grayscale
    px = preprocess_images(x, 32)
    assert px.shape == (2, 3, 32, 32)
    want = (1 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor([0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(px[0, :, 5, 7], want)


class _ColourCLIP(torch.nn.Module):
    """Hand-built 'CLIP': image embedding = mean RGB, text embedding = colour word one-hot."""

    class config:  # noqa: N801 - mimics CLIPConfig attribute access
        class vision_config:  # noqa: N801
            image_size = 8

        class text_config:  # noqa: N801
            max_position_embeddings = 77

    WORDS = {"red": 0, "green": 1, "blue": 2}

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def get_image_features(self, pixel_values):
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        return (pixel_values * std + mean).mean((2, 3)) - 0.5  # centred colour

    def get_text_features(self, input_ids, attention_mask):
        return torch.nn.functional.one_hot(input_ids[:, 0], 3).float() * 2 - 1


class _WordTok:
    def __call__(self, prompts, **kw):
        ids = torch.tensor([[_ColourCLIP.WORDS[p]] for p in prompts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_clip_score_higher_for_matching_pairs():
    model, tok = _ColourCLIP(), _WordTok()
    imgs = -torch.ones(3, 3, 8, 8)
    for c in range(3):
        imgs[c, c] = 1.0  # pure red, green, blue
    match = clip_score(imgs, ["red", "green", "blue"], model, tok)
    mismatch = clip_score(imgs, ["green", "blue", "red"], model, tok)
    assert match == pytest.approx(100.0, abs=1e-3)  # embeddings are exactly parallel
    assert mismatch == 0.0  # the mean cosine is negative and clipped at 0 (torchmetrics convention)
    per = clip_scores_per_sample(imgs, ["green", "blue", "red"], model, tok)
    assert torch.all(per < 0)

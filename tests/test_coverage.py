"""Mode-coverage metrics (stepdistill/eval/coverage.py) on point sets with known answers."""
import pytest
import torch

from stepdistill.eval.coverage import (
    coverage,
    coverage_metrics,
    knn_radii,
    per_class_recall,
    precision_recall,
)


def clusters(centres, n_per, spread=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    pts, labels = [], []
    for i, c in enumerate(centres):
        pts.append(torch.tensor(c, dtype=torch.float64) + spread * torch.randn(n_per, len(c), generator=g, dtype=torch.float64))
        labels += [i] * n_per
    return torch.cat(pts), torch.tensor(labels)


CENTRES = [(0.0, 0.0), (5.0, 0.0), (0.0, 5.0), (5.0, 5.0)]


def test_identical_sets_give_precision_and_recall_one():
    x, _ = clusters(CENTRES, 30)
    p, r = precision_recall(x, x)
    assert p == 1.0 and r == 1.0
    assert coverage(x, x) == 1.0


def test_missing_cluster_lowers_recall_not_precision():
    ref, ref_lab = clusters(CENTRES, 40, seed=1)
    gen, gen_lab = clusters(CENTRES[:3], 40, seed=2)          # drops the 4th mode
    full, _ = clusters(CENTRES, 40, seed=2)                 # same sampler, all four modes
    p, r = precision_recall(gen, ref)
    p_full, r_full = precision_recall(full, ref)
    assert p > 0.9 and p_full > 0.9
    assert r <= 0.75                                        # a quarter of the real set is unreachable
    assert r_full - r == pytest.approx(0.25, abs=0.08)
    assert coverage(full, ref) - coverage(gen, ref) == pytest.approx(0.25, abs=0.08)


def test_off_manifold_samples_lower_precision():
    ref, _ = clusters(CENTRES, 40, seed=1)
    far, _ = clusters([(50.0, 50.0)], 40, seed=3)
    gen = torch.cat([clusters(CENTRES, 10, seed=4)[0], far])  # half the samples are nowhere near the data
    p, _ = precision_recall(gen, ref)
    assert p == pytest.approx(0.5, abs=0.05)


def test_knn_radius_excludes_the_point_itself():
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0]], dtype=torch.float64)
    # k = 1: nearest other point; k = 2: second nearest
    assert knn_radii(x, 1).tolist() == [1.0, 1.0, 2.0, 3.0]
    assert knn_radii(x, 2).tolist() == [3.0, 2.0, 3.0, 5.0]


def test_knn_radius_needs_more_points_than_k():
    with pytest.raises(ValueError, match="N > k=3"):
        knn_radii(torch.zeros(3, 2), 3)


def test_per_class_recall_shows_a_dropped_mode_inside_one_class():
    # class 0 has two real modes; the generator covers only one of them. Class 1 is fully covered.
    ref0, _ = clusters([(0.0, 0.0), (3.0, 0.0)], 30, seed=5)
    ref1, _ = clusters([(0.0, 9.0)], 60, seed=6)
    gen0, _ = clusters([(0.0, 0.0)], 30, seed=7)
    gen1, _ = clusters([(0.0, 9.0)], 30, seed=8)
    ref = torch.cat([ref0, ref1])
    ref_lab = torch.tensor([0] * 60 + [1] * 60)
    gen = torch.cat([gen0, gen1])
    gen_lab = torch.tensor([0] * 30 + [1] * 30)
    per = per_class_recall(gen, gen_lab, ref, ref_lab, ["a", "b"])
    assert per["a"] == pytest.approx(0.5, abs=0.1)
    assert per["b"] > 0.9
    m = coverage_metrics(gen, ref, gen_lab, ref_lab, ["a", "b"])
    assert m["min_class_recall"] == per["a"]
    assert m["mean_class_recall"] == pytest.approx((per["a"] + per["b"]) / 2)
    assert set(m) >= {"precision", "recall", "coverage", "per_class_recall"}


def test_equals_torch_fidelity_on_random_features():
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    g = torch.Generator().manual_seed(0)
    gen = torch.randn(120, 16, generator=g)
    ref = torch.randn(150, 16, generator=g) * 1.3 + 0.2
    p_tf, r_tf = calculate_precision_recall_full(gen, ref, neighborhood=3)
    p, r = precision_recall(gen, ref)
    assert abs(p - p_tf) < 1e-6 and abs(r - r_tf) < 1e-6

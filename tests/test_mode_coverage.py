"""The exact Gaussian-mixture teacher (stepdistill/toy_gmm.py) and the mode-coverage benchmark
(stepdistill/eval/mode_coverage.py): the denoiser is the true posterior mean, its DDIM samples have the true mode
weights, and an objective trained on it moves its one-step samples off the starting point onto the modes."""
from __future__ import annotations

import torch

from stepdistill.toy_gmm import MEANS, STD, WEIGHTS, gmm_samples, gmm_teacher, mode_weights


def test_exact_denoiser_is_the_posterior_mean():
    """E[x0 | x_t] by self-normalised importance sampling over 400,000 prior draws = the closed form."""
    den, _ = gmm_teacher()
    x0 = gmm_samples(400_000, seed=3).images.flatten(1).double()
    for t in (50.0, 400.0, 900.0):
        a, s = (float(v) for v in den.schedule.alpha_sigma(torch.tensor([t], dtype=torch.float64)))
        x_t = torch.tensor([[0.3, -0.2], [0.9, 0.8], [-0.5, 0.1]], dtype=torch.float64)
        logw = -((x_t[:, None, :] - a * x0[None]) ** 2).sum(-1) / (2 * s * s)       # (3, N)
        w = torch.softmax(logw, dim=1)
        mc = w @ x0                                                                   # (3, 2)
        exact = den.backbone.exact_x0(x_t.float(), torch.full((3,), t)).double()
        torch.testing.assert_close(exact, mc, atol=0.01, rtol=0.0)


def test_teacher_samples_have_the_true_mode_weights():
    from stepdistill.eval.mode_coverage import teacher_modes

    r = teacher_modes(n=4000, steps=50)
    assert r["tv"] < 0.02 and r["on_mode"] > 0.99 and r["worst_mode_ratio"] > 0.85
    assert mode_weights(gmm_samples(4000).images)["tv"] < 0.02
    assert len(MEANS) == len(WEIGHTS) == 4 and STD == 0.1


def test_an_objective_moves_its_samples_onto_the_modes():
    """At initialisation the one-step student returns about the posterior mean at T (one point near the majority
    mode); 300 SiD steps spread it over the modes."""
    from stepdistill.eval.mode_coverage import run_objective

    r = run_objective("SiD (alpha 1.2)", steps=300, seed=0, n=2000)
    assert abs(sum(r["share"]) - 1) < 1e-6 and r["share"][0] < 0.8 and r["tv"] < 0.3
    assert set(r) >= {"objective", "on_mode", "worst_mode_ratio", "train_seconds"}

"""Real-size architectures built without weights (meta device) through the Denoiser adapter, with their
published parameter counts."""
from __future__ import annotations

import pytest
import torch

from stepdistill.architectures import ARCHITECTURES, architecture_denoiser, param_count


@pytest.mark.parametrize("name, kind, params", [
    ("sd15", "unet2d_cond", 860e6), ("sdxl", "unet2d_cond", 2.6e9), ("sd3", "sd3", 2.0e9), ("flux", "flux", 11.9e9),
])
def test_real_architectures_build_with_the_right_size(name, kind, params):
    den = architecture_denoiser(name)
    assert den.kind == kind and next(den.backbone.parameters()).device.type == "meta"
    n = param_count(name)
    assert abs(n - params) / params < 0.015, n  # 859.5M, 2.567B, 2.028B, 11.90B (published: 860M, 2.6B, 2B, 11.9B)
    assert den.schedule.kind == ("vp" if name in ("sd15", "sdxl") else "flow")
    assert set(ARCHITECTURES) == {"sd15", "sdxl", "sd3", "flux"}


def test_the_sd15_unet_runs_on_the_cpu_at_a_small_latent():
    """Random weights on the CPU: one forward through the adapter (text conditioning of the right width)."""
    torch.manual_seed(0)
    den = architecture_denoiser("sd15", device="cpu")
    x, cond = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 768)
    with torch.no_grad():
        x0 = den(x, torch.tensor([500.0]), cond)
    assert x0.shape == (1, 4, 8, 8) and torch.isfinite(x0).all()

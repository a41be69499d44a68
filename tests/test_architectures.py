"""Real-size architectures built without weights (meta device) through the Denoiser adapter, with their
published parameter counts."""
from __future__ import annotations

import pytest
import torch

from stepdistill.architectures import ARCHITECTURES, architecture_denoiser, param_count


@pytest.mark.parametrize("name, kind, params", [
    ("sd15", "unet2d_cond", 860e6), ("sdxl", "unet2d_cond", 2.6e9), ("sd3", "sd3", 2.0e9), ("flux", "flux", 11.9e9),
    # Wan 2.1 T2V is named 1.3B / 14B; its diffusers transformers hold 1.419 B / 14.29 B (embedders included)
    ("wan-1.3b", "wan", 1.42e9), ("wan-14b", "wan", 14.29e9),
])
def test_real_architectures_build_with_the_right_size(name, kind, params):
    den = architecture_denoiser(name)
    assert den.kind == kind and next(den.backbone.parameters()).device.type == "meta"
    n = param_count(name)
    assert abs(n - params) / params < 0.015, n  # 859.5M, 2.567B, 2.028B, 11.90B (published: 860M, 2.6B, 2B, 11.9B)
    assert den.schedule.kind == ("vp" if name in ("sd15", "sdxl") else "flow")
    assert set(ARCHITECTURES) == {"sd15", "sdxl", "sd3", "flux", "wan-1.3b", "wan-14b"}


def test_the_sd15_unet_runs_on_the_cpu_at_a_small_latent():
    """Random weights on the CPU: one forward through the adapter (text conditioning of the right width)."""
    torch.manual_seed(0)
    den = architecture_denoiser("sd15", device="cpu")
    x, cond = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 768)
    with torch.no_grad():
        x0 = den(x, torch.tensor([500.0]), cond)
    assert x0.shape == (1, 4, 8, 8) and torch.isfinite(x0).all()


def test_sdxl_micro_conditioning_goes_through_the_adapter():
    """SDXL-style UNet2DConditionModel (addition_embed_type text_time): the condition is {"emb", "pooled"}
    (+ optional "time_ids"); by default the six ids say "uncropped, latent size x 8"."""
    import diffusers

    from stepdistill.denoiser import Denoiser
    from stepdistill.schedules import schedule_from_config

    torch.manual_seed(0)
    net = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)
    den = Denoiser(net, schedule_from_config({"kind": "vp", "num_train_timesteps": 1000}), "epsilon")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0])
    cond = {"emb": torch.randn(2, 5, 32), "pooled": torch.randn(2, 16)}
    with torch.no_grad():
        a = den(x, t, cond)
        ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)
        b = den(x, t, {**cond, "time_ids": ids})
        c = den(x, t, {**cond, "pooled": torch.randn(2, 16)})
        d = den(x, t, {**cond, "time_ids": ids * 2})
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-4 and (a - d).abs().max() > 1e-4

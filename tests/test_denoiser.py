"""The Denoiser adapter over every supported backbone family (tiny random models, CPU, seconds)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from stepdistill.denoiser import BACKBONE_KINDS, Denoiser, _flux_call, backbone_kind
from stepdistill.schedules import FlowMatchSchedule, VPSchedule

torch.set_num_threads(1)

K = 4          # classes; label K is the null class
L, D_TXT, P = 5, 12, 6  # text tokens, text width, pooled width
B = 3


def _vp():
    from diffusers import DDPMScheduler

    return VPSchedule.from_scheduler_config(dict(DDPMScheduler(beta_schedule="squaredcos_cap_v2").config))


def _jitter(model: nn.Module, seed: int) -> nn.Module:
    """Perturb every weight so zero-initialised output layers do not make the tests vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


class TinyCustom(nn.Module):
    """A custom backbone following the documented signature ``forward(x_t, t, cond)``."""

    def __init__(self, channels: int = 2, num_classes: int = K):
        super().__init__()
        self.inp = nn.Conv2d(channels, 8, 3, padding=1)
        self.temb = nn.Linear(1, 8)
        self.cemb = nn.Embedding(num_classes + 1, 8)
        self.bottleneck = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.SiLU())
        self.bottleneck_channels = 8
        self.out = nn.Conv2d(8, channels, 3, padding=1)

    def forward(self, x, t, cond):
        h = self.inp(x) + self.temb((t.float() / 1000.0)[:, None])[..., None, None]
        if cond is not None:
            h = h + self.cemb(cond)[..., None, None]
        b = self.bottleneck(h)
        return self.out(h + F.interpolate(b, scale_factor=2.0))


# -- tiny backbones -------------------------------------------------------------------------------
def _unet2d():
    from diffusers import UNet2DModel

    m = UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                    norm_num_groups=4, attention_head_dim=4, num_class_embeds=K + 1)
    return m, dict(spatial=4)


def _unet2d_cond():
    from diffusers import UNet2DConditionModel

    m = UNet2DConditionModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16),
                             layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4,
                             attention_head_dim=4, cross_attention_dim=D_TXT)
    return m, dict(spatial=4)


def _dit():
    from diffusers import DiTTransformer2DModel

    # out_channels = 2 * in_channels: the learned-variance half must be dropped
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=2, out_channels=4,
                              num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=K + 1)
    return m, dict(spatial=4)


def _pixart():
    from diffusers import PixArtTransformer2DModel

    m = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=2, out_channels=4,
                                 num_layers=2, cross_attention_dim=16, caption_channels=D_TXT, sample_size=8,
                                 patch_size=2, use_additional_conditions=False)
    return m, dict(spatial=4)


def _pixart_legacy():
    from diffusers import Transformer2DModel

    m = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=2, out_channels=4, num_layers=2,
                           cross_attention_dim=16, caption_channels=D_TXT, sample_size=8, patch_size=2,
                           norm_type="ada_norm_single", num_embeds_ada_norm=1000, use_additional_conditions=False)
    return m, dict(spatial=4)


def _sd3():
    from diffusers import SD3Transformer2DModel

    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=2, out_channels=2, num_layers=2,
                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=D_TXT,
                              caption_projection_dim=16, pooled_projection_dim=P, pos_embed_max_size=8)
    return m, dict(spatial=4)


def _flux():
    from diffusers import FluxTransformer2DModel

    # in_channels = 4 * latent channels (2x2 packing); rope axes sum to attention_head_dim
    m = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=1, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=D_TXT, pooled_projection_dim=P,
                               guidance_embeds=False, axes_dims_rope=(2, 2, 4))
    return m, dict(spatial=4)


def _custom():
    return TinyCustom(), dict(spatial=4)


def _class_cond(g):
    return torch.randint(0, K, (B,), generator=g)


def _text_cond(g):
    return torch.randn(B, L, D_TXT, generator=g)


def _dict_cond(g):
    return {"emb": torch.randn(B, L, D_TXT, generator=g), "pooled": torch.randn(B, P, generator=g)}


_NULL_TEXT = torch.linspace(-1, 1, L * D_TXT).reshape(1, L, D_TXT)
_NULL_DICT = {"emb": _NULL_TEXT, "pooled": torch.linspace(-0.5, 0.5, P).reshape(1, P)}

# name -> (builder, kind, schedule factory, prediction type, cond maker, Denoiser null kwargs)
FAMILIES = {
    "unet2d": (_unet2d, "unet2d", _vp, "v_prediction", _class_cond, dict(null_class=K)),
    "unet2d_cond": (_unet2d_cond, "unet2d_cond", _vp, "epsilon", _text_cond, dict(null_cond=_NULL_TEXT)),
    "dit": (_dit, "dit", _vp, "epsilon", _class_cond, dict(null_class=K)),
    "pixart": (_pixart, "pixart", _vp, "epsilon", _text_cond, dict(null_cond=_NULL_TEXT)),
    "pixart_legacy": (_pixart_legacy, "pixart", _vp, "epsilon", _text_cond, dict(null_cond=_NULL_TEXT)),
    "sd3": (_sd3, "sd3", lambda: FlowMatchSchedule(1000, 3.0), "flow_prediction", _dict_cond, dict(null_cond=_NULL_DICT)),
    "flux": (_flux, "flux", lambda: FlowMatchSchedule(1000, 3.0), "flow_prediction", _dict_cond,
             dict(null_cond=_NULL_DICT)),
    "custom": (_custom, "custom", _vp, "sample", _class_cond, dict(null_class=K)),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def fam(request):
    build, kind, sched, pt, cond_fn, null_kw = FAMILIES[request.param]
    torch.manual_seed(0)
    model, info = build()
    model = _jitter(model, 1)
    den = Denoiser(model, sched(), pt, **null_kw)
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(B, 2, 8, 8, generator=g)
    t = torch.tensor([250.0, 480.5, 700.0], dtype=torch.float64)
    cond = cond_fn(g)
    return SimpleNamespace(name=request.param, den=den, kind=kind, x_t=x_t, t=t, cond=cond, null_kw=null_kw,
                           cond_fn=cond_fn, **info)


def _expand_null(null, n):
    if isinstance(null, dict):
        return {k: v.expand(n, *v.shape[1:]) for k, v in null.items()}
    if isinstance(null, int):
        return torch.full((n,), null, dtype=torch.long)
    return null.expand(n, *null.shape[1:])


def _no_hooks(module: nn.Module) -> bool:
    return all(len(m._forward_hooks) == 0 for m in module.modules())


def test_backbone_kinds_cover_diffusers_classes():
    import diffusers

    for cls_name in BACKBONE_KINDS:
        assert hasattr(diffusers, cls_name), f"{cls_name} is not a diffusers class in {diffusers.__version__}"
    assert backbone_kind(nn.Linear(1, 1)) == "custom"


@torch.no_grad()
def test_kind_and_output_shape(fam):
    assert fam.den.kind == fam.kind
    out = fam.den(fam.x_t, fam.t, fam.cond, output="raw")
    assert out.shape == fam.x_t.shape
    assert torch.isfinite(out).all() and out.abs().max() > 0


@torch.no_grad()
def test_outputs_consistent(fam):
    den, x_t, t, cond = fam.den, fam.x_t, fam.t, fam.cond
    x0 = den(x_t, t, cond, output="x0")
    eps = den(x_t, t, cond, output="eps")
    v = den(x_t, t, cond, output="v")
    flow = den(x_t, t, cond, output="flow")
    raw = den(x_t, t, cond, output="raw")
    a = den.schedule.alpha(t).reshape(-1, 1, 1, 1)
    s = den.schedule.sigma(t).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(a * x0 + s * eps, x_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v, a * eps - s * x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flow, eps - x0, atol=1e-5, rtol=1e-5)
    # the native prediction is what the backbone returned, and converts back to itself
    native = {"epsilon": eps, "sample": x0, "v_prediction": v, "flow_prediction": flow}[den.prediction_type]
    torch.testing.assert_close(native, raw, atol=1e-5, rtol=1e-5)
    # a scalar t means the same t for every sample
    torch.testing.assert_close(den(x_t, 480.5, cond), den(x_t, torch.full((B,), 480.5), cond), atol=1e-6, rtol=0)


@torch.no_grad()
def test_time_and_condition_matter(fam):
    """The adapter really feeds t and cond to the network (otherwise CFG tests would be vacuous)."""
    den, x_t, t, cond = fam.den, fam.x_t, fam.t, fam.cond
    base = den(x_t, t, cond, output="raw")
    assert (den(x_t, t + 100, cond, output="raw") - base).abs().max() > 1e-5
    other = fam.cond_fn(torch.Generator().manual_seed(99))
    assert (den(x_t, t, other, output="raw") - base).abs().max() > 1e-5


@torch.no_grad()
@pytest.mark.parametrize("w", [0.0, 2.5])
def test_cfg_formula(fam, w):
    den, x_t, t, cond = fam.den, fam.x_t, fam.t, fam.cond
    null = fam.null_kw.get("null_class", fam.null_kw.get("null_cond"))
    unc = den(x_t, t, _expand_null(null, B), output="raw")
    con = den(x_t, t, cond, output="raw")
    assert (con - unc).abs().max() > 1e-5, "null condition gives the same output as the condition"
    guided = den(x_t, t, cond, guidance_scale=w, output="raw")
    torch.testing.assert_close(guided, unc + w * (con - unc), atol=1e-5, rtol=1e-5)
    # guidance on the native prediction == guidance on x0 (all conversions are affine)
    x0_u, x0_c = den(x_t, t, _expand_null(null, B)), den(x_t, t, cond)
    torch.testing.assert_close(den(x_t, t, cond, guidance_scale=w), x0_u + w * (x0_c - x0_u), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_cfg_negative_overrides_null(fam):
    den, x_t, t, cond = fam.den, fam.x_t, fam.t, fam.cond
    neg = fam.cond_fn(torch.Generator().manual_seed(5))
    p_n = den(x_t, t, neg, output="raw")
    p_c = den(x_t, t, cond, output="raw")
    got = den(x_t, t, cond, guidance_scale=3.0, output="raw", negative=neg)
    torch.testing.assert_close(got, p_n + 3.0 * (p_c - p_n), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_guidance_one_and_uncond_need_no_null(fam):
    """w = 1 and cond=None never need the null condition."""
    den = Denoiser(fam.den.backbone, fam.den.schedule, fam.den.prediction_type)
    a = den(fam.x_t, fam.t, fam.cond, guidance_scale=1.0)
    torch.testing.assert_close(a, fam.den(fam.x_t, fam.t, fam.cond), atol=1e-6, rtol=0)


@torch.no_grad()
def test_x0_and_features(fam):
    den, x_t, t, cond = fam.den, fam.x_t, fam.t, fam.cond
    assert _no_hooks(den.backbone)
    x0, feats = den.x0_and_features(x_t, t, cond)
    assert feats.ndim == 4
    assert feats.shape == (B, den.feature_channels, fam.spatial, fam.spatial), feats.shape
    assert torch.isfinite(feats).all()
    torch.testing.assert_close(x0, den(x_t, t, cond), atol=1e-6, rtol=0)
    assert _no_hooks(den.backbone), "forward hook left registered"
    assert den._feats is None
    # features depend on the input (they come from this forward pass)
    _, feats2 = den.x0_and_features(x_t * 0.5, t, cond)
    assert (feats2 - feats).abs().max() > 1e-6


def test_hook_removed_when_forward_raises(fam):
    den = fam.den
    bad_x = torch.randn(B, 2, 8)  # wrong rank: the backbone raises
    with pytest.raises(Exception):
        den.x0_and_features(bad_x, fam.t, fam.cond)
    assert _no_hooks(den.backbone)


@torch.no_grad()
def test_cfg_without_null_raises(fam):
    den = Denoiser(fam.den.backbone, fam.den.schedule, fam.den.prediction_type)  # no null_class / null_cond
    with pytest.raises(ValueError, match="null_class|null_cond"):
        den(fam.x_t, fam.t, fam.cond, guidance_scale=2.0)


# -- family-specific checks --------------------------------------------------------------------
def test_dit_drops_learned_variance_half():
    torch.manual_seed(0)
    m, _ = _dit()
    m = _jitter(m, 3)
    den = Denoiser(m, _vp(), "epsilon", null_class=K)
    x = torch.randn(2, 2, 8, 8)
    t = torch.tensor([10.0, 900.0])
    y = torch.tensor([0, 3])
    with torch.no_grad():
        full = m(x, timestep=t, class_labels=y).sample
        out = den(x, t, y, output="raw")
    assert full.shape[1] == 4 and out.shape[1] == 2
    torch.testing.assert_close(out, full[:, :2])


def test_unet2d_condition_with_class_labels():
    """A class-conditional UNet2DConditionModel gets a zero text embedding plus the labels."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    m = UNet2DConditionModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16),
                             layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4,
                             attention_head_dim=4, cross_attention_dim=D_TXT, num_class_embeds=K + 1)
    m = _jitter(m, 4)
    den = Denoiser(m, _vp(), "epsilon", null_class=K)
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([100.0, 600.0])
    y = torch.tensor([1, 2])
    with torch.no_grad():
        a = den(x, t, y, output="raw")
        ref = m(x, t.float(), encoder_hidden_states=torch.zeros(2, 1, D_TXT), class_labels=y).sample
        g = den(x, t, y, guidance_scale=2.0, output="raw")
        u = den(x, t, torch.full((2,), K), output="raw")
    torch.testing.assert_close(a, ref)
    torch.testing.assert_close(g, u + 2.0 * (a - u), atol=1e-5, rtol=1e-5)


def test_sd3_timestep_is_shifted_sigma_times_1000():
    """SD3 is conditioned on sigma * 1000 (what diffusers' SD3 pipeline feeds it)."""
    torch.manual_seed(0)
    m, _ = _sd3()
    m = _jitter(m, 5)
    sched = FlowMatchSchedule(1000, 3.0)
    den = Denoiser(m, sched, "flow_prediction")
    x = torch.randn(2, 2, 8, 8)
    cond = _dict_cond(torch.Generator().manual_seed(0))
    cond = {k: v[:2] for k, v in cond.items()}
    t = torch.tensor([500.0, 500.0])
    sigma = 3 * 0.5 / (1 + 2 * 0.5)
    with torch.no_grad():
        got = den(x, t, cond, output="raw")
        ref = m(hidden_states=x, encoder_hidden_states=cond["emb"], pooled_projections=cond["pooled"],
                timestep=torch.full((2,), sigma * 1000)).sample
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


class _EchoFlux(nn.Module):
    """Stands in for FluxTransformer2DModel: returns its packed tokens, records the call."""

    def forward(self, hidden_states, **kw):
        self.kw = kw
        self.tokens = hidden_states
        return SimpleNamespace(sample=hidden_states)


def test_flux_packing_round_trip_matches_diffusers():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 6, 8)
    cond = {"emb": torch.randn(2, L, D_TXT), "pooled": torch.randn(2, P)}
    stub = _EchoFlux()
    out = _flux_call(stub, x, torch.tensor([500.0, 250.0]), cond)
    torch.testing.assert_close(out, x, atol=0, rtol=0)  # pack -> unpack is the identity
    torch.testing.assert_close(stub.tokens, FluxPipeline._pack_latents(x, 2, 4, 6, 8))
    ids = FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32)
    torch.testing.assert_close(stub.kw["img_ids"], ids)
    assert stub.kw["txt_ids"].shape == (L, 3)
    torch.testing.assert_close(stub.kw["timestep"], torch.tensor([0.5, 0.25]))  # Flux takes sigma in [0, 1]
    # the real pipeline's unpack (vae factor 1) agrees with ours
    torch.testing.assert_close(FluxPipeline._unpack_latents(stub.tokens, 6, 8, 1), x)


def test_flux_real_model_matches_manual_call():
    torch.manual_seed(0)
    m, _ = _flux()
    m = _jitter(m, 6)
    den = Denoiser(m, FlowMatchSchedule(1000, 1.0), "flow_prediction")
    assert den.kind == "flux"
    from diffusers import FluxPipeline

    x = torch.randn(1, 2, 8, 8)
    cond = {"emb": torch.randn(1, L, D_TXT), "pooled": torch.randn(1, P)}
    with torch.no_grad():
        got = den(x, torch.tensor([300.0]), cond, output="raw")
        tokens = FluxPipeline._pack_latents(x, 1, 2, 8, 8)
        ref = m(hidden_states=tokens, encoder_hidden_states=cond["emb"], pooled_projections=cond["pooled"],
                timestep=torch.tensor([0.3]), img_ids=FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu",
                                                                                          torch.float32),
                txt_ids=torch.zeros(L, 3)).sample
    torch.testing.assert_close(got, FluxPipeline._unpack_latents(ref, 8, 8, 1), atol=1e-6, rtol=0)


def test_feature_channels_without_bottleneck_raises():
    class NoBottleneck(nn.Module):
        def forward(self, x, t, cond):
            return x

    den = Denoiser(NoBottleneck(), _vp(), "epsilon")
    with pytest.raises(ValueError, match="bottleneck"):
        den.feature_channels
    with pytest.raises(ValueError, match="bottleneck"):
        den.x0_and_features(torch.zeros(1, 1, 4, 4), 10.0)


def test_custom_bottleneck_without_channel_count_raises():
    net = TinyCustom()
    del net.bottleneck_channels
    den = Denoiser(net, _vp(), "sample")
    with pytest.raises(ValueError, match="bottleneck_channels"):
        den.feature_channels


def test_pixart_with_additional_conditions():
    """PixArt-alpha 1024-style models need resolution / aspect ratio (pixels = latents x 8)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    # inner dim divisible by 3 (the size embedding splits it into timestep / resolution / aspect thirds)
    m = PixArtTransformer2DModel(num_attention_heads=3, attention_head_dim=8, in_channels=2, out_channels=4,
                                 num_layers=1, cross_attention_dim=24, caption_channels=D_TXT, sample_size=8,
                                 patch_size=2, use_additional_conditions=True)
    m = _jitter(m, 7)
    den = Denoiser(m, _vp(), "epsilon", null_cond=_NULL_TEXT)
    x = torch.randn(2, 2, 8, 8)
    c = torch.randn(2, L, D_TXT)
    t = torch.tensor([100.0, 800.0])
    with torch.no_grad():
        got = den(x, t, c, output="raw")
        ref = m(x, encoder_hidden_states=c, timestep=t, added_cond_kwargs={
            "resolution": torch.tensor([[64.0, 64.0]] * 2), "aspect_ratio": torch.tensor([[1.0]] * 2)}).sample[:, :2]
        assert den(x, t, c, guidance_scale=3.0).shape == x.shape
    torch.testing.assert_close(got, ref)


def test_features_stop_at_the_bottleneck_with_the_same_values():
    """Denoiser.features: the GAN real branch's forward ends at the bottleneck (no decoder pass), same tensor."""
    from stepdistill.models import load_denoiser

    den, _ = load_denoiser("builtin:animal_mnist")
    up_calls = []
    h = den.backbone.up_blocks[0].register_forward_hook(lambda *a: up_calls.append(1))
    x, t, c = torch.randn(3, 1, 32, 32), torch.tensor([10.0, 400.0, 990.0]), torch.tensor([0, 3, 10])
    _, full = den.x0_and_features(x, t, c)
    assert len(up_calls) == 1
    feats = den.features(x, t, c)
    h.remove()
    assert len(up_calls) == 1                      # the decoder did not run
    assert torch.equal(feats, full) and den._feats is None

"""The ``Denoiser`` adapter: any backbone -> x0 / eps / v predictions, conditioning and CFG.

Trainers and samplers only ever call a :class:`Denoiser`; model-family differences live here
(the role of the preconditioner in EDM, Karras et al. 2022, and of k-diffusion's wrappers).

Supported backbones (``backbone_kind``):

* ``unet2d``       diffusers ``UNet2DModel``            (class labels via ``class_labels``)
* ``unet2d_cond``  diffusers ``UNet2DConditionModel``   (text via ``encoder_hidden_states``)
* ``dit``          diffusers ``DiTTransformer2DModel``  (class labels; learned-sigma half dropped)
* ``pixart``       diffusers ``Transformer2DModel``     (PixArt-style, text cross-attention)
* ``sd3``          diffusers ``SD3Transformer2DModel``  (text + pooled text, flow matching)
* ``flux``         diffusers ``FluxTransformer2DModel`` (packed latents, flow matching)
* ``wan``          diffusers ``WanTransformer3DModel``  (video: samples (B, C, F, H, W), text, flow matching)
* ``custom``       any ``nn.Module`` with the signature

      ``forward(x_t: (B, C, H, W), t: (B,) float, cond: None | (B,) long | (B, L, D) float) -> (B, C, H, W)``

  returning the prediction named by ``prediction_type``. Give it an attribute ``bottleneck``
  (an ``nn.Module`` whose output is a (B, C', h, w) feature map) and an int attribute
  ``bottleneck_channels`` (= C') to use a GAN head on it.

Conditioning ``cond``: ``None`` (unconditional), a LongTensor of class labels (B,), or text
embeddings (B, L, D) (a dict ``{"emb": (B, L, D), "pooled": (B, P)}`` for SD3-style models).
Classifier-free guidance (Ho & Salimans 2022, Eq. 6):
``pred = pred_uncond + w * (pred_cond - pred_uncond)``, computed on the native prediction. Since
every conversion in :mod:`stepdistill.schedules` is affine in the prediction for fixed
(x_t, t), guiding eps, x0 or v gives the same x0.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .schedules import NoiseSchedule

BACKBONE_KINDS = {
    "UNet2DModel": "unet2d",
    "UNet2DConditionModel": "unet2d_cond",
    "DiTTransformer2DModel": "dit",
    "Transformer2DModel": "pixart",
    "PixArtTransformer2DModel": "pixart",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
    "WanTransformer3DModel": "wan",
}


def backbone_kind(module: nn.Module) -> str:
    kind = getattr(module, "denoiser_kind", None)  # LoRA views (stepdistill.lora) report their base model's kind
    if isinstance(kind, str):
        return kind
    # through the MRO: FSDP2 (train.fsdp) turns UNet2DModel into a subclass named FSDPUNet2DModel
    return next((BACKBONE_KINDS[c.__name__] for c in type(module).__mro__ if c.__name__ in BACKBONE_KINDS), "custom")


TRANSFORMER_KINDS = ("dit", "pixart", "sd3", "flux", "wan")


def component_name(backbone: nn.Module) -> str:
    """diffusers' component (and subfolder) name of a backbone: ``transformer`` for transformer backbones (SD3,
    Flux, DiT, PixArt), else ``unet``; a custom module named like a transformer counts as one."""
    kind = backbone_kind(backbone)
    if kind == "custom":
        return "transformer" if "Transformer" in type(backbone).__name__ else "unet"
    return "transformer" if kind in TRANSFORMER_KINDS else "unet"


#: one sample larger than this many elements (a 4096^2 RGBA latent) is a broken config (``sample_size: 100000``),
#: refused before anything is allocated
MAX_SAMPLE_ELEMENTS = 4096 * 4096 * 4


def check_sample_shape(shape: tuple[int, ...], where: str = "the model") -> None:
    """:class:`~stepdistill.errors.ModelLoadError` for a sample shape no one means (see MAX_SAMPLE_ELEMENTS);
    ``shape`` is (C, H, W) or, for video, (C, F, H, W)."""
    import math

    from .errors import ModelLoadError

    if math.prod(shape) > MAX_SAMPLE_ELEMENTS or min(shape) < 1:
        raise ModelLoadError(f"{where} samples {'x'.join(map(str, shape))} tensors (its config's sample_size is "
                             f"{shape[-1]}): too large to draw; check sample_size in its config.json")


def sample_shape(backbone: nn.Module) -> tuple[int, ...]:
    """(C, H, W) of one sample ``backbone`` denoises ((C, F, H, W) for video): from a diffusers config
    (``in_channels``, ``sample_size``), or the module's own ``sample_shape`` attribute (custom modules; video
    transformers, whose config has no sample size, get it from ``stepdistill.json`` when loaded). The one place pipelines, samplers and exporters read
    the noise shape from."""
    c = getattr(backbone, "config", None)
    if c is not None and hasattr(c, "in_channels") and hasattr(c, "sample_size"):
        size = c.sample_size if not isinstance(c.sample_size, (list, tuple)) else c.sample_size[0]
        return (int(c.in_channels), int(size), int(size))
    shape = getattr(backbone, "sample_shape", None)
    if shape is None:
        raise ValueError("a custom backbone needs a sample_shape attribute (C, H, W) to be sampled from noise")
    return tuple(int(v) for v in shape)


class Denoiser(nn.Module):
    """Wraps a backbone network with its noise schedule, prediction type and conditioning.

    Args:
        backbone: the network (a diffusers model or a custom module, see module docstring).
        schedule: the :class:`NoiseSchedule` the backbone was trained with.
        prediction_type: ``epsilon`` | ``sample`` | ``v_prediction`` | ``flow_prediction``.
        null_class: label of the unconditional class (class-conditional CFG), or None.
        null_cond: unconditional text embedding (1, L, D) (text CFG), or None.
    """

    def __init__(self, backbone: nn.Module, schedule: NoiseSchedule, prediction_type: str = "epsilon",
                 null_class: int | None = None, null_cond: Any = None):
        super().__init__()
        self.backbone = backbone
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.kind = backbone_kind(backbone)
        self.null_class = null_class
        self.null_cond = null_cond
        self._feats: torch.Tensor | None = None
        # a reference, not a submodule (it lives in the backbone): Denoiser.parameters() are the backbone's only
        object.__setattr__(self, "_hook_module", self._find_bottleneck())
        # memory options (dmd.teacher_dtype / dmd.offload_teacher): inputs cast to compute_dtype, outputs back to
        # float32; offload keeps the weights on the CPU and moves them to the input's device for each forward
        self.compute_dtype: torch.dtype | None = None
        self.offload = False
        # CFG as one forward of 2B images (default) or two of B: same numbers up to float rounding
        self.batched_cfg = True

    def to(self, *args, **kwargs):
        if self.offload:  # an offloaded denoiser ignores device moves (dtype conversions still apply)
            dtype = torch._C._nn._parse_to(*args, **kwargs)[1]
            return super().to(dtype) if dtype is not None else self
        return super().to(*args, **kwargs)

    # -- features for GAN heads (forward hook, no monkey-patching) ------------------------
    def _find_bottleneck(self) -> nn.Module | None:
        b = self.backbone
        if getattr(b, "mid_block", None) is not None:
            return b.mid_block
        if getattr(b, "bottleneck", None) is not None:
            return b.bottleneck
        blocks = getattr(b, "transformer_blocks", None)
        if blocks is None and self.kind == "wan":
            blocks = b.blocks
        if blocks is not None and len(blocks) > 0:
            return blocks[len(blocks) // 2]
        return None

    def _store_features(self, module, inputs, output):
        if isinstance(output, tuple):
            # SD3 / Flux joint blocks return (encoder_hidden_states, hidden_states): take the image tokens
            out = output[-1] if self.kind in ("sd3", "flux") else output[0]
        else:
            out = output
        if self.kind == "wan" and out.ndim == 3:  # video tokens (B, F'h'w', D) -> (B, D, F'h', w')
            B, N, D = out.shape
            w = self.sample_shape[-1] // self.backbone.config.patch_size[2]
            out = out.transpose(1, 2).reshape(B, D, N // w, w)
        elif self.kind in ("dit", "pixart", "sd3", "flux") and out.ndim == 3:  # tokens (B, N, D) -> (B, D, h, w)
            B, N, D = out.shape
            h = int(round(N ** 0.5))
            out = out.transpose(1, 2).reshape(B, D, h, N // h)
        self._feats = out

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one sample the backbone denoises ((C, F, H, W) for video; :func:`sample_shape`)."""
        return sample_shape(self.backbone)

    @property
    def text_dim(self) -> int | None:
        """Width D of the text embeddings (B, L, D) a text-conditional backbone takes; None for others."""
        c = getattr(self.backbone, "config", None)
        return next((int(v) for k in ("cross_attention_dim", "joint_attention_dim", "caption_channels", "text_dim")
                     if (v := getattr(c, k, None))), None)

    @property
    def feature_channels(self) -> int:
        """Channels of the bottleneck features (runs nothing: reads the module config)."""
        if self._hook_module is None:
            raise ValueError("this backbone exposes no bottleneck module for a GAN head")
        b = self.backbone
        if self.kind in ("unet2d", "unet2d_cond"):
            return b.config.block_out_channels[-1]
        if self.kind in ("dit", "pixart", "sd3", "flux", "wan"):
            return b.config.num_attention_heads * b.config.attention_head_dim
        if not hasattr(b, "bottleneck_channels"):
            raise ValueError("a custom backbone with a bottleneck must also set bottleneck_channels (its channel count)")
        return int(b.bottleneck_channels)

    # -- raw network call ---------------------------------------------------------------
    def _call(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """One network evaluation returning the native prediction (B, C, H, W)."""
        dt = self.compute_dtype if self.compute_dtype is not None else getattr(self.backbone, "compute_dtype", None)
        if self.offload:
            self.backbone.to(x_t.device)
        try:
            if dt is None or dt == x_t.dtype:
                return self._call_backbone(x_t, t, cond)
            return self._call_backbone(x_t.to(dt), t, _cast_cond(cond, dt)).float()
        finally:
            if self.offload:
                self.backbone.to("cpu")

    def _call_backbone(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        return self.backbone_at(x_t, self.schedule.model_timestep(t).to(x_t.device), cond)

    def backbone_at(self, x_t: torch.Tensor, tm: torch.Tensor, cond) -> torch.Tensor:
        """The backbone's native prediction at the *model* timestep ``tm`` (what the network is conditioned on:
        ``schedule.model_timestep(t)``); differentiable in ``tm`` (TrigFlow tangents, stepdistill/trigflow.py)."""
        b, k = self.backbone, self.kind
        if k == "unet2d":
            return b(x_t, tm, class_labels=cond).sample
        if k == "unet2d_cond":
            if torch.is_tensor(cond) and cond.dtype == torch.long:  # class-conditional UNet2DConditionModel
                emb = torch.zeros(x_t.shape[0], 1, b.config.cross_attention_dim, device=x_t.device, dtype=x_t.dtype)
                return b(x_t, tm, encoder_hidden_states=emb, class_labels=cond).sample
            if isinstance(cond, dict):  # SDXL: pooled text + micro-conditioning (addition_embed_type text_time)
                return b(x_t, tm, encoder_hidden_states=cond["emb"],
                         added_cond_kwargs={"text_embeds": cond["pooled"], "time_ids": _sdxl_time_ids(x_t, cond)}).sample
            return b(x_t, tm, encoder_hidden_states=cond).sample
        if k == "dit":
            out = b(x_t, timestep=tm, class_labels=cond).sample
            return out[:, : x_t.shape[1]]  # drop the learned-variance half if present
        if k == "pixart":
            out = b(x_t, encoder_hidden_states=cond, timestep=tm, added_cond_kwargs=_pixart_added_cond(b, x_t)).sample
            return out[:, : x_t.shape[1]]
        if k == "sd3":
            return b(hidden_states=x_t, encoder_hidden_states=cond["emb"], pooled_projections=cond["pooled"],
                     timestep=tm).sample
        if k == "flux":
            return _flux_call(b, x_t, tm, cond)
        if k == "wan":  # (B, C, F, H, W); Wan's pipelines feed the flow sigma * 1000 as the timestep
            return b(hidden_states=x_t, timestep=tm, encoder_hidden_states=cond).sample
        return b(x_t, tm, cond)

    def _uncond_like(self, cond, batch: int):
        if cond is None:
            return None
        if isinstance(cond, dict):
            if self.null_cond is None:
                raise ValueError("CFG with text conditioning needs null_cond (the empty-prompt embedding)")
            return {k: v.to(cond[k]).expand(batch, *v.shape[1:]) if k in cond else v.expand(batch, *v.shape[1:])
                    for k, v in self.null_cond.items()}
        if cond.dtype == torch.long:
            if self.null_class is None:
                raise ValueError("CFG with class labels needs null_class (the unconditional label)")
            return torch.full_like(cond, self.null_class)
        if self.null_cond is None:
            raise ValueError("CFG with text conditioning needs null_cond (the empty-prompt embedding)")
        return self.null_cond.to(cond).expand(batch, *self.null_cond.shape[1:])

    def raw(self, x_t, t, cond=None, guidance_scale: float = 1.0, negative=None) -> torch.Tensor:
        """Native prediction with CFG. ``negative`` overrides the unconditional input (negative prompt)."""
        t = self.schedule._t(t, x_t.shape[0], x_t.device)
        if guidance_scale == 1.0 or cond is None:
            return self._call(x_t, t, cond)
        p_u, p_c = self._raw_uncond_cond(x_t, t, cond, negative)
        return p_u + guidance_scale * (p_c - p_u)

    def _raw_uncond_cond(self, x_t, t, cond, negative=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Native unconditional and conditional predictions from one batched call: (2B, ...) = [uncond; cond]."""
        unc = negative if negative is not None else self._uncond_like(cond, x_t.shape[0])
        if not self.batched_cfg:  # two forwards of B (bench: the sequential-CFG teacher)
            return self._call(x_t, t, unc), self._call(x_t, t, cond)
        return self._call(torch.cat([x_t, x_t]), torch.cat([t, t]), _cat_cond(unc, cond)).chunk(2)

    def forward(self, x_t, t, cond=None, guidance_scale: float = 1.0, output: str = "x0", negative=None):
        """Prediction of ``output`` type: ``x0`` | ``eps`` | ``v`` | ``flow`` | ``raw``."""
        pred = self.raw(x_t, t, cond, guidance_scale, negative)
        if output == "raw":
            return pred
        x0, eps = self.schedule.pred_to_x0_eps(pred.float(), x_t.float(), t, self.prediction_type)
        if output == "x0":
            return x0
        if output == "eps":
            return eps
        return self.schedule.x0_eps_to_pred(x0, eps, t, {"v": "v_prediction", "flow": "flow_prediction"}[output])

    def x0_cond_uncond(self, x_t, t, cond, negative=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditional and unconditional x0 (B, C, H, W) each, from one batched (2B) call, as CFG's
        ``raw`` makes it; ``x0_u + w (x0_c - x0_u)`` is the guided x0 (conversions are affine).
        Decoupled DMD uses the two halves separately (trainers/decoupled_dmd.py)."""
        t = self.schedule._t(t, x_t.shape[0], x_t.device)
        x0_u, x0_c = (self.schedule.pred_to_x0_eps(p.float(), x_t.float(), t, self.prediction_type)[0]
                      for p in self._raw_uncond_cond(x_t, t, cond, negative))
        return x0_c, x0_u

    def x0_and_features(self, x_t, t, cond=None, output: str = "x0") -> tuple[torch.Tensor, torch.Tensor]:
        """Prediction (``output`` type, no CFG; x0 by default) and the bottleneck features
        (B, C', h, w) of the same forward pass (for GAN heads)."""
        if self._hook_module is None:
            raise ValueError("this backbone exposes no bottleneck module for a GAN head")
        handle = self._hook_module.register_forward_hook(self._store_features)
        try:
            x0 = self.forward(x_t, t, cond, output=output)
        finally:
            handle.remove()
        feats, self._feats = self._feats, None
        return x0, feats


    def features(self, x_t, t, cond=None) -> torch.Tensor:
        """Bottleneck features (B, C', h, w) alone: the forward stops at the bottleneck, so the layers after
        it (a UNet's decoder half) are never run. The same tensor as ``x0_and_features(...)[1]``, at about
        half the cost: GAN heads on real data need nothing else. (Sharded FSDP backbones run in full: their
        parameter gathering must see every layer.)"""
        if self._hook_module is None:
            raise ValueError("this backbone exposes no bottleneck module for a GAN head")
        if type(self.backbone).__name__.startswith("FSDP"):
            return self.x0_and_features(x_t, t, cond)[1]

        def stop(module, inputs, output):
            self._store_features(module, inputs, output)
            raise _FeaturesReady

        handle = self._hook_module.register_forward_hook(stop)
        try:
            self.raw(x_t, t, cond)
        except _FeaturesReady:
            pass
        finally:
            handle.remove()
        feats, self._feats = self._feats, None
        return feats


class _FeaturesReady(Exception):
    """Raised by :meth:`Denoiser.features`' hook to end the forward pass at the bottleneck."""


def _pixart_added_cond(b, x_t):
    """PixArt-alpha 1024px (``use_additional_conditions``) is conditioned on the image size in pixels
    (latent size x 8, the VAE factor) and the aspect ratio, as in diffusers' PixArtAlphaPipeline."""
    if not getattr(b, "use_additional_conditions", False):
        return {"resolution": None, "aspect_ratio": None}
    B, _, H, W = x_t.shape
    res = torch.tensor([H * 8, W * 8], dtype=x_t.dtype, device=x_t.device).repeat(B, 1)
    ar = torch.tensor([H / W], dtype=x_t.dtype, device=x_t.device).repeat(B, 1)
    return {"resolution": res, "aspect_ratio": ar}


def _cast_cond(cond, dtype):
    """Floating conditioning tensors (text embeddings) in the backbone's dtype; labels unchanged."""
    if isinstance(cond, dict):
        return {k: _cast_cond(v, dtype) for k, v in cond.items()}
    return cond.to(dtype) if torch.is_tensor(cond) and cond.is_floating_point() else cond


def _cat_cond(a, b):
    if isinstance(a, dict):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return torch.cat([a, b])


def _sdxl_time_ids(x_t, cond):
    """SDXL's six micro-conditioning ids (original size, crop top-left, target size; Podell et al. 2023, Sec. 2.2):
    ``cond["time_ids"]`` (B, 6) if given, else the uncropped latent size in pixels (VAE factor 8)."""
    if cond.get("time_ids") is not None:
        return cond["time_ids"].to(x_t)
    B, _, H, W = x_t.shape
    ids = torch.tensor([8 * H, 8 * W, 0, 0, 8 * H, 8 * W], device=x_t.device, dtype=x_t.dtype)
    return ids.expand(B, 6)


def _flux_call(b, x_t, tm, cond):
    """Flux packs 2x2 latent patches into tokens; pack, call, unpack."""
    B, C, H, W = x_t.shape
    tokens = x_t.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)
    ids = torch.zeros(H // 2, W // 2, 3, device=x_t.device)
    ids[..., 1] = torch.arange(H // 2, device=x_t.device)[:, None]
    ids[..., 2] = torch.arange(W // 2, device=x_t.device)[None, :]
    txt_ids = torch.zeros(cond["emb"].shape[1], 3, device=x_t.device)
    out = b(hidden_states=tokens, encoder_hidden_states=cond["emb"], pooled_projections=cond["pooled"],
            timestep=tm / 1000.0, img_ids=ids.reshape(-1, 3), txt_ids=txt_ids,
            guidance=cond.get("guidance")).sample  # (B, N, C*4)
    return out.reshape(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)

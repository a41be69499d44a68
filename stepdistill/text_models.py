"""Text-conditional model folders (the folder-I/O half of the text pair; :mod:`stepdistill.text` is the encoder
half): build the teacher UNet, save / load text encoder, tokenizer and VAE, VAE latents, what a folder says
about its prompts.

A text model folder is a diffusers pipeline folder::

    model_index.json      StepDistillTextPipeline / StepDistillTextTeacherPipeline, or StableDiffusionPipeline
                          (an SD-family student: CLIP text encoder + AutoencoderKL; loads into the stock class)
    unet/                 UNet2DConditionModel (encoder_hidden_states = token embeddings)
    scheduler/            DDPMScheduler (teachers) | LCMScheduler (students: explicit timesteps)
    text_encoder/, tokenizer/   transformers folders (safetensors); may be absent when ``stepdistill.json``
                          names the encoder instead (``extra.text.encoder: minilm``: the shipped package)
    vae/                  AutoencoderKL (latent models only)
    stepdistill.json      conditioning "text", extra.text = {max_length, encoder, class_names, templates}
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import TeacherModelConfig
from .models import ModelMeta, _resolve, save_model_folder
from .text import MINILM, PromptEncoder, TextEncoderError

TEXT_PIPELINE = "StepDistillTextPipeline"
TEXT_TEACHER_PIPELINE = "StepDistillTextTeacherPipeline"
SD_PIPELINE = "StableDiffusionPipeline"


def build_text_unet(cfg: TeacherModelConfig, cross_attention_dim: int, channels: int, resolution: int):
    """A pixel- (or latent-) space diffusers ``UNet2DConditionModel``: cross-attention to the prompt tokens at
    the levels marked in ``cfg.attention_levels`` (and in the mid block)."""
    from diffusers import UNet2DConditionModel

    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels))
    heads = max(1, cfg.block_out_channels[-1] // cfg.attention_head_dim)
    return UNet2DConditionModel(
        sample_size=resolution, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        down_block_types=down, up_block_types=up, norm_num_groups=cfg.norm_num_groups,
        cross_attention_dim=cross_attention_dim, attention_head_dim=heads,
    )


def text_meta(meta: ModelMeta) -> dict:
    return dict((meta.extra or {}).get("text") or {})


def save_text_folder(folder: str | Path, backbone, scheduler, meta: ModelMeta, pipeline_class: str,
                     encoder: PromptEncoder | None, vae=None, encoder_ref: str | None = None,
                     parts: dict | None = None, index_extra: dict | None = None) -> Path:
    """``save_model_folder`` plus the text encoder / tokenizer (or only a reference to them, ``encoder_ref``,
    e.g. ``minilm``) and the VAE; ``model_index.json`` lists exactly the components present. ``parts`` /
    ``index_extra``: a method's own components and index entries, as for ``save_model_folder``."""
    folder = Path(folder)
    meta.extra = dict(meta.extra or {})
    t = dict(meta.extra.get("text") or {})
    t["encoder"] = encoder_ref or "text_encoder/"
    if encoder is not None:
        t["max_length"] = encoder.max_length
    meta.extra["text"] = t
    text_parts = {}
    if encoder_ref is None:
        if encoder is None:
            raise TextEncoderError("save_text_folder needs the encoder or an encoder_ref")
        text_parts = {"text_encoder": encoder.text_encoder, "tokenizer": encoder.tokenizer}
    if vae is not None:
        text_parts["vae"] = vae
    index = {}
    if pipeline_class == SD_PIPELINE:  # stock StableDiffusionPipeline: no safety checker in a distilled toy
        index.update({"safety_checker": [None, None], "feature_extractor": [None, None],
                      "image_encoder": [None, None], "requires_safety_checker": False})
    return save_model_folder(folder, backbone, scheduler, meta, pipeline_class, parts={**text_parts, **(parts or {})},
                             index_extra={**index, **(index_extra or {})})


def is_sd_family(text_encoder, vae) -> bool:
    """Components of the StableDiffusionPipeline family: a CLIP text model and an AutoencoderKL."""
    return vae is not None and type(vae).__name__ == "AutoencoderKL" and type(text_encoder).__name__ == "CLIPTextModel"


def load_text_components(path_or_id: str | Path, meta: ModelMeta | None = None, max_length: int | None = None):
    """(PromptEncoder, vae or None) of a text model folder (or hub id)."""
    src = _resolve(str(path_or_id))
    p = Path(src)
    meta = meta or (ModelMeta.load(p) if p.is_dir() else None) or ModelMeta(conditioning="text")
    t = text_meta(meta)
    if p.is_dir():
        enc_src = p if (p / "text_encoder" / "config.json").is_file() else t.get("encoder")
        if not enc_src or enc_src == "text_encoder/":
            raise TextEncoderError(f"{p}: no text_encoder/ folder and stepdistill.json names no encoder")
        if enc_src != MINILM and not Path(enc_src).is_absolute() and (p / enc_src).exists():
            enc_src = p / enc_src
    else:
        enc_src = str(path_or_id)
    L = max_length or t.get("max_length")
    tok_len = None
    encoder = PromptEncoder.load(enc_src, 0)
    if not L:
        tok_len = getattr(encoder.tokenizer, "model_max_length", 77)
        L = tok_len if tok_len and tok_len < 10_000 else 77
    encoder.max_length = int(L)
    vae = _load_vae(p if p.is_dir() else str(path_or_id))
    return encoder, vae


def _load_vae(src):
    from diffusers import AutoencoderKL

    if isinstance(src, Path):
        if not (src / "vae" / "config.json").is_file():
            return None
        return AutoencoderKL.from_pretrained(src / "vae", use_safetensors=True).eval().requires_grad_(False)
    try:  # hub id: a latent model has a vae/ subfolder
        return AutoencoderKL.from_pretrained(src, subfolder="vae", use_safetensors=True).eval().requires_grad_(False)
    except Exception:  # noqa: BLE001 - pixel-space model
        return None


def reference_text_encoder(src: str | Path, dst: str | Path, encoder_ref: str = MINILM) -> Path:
    """Copy a text model folder without its ``text_encoder/`` and ``tokenizer/``, naming ``encoder_ref`` in
    ``stepdistill.json`` instead (how the shipped teacher avoids carrying the 87 MB MiniLM weights)::

        python -c "from stepdistill.text_models import reference_text_encoder as r; \\
                   r('runs/teacher_text_animal_mnist/model', 'stepdistill/assets/animal_mnist_text_teacher')"
    """
    import shutil

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("text_encoder", "tokenizer"), dirs_exist_ok=True)
    meta = ModelMeta.load(dst)
    meta.extra.setdefault("text", {})["encoder"] = encoder_ref
    meta.save(dst)
    index = json.loads((dst / "model_index.json").read_text())
    for k in ("text_encoder", "tokenizer"):
        index.pop(k, None)
    (dst / "model_index.json").write_text(json.dumps(index, indent=2))
    return dst


def default_prompts(meta: ModelMeta) -> list[str]:
    """The model's caption set, first template of every class ("a cat", ...) or ``["" ]`` without one."""
    names = ((meta.extra or {}).get("text") or {}).get("class_names") or []
    templates = ((meta.extra or {}).get("text") or {}).get("templates") or ["{name}"]
    return [templates[0].format(name=n) for n in names] or [""]


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Images in [-1, 1] (N, C, H, W) -> scaled VAE latents (the mean of the posterior)."""
    out = [vae.encode(images[i:i + batch_size].to(vae.dtype)).latent_dist.mean * vae.config.scaling_factor
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).float()

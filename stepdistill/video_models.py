"""Video backbones: a tiny diffusers ``WanTransformer3DModel`` (Wan 2.1's architecture: 3-D patch embedding, RoPE
over (frame, height, width), text cross-attention, adaLN timestep modulation; Wan Team 2025) trained with
flow matching (Lipman et al. 2023; x_t = (1 - sigma) x0 + sigma eps, the network predicts eps - x0).

A video sample is (C, F, H, W). Wan's config has no sample size, so the clip shape travels in
``stepdistill.json`` (``extra.sample_shape``) and :func:`attach_sample_shape` puts it on the loaded module, where
:func:`stepdistill.denoiser.sample_shape` reads it: one place for every pipeline and sampler."""
from __future__ import annotations

import json
from pathlib import Path

import torch.nn as nn

from .config import TeacherModelConfig

VIDEO_TEACHER_PIPELINE = "StepDistillVideoTeacherPipeline"
VIDEO_PIPELINE = "StepDistillVideoPipeline"


def build_video_transformer(cfg: TeacherModelConfig, text_dim: int, channels: int, frames: int, resolution: int
                            ) -> nn.Module:
    """A ``WanTransformer3DModel`` at ``cfg.video``'s size, with the clip shape attached."""
    from diffusers import WanTransformer3DModel

    v = cfg.video
    m = WanTransformer3DModel(patch_size=tuple(v.patch_size), num_attention_heads=v.num_attention_heads,
                              attention_head_dim=v.attention_head_dim, in_channels=channels, out_channels=channels,
                              text_dim=text_dim, freq_dim=v.freq_dim, ffn_dim=v.ffn_dim, num_layers=v.num_layers,
                              rope_max_seq_len=max(64, frames, resolution))
    m.sample_shape = (channels, frames, resolution, resolution)
    return m


def video_scheduler(cfg: TeacherModelConfig):
    """The stock flow-matching scheduler stored with a video teacher (``shift``: Wan's sigma shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.num_train_timesteps, shift=cfg.video.shift)


def attach_sample_shape(model: nn.Module, folder: Path) -> None:
    """Give a loaded video backbone its clip shape from the model folder's ``stepdistill.json``."""
    for meta in (Path(folder) / "stepdistill.json", Path(folder).parent / "stepdistill.json"):
        if meta.is_file():
            shape = (json.loads(meta.read_text()).get("extra") or {}).get("sample_shape")
            if shape:
                model.sample_shape = tuple(int(s) for s in shape)
            return

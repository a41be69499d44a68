"""The base of every stepdistill pipeline: ``from_pretrained`` also takes the shipped ``builtin:`` names.

    StepDistillPipeline.from_pretrained("builtin:animal_mnist_dmd2")   # the shipped one-step student
"""
from __future__ import annotations

import json
from pathlib import Path

from diffusers import DiffusionPipeline

from ..conditioning import class_index
from ..shipped import resolve_shipped


def image_output(x, output_type: str = "pil", return_dict: bool = True):
    """Samples x0 in [-1, 1] (B, C, H, W) as every stepdistill pipeline returns them: ``output_type`` ``"pt"`` (the
    tensor), ``"np"`` ((B, H, W, C) in [0, 1]) or ``"pil"``; an ``ImagePipelineOutput`` unless ``return_dict`` is
    False (then a one-tuple)."""
    from diffusers import ImagePipelineOutput

    if output_type == "pt":
        images = x
    else:
        images = ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).float().cpu().numpy()
        if output_type == "pil":
            from PIL import Image

            images = [Image.fromarray(((im[..., 0] if im.shape[-1] == 1 else im) * 255).round().astype("uint8"))
                      for im in images]
    if not return_dict:
        return (images,)
    return ImagePipelineOutput(images=images)


class StepDistillPipelineBase(DiffusionPipeline):
    """A ``DiffusionPipeline`` whose ``from_pretrained`` resolves ``builtin:`` names and then lets the
    subclass read the folder's ``stepdistill.json`` (:meth:`_read_meta`).

    Every *student* pipeline (one-/few-step student, Phased DMD experts, routed MSD students, text students) has
    one sampling method, the one route from a model folder to images that the CLI, eval, bench and the demo
    call::

        sample(noise (B, C, H, W), conditions (B,) labels | embeddings | None, num_inference_steps=None,
               generator=None, first_step=None, hybrid_steps=1) -> x0 in [-1, 1]
        denoisers() -> [Denoiser, ...]           # its networks, in chain / routing order
        max_hybrid_steps: int | None             # first steps a teacher may take: None any, 1, 0 none

    ``__call__`` draws the noise, calls ``sample`` and formats the images (:func:`image_output`).
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        path = resolve_shipped(pretrained_model_name_or_path)
        pipe = super().from_pretrained(path, **kwargs)
        meta_p = Path(path) / "stepdistill.json"
        if meta_p.is_file():
            pipe._read_meta(json.loads(meta_p.read_text()))
        return pipe

    def _read_meta(self, meta: dict) -> None:
        """Fill config entries that ``model_index.json`` lacks from ``stepdistill.json`` (default: nothing)."""

    def compile(self, **kwargs):
        """``torch.compile`` the network in place (``nn.Module.compile``: weights and saving unchanged); opt-in,
        measured by ``stepdistill bench --variants compile``. Returns the pipeline."""
        net = getattr(self, "network", None) or self.unet
        net.compile(**kwargs)
        return self

    def timesteps_for(self, num_inference_steps: int | None) -> list[float]:
        """A student's timesteps for ``num_inference_steps`` (None: all K; fewer: the trained subset rule of
        :func:`~stepdistill.pipelines.sampling.subset_timesteps`). Phased DMD overrides it (one step per expert)."""
        from .sampling import subset_timesteps

        return subset_timesteps(self.config.student_timesteps, num_inference_steps, "num_inference_steps")

    def class_index(self, c) -> int:
        """A class name or index -> index, checked against the model's class names
        (:func:`stepdistill.conditioning.class_index`)."""
        return class_index(c, getattr(self.config, "class_names", None) or [])

    def label_tensor(self, class_labels, batch_size: int, device):
        """Class names / indices (or one of them, repeated ``batch_size`` times) -> (B,) long tensor."""
        import torch

        if isinstance(class_labels, (int, str)):
            class_labels = [class_labels] * batch_size
        return torch.tensor([self.class_index(c) for c in class_labels], dtype=torch.long, device=device)

    def conditions(self, class_labels=None, batch_size: int = 1, prompt_embeds=None, pooled_prompt_embeds=None):
        """The network's conditioning and the batch size it implies: class names / indices (:meth:`label_tensor`,
        one sample per entry), or text embeddings (B, L, D) (+ pooled (B, P), a dict as the Denoiser takes it),
        or None (unconditional, ``batch_size`` samples). On the network's device (and dtype for embeddings)."""
        net = self.network
        if class_labels is not None:
            labels = self.label_tensor(class_labels, batch_size, net.device)
            return labels, len(labels)
        if prompt_embeds is None:
            return None, batch_size
        labels = prompt_embeds.to(net.device, net.dtype)
        if pooled_prompt_embeds is not None:
            labels = {"emb": labels, "pooled": pooled_prompt_embeds.to(net.device, net.dtype)}
        return labels, prompt_embeds.shape[0]

    def _cached(self, name: str, key: tuple, build):
        """``build()``, kept until ``key`` changes: the pipelines' denoisers (a schedule built from the scheduler
        config costs about a third of a one-step call at batch 1). The key holds the network and scheduler
        objects' ids and the scheduler config, so swapping a component or re-registering its config rebuilds."""
        box = self.__dict__.setdefault("_stepdistill_cache", {})
        if name not in box or box[name][0] != key:
            box[name] = (key, build())
        return box[name][1]

    def _component_key(self, *extra) -> tuple:
        sched = getattr(self, "scheduler", None)
        return (id(getattr(self, "unet", None)), id(getattr(self, "transformer", None)), id(sched),
                id(getattr(sched, "_internal_dict", None)), *extra)

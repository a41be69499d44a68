"""CLIP score for text-conditioned generators (Hessel et al. 2021, "CLIPScore: A Reference-free
Evaluation Metric for Image Captioning").

``clip_score = max(100 * mean_i cos(E_img(x_i), E_txt(c_i)), 0)``, the definition used by
torchmetrics' ``CLIPScore`` (Hessel et al. use ``w * max(cos, 0)`` per pair with ``w = 2.5``;
torchmetrics scales by 100 and clips the mean). Values lie in [0, 100]; higher means images agree
better with their prompts. Scores from different CLIP checkpoints are not comparable.

Images are float tensors (N, C, H, W) in [-1, 1] (C in {1, 3}; uint8 accepted). Preprocessing is
done here in torch, matching ``CLIPImageProcessor``: resize the shorter side to the model's
``vision_config.image_size`` (bicubic, antialiased), centre-crop, normalise with the CLIP mean/std
(or the processor's own ``image_mean``/``image_std`` when a processor is passed).

The default checkpoint is ``openai/clip-vit-base-patch32`` (override with the ``STEPDISTILL_CLIP_MODEL``
env var or the ``model_id_or_path`` argument of :func:`load_clip`); :func:`tiny_random_clip`
builds a tiny randomly initialised CLIP and a character-level CLIP tokenizer fully offline, for tests.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
ENV_CLIP_MODEL = "STEPDISTILL_CLIP_MODEL"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_clip(model_id_or_path: str | None = None, device: str | torch.device = "cpu", **from_pretrained_kwargs):
    """``(CLIPModel, CLIPProcessor)`` from a hub id or local folder (default ``$STEPDISTILL_CLIP_MODEL`` or
    ``openai/clip-vit-base-patch32``). Extra kwargs (e.g. ``local_files_only=True``) go to ``from_pretrained``."""
    from transformers import AutoTokenizer, CLIPModel

    name = model_id_or_path or os.environ.get(ENV_CLIP_MODEL) or DEFAULT_CLIP_MODEL
    model = CLIPModel.from_pretrained(name, **from_pretrained_kwargs).to(device).eval()
    try:
        from transformers import CLIPProcessor

        proc = CLIPProcessor.from_pretrained(name, **from_pretrained_kwargs)
    except Exception:  # no image-processor config or missing optional deps: the tokenizer suffices
        proc = AutoTokenizer.from_pretrained(name, **from_pretrained_kwargs)
    return model, proc


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _write_tiny_tokenizer(folder: Path) -> None:
    """A byte-level CLIP BPE vocabulary without merges (one token per character) + a few merges."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges = []
    for word in ("cat", "dog", "bird", "red", "blue", "a", "photo", "of"):  # a handful of whole-word tokens
        cur = word[0]
        for i, ch in enumerate(word[1:], 1):
            nxt = ch + ("</w>" if i == len(word) - 1 else "")
            merges.append(f"{cur} {nxt}")
            cur = cur + nxt
            if cur not in tokens:
                tokens.append(cur)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    merges = list(dict.fromkeys(merges))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def tiny_tokenizer(folder: str | Path | None = None):
    """An offline :class:`transformers.CLIPTokenizer` with a tiny byte-level vocabulary (~530 tokens)."""
    from transformers import CLIPTokenizer

    folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="stepdistill_tiny_clip_tok_"))
    _write_tiny_tokenizer(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def tiny_random_clip(seed: int = 0, image_size: int = 32, dim: int = 32, projection_dim: int = 16):
    """``(CLIPModel, CLIPTokenizer)``: a tiny randomly initialised CLIP (~0.1M params), built offline.

    Deterministic for a given ``seed``; for tests of the CLIP-score plumbing only.
    """
    from transformers import CLIPConfig, CLIPModel

    tok = tiny_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(image_size=image_size, patch_size=8, hidden_size=dim, intermediate_size=2 * dim,
                  num_hidden_layers=2, num_attention_heads=2, num_channels=3)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return model.eval(), tok


def _embedding(out) -> torch.Tensor:
    """Projected embedding from ``get_*_features`` (a tensor in transformers 4.x, an output object in 5.x)."""
    if torch.is_tensor(out):
        return out
    for attr in ("pooler_output", "image_embeds", "text_embeds"):
        v = getattr(out, attr, None)
        if torch.is_tensor(v):
            return v
    if isinstance(out, (tuple, list)) and len(out) > 1 and torch.is_tensor(out[1]):
        return out[1]
    raise TypeError(f"cannot find an embedding in {type(out).__name__}")


def preprocess_images(images, image_size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """[-1, 1] (or uint8) (N, C, H, W) -> normalised (N, 3, image_size, image_size) CLIP pixel values."""
    x = torch.as_tensor(images)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, C, H, W) with C in {{1, 3}}, got {tuple(x.shape)}")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else (x.float().clamp(-1, 1) + 1) / 2
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    s = image_size / min(h, w)
    nh, nw = max(image_size, round(h * s)), max(image_size, round(w * s))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - image_size) // 2, (nw - image_size) // 2
    x = x[..., top:top + image_size, left:left + image_size].clamp(0, 1)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    sd = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / sd


@torch.no_grad()
def clip_scores_per_sample(images, prompts, model, processor_or_tokenizer, batch_size: int = 64,
                           device: str | torch.device | None = None) -> torch.Tensor:
    """``100 * cos(image_emb_i, text_emb_i)`` for each pair (not clipped), as a float tensor (N,)."""
    n = len(images)
    if n == 0:
        raise ValueError("clip_score got an empty set of images")
    if isinstance(prompts, str):
        prompts = [prompts] * n
    prompts = list(prompts)
    if len(prompts) != n:
        raise ValueError(f"clip_score got {n} images but {len(prompts)} prompts")
    tok = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
    img_proc = getattr(processor_or_tokenizer, "image_processor", None)
    mean = tuple(getattr(img_proc, "image_mean", None) or CLIP_MEAN)
    std = tuple(getattr(img_proc, "image_std", None) or CLIP_STD)
    cfg = model.config
    image_size = cfg.vision_config.image_size
    max_len = getattr(cfg.text_config, "max_position_embeddings", 77)
    if device is None:
        device = next(model.parameters()).device
    model.eval()
    scores = []
    for i in range(0, n, batch_size):
        px = preprocess_images(images[i:i + batch_size], image_size, mean, std).to(device)
        t = tok(prompts[i:i + batch_size], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        img = _embedding(model.get_image_features(pixel_values=px)).float()
        txt = _embedding(model.get_text_features(input_ids=t["input_ids"].to(device),
                                                 attention_mask=t["attention_mask"].to(device))).float()
        scores.append(100.0 * F.cosine_similarity(img, txt, dim=-1).cpu())
    return torch.cat(scores)


def clip_score(images, prompts, model, processor_or_tokenizer, batch_size: int = 64,
               device: str | torch.device | None = None) -> float:
    """CLIP score (Hessel et al. 2021; torchmetrics convention): ``max(100 * mean cosine, 0)`` in [0, 100].

    Args:
        images: (N, C, H, W) float in [-1, 1] or uint8; C in {1, 3}.
        prompts: N strings (or one string for all images).
        model: a ``transformers.CLIPModel`` (anything with ``get_image_features``/``get_text_features``
            and a CLIP-style ``config``).
        processor_or_tokenizer: a ``CLIPProcessor`` (its tokenizer and image mean/std are used) or a tokenizer.
    """
    return float(max(clip_scores_per_sample(images, prompts, model, processor_or_tokenizer, batch_size, device).mean().item(), 0.0))

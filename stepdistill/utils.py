"""Small helpers: image grids, loss plots, hashing, atomic writes."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch


def quantize(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, C, H, W) on the CPU, as a PNG stores it; uint8 input passes through."""
    if x.dtype == torch.uint8:
        return x.cpu()
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] (or uint8) -> (N, H, W, C) uint8."""
    return quantize(x).permute(0, 2, 3, 1).numpy()


def make_grid(x: torch.Tensor, nrow: int, scale: int = 1, pad: int = 1) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (rows*H, nrow*W, 3) uint8 image, ``scale``x nearest upsampled. Video clips
    (N, C, F, H, W) become a frame strip: one clip per row, its F frames left to right (``nrow`` is ignored)."""
    if x.ndim == 5:
        n, c, f, h, w = x.shape
        x, nrow = x.permute(0, 2, 1, 3, 4).reshape(n * f, c, h, w), f
    imgs = to_uint8(x)
    if imgs.shape[-1] not in (1, 3):  # latents (SD3: 16 channels): preview the first 3 channels (1 if only 2)
        imgs = imgs[..., :3] if imgs.shape[-1] > 3 else imgs[..., :1]
    if imgs.shape[-1] == 1:
        imgs = np.repeat(imgs, 3, axis=-1)
    n, h, w, _ = imgs.shape
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 64, np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = imgs[i]
    if scale > 1:
        grid = grid.repeat(scale, 0).repeat(scale, 1)
    return grid


def save_grid(x: torch.Tensor, path: str | Path, nrow: int, scale: int = 2) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        Image.fromarray(make_grid(x, nrow, scale)).save(tmp, pnginfo=_png_tag())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_gif(clips: torch.Tensor, path: str | Path, nrow: int = 8, scale: int = 3, fps: int = 4) -> Path:
    """Clips (N, C, F, H, W) in [-1, 1] -> an animated GIF: frame f shows frame f of every clip in a grid."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [Image.fromarray(make_grid(clips[:, :, f], nrow, scale)) for f in range(clips.shape[2])]
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.gif")
    try:
        frames[0].save(tmp, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _png_tag():
    """PNG metadata that marks a file as written by stepdistill (outputs.is_our_file: replaced without asking)."""
    from PIL.PngImagePlugin import PngInfo

    from .outputs import PNG_TAG

    info = PngInfo()
    info.add_text(PNG_TAG, "1")
    return info


def save_labeled_grid(x: torch.Tensor, path: str | Path, nrow: int, scale: int = 2,
                      captions: list[str] | None = None) -> Path:
    """:func:`save_grid` with class names: a header over each column when every column holds one class
    (the ``sample`` layout: class ``i % k`` in column ``i % k``), else a caption under each image."""
    if not captions:
        return save_grid(x, path, nrow, scale)
    from PIL import Image, ImageDraw, ImageFont

    grid = Image.fromarray(make_grid(x, nrow, scale))
    font = ImageFont.load_default()
    n = len(captions)
    cols = [{captions[i] for i in range(c, n, nrow)} for c in range(min(nrow, n))]
    cell_w, cell_h = grid.width / nrow, grid.height / ((n + nrow - 1) // nrow)
    line = 12
    if all(len(c) == 1 for c in cols):  # one class per column: headers
        out = Image.new("RGB", (grid.width, grid.height + line + 2), (255, 255, 255))
        out.paste(grid, (0, line + 2))
        draw = ImageDraw.Draw(out)
        for c, names in enumerate(cols):
            draw.text((c * cell_w + 2, 1), _fit(draw, next(iter(names)), font, cell_w - 4), fill=(0, 0, 0), font=font)
    else:  # mixed columns: a caption strip under every row
        rows = (n + nrow - 1) // nrow
        out = Image.new("RGB", (grid.width, grid.height + rows * line), (255, 255, 255))
        draw = ImageDraw.Draw(out)
        for r in range(rows):
            y0 = int(r * (cell_h + line))
            out.paste(grid.crop((0, int(r * cell_h), grid.width, int((r + 1) * cell_h))), (0, y0))
            for c in range(nrow):
                if r * nrow + c < n:
                    draw.text((c * cell_w + 2, y0 + cell_h), _fit(draw, captions[r * nrow + c], font, cell_w - 4),
                              fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        out.save(tmp, pnginfo=_png_tag())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _fit(draw, text: str, font, width: float) -> str:
    """``text`` cut (with an ellipsis) to ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def plot_losses(log_path: str | Path, out_path: str | Path) -> Path | None:
    """Plot every numeric key of a ``log.jsonl`` file (one subplot per key) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    keys = sorted({k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))})
    if not rows or not keys:
        return None
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.0 * len(keys)), squeeze=False, sharex=True)
    for ax, k in zip(axes[:, 0], keys):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1)
        ax.set_ylabel(k, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    return save_figure(fig, out_path, dpi=90)


def save_figure(fig, path: str | Path, dpi: int = 90) -> Path:
    """Save a matplotlib figure atomically (temp file, then rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def class_balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """0, 1, ..., K-1, 0, 1, ... (n labels)."""
    return torch.arange(n) % max(num_classes, 1)


def swap_into_place(tmp: Path, final: Path) -> None:
    """Move the finished ``tmp`` to ``final``: an existing ``final`` is renamed aside first and removed only after the
    new one is in place, so a crash leaves one complete version (and a ``.old_*`` litter file at worst)."""
    if final.exists():
        old = final.parent / f".old_{final.name}_{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False, kind: str = "export", inputs=(), own: bool = False):
    """Write a folder all at once: yields a temporary sibling folder that replaces ``out`` on success (and is
    removed on failure), so readers never see a half-written or mixed folder. The folder gets our marker
    (:mod:`stepdistill.outputs`) listing its files. A non-empty ``out`` is replaced only with ``overwrite``, and
    only when it is a marked folder of the same ``kind`` holding nothing else (:func:`outputs.check_replace_folder`;
    ``own=True``: a part of a run folder we hold, e.g. the run's ``student/``). The temporary folder has ``out``'s
    name (inside a hidden sibling), so what is written there by name (a model card's title and snippets) names
    the final folder."""
    from .outputs import check_replace_folder, mark_folder

    from .outputs import clean_stale_temps

    out = Path(out)
    if not own:
        check_replace_folder(out, overwrite, kind, inputs)
    clean_stale_temps(out.parent)  # what a killed earlier export left
    out.parent.mkdir(parents=True, exist_ok=True)
    box = out.parent / f".tmp_{out.name}_{os.getpid()}"
    shutil.rmtree(box, ignore_errors=True)
    tmp = box / out.name
    tmp.mkdir(parents=True)
    try:
        yield tmp
        mark_folder(tmp, kind)
    except BaseException:
        shutil.rmtree(box, ignore_errors=True)
        raise
    swap_into_place(tmp, out)
    shutil.rmtree(box, ignore_errors=True)

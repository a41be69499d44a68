"""Ship a trained video teacher as ``builtin:moving_animal_mnist``: its transformer, scheduler and metadata, with the
text encoder referenced (the installed MiniLM package, as ``builtin:animal_mnist_text`` does) instead of copied.

    python scripts/ship_video_teacher.py runs/video/teacher/model stepdistill/assets/moving_animal_mnist_teacher
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path


def main(src: str, out: str) -> int:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from stepdistill.models import ModelMeta, load_denoiser
    from stepdistill.text_models import save_text_folder
    from stepdistill.video_models import VIDEO_TEACHER_PIPELINE

    den, meta = load_denoiser(src)
    if den.kind != "wan":
        raise SystemExit(f"{src} is not a video teacher")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(src, subfolder="scheduler")
    meta = ModelMeta.load(Path(src))
    if Path(out).exists():
        raise SystemExit(f"{out} exists: remove it yourself first")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ship_", dir=Path(out).parent)) / "model"   # ours alone: nothing else touched
    save_text_folder(tmp, den.backbone, scheduler, meta, VIDEO_TEACHER_PIPELINE, None, encoder_ref="minilm")
    for f in ("training_result.json",):
        if (Path(src) / f).is_file():
            shutil.copy(Path(src) / f, tmp / f)
    tmp.rename(out)
    tmp.parent.rmdir()
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:3]))

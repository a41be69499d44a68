"""Frame strips, GIFs and frames per second of video teachers and students (BENCHMARKS "Video").

For each ``NAME=FOLDER[:STEPS]``: ten clips (one caption per class, seed 0) written as ``OUT/NAME.png`` (a frame
strip: one clip per row) and ``OUT/NAME.gif``; then the generation time at batch 1 and 8 (the minimum of
``--repeats`` runs after one warm-up, with ``--threads`` torch threads) as frames per second, printed as JSON.

    python scripts/video_media.py --out docs/video teacher=runs/video/teacher/model:25 dmd2_4=runs/video/dmd2_4/student
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="NAME=FOLDER[:STEPS]")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--guidance", type=float, default=3.0)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from stepdistill.pipelines.loading import load_text_pipeline
    from stepdistill.utils import save_gif, save_grid

    out = Path(a.out)
    report = {"threads": a.threads, "repeats": a.repeats, "models": []}
    for spec in a.models:
        name, _, rest = spec.partition("=")
        folder, _, steps = rest.partition(":")
        pipe = load_text_pipeline(folder)
        teacher = not getattr(pipe.config, "student_timesteps", None)
        kw = {"num_inference_steps": int(steps)} if steps else {}
        if teacher:
            kw["guidance_scale"] = a.guidance
        names = pipe.meta.extra["text"]["class_names"]
        prompts = [f"a {n}" for n in names]
        clips = pipe(prompts, seed=0, output_type="pt", **kw).images
        save_grid(clips, out / f"{name}.png", nrow=clips.shape[2])
        save_gif(clips, out / f"{name}.gif", nrow=5)
        row = {"model": name, "folder": folder, "kind": "teacher" if teacher else "student",
               "steps": kw.get("num_inference_steps", len(pipe.config.student_timesteps) if not teacher else 50),
               "causal": getattr(pipe.config, "causal", None), "frames_per_clip": clips.shape[2]}
        for b in (1, 8):
            emb = pipe.encode_prompt(prompts[:b])
            pipe(prompt_embeds=emb, seed=0, output_type="pt", **kw)               # warm-up
            times = []
            for r in range(a.repeats):
                t0 = time.perf_counter()
                pipe(prompt_embeds=emb, seed=r, output_type="pt", **kw)
                times.append(time.perf_counter() - t0)
            row[f"fps_b{b}"] = b * clips.shape[2] / min(times)
            row[f"clip_s_b{b}"] = min(times)
        report["models"].append(row)
        print(json.dumps(row), flush=True)
    (out / "fps.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

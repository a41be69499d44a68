"""Measure a style LoRA stacked on a distilled LoRA, both loaded by diffusers' own loader into the teacher's stock
UNet (``UNet2DConditionModel.load_lora_adapter`` + ``set_adapters``), as a user of a stock pipeline would.

Rows (one JSON record each): the teacher (``--teacher-steps`` DDIM steps, CFG ``--guidance``), the teacher + style
LoRA (the style's target), the distilled LoRA alone (its own step count) and distilled + style at each
``--weights`` scale. Each row: FID / precision / recall against the real split, FID against the same images with the
style's transform applied (``--style-transform``, e.g. bold), the Animal-MNIST classifier's accuracy on the prompts'
classes, within-prompt diversity, and the ink fraction (pixels above mid-grey: bold silhouettes have more of it).
Nothing is picked from these numbers (every row is reported), so ``--split test`` is read once per row.

    python scripts/lora_stacking.py --teacher builtin:animal_mnist_text --distilled runs/stack/lora_student/student \\
        --style runs/stack/style_lora/model --out docs/benchmarks/lora_stacking.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def ink(x: torch.Tensor) -> float:
    """Mean fraction of pixels above mid-grey (images in [-1, 1], white silhouettes)."""
    return float((x > 0).float().mean())


def stock_unet(teacher: str, adapters: dict[str, str]):
    """The teacher's UNet from its folder with stock diffusers, each LoRA file loaded as a named adapter."""
    from diffusers import UNet2DConditionModel

    from stepdistill.models import _resolve

    unet = UNet2DConditionModel.from_pretrained(_resolve(teacher), subfolder="unet").eval()
    for name, folder in adapters.items():
        unet.load_lora_adapter(str(Path(folder) / "lora" / "pytorch_lora_weights.safetensors"), prefix="unet",
                               adapter_name=name)
    return unet


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="builtin:animal_mnist_text")
    ap.add_argument("--distilled", required=True, help="a distilled LoRA student folder (its lora/ is loaded)")
    ap.add_argument("--style", required=True, help="a style LoRA folder from stepdistill teacher (finetune.lora_rank)")
    ap.add_argument("--weights", default="0.5,1.0", help="style scales stacked on the distilled LoRA (scale 1)")
    ap.add_argument("--style-transform", default="bold", help="the style's image transform (its FID reference)")
    ap.add_argument("--num", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="test")
    ap.add_argument("--teacher-steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reuse-teacher-rows", default=None,
                    help="a previous JSON of the same teacher, style LoRA, --num, --seed and --split: its two teacher "
                         "rows are taken instead of sampled again (50 CFG steps each)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from stepdistill.eval.metrics import classifier_accuracy, diversity_metric, fid_metrics, load_reference
    from stepdistill.eval.text_eval import load_text_model
    from stepdistill.models import ModelMeta, _resolve
    from stepdistill.trainers.pso_data import apply_transform

    weights = [float(w) for w in a.weights.split(",") if w.strip()]
    unet = stock_unet(a.teacher, {"distilled": a.distilled, "style": a.style})
    teacher = load_text_model(a.teacher, ModelMeta.load(Path(_resolve(a.teacher))), "cpu")
    student = load_text_model(a.distilled, ModelMeta.load(Path(a.distilled)), "cpu")
    teacher.pipe.unet = student.pipe.unet = unet
    prompts = teacher.default_prompts()
    labels = teacher.prompt_classes(prompts)[torch.arange(a.num) % len(prompts)]
    ref, _, key = load_reference("animal_mnist", 32, 1, a.split)
    styled_ref = apply_transform(ref, a.style_transform)
    rows = [("teacher", teacher, None, a.teacher_steps), ("teacher + style", teacher, (["style"], [1.0]),
                                                            a.teacher_steps),
            ("distilled LoRA", student, (["distilled"], [1.0]), None)]
    rows += [(f"distilled + style x{w:g}", student, (["distilled", "style"], [1.0, w]), None) for w in weights]
    out = {"teacher": a.teacher, "distilled": a.distilled, "style": a.style, "style_transform": a.style_transform,
           "num": a.num, "seed": a.seed, "split": a.split, "guidance_teacher": a.guidance,
           "real": {"ink": ink(ref), f"ink_{a.style_transform}": ink(styled_ref)}, "rows": []}
    reuse = {}
    if a.reuse_teacher_rows:
        prev = json.loads(Path(a.reuse_teacher_rows).read_text())
        same = all(prev[k] == v for k, v in (("teacher", a.teacher), ("style", a.style), ("num", a.num),
                                               ("seed", a.seed), ("split", a.split)))
        if not same:
            raise SystemExit(f"--reuse-teacher-rows {a.reuse_teacher_rows}: another teacher, style, num, seed or split")
        reuse = {r["model"]: r for r in prev["rows"] if r["model"].startswith("teacher")}
    for name, model, adapters, steps in rows:
        if name in reuse:
            out["rows"].append({**reuse[name], "reused_from": a.reuse_teacher_rows})
            print(json.dumps(out["rows"][-1]), flush=True)
            continue
        if adapters is None:
            unet.disable_lora()
        else:
            unet.enable_lora()
            unet.set_adapters(*adapters)
        t0 = time.perf_counter()
        x = model.generate(n=a.num, steps=model.resolve_steps(steps), guidance_scale=a.guidance, seed=a.seed,
                           prompts=prompts, progress=False)
        row = {"model": name, "adapters": adapters and dict(zip(*adapters)), "steps": model.resolve_steps(steps),
               "seconds": round(time.perf_counter() - t0, 1), "ink": ink(x)}
        plain = fid_metrics(x, ref, key, kid=False)
        row.update(fid=plain["fid"], precision=plain["precision"], recall=plain["recall"])
        row[f"fid_{a.style_transform}"] = fid_metrics(x, styled_ref, f"{key}-{a.style_transform}", kid=False)["fid"]
        row.update(class_accuracy=classifier_accuracy(x, labels, teacher.class_names)["class_accuracy"])
        row.update(diversity=diversity_metric(x, torch.arange(a.num) % len(prompts))["diversity"])
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        from stepdistill.utils import save_grid

        save_grid(x[:40], Path(a.out).with_suffix("").as_posix() + f"_{len(out['rows'])}.png", nrow=10)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({"wrote": a.out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

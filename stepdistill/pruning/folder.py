"""What a pruned model folder holds and says: the teacher's folder with the smaller network (:func:`fill_like`), the
prune record in ``stepdistill.json`` ``extra.pruned`` (:func:`pruned_record`), the block map that ``method: kd``
reads (:func:`block_map`) and the words of its model cards (:func:`card`, :func:`describe`). Used by
``stepdistill prune`` (:mod:`stepdistill.prune`), ``method: kd`` and every exporter of a student that started from a pruned
network."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..denoiser import backbone_kind, component_name
from ..models import ModelMeta, meta_extra, save_component
from .structure import DIT_KINDS, Unit

PRUNED_KEY = "pruned"


def block_map(net: torch.nn.Module, units: list[Unit]) -> dict[str, str]:
    """{pruned block path: teacher block path} for the blocks both keep (their outputs are the features that
    ``method: kd`` matches): every down / up block and the mid block of a UNet (the deepest stage cut shifts the
    up blocks by one), every kept transformer block of a DiT."""
    names = {u.name for u in units}
    if backbone_kind(net) in DIT_KINDS:
        kept = [k for k in range(len(net.transformer_blocks)) if f"block{k}" not in names]
        return {f"transformer_blocks.{i}": f"transformer_blocks.{k}" for i, k in enumerate(kept)}
    n = len(net.down_blocks)
    cut = f"stage{n - 1}" in names
    keep = n - 1 if cut else n
    out = {f"down_blocks.{d}": f"down_blocks.{d}" for d in range(keep)}
    if net.mid_block is not None and "mid" not in names:
        out["mid_block"] = "mid_block"
    shift = 1 if cut else 0
    out.update({f"up_blocks.{u}": f"up_blocks.{u + shift}" for u in range(keep)})
    return out


def fill_like(folder: Path, base: Path, backbone: torch.nn.Module, extra: dict, meta: ModelMeta) -> Path:
    """Write into the empty ``folder`` the model folder ``base`` (scheduler, text encoder, tokenizer, VAE,
    model_index.json) with ``backbone`` in place of its own and ``extra`` added to ``stepdistill.json``."""
    folder, base = Path(folder), Path(base)
    sub = component_name(backbone)
    for p in base.iterdir():
        if p.is_dir() and p.name not in (sub, "unet", "transformer") and not p.name.startswith("."):
            shutil.copytree(p, folder / p.name)
    index = json.loads((base / "model_index.json").read_text()) if (base / "model_index.json").exists() else {}
    index.pop("unet", None), index.pop("transformer", None)
    index[sub] = save_component(folder / sub, backbone)
    index.setdefault("_class_name", "StepDistillTeacherPipeline")
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    ModelMeta(**{**meta.__dict__, "extra": {**(meta.extra or {}), **extra}}).save(folder)
    return folder


def pruned_record(source: str, allow_pickle: bool = False) -> dict | None:
    """The ``extra.pruned`` record of a model folder (None for an unpruned one or a hub id without one)."""
    return meta_extra(source, allow_pickle).get(PRUNED_KEY)


def card(out: str, record: dict) -> str:
    """The pruned folder's model card: what went, the scores, and what to do next."""
    rows = "\n".join(f"| `{s['unit']}` | {s['params']:,} | {s['error']:.3g} | {s['relative']:.3g} | "
                     f"{'removed' if s['unit'] in record['removed'] else ''} |" for s in record["scores"])
    add = record["additivity"]
    return "\n".join([
        f"# {Path(out).name}", "", describe(record), "",
        "Each layer was scored by the output loss of the network without it, ||f(x_t) - f_without(x_t)||^2 on "
        f"{record['calibration']['inputs']} calibration inputs at timesteps {record['calibration']['timesteps']} "
        "(LAPTOP-Diff, Zhang et al. 2024), and the "
        "cheapest set meeting the ratio was removed in one shot.", "",
        "| unit | parameters | output loss | relative | |", "|---|---|---|---|---|", rows, "",
        f"Output loss of the removed set: {record['set_error']:.3g} (sum of its units' losses: "
        f"{record['set_error_sum']:.3g}). Additivity over {add.get('num_pairs', 0)} pairs of units: Pearson "
        f"{add.get('pearson', float('nan')):.3f}, median relative gap {add.get('median_relative_gap', float('nan')):.2f}.",
        *([""] + [f"Not removable alone: `{k}` ({v})." for k, v in record["rejected"].items()] if record["rejected"]
          else []),
        "", *_next_steps(out, record)])


def _next_steps(out: str, record: dict) -> list[str]:
    """What to run on the pruned folder: a pruned teacher is retrained as a many-step model, a pruned distilled
    student on its own map (``method: kd`` with the student as ``dmd.teacher``)."""
    ts = record.get("student_timesteps")
    if ts:
        return [f"This is a distilled student of timesteps {ts} minus those layers, scored at its own inputs. Retrain "
                "it on the full student's map (normalised feature distillation, pure noise in), then continue it "
                "with the one-step recipe:", "", "```bash",
                f"stepdistill distill --config configs/kd_student_animal_mnist.yaml kd.student={out} "
                f"dmd.teacher={record['source']} output_dir=runs/kd_student",
                "stepdistill export output_dir=runs/kd_student --checkpoint runs/kd_student/checkpoints/step_001000 "
                "--out runs/kd_student_1000",
                "stepdistill distill --config configs/dmd2_animal_mnist_full.yaml "
                "dmd.student_init=runs/kd_student_1000",
                "```", ""]
    return ["This is a many-step model (the teacher minus those layers). Retrain it with normalised feature "
            "distillation, then distill it to one step:", "", "```bash",
            f"stepdistill distill --config configs/kd_animal_mnist.yaml kd.student={out} output_dir=runs/kd",
            "stepdistill distill --config configs/dmd2_animal_mnist.yaml dmd.student_init=runs/kd/student", "```", ""]


def describe(record: dict) -> str:
    """The model card's words for a pruned network."""
    n0, n1 = record["params_before"], record["params_after"]
    return (f"The network is a layer-pruned copy of `{record['source']}` (LAPTOP-Diff one-shot pruning, "
            f"`stepdistill prune --ratio {record['ratio']} --by {record['by']}`): "
            f"{', '.join('`' + r + '`' for r in record['removed'])} removed, {n0:,} -> {n1:,} parameters "
            f"({1 - n1 / n0:.1%} fewer; {record['class_before']} -> {record['class_after']}).")

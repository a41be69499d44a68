"""``stepdistill grow``: a deeper copy of a transformer teacher that computes the same function
(:mod:`~stepdistill.pruning.growth`), written as a diffusers folder, to start a larger student from
(``dmd.student_init``).

The folder is the teacher's folder (scheduler, text encoder, ...) with the deeper backbone (a stock config with a
larger ``num_layers``) and ``stepdistill.json`` ``extra.grown``: the blocks copied, the parameters before and after,
the block map and the check that the grown network's outputs equal the teacher's on calibration inputs (real data
at five noise levels). A grown model samples as a many-step model (``stepdistill eval --model <folder>``) exactly
like its teacher; what it is for is ``stepdistill distill dmd.student_init=<folder>``, where the student keeps its
own (deeper) network and the critic stays a teacher copy.

A tool on top of the trainers' set-up (it checks on the data a distill run would see), beside
:mod:`stepdistill.prune`.
"""
from __future__ import annotations

from pathlib import Path

from .errors import ConfigError
from .models import _resolve
from .prune import teacher_inputs
from .pruning.criterion import make_calibration, param_count
from .pruning.folder import fill_like
from .pruning.growth import GROWN_KEY, block_map, check_after, describe, grow_network, inserted_blocks
from .utils import atomic_folder

#: the largest mean squared difference between the grown network's and the teacher's outputs accepted as "equal"
#: (float32 arithmetic adds zeros exactly, so the check reads 0.0 in practice)
EQUAL_TOL = 1e-10


def grow_model(source: str, out: str, after, num: int = 16, seed: int = 0, data: str | None = None,
               allow_pickle: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Grow ``source`` by a zero-output copy of each block in ``after`` and write the folder ``out``. Returns the
    record (also in ``out/stepdistill.json`` ``extra.grown``)."""
    root = Path(_resolve(str(source), allow_pickle))
    den, meta, images, labels, conds = teacher_inputs(source, allow_pickle, data, seed)
    net = den.backbone.eval()
    idx = check_after(net, after)
    grown = grow_network(net, idx)
    cal = make_calibration(den, images, labels, conds, num=num, seed=seed)
    err = cal.error(grown)
    if not err <= EQUAL_TOL:
        raise ConfigError(f"grow: the grown network's outputs differ from {source}'s (mean squared difference "
                          f"{err:.3g}); its blocks write to the residual stream through a layer this tool does not "
                          "zero")
    n0, n = grown.config.num_layers - len(idx), grown.config.num_layers
    record = {
        "source": str(source), "student_timesteps": list(meta.student_timesteps or []) or None,
        "after": idx, "inserted": inserted_blocks(idx), "num_layers_before": n0, "num_layers_after": n,
        "params_before": param_count(net), "params_after": param_count(grown), "class": type(net).__name__,
        "block_map": block_map(n0, idx),
        "check": {"inputs": len(cal.x_t), "mse": err, "seed": seed},
    }
    with atomic_folder(out, overwrite=overwrite, kind="grown", inputs=(root,)) as tmp:
        fill_like(tmp, root, grown, {GROWN_KEY: record}, meta)
        (tmp / "README.md").write_text(card(str(out), record))
    if progress:
        print(f"grow: copied blocks {', '.join(map(str, idx))}: {record['num_layers_before']} -> {n} blocks, "
              f"{record['params_before']:,} -> {record['params_after']:,} parameters; outputs equal on "
              f"{len(cal.x_t)} calibration inputs (mse {err:.1e}); saved to {out}", flush=True)
    return record


def card(out: str, record: dict) -> str:
    """The grown folder's model card: what was copied, the check, and what to do next."""
    return "\n".join([
        f"# {Path(out).name}", "", describe(record), "",
        f"Check: on {record['check']['inputs']} calibration inputs (real data at five noise levels) the grown "
        f"network's outputs differ from the source's by a mean squared {record['check']['mse']:.1e}.", "",
        "Distil it as a student that is deeper than its teacher (the critic stays a teacher copy):", "", "```bash",
        f"stepdistill distill --config <your config> dmd.teacher={record['source']} dmd.student_init={out}",
        "```", ""])

"""Write the teacher ODE pairs that ship with the package (``stepdistill/assets/teacher_pairs/``).

    python scripts/ship_teacher_pairs.py [configs/dmd2_animal_mnist.yaml] [overrides ...]

The main job's pairs (1,024 DDIM pairs of the shipped teacher, seed 0) take about 4.7 minutes on 2 CPU cores; a
run finds them in the package instead (:func:`stepdistill.pairs.teacher_ode_pairs`). The file holds the labels and
the teacher outputs under the cache entry's own name; the noise is redrawn from the seed when they are used.
"""
import sys

from safetensors.torch import save_file

from stepdistill.config import DistillConfig, load_config
from stepdistill.trainers.setup import prepare
from stepdistill.pairs import SHIPPED_PAIRS_DIR, pairs_key, pairs_key_file, teacher_ode_pairs

args = sys.argv[1:] or ["configs/dmd2_animal_mnist.yaml"]
cfg = load_config(DistillConfig, args[0], args[1:])
s = prepare(cfg)  # the teacher, its conditions and the data, exactly as the trainer sees them
shape = tuple(s.data.images.shape[1:])
key = pairs_key(s.teacher, cfg.dmd, s.num_classes, shape, cfg.train.seed, s.conds)
noise, labels, x0 = teacher_ode_pairs(s.teacher, cfg.dmd, s.num_classes, shape, seed=cfg.train.seed, conds=s.conds)
SHIPPED_PAIRS_DIR.mkdir(parents=True, exist_ok=True)
out = SHIPPED_PAIRS_DIR / pairs_key_file(key)
save_file({"labels": labels.contiguous(), "x0": x0.contiguous()}, str(out))
print(out, key)

"""Export the EMA model of a teacher run's checkpoint as a teacher folder (dev helper).

    python scripts/export_teacher_ckpt.py runs/teacher_animal_mnist [checkpoint_name] OUT
"""
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

from stepdistill.config import TeacherConfig, load_config
from stepdistill.data import ANIMAL_CLASSES
from stepdistill.models import ModelMeta, build_scheduler, build_teacher_unet, save_model_folder

run, ckpt, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
cfg = load_config(TeacherConfig, run / "config.yaml")
unet = build_teacher_unet(cfg.model, 10, 1, cfg.data.resolution)
ckpt = ckpt if ckpt != "latest" else (run / "checkpoints" / "latest").read_text().strip()
t = load_file(run / "checkpoints" / ckpt / "models.safetensors")
unet.load_state_dict({k[len("ema.model."):]: v for k, v in t.items() if k.startswith("ema.model.")})
meta = ModelMeta(prediction_type=cfg.model.prediction_type, conditioning="class", class_names=ANIMAL_CLASSES,
                 null_class=10, extra={"checkpoint": ckpt})
save_model_folder(out, unet, build_scheduler(cfg.model), meta, "StepDistillTeacherPipeline")
print(json.dumps({"exported": str(out), "checkpoint": ckpt}))

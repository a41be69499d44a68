#!/bin/sh
# The video measurements of BENCHMARKS "Video: a Wan-architecture teacher, DMD2 students at 1/2/4 steps, a
# streaming student": the teacher, four students and their evaluations, one thread per job (2 cores: at most two
# jobs at once). Each student up to dmd2_4_long is picked by nothing: its last EMA weights are exported and
# evaluated once; dmd2_4_xl is picked on the validation split.
set -e
T=runs/video/teacher/model
stepdistill teacher --config configs/teacher_video_animal_mnist.yaml output_dir=runs/video/teacher
for k in 1 2 4; do
  case $k in 1) ts="[999]";; 2) ts="[999,500]";; 4) ts="[999,750,500,250]";; esac
  stepdistill distill --config configs/dmd2_video_animal_mnist.yaml dmd.teacher=$T "dmd.student_timesteps=$ts" \
    output_dir=runs/video/dmd2_$k
done
stepdistill distill --config configs/dmd2_video_animal_mnist.yaml --fork runs/video/dmd2_4/checkpoints/step_000450 \
  dmd.teacher=$T "dmd.student_timesteps=[999,750,500,250]" train.max_steps=900 output_dir=runs/video/dmd2_4_long
stepdistill distill --config configs/self_forcing_video_animal_mnist.yaml dmd.teacher=$T causal.mode=pipelined train.max_steps=360 \
  output_dir=runs/video/stream
for m in dmd2_1 dmd2_2 dmd2_4 dmd2_4_long stream; do
  stepdistill eval --model runs/video/$m/student --num 128 --ref-num 250 --out docs/benchmarks/video/eval_$m.json
done
# the 4-step student continued to 2,000 steps, picked on the validation split (lowest per-frame FID with no collapsed
# clip, every 200 steps from 1000), then the test split once
stepdistill distill --config runs/video/dmd2_4_long/config.yaml --fork runs/video/dmd2_4_long/checkpoints/step_000900 \
  train.max_steps=2000 output_dir=runs/video/dmd2_4_xl
stepdistill curve --run runs/video/dmd2_4_xl --ref-split val --ref-num 250 --num 128 --seed 1 --min-step 1000 \
  --every 200 --pick-acc 0
N=$(python -c "import json; print(json.load(open('runs/video/dmd2_4_xl/curve/curve.json'))['pick']['step'])")
stepdistill export --config runs/video/dmd2_4_xl/config.yaml --out runs/video/dmd2_4_xl_pick \
  --checkpoint runs/video/dmd2_4_xl/checkpoints/step_$(printf %06d $N)
stepdistill eval --model runs/video/dmd2_4_xl_pick --num 128 --ref-num 250 --out docs/benchmarks/video/eval_dmd2_4_xl_pick.json
stepdistill eval --model $T --steps 50 --num 128 --ref-num 250 --out docs/benchmarks/video/eval_teacher.json
python scripts/video_media.py --out docs/video teacher=$T:50 dmd2_1=runs/video/dmd2_1/student \
  dmd2_2=runs/video/dmd2_2/student dmd2_4=runs/video/dmd2_4/student stream=runs/video/stream/student

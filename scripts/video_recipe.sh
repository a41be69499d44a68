#!/bin/sh
# The video measurements of BENCHMARKS "Video: a Wan-architecture teacher, DMD2 students at 1/2/4 steps, a
# streaming student": the teacher, four students and their evaluations, one thread per job (2 cores: at most two
# jobs at once). Each student is picked by nothing: its last EMA weights are exported and evaluated once.
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
stepdistill eval --model $T --steps 50 --num 128 --ref-num 250 --out docs/benchmarks/video/eval_teacher.json
python scripts/video_media.py --out docs/video teacher=$T:50 dmd2_1=runs/video/dmd2_1/student \
  dmd2_2=runs/video/dmd2_2/student dmd2_4=runs/video/dmd2_4/student stream=runs/video/stream/student

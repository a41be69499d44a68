#!/bin/sh
# Smaller one-step students (BENCHMARKS.md "Pruned students"): LAPTOP-Diff one-shot pruning of the Animal-MNIST
# teacher at 25 % and 50 % of its parameters, normalised feature distillation (method kd), then the main job's
# DMD2 recipe (configs/dmd2_animal_mnist.yaml) from the retrained network; the full-size student by the same
# recipe from the teacher; MSD with 4 half-size students from the pruned one-step student. One thread per run, two
# at a time; the test split once per student, at the end of its fixed budget (nothing is picked).
#   sh scripts/prune_recipe.sh             (about 75 minutes on 2 cores)
# SD: the stepdistill command (default: stepdistill).
set -e
SD=${SD:-stepdistill}
R=runs/prune
T="train.threads=1"
mkdir -p $R
pipeline() {  # ratio name
  $SD prune --ratio $1 --out $R/pruned_$2 --report $R/prune_$2.json --threads 1 --no-progress > $R/prune_$2.log 2>&1
  $SD distill --config configs/kd_animal_mnist.yaml kd.student=$R/pruned_$2 output_dir=$R/kd_$2 $T > $R/kd_$2.log 2>&1
  $SD distill --config configs/dmd2_animal_mnist.yaml dmd.student_init=$R/kd_$2/student output_dir=$R/dmd2_$2 $T \
    > $R/dmd2_$2.log 2>&1
}
test_once() { $SD eval --model $R/$1 --num 500 --seed 0 --threads 1 --no-progress --out $R/eval_$2_test.json \
  > $R/eval_$2.log 2>&1; }
(pipeline 0.5 50; test_once dmd2_50/student dmd2_50
 $SD distill --config configs/msd_pruned_animal_mnist.yaml output_dir=$R/msd_pruned $T > $R/msd_pruned.log 2>&1
 test_once msd_pruned/student msd_pruned) &
(pipeline 0.25 25; test_once dmd2_25/student dmd2_25
 $SD distill --config configs/dmd2_animal_mnist.yaml output_dir=$R/dmd2_full $T > $R/dmd2_full.log 2>&1
 test_once dmd2_full/student dmd2_full) &
wait
for n in 25 50; do test_once kd_$n/student kd_$n; done  # the retrained many-step networks (50 DDIM steps, CFG 2)

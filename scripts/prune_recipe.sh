#!/bin/sh
# Smaller one-step students (BENCHMARKS.md "Smaller one-step students"): LAPTOP-Diff one-shot pruning of the
# Animal-MNIST teacher (--ratio 0.25 and 0.5 of its parameters), normalised feature distillation (method kd), then
# the main job's DMD2 recipe (configs/dmd2_animal_mnist.yaml) from the retrained network; the full-size student by
# the same recipe from the teacher; MSD with 4 half-size students from the pruned one-step student (with and without
# the regression term), and MSD with 4 fresh students of the same size from the paper's teacher score matching.
# One thread per run, at most three at a time. Variants are compared on the validation split (noise seed 1); the
# test split once per model, at the end of its fixed budget; then the latencies on a quiet machine, the JSON into
# docs/benchmarks/prune/ and the plot.
#   sh scripts/prune_recipe.sh             (about 100 minutes on 2 cores)
# SD: the stepdistill command (default: stepdistill).
# Since 2026-12-06 configs/dmd2_animal_mnist_full.yaml runs 2,000 steps with a fourth schedule entry (the DM term's
# teacher CFG 4 from step 1600), and builtin:animal_mnist_dmd2 is that file's seed-1 student: the numbers recorded
# came from the file at 1,600 steps (add train.max_steps=1600 and its first three schedule entries) and from the
# student shipped before (git show 0e16082:stepdistill/assets/animal_mnist_dmd2_student/...).
set -e
SD=${SD:-stepdistill}
R=runs/prune
D=docs/benchmarks/prune
T="train.threads=1"
mkdir -p $R $D
pipeline() {  # ratio name
  $SD prune --ratio $1 --out $R/pruned_$2 --report $R/prune_$2.json --threads 1 --no-progress > $R/prune_$2.log 2>&1
  $SD distill --config configs/kd_animal_mnist.yaml kd.student=$R/pruned_$2 output_dir=$R/kd_$2 $T > $R/kd_$2.log 2>&1
  $SD distill --config configs/dmd2_animal_mnist.yaml dmd.student_init=$R/kd_$2/student output_dir=$R/dmd2_$2 $T \
    > $R/dmd2_$2.log 2>&1
}
ev() { $SD eval --model $1 --num 500 --seed $3 --ref-split $4 --threads 1 --no-progress --out $R/eval_$2_$4.json \
  > $R/eval_$2_$4.log 2>&1; }
test_once() { ev $1 $2 0 test; }
val() { ev $1 $2 1 val; }
# the recipe's CFG 2 -> 3 after the warm-up, for the half-size student (compared with CFG 2 on validation)
CFG3='schedule=[{at: 300, set: {dmd.optim.lr: 2.0e-5, dmd.critic_optim.lr: 2.0e-5, train.batch_size: 16, train.ema_decay: 0.99, dmd.real_guidance_scale: 3.0}}, {at: 450, set: {dmd.regression_weight: 0.05}}]'
(pipeline 0.5 50; test_once $R/dmd2_50/student dmd2_50
 $SD distill --config configs/msd_pruned_animal_mnist.yaml dmd.regression_weight=0 output_dir=$R/msd_pruned $T \
   > $R/msd_pruned.log 2>&1
 test_once $R/msd_pruned/student msd_pruned
 $SD distill --config configs/dmd2_animal_mnist.yaml dmd.student_init=$R/kd_50/student output_dir=$R/dmd2_50_cfg3 \
   "$CFG3" $T > $R/dmd2_50_cfg3.log 2>&1) &
(pipeline 0.25 25; test_once $R/dmd2_25/student dmd2_25
 $SD distill --config configs/dmd2_animal_mnist.yaml output_dir=$R/dmd2_full $T > $R/dmd2_full.log 2>&1
 test_once $R/dmd2_full/student dmd2_full) &
($SD distill --config configs/msd_small_animal_mnist.yaml "msd.student_channels=[22,44,44]" msd.tsm_steps=1000 \
   msd.steps_per_student=150 train.max_steps=4600 train.batch_size=16 dmd.critic_updates=2 dmd.t_min=2.0 \
   train.ema_decay=0.99 data.split=fit train.sample_every=500 train.checkpoint_every=500 output_dir=$R/msd_tsm $T \
   > $R/msd_tsm.log 2>&1) &
wait
$SD distill --config configs/msd_pruned_animal_mnist.yaml output_dir=$R/msd_pruned_reg $T > $R/msd_pruned_reg.log 2>&1
# variants on validation: MSD with / without regression and the fresh + TSM students; the half-size student at CFG 2 / 3
for n in msd_pruned msd_pruned_reg msd_tsm dmd2_50 dmd2_50_cfg3; do val $R/$n/student $n; done
for n in msd_pruned_reg msd_tsm dmd2_50_cfg3; do test_once $R/$n/student $n; done
# the many-step networks: pruned in one shot, and after KD (50 DDIM steps, CFG 2)
for n in 25 50; do test_once $R/pruned_$n pruned_$n; test_once $R/kd_$n/student kd_$n; done
for n in dmd2_full dmd2_25 dmd2_50 dmd2_50_cfg3 msd_pruned_reg msd_tsm; do
  $SD bench --student $R/$n/student --teacher builtin:animal_mnist --batch-sizes 1,32 --teacher-steps 50 \
    --repeats 5 --threads 1 --out $D/bench_$n.json > $R/bench_$n.log 2>&1
done
cp $R/eval_*_test.json $R/eval_*_val.json $R/prune_25.json $R/prune_50.json $D/
python scripts/plot_pruned.py       # docs/pruned_quality_latency.png and the table rows
python scripts/time_forwards.py $R/dmd2_full/student $R/dmd2_25/student $R/dmd2_50/student > $D/forwards_interleaved.json
# The full recipe (configs/dmd2_animal_mnist_full.yaml, 1,600 steps) from the half-size KD network, picked on
# validation as the full-size recipe student was; then MSD students that continue its last phase from that pick,
# every critic from the same checkpoint (configs/msd_pruned_recipe_animal_mnist.yaml); the test split once each.
$SD distill --config configs/dmd2_animal_mnist_full.yaml dmd.student_init=$R/kd_50/student output_dir=$R/full_50 $T \
  > $R/full_50.log 2>&1
$SD curve --run $R/full_50 --ref-split val --seed 1 --min-step 800 --every 200 --acc-num 2000 --pick-acc 0.96 \
  --threads 1 --no-progress > $R/curve_full_50.log 2>&1
cp $R/full_50/curve/curve.json $D/curve_recipe_50_val.json
N=$(python -c "import json; print(json.load(open('$D/curve_recipe_50_val.json'))['pick']['step'])")
$SD export --config $R/full_50/config.yaml --checkpoint $R/full_50/checkpoints/step_$(printf %06d $N) \
  --out $R/full_50_pick > $R/full_50_pick.log 2>&1   # the MSD config's student_init / critic_init (step 1600 here)
ev $R/full_50_pick recipe_50 0 test
$SD distill --config configs/msd_pruned_recipe_animal_mnist.yaml $T > $R/msd_recipe_warm.log 2>&1
val $R/msd_recipe_warm/student msd_recipe_warm; test_once $R/msd_recipe_warm/student msd_recipe_warm
cp $R/eval_recipe_50_test.json $R/eval_msd_recipe_warm_*.json $D/
python scripts/plot_pruned.py
# Sixth session: a longer KD stage (2,000 steps; the step-2000 checkpoint of a run set to 3,000, the learning rate is
# constant) before the same full recipe, picked on validation (class accuracy 0.924 at the pick: not read on test)
$SD distill --config configs/kd_animal_mnist.yaml kd.student=$R/pruned_50 output_dir=$R/kd_50_long train.max_steps=3000 $T \
  > $R/kd_50_long.log 2>&1   # only its step-2000 checkpoint is used (the run here was stopped there)
$SD export --config $R/kd_50_long/config.yaml --checkpoint $R/kd_50_long/checkpoints/step_002000 --out $R/kd_50_2000
$SD distill --config configs/dmd2_animal_mnist_full.yaml dmd.student_init=$R/kd_50_2000 output_dir=$R/full_50_kd2000 $T \
  > $R/full_50_kd2000.log 2>&1
$SD curve --run $R/full_50_kd2000 --ref-split val --seed 1 --min-step 800 --every 200 --acc-num 2000 --pick-acc 0.96 \
  --threads 1 --no-progress > $R/curve_full_50_kd2000.log 2>&1
cp $R/full_50_kd2000/curve/curve.json $D/curve_recipe_50_kd2000_val.json
# the two KD networks as many-step models on validation (50 DDIM steps, CFG 2)
$SD export --config $R/kd_50_long/config.yaml --checkpoint $R/kd_50_long/checkpoints/step_001000 --out $R/kd_50_1000
for n in 1000 2000; do
  $SD eval --model $R/kd_50_$n --num 500 --seed 1 --ref-split val --threads 1 --no-progress --out $D/eval_kd_50_${n}_val.json
done
# Seventh session: prune the shipped one-step student itself (calibrated at its own input, pure noise at t = 999),
# retrain the half-size network on that student's map (output + normalised feature KD, no real-data term,
# configs/kd_student_animal_mnist.yaml), then the same full recipe from KD step 1000 (the teacher route's KD length).
# Rules written before scoring: docs/benchmarks/prune/rule_student_route.txt.
$SD prune --model builtin:animal_mnist_dmd2 --out $R/student_50 --ratio 0.5 --threads 1 --no-progress \
  --report $D/prune_student_50.json
$SD eval --model $R/student_50 --num 500 --seed 1 --ref-split val --threads 1 --no-progress \
  --out $D/eval_student_50_oneshot_val.json
$SD distill --config configs/kd_student_animal_mnist.yaml kd.student=$R/student_50 output_dir=$R/kd_student_50 \
  train.max_steps=2000 $T > $R/kd_student_50.log 2>&1
$SD curve --run $R/kd_student_50 --ref-split val --seed 1 --min-step 500 --every 500 --acc-num 2000 --pick-acc 0.95 \
  --threads 1 --no-progress --out $R/curve_kd_student_val > /dev/null   # KD alone: pick 103.8 / 0.764, not tested
cp $R/curve_kd_student_val/curve.json $D/curve_kd_student_val.json
$SD export --config $R/kd_student_50/config.yaml --checkpoint $R/kd_student_50/checkpoints/step_001000 \
  --out $R/kd_student_50_step1000
$SD distill --config configs/dmd2_animal_mnist_full.yaml train.seed=0 dmd.student_init=$R/kd_student_50_step1000 \
  output_dir=$R/recipe_from_kdstudent $T > $R/recipe_from_kdstudent.log 2>&1
$SD curve --run $R/recipe_from_kdstudent --ref-split val --seed 1 --min-step 800 --every 200 --acc-num 2000 \
  --pick-acc 0.96 --threads 1 --no-progress --out $R/curve_recipe_from_kdstudent_val > /dev/null   # pick: 1600
cp $R/curve_recipe_from_kdstudent_val/curve.json $D/curve_recipe_from_kdstudent_val.json
$SD eval --model $R/recipe_from_kdstudent/student --num 500 --seed 0 --ref-split test --threads 1 --no-progress \
  --out $D/eval_recipe_from_kdstudent_test.json   # the test split once
$SD bench --student $R/recipe_from_kdstudent/student --batch-sizes 1,32 --repeats 5 --threads 1 --no-progress \
  > $D/bench_recipe_from_kdstudent.json
python scripts/plot_pruned.py

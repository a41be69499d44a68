#!/bin/sh
# Every one-step objective on equal terms (BENCHMARKS.md): from the teacher, 400 generator steps at batch 16,
# seed 0, one thread each, two at a time; validation curves every 100 steps; the test split once, at step 400.
#   sh scripts/compare_objectives.sh        (about 80 minutes on 2 cores)
set -e
C="train.threads=1 train.checkpoint_every=100 train.sample_every=100"
run() { name=$1; shift; stepdistill distill "$@" output_dir=runs/compare/$name $C > runs/compare/$name.log 2>&1; }
mkdir -p runs/compare
(run dmd2 --config configs/onestep_compare.yaml
 run fdistill_js --config configs/onestep_compare.yaml dmd.divergence=js
 run sid --config configs/sid_animal_mnist.yaml
 run boot --config configs/boot_animal_mnist.yaml) &
(run dmd2_reg --config configs/onestep_compare.yaml dmd.regression_weight=0.25
 run fdistill_fkl --config configs/onestep_compare.yaml dmd.divergence=forward_kl
 run uni_instruct --config configs/uni_instruct_animal_mnist.yaml
 run rcm --config configs/rcm_animal_mnist.yaml data.split=fit train.batch_size=16 train.max_steps=400 train.ema_decay=0.95) &
wait
curve() { stepdistill curve --run runs/compare/$1 --ref-split val --seed 1 --every 100 --threads 1 \
  --out runs/compare/$1/curve_val --no-progress > runs/compare/$1.curve.log 2>&1; }
test_once() { stepdistill eval --model runs/compare/$1/student --num 500 --seed 0 --threads 1 --no-progress \
  --out runs/compare/eval_$1_test.json > runs/compare/$1.test.log 2>&1; }
(for n in dmd2 fdistill_js sid boot; do curve $n; test_once $n; done) &
(for n in dmd2_reg fdistill_fkl uni_instruct rcm; do curve $n; test_once $n; done) &
wait
python -m stepdistill.eval.mode_coverage --steps 1500 --seeds 0 1 2 --out runs/compare/mode_coverage.json
for n in dmd2 dmd2_reg fdistill_js fdistill_fkl rcm sid uni_instruct boot; do
  cp runs/compare/$n/curve_val/curve.json docs/benchmarks/curves/curve_equal_terms_${n}_val.json
  cp runs/compare/eval_${n}_test.json docs/benchmarks/eval_equal_terms_${n}_test.json
done
python scripts/plot_objectives.py      # docs/objectives_equal_terms.png

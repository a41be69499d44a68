#!/bin/sh
# Trainer numerics before and after a refactor: three steps of every distill method, from this checkout and from
# REV (a temporary git worktree), on the shipped Animal-MNIST teacher; every weight of the step-3 checkpoints must
# be identical.  Usage: scripts/check_bitexact.sh REV   (about 5 minutes on 2 CPU cores)
set -e
REV=${1:?usage: scripts/check_bitexact.sh REV}
ROOT=$(git rev-parse --show-toplevel)
TMP=$(mktemp -d)
git -C "$ROOT" worktree add -f "$TMP/old" "$REV" -q
trap 'git -C "$ROOT" worktree remove --force "$TMP/old"; rm -rf "$TMP"' EXIT
BASE="train.batch_size=4 train.max_steps=3 train.checkpoint_every=3 train.sample_every=3 train.threads=1 dmd.critic_updates=1"
# the command's entry point at REV (before the front ends moved into stepdistill/frontends/ it was stepdistill.cli)
OLD_MAIN='import sys
try:
    from stepdistill.frontends.cli import main
except ImportError:
    from stepdistill.cli import main
sys.exit(main(sys.argv[1:]))'
run() {
  name=$1; shift
  (cd "$ROOT" && python -m stepdistill \
     distill --config "" output_dir="$TMP/new_$name" $BASE "$@" > "$TMP/new_$name.log" 2>&1)
  (cd "$TMP/old" && PYTHONPATH="$TMP/old" python -c "$OLD_MAIN" \
     distill --config "" output_dir="$TMP/old_$name" $BASE "$@" > "$TMP/old_$name.log" 2>&1)
  python - "$TMP" "$name" <<'PY'
import sys
import torch
from safetensors.torch import load_file
tmp, n = sys.argv[1:]
a = load_file(f"{tmp}/new_{n}/checkpoints/step_000003/models.safetensors")
b = load_file(f"{tmp}/old_{n}/checkpoints/step_000003/models.safetensors")
same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
print(f"{n}: {len(a)} tensors, {'identical' if same else 'DIFFERENT'}")
sys.exit(0 if same else 1)
PY
}
run dmd2 method=dmd2 dmd.pixel_gan_g_weight=0.3 dmd.pixel_gan_lr=5e-4 dmd.regression_weight=0.25 dmd.regression_pairs=8 \
  dmd.regression_steps=2 dmd.regression_warmup_steps=1 "schedule=[{at: 2, set: {dmd.regression_weight: 0.05}}]"
run fdistill_js method=dmd2 dmd.divergence=js
run decoupled method=dmd2 dmd.decoupled=true
run rcm method=rcm dmd.gan=false rcm.tangent_warmup_steps=1
run phased method=phased_dmd "phased.boundaries=[999,500,0]" "dmd.student_timesteps=[999,500]" train.max_steps=4 \
  "phased.steps_per_phase=[2,2]"
run msd method=msd msd.num_students=2 msd.schedule=all train.max_steps=4

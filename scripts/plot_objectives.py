"""docs/objectives_vs_budget.png: FID and recall against training budget for the objectives compared in
BENCHMARKS.md "One comparison" (reads docs/benchmarks/curves/*.json; fork rows add the shared prefix)."""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

C = Path("docs/benchmarks/curves")
PREFIX_STEP, PREFIX_PASSES = 1400, 147200   # runs/long1 step 1,400: the one-step fork point


def points(name, fork=False, lo=0, hi=10**9):
    d = json.loads((C / name).read_text())
    ppg, B = d.get("passes_per_generator_step"), d.get("batch_size")
    out = []
    for p in d["points"]:
        if lo <= p["step"] <= hi:
            passes = PREFIX_PASSES + (p["step"] - PREFIX_STEP) * B * ppg if fork else p["sample_passes"]
            out.append((passes / 1e6, p["fid"], p["recall"]))
    return out


rows = [("1 step: regression, then DMD2 (reverse KL)", points("curve_1step_long_regression.json", hi=1700), "C0", "-"),
        ("1 step: f-distill forward KL", points("curve_1step_fdistill_fkl.json"), "C1", "-"),
        ("1 step: f-distill JS", points("curve_1step_fdistill_js.json"), "C2", "-"),
        ("1 step: rCM from the fork", points("curve_1step_rcm_from_regression.json", fork=True), "C3", "-"),
        ("4 steps: DMD2", points("curve_dmd2_4step.json"), "C0", "--"),
        ("4 steps: rCM", points("curve_4step_rcm.json"), "C3", "--")]
fig, ax = plt.subplots(1, 2, figsize=(11, 4))
for label, pts, color, ls in rows:
    x, f, r = zip(*pts)
    ax[0].plot(x, f, ls, color=color, marker="o", label=label)
    ax[1].plot(x, r, ls, color=color, marker="o", label=label)
for a, teacher, name in ((ax[0], 70.0, "FID (lower is better)"), (ax[1], 0.533, "recall")):
    a.axhline(teacher, color="k", lw=0.8, ls=":", label="teacher, 50 steps CFG 2")
    a.set_xlabel("training budget (M forward passes per sample)")
    a.set_title(name)
ax[0].legend(fontsize=7)
fig.tight_layout()
fig.savefig("docs/objectives_vs_budget.png", dpi=110)
print("wrote docs/objectives_vs_budget.png")

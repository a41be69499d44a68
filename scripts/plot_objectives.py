"""FID and recall against training budget (reads docs/benchmarks/curves/*.json):

* docs/objectives_vs_budget.png: the objectives of BENCHMARKS.md "One comparison" (fork rows add the shared prefix);
* docs/objectives_equal_terms.png: every one-step objective of "Every one-step objective on equal terms"
  (validation curves written by scripts/compare_objectives.sh), when those curves are there."""
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


def figure(rows, out, teacher_recall=0.533, fid_title="FID (lower is better)", recall_title="recall"):
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for label, pts, color, ls in rows:
        x, f, r = zip(*pts)
        ax[0].plot(x, f, ls, color=color, marker="o", label=label)
        ax[1].plot(x, r, ls, color=color, marker="o", label=label)
    for a, teacher, name in ((ax[0], 70.0, fid_title), (ax[1], teacher_recall, recall_title)):
        a.axhline(teacher, color="k", lw=0.8, ls=":", label="teacher, 50 steps CFG 2")
        a.set_xlabel("training budget (M forward passes per sample)")
        a.set_title(name)
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


figure(rows, "docs/objectives_vs_budget.png")
EQUAL = [("dmd2", "DMD2 (GAN)"), ("dmd2_reg", "DMD2 + regression (ODE pairs)"), ("fdistill_js", "f-distill JS"),
         ("fdistill_fkl", "f-distill forward KL"), ("rcm", "rCM"), ("sid", "SiD (data-free)"),
         ("uni_instruct", "Uni-Instruct JS"), ("boot", "BOOT (data-free)")]
eq = [(label, points(f"curve_equal_terms_{n}_val.json"), f"C{i}", "--" if n in ("sid", "boot") else "-")
      for i, (n, label) in enumerate(EQUAL) if (C / f"curve_equal_terms_{n}_val.json").exists()]
if eq:
    figure(eq, "docs/objectives_equal_terms.png", teacher_recall=0.548, fid_title="validation FID (lower is better)",
           recall_title="validation recall")

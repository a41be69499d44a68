"""docs/objectives_equal_terms.png: validation FID and recall against training budget (forward passes per sample)
for every one-step objective of BENCHMARKS.md "Every one-step objective on equal terms" (reads
docs/benchmarks/curves/curve_equal_terms_*_val.json, written by scripts/compare_objectives.sh)."""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

C = Path("docs/benchmarks/curves")
ROWS = [("dmd2", "DMD2 (GAN)"), ("dmd2_reg", "DMD2 + regression (ODE pairs)"), ("fdistill_js", "f-distill JS"),
        ("fdistill_fkl", "f-distill forward KL"), ("rcm", "rCM"), ("sid", "SiD (data-free)"),
        ("uni_instruct", "Uni-Instruct JS"), ("boot", "BOOT (data-free)")]
fig, ax = plt.subplots(1, 2, figsize=(11, 4))
for i, (name, label) in enumerate(ROWS):
    f = C / f"curve_equal_terms_{name}_val.json"
    if not f.exists():
        continue
    pts = json.loads(f.read_text())["points"]
    x = [p["sample_passes"] / 1e6 for p in pts]
    ls = "--" if name in ("sid", "boot") else "-"
    ax[0].plot(x, [p["fid"] for p in pts], ls, color=f"C{i}", marker="o", label=label)
    ax[1].plot(x, [p["recall"] for p in pts], ls, color=f"C{i}", marker="o", label=label)
for a, teacher, name in ((ax[0], 70.0, "validation FID (lower is better)"), (ax[1], 0.548, "validation recall")):
    a.axhline(teacher, color="k", lw=0.8, ls=":", label="teacher, 50 steps CFG 2")
    a.set_xlabel("training budget (M forward passes per sample)")
    a.set_title(name)
ax[0].legend(fontsize=7)
fig.tight_layout()
fig.savefig("docs/objectives_equal_terms.png", dpi=110)
print("wrote docs/objectives_equal_terms.png")

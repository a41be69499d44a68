"""Quality against latency of the one-step students (BENCHMARKS.md "Smaller one-step students"): the full-size
student, the pruned ones (25 % and 50 % of the parameters asked, 31 % and 50 % removed), MSD's 4 half-size
students; squares: the full 1,600-step recipe's students (configs/dmd2_animal_mnist_full.yaml), one of them from
the pruned one-step student (configs/kd_student_animal_mnist.yaml); the teacher's FID
(50 DDIM steps, CFG 2) as a reference line. Reads docs/benchmarks/prune/eval_*_test.json
and bench_*.json, writes docs/pruned_quality_latency.png and prints the BENCHMARKS.md table rows.

    python scripts/plot_pruned.py
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
B = ROOT / "docs" / "benchmarks" / "prune"
ROWS = [("dmd2_full", "full size (DMD2 recipe)"), ("dmd2_25", "pruned + KD + DMD2"),
        ("dmd2_50", "pruned + KD + DMD2"), ("msd_pruned_reg", "MSD x4 from the pruned student"),
        ("msd_tsm", "MSD x4, fresh + TSM"),
        ("recipe_full", "full size, full recipe"), ("recipe_50", "pruned 50 % + KD, full recipe"),
        ("msd_recipe_warm", "MSD x4 from it, warm critics"),
        ("recipe_from_kdstudent", "pruned one-step student + KD, full recipe")]
TABLE = ROWS[:3] + [("dmd2_50_cfg3", "pruned + KD + DMD2, CFG 3"), ("msd_pruned", "MSD x4 from the pruned student, "
                                                                              "no regression")] + ROWS[3:] + \
    [("msd_recipe", "MSD x4 from it, fresh critics")]
#: the full recipe's students (configs/dmd2_animal_mnist_full.yaml, 1,600 steps) have the networks of the main
#: recipe's: their latency is that network's bench; the full-size student's test JSON is the recipe section's
SAME_NETWORK = {"recipe_full": "dmd2_full", "recipe_50": "dmd2_50", "msd_recipe_warm": "msd_pruned_reg",
                "msd_recipe": "msd_pruned_reg", "recipe_from_kdstudent": "dmd2_50"}
#: drawn as squares: the students of the full recipe (recipe_from_kdstudent prunes the shipped one-step student
#: itself, KD of its map, then the same recipe: recipe_50's network, so its latency is that bench's; its own bench,
#: bench_recipe_from_kdstudent.json, ran on a machine twice as slow that day, the teacher too)
FULL_RECIPE = set(SAME_NETWORK)
EVAL = {"recipe_full": ROOT / "docs" / "benchmarks" / "eval_recipe1600_seed0_step1600_test.json"}


def files(name: str) -> tuple[Path, Path]:
    """(test-split eval JSON, bench JSON) of a row."""
    return EVAL.get(name, B / f"eval_{name}_test.json"), B / f"bench_{SAME_NETWORK.get(name, name)}.json"


YMAX = 120


def latency_ms(bench: dict, batch: int, who: str = "student") -> float:
    row = next(r for r in bench["results"] if r["batch_size"] == batch)
    entry = row[who][0] if who == "student" else row[who]
    return 1e3 * entry["latency_s"]


def main() -> None:
    teacher = json.loads((ROOT / "docs" / "benchmarks" / "eval_teacher50.json").read_text())
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, batch in zip(axes, (1, 32)):
        drawn = []
        for name, label in ROWS:
            ev, be = files(name)
            if not (ev.exists() and be.exists()):
                continue
            e, b = json.loads(ev.read_text()), json.loads(be.read_text())
            x, y = latency_ms(b, batch), e["fid"]
            if y > YMAX:  # off the chart (a collapsed student): named at the top edge
                ax.annotate(f"{label}: FID {y:.0f} (off the chart)", (x, YMAX), fontsize=6, xytext=(0, -10),
                            textcoords="offset points", ha="center")
                continue
            ax.scatter([x], [y], s=40, marker="s" if name in FULL_RECIPE else "o")
            share = b["config"]["student_params"] / b["config"]["teacher_params"]
            k = sum(abs(x - px) < 1e-9 for px in drawn)   # students of one network share x: labels stacked
            drawn.append(x)
            ax.annotate(f"{label}\n{share:.0%} of the teacher's params", (x, y), fontsize=6,
                        xytext=(4, 4 - 18 * k), textcoords="offset points")
        ax.set_ylim(50, YMAX)
        ax.axhline(teacher["fid"], color="k", ls="--", lw=1, label=f"teacher, 50 steps (FID {teacher['fid']:.1f})")
        full = B / "bench_dmd2_full.json"
        if full.exists():
            t_ms = latency_ms(json.loads(full.read_text()), batch, "teacher")
            ax.set_title(f"batch {batch} (the teacher's 50 steps: {t_ms:.0f} ms)", fontsize=9)
        ax.set_xlabel("one-step pipeline latency (ms, CPU, 1 thread; +-20 %)")
        ax.set_ylabel("FID (500 samples, test split)")
        ax.legend(fontsize=7, loc="center right")
    fig.suptitle("Smaller one-step students: quality against latency", fontsize=10)
    fig.tight_layout()
    out = ROOT / "docs" / "pruned_quality_latency.png"
    fig.savefig(out, dpi=120)
    print(out)


def table() -> None:
    """The BENCHMARKS.md rows: parameters (per student), latency at batch 1 / 32, test metrics."""
    for name, label in TABLE:
        ev, be = files(name)
        if not ev.exists():
            continue
        e = json.loads(ev.read_text())
        lat = "-"
        params = ""
        if be.exists():
            b = json.loads(be.read_text())
            lat = f"{latency_ms(b, 1):.1f} / {latency_ms(b, 32):.1f}"
            params = f"{b['config']['student_params']:,} ({b['config']['student_params'] / b['config']['teacher_params']:.0%})"
        print(f"| {label} (`{name}`) | {params} | {lat} | {e['fid']:.1f} | {e['precision']:.3f} | {e['recall']:.3f} | "
              f"{e['min_class_recall']:.2f} | {e['class_accuracy']:.3f} | {e['diversity']:.3f} |")


if __name__ == "__main__":
    main()
    table()

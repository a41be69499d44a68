"""``stepdistill bench``: latency, throughput, speed-up and peak memory of teacher vs student.

For every batch size ``b`` :func:`benchmark` times, through the diffusers pipelines' ``__call__``
(``output_type="pt"``: noise draw + sampling loop, no PIL conversion):

* the teacher at ``teacher_steps`` with classifier-free guidance (NFE per sample =
  ``2 * steps`` with CFG, ``steps`` without; CFG runs as one batched forward of 2b images);
* the student at each of ``student_steps`` (NFE per sample = steps);
* one bare forward of the student network (``unet(x, t, class_labels)``, through
  ``Denoiser._call`` so every backbone kind is called correctly) at batch ``b``.

Reported per configuration: median latency over ``repeats`` timed runs after ``warmup`` untimed
runs (``latencies_s`` lists every timed run), latency per image, throughput (images/s),
``speedup`` = teacher latency / student latency (same batch size), and
``pipeline_overhead`` = one-step student pipeline latency / bare network forward (1.0 is the
floor: everything above it is noise drawing, timestep/label handling and the prediction -> x0
conversion; it can read slightly below 1.0 from timing noise).

Peak memory: the warm-up run's peak increase, measured by :class:`stepdistill.meter.PeakMemory` (on CUDA the
allocator's peak minus what was allocated before, weights excluded; on CPU the sampled resident set);
``memory_method`` in the output says which.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from ..config import ConfigError
from ..meter import PeakMemory, memory_method


# -- machine info ---------------------------------------------------------------------------------

def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    else:
        info["device_name"] = info["cpu"]
    return info


# -- timing ---------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device: torch.device, repeats: int, warmup: int = 1) -> dict:
    """Run ``fn`` ``warmup`` times (the first one under the memory probe), then time ``repeats`` runs."""
    peak = None
    for w in range(max(warmup, 1)):
        if w == 0:
            with PeakMemory(device) as pm:
                fn()
            peak = pm.peak_delta
        else:
            fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"latency_s": statistics.median(times), "latencies_s": times, "peak_memory_bytes": peak}


def parse_int_list(text: str | list | None, what: str) -> list[int] | None:
    """``"1,8,32"`` -> [1, 8, 32]; also ``"1..4"`` -> [1, 2, 3, 4]."""
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        return [int(v) for v in text]
    out: list[int] = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                continue
            if ".." in part:
                a, b = part.split("..", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError as e:
        raise ConfigError(f"{what}: expected a comma-separated list of integers (or A..B), got {text!r}") from e
    if not out:
        raise ConfigError(f"{what}: empty list")
    return out


# -- benchmark ------------------------------------------------------------------------------------

def _labels(model, b: int) -> list[int] | None:
    return model.default_labels(b).tolist() if model.num_classes else None


def _rates(r: dict, b: int, teacher: dict | None = None) -> dict:
    """Per-image latency and throughput of a timing ``r`` at batch ``b`` (+ the speed-up over the ``teacher`` timing)."""
    out = {"latency_per_image_s": r["latency_s"] / b, "throughput_img_s": b / r["latency_s"]}
    if teacher is not None:
        out["speedup"] = teacher["latency_s"] / r["latency_s"]
    return out


def benchmark(teacher: str | None, student: str, batch_sizes=(1, 8, 32), teacher_steps: int = 50,
              student_steps=None, repeats: int = 3, warmup: int = 1, guidance_scale: float = 2.0,
              sampler: str = "ddim", device: str | torch.device | None = None, seed: int = 0,
              allow_pickle: bool = False, progress: bool = True, hybrid_steps: int = 0,
              hybrid_substeps: int = 1, hybrid_handoff: str = "renoise", variants=None, onnx: bool = False,
              attention: str = "sdpa") -> dict:
    """Benchmark a teacher folder against a student folder; returns a JSON-serialisable dict.

    ``hybrid_steps > 0`` also times hybrid sampling at the student's K steps: the teacher (CFG
    ``guidance_scale``) takes the first ``hybrid_steps`` steps (:mod:`stepdistill.eval.hybrid`); its
    NFE per sample counts the teacher's calls including both CFG halves.

    ``variants`` (names of :mod:`stepdistill.eval.variants`: channels_last, bf16, fp16, math_attention,
    compile) time the fewest-step student with each opt-in change and compare its images with the eager
    fp32 ones; ``onnx`` also times the student exported as one ONNX graph under onnxruntime. ``attention``:
    the attention backend of every network of both pipelines (:mod:`stepdistill.attention`: sdpa | math |
    xformers), recorded with the number of layers switched.

    ``student_steps`` defaults to 1..K (K = number of trained student timesteps). See the module
    docstring for what each number means. ``teacher=None``: the teacher recorded in the student's
    ``stepdistill.json`` (``extra.teacher``).
    """
    from tqdm.auto import tqdm

    from .report import load_student_and_teacher

    batch_sizes = parse_int_list(batch_sizes, "--batch-sizes")
    if any(b < 1 for b in batch_sizes):
        raise ConfigError(f"--batch-sizes must be >= 1, got {batch_sizes}")
    if repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {repeats}")
    if teacher_steps < 1:
        raise ConfigError(f"--teacher-steps must be >= 1, got {teacher_steps}")
    s, t = load_student_and_teacher(student, teacher, device=device, allow_pickle=allow_pickle, sampler=sampler)
    from ..attention import set_attention

    switched = sum(set_attention(m, attention, "--attention") for p in (s.pipe, t.pipe)
                   for m in p.components.values() if isinstance(m, torch.nn.Module))
    k = s.max_steps
    k0 = s.min_steps  # 1, or K for phased students (one step per expert)
    student_steps = parse_int_list(student_steps, "--student-steps") or list(range(k0, k + 1))
    bad = [n for n in student_steps if not k0 <= n <= k]
    if bad:
        raise ConfigError(f"--student-steps must lie in 1..{k} for this student, got {bad}")
    dev = s.device
    cfg_on = t.uses_cfg(guidance_scale)
    gs = guidance_scale if cfg_on else 1.0
    t_nfe = t.nfe_per_sample(teacher_steps, guidance_scale)
    hyb = None
    if hybrid_steps:
        from .hybrid import Hybrid

        hyb = Hybrid(t, hybrid_steps, hybrid_substeps, guidance_scale, hybrid_handoff)
        hyb.check(s, k)

    from .variants import VARIANTS

    variants = [v.strip() for v in (variants.split(",") if isinstance(variants, str) else variants or []) if v.strip()]
    if any(v not in VARIANTS for v in variants):
        raise ConfigError(f"--variants: unknown {sorted(set(variants) - set(VARIANTS))}; known: {', '.join(VARIANTS)}")
    ort = _OnnxStudent(student, k0, allow_pickle) if onnx else None
    results = []
    jobs = len(batch_sizes) * (2 + len(student_steps) + (hyb is not None) + len(variants) + bool(ort) + cfg_on)
    bar = tqdm(total=jobs, desc="bench", disable=not progress, leave=False)
    for b in batch_sizes:
        tl, sl = _labels(t, b), _labels(s, b)

        def teacher_call():
            t.pipe(class_labels=tl, batch_size=b, num_inference_steps=teacher_steps, guidance_scale=gs,
                   sampler=sampler, seed=seed, output_type="pt")

        tr = time_fn(teacher_call, dev, repeats, warmup)
        bar.update()
        teacher_row = {"steps": teacher_steps, "guidance_scale": gs, "cfg": cfg_on, "nfe_per_sample": t_nfe, **tr,
                       **_rates(tr, b)}
        rows = []
        for n in student_steps:
            def student_call(n=n):
                s.pipe(class_labels=sl, batch_size=b, num_inference_steps=n, seed=seed, output_type="pt")

            sr = time_fn(student_call, dev, repeats, warmup)
            bar.update()
            rows.append({"steps": n, "nfe_per_sample": s.nfe_per_sample(n), **sr, **_rates(sr, b, tr)})
        hybrid_row = None
        if hyb is not None:
            y_h = torch.tensor(sl, dtype=torch.long) if sl is not None else None

            def hybrid_call():
                s.pipe(class_labels=sl, batch_size=b, num_inference_steps=k, seed=seed, output_type="pt",
                       **hyb.pipe_kwargs(s, y_h, k))

            hr = time_fn(hybrid_call, dev, repeats, warmup)
            bar.update()
            hybrid_row = {**hyb.describe(k), "student_steps": k, "nfe_per_sample": hyb.nfe(k), **hr,
                          **_rates(hr, b, tr)}
        x = torch.randn(b, *s.image_shape, generator=torch.Generator().manual_seed(seed)).to(dev)
        tt = torch.full((b,), float(s.meta.student_timesteps[0]), device=dev)
        y = torch.tensor(sl, dtype=torch.long, device=dev) if sl is not None else None
        den = s.pipe.denoisers()[0]  # the first network of the chain

        @torch.no_grad()
        def bare_forward():  # one network evaluation (Denoiser._call: the backbone's own call convention)
            return den._call(x, tt, y)

        fr = time_fn(bare_forward, dev, repeats, warmup)
        bar.update()
        one = next((r for r in rows if r["steps"] == k0), None)
        if one is None:  # fewest steps not benchmarked: time it now for the overhead ratio
            one = time_fn(lambda: s.pipe(class_labels=sl, batch_size=b, num_inference_steps=k0, seed=seed,
                                         output_type="pt"), dev, repeats, warmup)
        # honest speed-ups: NFE ratio vs wall clock, the teacher with batched and with sequential CFG, and the
        # ceiling the bare forward times allow (teacher steps x one CFG forward / the student's forwards)
        seq = fr2 = None
        if cfg_on:
            tden = t.pipe.denoiser()
            tden.batched_cfg = False
            try:
                seq = time_fn(teacher_call, dev, repeats, warmup)
            finally:
                tden.batched_cfg = True
            bar.update()
            x2, tt2 = torch.cat([x, x]), torch.cat([tt, tt])
            y2 = torch.cat([y, y]) if y is not None else None
            fr2 = time_fn(torch.no_grad()(lambda: den._call(x2, tt2, y2)), dev, repeats, warmup)
        t_forward = fr2["latency_s"] if cfg_on else fr["latency_s"]
        speedup = {
            "nfe_ratio": t_nfe / s.nfe_per_sample(k0),
            "wall_clock": tr["latency_s"] / one["latency_s"],
            "ceiling_from_bare_forwards": teacher_steps * t_forward / (k0 * fr["latency_s"]),
            **({"wall_clock_sequential_cfg_teacher": seq["latency_s"] / one["latency_s"]} if seq else {}),
        }
        row = {
            "batch_size": b, "teacher": teacher_row, "student": rows,
            **({"hybrid": hybrid_row} if hybrid_row is not None else {}),
            **({"teacher_sequential_cfg": {**seq, **_rates(seq, b)}} if seq else {}),
            "bare_forward": {**fr, "nfe_per_sample": 1},
            **({"bare_forward_2b": {**fr2, "nfe_per_sample": 1, "batch": 2 * b}} if fr2 else {}),
            # fewest-step pipeline time / the network evaluations it must make (k0 bare forwards)
            "pipeline_overhead": one["latency_s"] / (k0 * fr["latency_s"]),
            "speedup": speedup,
        }
        if variants or ort:
            def fewest():
                return s.pipe(class_labels=sl, batch_size=b, num_inference_steps=k0, seed=seed,
                              output_type="pt").images
            ref = fewest()
            if variants:
                row["variants"] = _time_variants(s, variants, fewest, ref, one, dev, repeats, warmup, bar)
            if ort:
                row["onnxruntime"] = ort.time(b, sl, seed, ref, one, dev, repeats, warmup)
                bar.update()
        results.append(row)
    bar.close()

    return {
        "machine": machine_info(dev),
        "config": {"teacher": t.path, "student": str(student), "batch_sizes": batch_sizes,
                   "teacher_steps": teacher_steps, "teacher_sampler": sampler, "guidance_scale": guidance_scale,
                   "student_steps": student_steps, "student_max_steps": k, "repeats": repeats, "warmup": warmup,
                   "hybrid_steps": hybrid_steps, "hybrid_substeps": hybrid_substeps, "hybrid_handoff": hybrid_handoff,
                   "variants": variants, "onnx": bool(onnx), "attention": attention,
                   "attention_layers_switched": switched,
                   "seed": seed, "image_shape": list(s.image_shape), "dtype": str(s.network.dtype).replace("torch.", ""),
                   "teacher_params": t.num_params(), "student_params": s.num_params()},
        "memory_method": memory_method(dev),
        "timing": ("median wall time of the pipeline __call__ (noise + sampling, output_type='pt') over "
                   f"{repeats} runs after {warmup} warm-up run(s); peak memory measured during the first warm-up run"),
        "nfe": ("network evaluations per sample: teacher steps x 2 with CFG (steps without), student steps; "
                "hybrid: teacher steps x sub-steps x 2 with CFG + the student's remaining steps"),
        "results": results,
    }


def _time_variants(s, variants, fewest, ref, one, dev, repeats, warmup, bar) -> list[dict]:
    """Each opt-in variant of the fewest-step student: latency, speed-up over eager fp32, image difference."""
    from .variants import applied, image_difference, unavailable

    out = []
    for name in variants:
        why = ("the student has several networks (one per phase or class group)" if len(s.pipe.denoisers()) > 1
               else unavailable(name, s.pipe))
        if why:
            out.append({"variant": name, "skipped": why})
        else:
            with applied(name, s.pipe):
                img = fewest()  # for compile: the call that compiles
                r = time_fn(fewest, dev, repeats, warmup)
            out.append({"variant": name, **r, "speedup_vs_eager": one["latency_s"] / r["latency_s"],
                        **image_difference(img, ref)})
        bar.update()
    return out


class _OnnxStudent:
    """The student exported once to a temporary ONNX file, timed under onnxruntime against the pipeline."""

    def __init__(self, student: str, steps: int, allow_pickle: bool):
        import tempfile

        from ..onnx_export import export_onnx, onnx_session

        self.dir = tempfile.TemporaryDirectory(prefix="stepdistill_onnx_")
        path = Path(self.dir.name) / "student.onnx"
        self.info = export_onnx(student, path, steps=steps, allow_pickle=allow_pickle)
        self.session = onnx_session(path, threads=torch.get_num_threads())

    def time(self, b: int, labels, seed: int, ref: torch.Tensor, one: dict, dev, repeats: int, warmup: int) -> dict:
        from ..onnx_export import onnx_inputs
        from .variants import image_difference

        shape, ts = self.info["sample_shape"], self.info["student_timesteps"]
        g = torch.Generator().manual_seed(seed)  # the pipeline's draws: x_{t_0}, then one per re-noising
        noise = torch.randn(b, *shape, generator=g)
        steps = torch.stack([torch.randn(b, *shape, generator=g) for _ in ts[1:]]) if len(ts) > 1 else None
        cond = torch.tensor(labels, dtype=torch.long) if labels is not None else None
        feeds = onnx_inputs(self.info, noise, cond, steps)
        img = torch.from_numpy(self.session.run(None, feeds)[0])
        r = time_fn(lambda: self.session.run(None, feeds), torch.device("cpu"), repeats, warmup)
        return {**r, "speedup_vs_pytorch": one["latency_s"] / r["latency_s"], **image_difference(img, ref.cpu()),
                "note": "onnxruntime CPUExecutionProvider; noise fed in (the pipeline draws it inside its time)"}


def summary_lines(report: dict) -> list[str]:
    """A short human-readable table of a :func:`benchmark` result."""
    lines = [f"{'batch':>5} {'model':>12} {'NFE':>5} {'latency ms':>11} {'img/s':>9} {'speed-up':>9} {'peak MiB':>9}"]
    for r in report["results"]:
        t = r["teacher"]
        mem = (t["peak_memory_bytes"] or 0) / 2**20
        lines.append(f"{r['batch_size']:>5} {'teacher':>12} {t['nfe_per_sample']:>5} {t['latency_s'] * 1e3:>11.2f} "
                     f"{t['throughput_img_s']:>9.1f} {'1.0':>9} {mem:>9.1f}")
        for s in r["student"]:
            mem = (s["peak_memory_bytes"] or 0) / 2**20
            lines.append(f"{r['batch_size']:>5} {'student ' + str(s['steps']) + 'st':>12} {s['nfe_per_sample']:>5} "
                         f"{s['latency_s'] * 1e3:>11.2f} {s['throughput_img_s']:>9.1f} {s['speedup']:>9.1f} {mem:>9.1f}")
        if r.get("hybrid"):
            h = r["hybrid"]
            mem = (h["peak_memory_bytes"] or 0) / 2**20
            name = f"hybrid {h['steps']}T+{h['student_steps'] - h['steps']}S"
            lines.append(f"{r['batch_size']:>5} {name:>12} {h['nfe_per_sample']:>5} {h['latency_s'] * 1e3:>11.2f} "
                         f"{h['throughput_img_s']:>9.1f} {h['speedup']:>9.1f} {mem:>9.1f}")
        lines.append(f"{'':>5} pipeline_overhead (1-step pipeline / bare forward) = {r['pipeline_overhead']:.2f}")
        sp = r.get("speedup", {})
        if sp:
            seq = sp.get("wall_clock_sequential_cfg_teacher")
            lines.append(f"{'':>5} speed-up: NFE ratio {sp['nfe_ratio']:.0f}x, wall clock {sp['wall_clock']:.1f}x"
                         + (f" ({seq:.1f}x vs a sequential-CFG teacher)" if seq else "")
                         + f", ceiling from bare forwards {sp['ceiling_from_bare_forwards']:.1f}x")
        for v in r.get("variants", []):
            if "skipped" in v:
                lines.append(f"{'':>5} variant {v['variant']}: skipped ({v['skipped']})")
            else:
                lines.append(f"{'':>5} variant {v['variant']}: {v['latency_s'] * 1e3:.2f} ms, "
                             f"{v['speedup_vs_eager']:.2f}x vs eager fp32, max diff {v['max_abs_diff']:.2g} "
                             f"({v['max_pixel_diff_8bit']} / 255)")
        if r.get("onnxruntime"):
            o = r["onnxruntime"]
            lines.append(f"{'':>5} onnxruntime: {o['latency_s'] * 1e3:.2f} ms, {o['speedup_vs_pytorch']:.2f}x vs the "
                         f"PyTorch pipeline, max diff {o['max_abs_diff']:.2g}")
    return lines

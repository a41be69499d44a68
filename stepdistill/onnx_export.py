"""A distilled student as one ONNX graph: noise and condition in, image out (``stepdistill onnx``).

The graph is the student's whole chain (:func:`stepdistill.pipelines.sampling.student_sample`) with
its timesteps baked in::

    inputs   noise        float32 (B, C, H, W)      x_{t_0}, standard normal
             class_labels int64   (B,)              class students (or text_embeds float32 (B, L, D))
             step_noise   float32 (K-1, B, C, H, W) K-step students only: the fresh noise of each re-noising
    output   image        float32 (B, C, H, W)      in [-1, 1]

It runs under onnxruntime on a machine without torch or stepdistill (the model card shows how).
Given the same noise, it matches the PyTorch pipeline to float rounding (``check_onnx``); the
pipeline draws ``step_noise`` from its generator after ``noise``, in chain order.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, ModelLoadError


class StudentGraph(nn.Module):
    """The student chain with fixed timesteps, traceable: ``(noise, cond[, step_noise]) -> image``."""

    def __init__(self, den, timesteps: list[float]):
        super().__init__()
        self.den = den
        self.timesteps = [float(t) for t in timesteps]

    def forward(self, noise: torch.Tensor, cond: torch.Tensor | None = None, step_noise: torch.Tensor | None = None):
        x, x0 = noise, noise
        ones = torch.ones_like(noise[:, 0, 0, 0])  # (B,): the batch size stays dynamic in the graph
        for k, t in enumerate(self.timesteps):
            x0 = self.den(x, ones * t, cond)
            if k + 1 < len(self.timesteps):
                x = self.den.schedule.add_noise(x0, step_noise[k], ones * self.timesteps[k + 1])
        return x0.clamp(-1, 1)


def export_onnx(model: str | Path, out: str | Path, steps: int | None = None, opset: int = 17,
                allow_pickle: bool = False, overwrite: bool = False) -> dict:
    """Write ``out`` (.onnx) and ``out.json`` (inputs, timesteps, class names) for a student folder or builtin."""
    from .models import load_denoiser
    from .outputs import check_replace_file
    from .pipelines.sampling import subset_timesteps

    den, meta = load_denoiser(str(model), allow_pickle=allow_pickle)
    if not meta.student_timesteps:
        raise ModelLoadError(f"{model} is not a distilled student (no student_timesteps); ONNX export is for students")
    extra = meta.extra or {}
    if extra.get("experts") or extra.get("students"):
        raise ConfigError(f"{model} has several networks ({'Phased DMD experts' if extra.get('experts') else 'MSD students'}); "
                          "ONNX export covers one-network students (DMD, DMD2, rCM, PSO)")
    if den.kind not in ("unet2d", "unet2d_cond", "dit", "custom"):
        raise ConfigError(f"ONNX export supports UNet, DiT and custom students, not {den.kind!r} ones yet")
    ts = subset_timesteps(meta.student_timesteps, steps)
    out = Path(out)
    if out.suffix != ".onnx":
        raise ConfigError(f"--out must end in .onnx, got {out}")
    check_replace_file(out, overwrite)                       # the .onnx and the .json beside it: ours, or
    check_replace_file(out.with_suffix(".json"), overwrite)  # --overwrite
    den.eval()
    graph = StudentGraph(den, ts).eval()
    shape = sample_shape(den)
    b = 2
    noise = torch.randn(b, *shape)
    names, args, axes = ["noise"], [noise], {"noise": {0: "batch"}, "image": {0: "batch"}}
    if meta.conditioning == "class":
        names.append("class_labels")
        args.append(torch.zeros(b, dtype=torch.long))
        axes["class_labels"] = {0: "batch"}
    elif meta.conditioning == "text":
        dim = den.text_dim
        length = ((meta.extra or {}).get("text") or {}).get("max_length") or 16
        names.append("text_embeds")
        args.append(torch.zeros(b, int(length), int(dim)))
        axes["text_embeds"] = {0: "batch"}
    else:
        args.append(None)
    if len(ts) > 1:
        names.append("step_noise")
        args.append(torch.randn(len(ts) - 1, b, *shape))
        axes["step_noise"] = {1: "batch"}
    out.parent.mkdir(parents=True, exist_ok=True)
    from .outputs import clean_stale_temps

    clean_stale_temps(out.parent)  # what a killed earlier export left
    tmp, tmp_json = out.with_name(f".{out.name}.{os.getpid()}.tmp"), out.with_name(f".{out.stem}.{os.getpid()}.json.tmp")
    import warnings

    from .outputs import JSON_TAG
    from .utils import sha256_file

    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape asserts and the fixed-t table look-up
            torch.onnx.export(graph, tuple(args), str(tmp), input_names=names, output_names=["image"],
                              dynamic_axes=axes, opset_version=opset, dynamo=False)
        info = {"onnx": str(out), "inputs": names, "outputs": ["image"], "sample_shape": list(shape),
                "student_timesteps": ts, "class_names": list(meta.class_names), "conditioning": meta.conditioning,
                "opset": opset, "bytes": tmp.stat().st_size,
                "onnx_sha256": sha256_file(tmp),  # pairs the two files: read_onnx_info refuses a mismatch
                JSON_TAG: "onnx"}
        tmp_json.write_text(json.dumps(info, indent=2))
        # the pair is replaced together: the .json first (its hash names the new graph), then the .onnx. A kill
        # between the two renames leaves a .json whose onnx_sha256 does not match, which read_onnx_info refuses.
        os.replace(tmp_json, out.with_suffix(".json"))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_json.unlink(missing_ok=True)
    return info


def read_onnx_info(onnx_path: str | Path) -> dict:
    """The ``.json`` beside an ONNX export, checked against the graph it describes (:func:`export_onnx`)."""
    from .utils import sha256_file

    onnx_path = Path(onnx_path)
    side = onnx_path.with_suffix(".json")
    if not onnx_path.exists() or not side.exists():
        raise ModelLoadError(f"{onnx_path}: an ONNX export needs both {onnx_path.name} and {side.name}; re-export it "
                             f"with stepdistill onnx")
    info = json.loads(side.read_text())
    want = info.get("onnx_sha256")
    if want and sha256_file(onnx_path) != want:
        raise ModelLoadError(f"{onnx_path} and {side.name} do not belong together (an interrupted export?); re-export "
                             f"with stepdistill onnx --overwrite")
    return info


def sample_shape(den) -> tuple[int, int, int]:
    """(C, H, W) of one sample (the adapter's :attr:`~stepdistill.denoiser.Denoiser.sample_shape`)."""
    return den.sample_shape


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session (``threads``: intra-op threads; None = onnxruntime's choice)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("onnxruntime is not installed: pip install 'stepdistill[onnx]'") from None
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def onnx_inputs(info: dict, noise: torch.Tensor, cond=None, step_noise: torch.Tensor | None = None) -> dict:
    feeds = {"noise": noise.numpy()}
    if "class_labels" in info["inputs"]:
        feeds["class_labels"] = cond.numpy().astype("int64")
    if "text_embeds" in info["inputs"]:
        feeds["text_embeds"] = cond.float().numpy()
    if "step_noise" in info["inputs"]:
        feeds["step_noise"] = step_noise.numpy()
    return feeds


def check_onnx(model: str | Path, onnx_path: str | Path, batch: int = 4, seed: int = 0,
               allow_pickle: bool = False) -> float:
    """Max |ONNX - PyTorch pipeline| on one batch: the noise is drawn as the pipeline draws it from ``seed``
    (x_{t_0}, then one (B, C, H, W) draw per re-noising), so both see the same numbers."""
    from .pipelines.student import StepDistillPipeline

    info = read_onnx_info(onnx_path)
    if info["conditioning"] == "text":
        raise ConfigError("check_onnx compares class and unconditional students with StepDistillPipeline")
    pipe = StepDistillPipeline.from_pretrained(str(model), use_safetensors=not allow_pickle)
    shape, ts = tuple(info["sample_shape"]), info["student_timesteps"]
    cond = torch.arange(batch) % max(len(info["class_names"]), 1) if info["conditioning"] == "class" else None
    ref = pipe(class_labels=cond.tolist() if cond is not None else None, batch_size=batch, seed=seed,
               num_inference_steps=len(ts), output_type="pt").images
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, *shape, generator=g)
    steps = torch.stack([torch.randn(batch, *shape, generator=g) for _ in ts[1:]]) if len(ts) > 1 else None
    got = onnx_session(onnx_path).run(None, onnx_inputs(info, noise, cond, steps))[0]
    return float((torch.from_numpy(got) - ref).abs().max())

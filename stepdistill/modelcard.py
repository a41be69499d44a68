"""Model cards (``README.md`` with Hugging Face YAML front matter) for exported students.

:func:`write_model_card` writes the whole card; :func:`update_model_card_metrics` rewrites only the
metrics section (between the ``<!-- stepdistill:metrics -->`` markers), keeping any hand edits
elsewhere. The usage section shows both the stepdistill pipeline and a reproduction with stock
diffusers (``UNet2DModel`` + ``DDPMScheduler``, no stepdistill import).
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Callable

import yaml

METRICS_START = "<!-- stepdistill:metrics:start -->"
METRICS_END = "<!-- stepdistill:metrics:end -->"
NOT_MEASURED = "Not measured yet (run `stepdistill eval` / `stepdistill report` on this folder)."

def _is_portable_id(teacher: str) -> bool:
    """A name that means the same model on another machine: ``builtin:...`` or a hub id ``owner/name`` that is not a
    local path."""
    if teacher.startswith("builtin:"):
        return True
    return (teacher.count("/") == 1 and not teacher.startswith((".", "/", "~")) and not Path(teacher).exists())


def _method_record(method: str):
    """The registry record of ``method`` (spelled loosely: ``Phased-DMD`` = ``phased_dmd``), or None."""
    from .methods import get_method, method_names

    key = method.lower().replace("-", "_").replace(" ", "_")
    return get_method(key) if key in method_names() else None


def recipe_text(method: str, config: dict) -> str:
    """What this run actually used, in words, read from its config by the method itself
    (:attr:`stepdistill.methods.Method.describe_run`; never the method's textbook description); "" when the method
    gives none."""
    hook = getattr(_method_record(method), "describe_run", None)
    return hook(config) if hook is not None else ""


def _method_text(method: str) -> tuple[str, str]:
    """(title, paragraph) of the method (:attr:`stepdistill.methods.Method.card`)."""
    card = getattr(_method_record(method), "card", ())
    return tuple(card) if card else (method, f"A one-/few-step student distilled with `{method}`.")


def _yaml_scalar_safe(v):
    """Config values -> YAML-safe builtins (paths and tuples become strings / lists)."""
    if isinstance(v, dict):
        return {str(k): _yaml_scalar_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_yaml_scalar_safe(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def _fmt_value(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.4e}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt_value(x) for x in v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.extend(_flatten(v, key + "."))
        else:
            out.append((key, v))
    return out


def metrics_section(metrics: dict | None) -> str:
    """The ``## Metrics`` section, markers included."""
    lines = [METRICS_START, "## Metrics", ""]
    rows = _flatten(metrics) if metrics else []
    if not rows:
        lines.append(NOT_MEASURED)
    else:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {_fmt_value(k)} | {_fmt_value(v)} |" for k, v in rows]
    lines.append(METRICS_END)
    return "\n".join(lines)


def _network(folder: Path) -> tuple[str, str, str]:
    """(subfolder, diffusers class, call) of the folder's network, from ``model_index.json``: the stock snippet
    loads and calls the right one (UNets: ``net(x, t, class_labels=...)``; DiT: ``timestep=`` / learned-variance
    channels dropped)."""
    index = folder / "model_index.json"
    entries = json.loads(index.read_text()) if index.exists() else {}
    for sub in ("transformer", "unet"):
        if isinstance(entries.get(sub), list) and entries[sub][-1]:
            cls = entries[sub][-1]
            if sub == "transformer":
                return sub, cls, "net(x, timestep=t.expand(x.shape[0]), class_labels=labels).sample[:, : x.shape[1]]"
            return sub, cls, "net(x, t, class_labels=labels).sample"
    return "unet", "UNet2DModel", "net(x, t, class_labels=labels).sample"


def _usage(folder_name: str, steps: list[float], class_names: list[str], prediction_type: str | None,
           network: tuple[str, str, str] = ("unet", "UNet2DModel", "net(x, t, class_labels=labels).sample")) -> str:
    sub, net_cls, call = network
    cls0 = class_names[0] if class_names else None
    ts = "[" + ", ".join(repr(int(t)) if float(t).is_integer() else repr(float(t)) for t in steps) + "]"
    label_arg = f"class_labels=[{cls0!r}] * 4, " if cls0 is not None else "batch_size=4, "
    label_line = "labels = torch.tensor([0] * 4)  # class indices (see the class list above)" if class_names \
        else "labels = None"
    spacing = ("`scheduler.set_timesteps(" + str(len(steps)) + ")` gives the same timesteps (trailing spacing)"
               if _trailing(steps) else "pass them to `set_timesteps` as below")
    return f'''## Usage

With stepdistill (`pip install stepdistill`):

```python
from stepdistill import StepDistillPipeline

pipe = StepDistillPipeline.from_pretrained("{folder_name}")
images = pipe({label_arg}num_inference_steps={len(steps)}, seed=0).images  # PIL images
```

`DiffusionPipeline.from_pretrained(folder)` needs stepdistill installed too: `model_index.json` names our
`StepDistillPipeline`. The folder holds no code (so no `custom_pipeline`); without stepdistill, load the two
stock parts and run the student's chain with the stock scheduler (the same computation; weights are
safetensors). The student's timesteps are `{ts}`; {spacing}.

```python
import torch
from diffusers import DDPMScheduler, {net_cls}

folder = "{folder_name}"  # path to this folder (or its hub id)
net = {net_cls}.from_pretrained(folder, subfolder="{sub}").eval()
scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
scheduler.set_timesteps(timesteps={ts})
{label_line}
g = torch.Generator().manual_seed(0)
c = net.config
x = torch.randn(len(labels) if labels is not None else 4, c.in_channels, c.sample_size, c.sample_size, generator=g)
ts = scheduler.timesteps
with torch.no_grad():
    for i, t in enumerate(ts):  # each step predicts x0; between steps, re-noise it with fresh noise
        x0 = scheduler.step({call}, t, x).pred_original_sample
        x = scheduler.add_noise(x0, torch.randn(x.shape, generator=g), ts[i + 1:i + 2]) if i + 1 < len(ts) else x0
images = x.clamp(-1, 1)  # (B, C, H, W) in [-1, 1]
```
'''


def _trailing(steps: list[float], num_train_timesteps: int = 1000) -> bool:
    """True when ``DDPMScheduler(timestep_spacing="trailing").set_timesteps(K)`` gives exactly ``steps``."""
    import numpy as np

    k = len(steps)
    trailing = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / k)) - 1
    return [int(t) for t in trailing] == [int(t) for t in steps]


def _onnx_usage(folder_name: str, class_names: list[str]) -> str:
    """Serving without torch: ``stepdistill onnx`` once, then onnxruntime + numpy only."""
    cls = class_names[2] if len(class_names) > 2 else (class_names[0] if class_names else None)
    label = (f'feeds["class_labels"] = np.array([info["class_names"].index({cls!r})] * b, dtype=np.int64)'
             if cls is not None else '# an unconditional student: no label input')
    return f'''## Serving without torch (ONNX)

Write the whole student chain as one ONNX graph once (`noise` and `class_labels` in, `image` in [-1, 1] out; the
`.json` beside it lists the inputs, shape and class names; `--check` prints the difference from the PyTorch
pipeline, about 1e-6):

```bash
stepdistill onnx --model {folder_name} --out student.onnx --check
```

Then serve it with `pip install onnxruntime numpy pillow` only, no torch and no stepdistill:

```python
import json

import numpy as np
import onnxruntime as ort
from PIL import Image

sess = ort.InferenceSession("student.onnx", providers=["CPUExecutionProvider"])
info = json.load(open("student.json"))
b, (c, h, w) = 4, info["sample_shape"]
rng = np.random.default_rng(0)
feeds = {{"noise": rng.standard_normal((b, c, h, w), dtype=np.float32)}}
{label}
if "step_noise" in info["inputs"]:  # K-step students: fresh noise for each of the K - 1 re-noisings
    feeds["step_noise"] = rng.standard_normal((len(info["student_timesteps"]) - 1, b, c, h, w), dtype=np.float32)
images = sess.run(None, feeds)[0]  # (B, C, H, W) in [-1, 1]
im = ((images[0].transpose(1, 2, 0) + 1) * 127.5).round().astype(np.uint8)  # (H, W, C)
Image.fromarray(im[..., 0] if c == 1 else im).save("sample.png")
```
'''


def _text_usage(folder: Path, steps: list[float]) -> str:
    """Text students: our pipeline, plus the stock StableDiffusionPipeline for SD-family folders."""
    ts = "[" + ", ".join(str(int(t)) for t in steps) + "]"
    out = f'''## Usage

With stepdistill (`pip install stepdistill`):

```python
from stepdistill.pipelines.loading import load_text_pipeline

pipe = load_text_pipeline("{folder.name}")
images = pipe(["a cat", "a dog"], seed=0).images  # PIL images; guidance is distilled in
```
'''
    index = folder / "model_index.json"
    if index.exists() and json.loads(index.read_text()).get("_class_name") == "StableDiffusionPipeline":
        out += f'''
With stock diffusers only (the scheduler is an `LCMScheduler`; pass the student's timesteps):

```python
import torch
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{folder.name}")
images = pipe("a cat", timesteps={ts}, guidance_scale=1.0, generator=torch.Generator().manual_seed(0)).images
```
'''
    return out


def write_model_card(folder: str | os.PathLike, *, method: str, teacher: str, steps: list[float], config: dict,
                     metrics: dict | None = None, class_names: list[str] | None = None,
                     edit: Callable[[str], str] | None = None) -> Path:
    """Write ``folder/README.md`` (front matter, method, teacher, steps, usage, config, metrics). ``edit``: a
    method's change to the text before it is written (Phased DMD's and MSD's sampling and usage sections)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    class_names = list(class_names or [])
    steps = [float(t) for t in steps]
    title, description = _method_text(method)
    prediction_type = None
    meta_p = folder / "stepdistill.json"
    if meta_p.exists():
        try:
            prediction_type = json.loads(meta_p.read_text()).get("prediction_type")
        except json.JSONDecodeError:
            prediction_type = None
    front = {
        "library_name": "diffusers",
        "tags": ["stepdistill", "distillation", method.lower()],
    }
    if _is_portable_id(str(teacher)):  # a hub id or a shipped model; a local path means nothing elsewhere
        front["base_model"] = str(teacher)
    step_list = ", ".join(f"{t:g}" for t in steps)
    n = len(steps)
    parts = [
        "---\n" + yaml.safe_dump(front, sort_keys=False).rstrip() + "\n---",
        f"# {folder.name}: {n}-step student distilled with {method}",
        f"## Method\n\n**{title}.** {description}",
        *([f"## This run\n\n{run_text}"] if (run_text := recipe_text(method, config or {})) else []),
        f"## Teacher\n\n`{teacher if _is_portable_id(str(teacher)) else Path(str(teacher)).name}`"
        f"{'' if _is_portable_id(str(teacher)) else ' (a local folder of the machine that trained it)'} (sampled with many steps and classifier-free guidance; the student needs "
        f"neither: guidance is distilled in).",
        f"## Sampling steps\n\n{n} step(s) at timesteps `[{step_list}]` (of the teacher's discrete "
        f"DDPM schedule; each step predicts a clean image, which is re-noised with fresh noise to the next "
        f"timestep).",
    ]
    if class_names:
        parts.append("## Classes\n\n" + ", ".join(f"{i}: `{c}`" for i, c in enumerate(class_names)))
    if (folder / "text_encoder").is_dir():  # a text-to-image student (stepdistill/text_models.py)
        parts.append(_text_usage(folder, steps).rstrip())
    else:
        parts.append(_usage(folder.name, steps, class_names, prediction_type, _network(folder)).rstrip())
        parts.append(_onnx_usage(folder.name, class_names).rstrip())
    cfg_yaml = yaml.safe_dump(_yaml_scalar_safe(config or {}), sort_keys=False).rstrip()
    parts.append(f"## Training configuration\n\n```yaml\n{cfg_yaml}\n```")
    parts.append(metrics_section(metrics))
    path = folder / "README.md"
    text = "\n\n".join(parts) + "\n"
    _atomic_write(path, edit(text) if edit is not None else text)
    return path


def update_model_card_metrics(folder: str | os.PathLike, metrics: dict | None) -> Path:
    """Replace the metrics section of ``folder/README.md``; everything else stays byte-identical."""
    path = Path(folder) / "README.md"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; write the card first (write_model_card)")
    text = path.read_text()
    new = metrics_section(metrics)
    i, j = text.find(METRICS_START), text.find(METRICS_END)
    if i >= 0 and j > i:
        text = text[:i] + new + text[j + len(METRICS_END):]
    else:  # markers removed by hand: replace a "## Metrics" section, or append one
        m = re.search(r"^## Metrics[ \t]*$", text, flags=re.M)
        if m:
            nxt = re.search(r"^## ", text[m.end():], flags=re.M)
            end = m.end() + nxt.start() if nxt else len(text)
            text = text[:m.start()] + new + ("\n\n" + text[end:] if nxt else "\n")
        else:
            text = text.rstrip("\n") + "\n\n" + new + "\n"
    _atomic_write(path, text)
    return path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- cards of multi-network students (Phased DMD experts, MSD students) ----------------------------------------
def splice_sections(text: str, start: str, end: str | None, section: str, keep: str | None = None) -> str:
    """``text`` with the sections from heading ``start`` up to heading ``end`` (None: the next heading) replaced
    by ``section``; a ``keep`` heading inside the replaced span survives after it. Appended when ``start`` is
    missing."""
    i = text.find(start)
    j = (text.find(end) if end else text.find("\n## ", i + 1) + 1) if i >= 0 else -1
    if i < 0:
        return text.rstrip("\n") + "\n\n" + section.rstrip() + "\n"
    if j <= i:  # the replaced span runs to the end
        j = len(text)
    kept = ""
    if keep:
        k = text.find(keep, i, j)
        if k >= 0:
            nxt = text.find("\n## ", k + 1)
            kept = text[k:(nxt + 1 if 0 <= nxt < j else j)].rstrip() + "\n\n"
    return text[:i] + section.rstrip() + "\n\n" + kept + text[j:]


def phased_card(out: Path, ts: list[float], meta) -> Callable[[str], str]:
    """The card edit of a Phased DMD folder: the StepDistill-specific sampling/usage sections (fresh-noise chain)
    replaced by the phased chain (experts by timestep, DDIM transport). Applied when the card is written, after
    the networks (the stock snippet names the folder's network class)."""
    return lambda text: splice_sections(text, "## Sampling steps", "## Training configuration",
                                        _phased_section(out, ts, meta), keep="## Classes")


def _phased_section(out: Path, ts: list[float], meta) -> str:
    names = ["unet" if k == 0 else f"expert_{k}" for k in range(len(ts))]  # pipelines/phased.expert_subfolder
    _, net_cls, call = _network(out)
    tlist = ", ".join(f"{t:g}" for t in ts)
    label = (f"class_labels=[{meta.class_names[0]!r}] * 4, " if meta.class_names else "batch_size=4, ")
    section = f"""## Sampling steps

{len(ts)} steps at timesteps `[{tlist}]`, one expert network per phase ({', '.join(f'`{n}/`' for n in names)},
in order). Step k runs the expert that owns timestep t_k, predicts a clean image x0_k and moves to the next
timestep with a deterministic DDIM step on the expert's own predicted noise
(`x = alpha(t_k+1) x0_k + sigma(t_k+1) eps_k`); the chain uses no randomness after the starting noise.

## Usage

```python
from stepdistill.pipelines.phased import PhasedDMDPipeline

pipe = PhasedDMDPipeline.from_pretrained("{out.name}")
images = pipe({label}num_inference_steps={len(ts)}, seed=0).images  # PIL images
print(pipe.last_experts)  # the expert that ran each step
```

With stock diffusers only (DDPM-family schedule; `x0, eps` from the prediction type as usual):

```python
import torch
from diffusers import DDPMScheduler, {net_cls}

folder = "{out.name}"
experts = [{net_cls}.from_pretrained(folder, subfolder=s).eval() for s in {names!r}]
ac = DDPMScheduler.from_pretrained(folder, subfolder="scheduler").alphas_cumprod.double()
prediction_type = {meta.prediction_type!r}
timesteps = {[int(t) if float(t).is_integer() else t for t in ts]!r}
x = torch.randn(4, experts[0].config.in_channels, experts[0].config.sample_size, experts[0].config.sample_size,
                generator=torch.Generator().manual_seed(0))
labels = {"torch.tensor([0] * 4)" if meta.class_names else "None"}
with torch.no_grad():
    for k, step in enumerate(timesteps):
        net, t = experts[k], torch.tensor([float(step)])
        a, s = ac[int(step)].sqrt().float(), (1 - ac[int(step)]).sqrt().float()
        pred = {call}
        if prediction_type == "epsilon":
            x0, eps = (x - s * pred) / a, pred
        elif prediction_type == "v_prediction":
            x0, eps = a * x - s * pred, s * x + a * pred
        else:  # "sample"
            x0, eps = pred, (x - a * pred) / s
        if k + 1 < len(timesteps):
            t1 = int(timesteps[k + 1])
            x = ac[t1].sqrt().float() * x0 + (1 - ac[t1]).sqrt().float() * eps
images = x0.clamp(-1, 1)
```
"""
    return section


def msd_card(out: Path, students_meta: list[dict], meta, timesteps: list[float]) -> Callable[[str], str]:
    """The card edit of an MSD folder: a students table, and routed usage instead of the single-student usage
    (applied when the card is written, after the networks)."""
    return lambda text: splice_sections(text, "## Usage", None, _msd_section(out, students_meta, meta, timesteps))


def _msd_section(out: Path, students_meta: list[dict], meta, timesteps: list[float]) -> str:
    names = list(meta.class_names)
    rows = "\n".join(f"| `{s['name']}` | `{s['subfolder']}/` | "
                     f"{', '.join(f'`{names[c]}`' if names else str(c) for c in s['classes'])} | {s['params']:,} |"
                     for s in students_meta)
    first = names[students_meta[-1]["classes"][0]] if names else students_meta[-1]["classes"][0]
    ts = [int(t) if float(t).is_integer() else t for t in timesteps]
    _, net_cls, call = _network(out)
    section = f"""## Students

{len(students_meta)} students, each distilled on its own classes only (multi-student distillation); a request
is served by the student that owns its class.

| student | folder | classes | parameters |
|---|---|---|---|
{rows}

## Usage

```python
from stepdistill.pipelines.multi_student import MultiStudentPipeline

pipe = MultiStudentPipeline.from_pretrained("{out.name}")
images = pipe(class_labels=[{first!r}, 0], seed=0).images  # PIL images, in request order
print(pipe.last_students)  # the student that made each image
```

With stock diffusers only: look the class up in `model_index.json`'s `student_classes`, then run that
student as a plain {len(ts)}-step student:

```python
import json
import torch
from diffusers import DDPMScheduler, {net_cls}

folder = "{out.name}"
groups = json.load(open(f"{{folder}}/model_index.json"))["student_classes"]
label = 0
k = next(i for i, g in enumerate(groups) if label in g)
net = {net_cls}.from_pretrained(folder, subfolder="unet" if k == 0 else f"student_{{k}}").eval()
ac = DDPMScheduler.from_pretrained(folder, subfolder="scheduler").alphas_cumprod.double()
prediction_type = {meta.prediction_type!r}
timesteps = {ts!r}
g = torch.Generator().manual_seed(0)
x = torch.randn(1, net.config.in_channels, net.config.sample_size, net.config.sample_size, generator=g)
labels = torch.tensor([label])
with torch.no_grad():
    for i, step in enumerate(timesteps):
        t = torch.tensor([float(step)])
        a, s = ac[int(step)].sqrt().float(), (1 - ac[int(step)]).sqrt().float()
        pred = {call}
        x0 = {{"epsilon": (x - s * pred) / a, "v_prediction": a * x - s * pred}}.get(prediction_type, pred)
        if i + 1 < len(timesteps):  # re-noise to the next timestep with fresh noise
            t1 = int(timesteps[i + 1])
            x = ac[t1].sqrt().float() * x0 + (1 - ac[t1]).sqrt().float() * torch.randn(x.shape, generator=g)
image = x0.clamp(-1, 1)
```"""
    return section

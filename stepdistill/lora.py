"""LoRA student and critic on ONE frozen base (the teacher), and the other memory options.

LoRA (Hu et al. 2022): a frozen weight W gets a trainable low-rank update ``W + (alpha / r) B A``
(``A``: r x in, ``B``: out x r, B initialised to 0 so training starts at the base model). With
``dmd.lora_rank > 0`` DMD2's three networks are one module in memory:

* teacher (real score)  = the base with all adapters disabled,
* student (generator)   = the base with adapter ``student``,
* critic (fake score)   = the base with adapter ``critic``,

(``peft`` multi-adapter LoRA layers injected into the teacher's own backbone). Each role is a
:class:`LoRAView`: a thin ``nn.Module`` that activates its adapter before every forward and whose
``parameters()`` / ``state_dict()`` are that adapter's weights only, so the trainer core's
optimizers, gradient sync, clipping, EMA and checkpoints see exactly the trainable LoRA weights
and the base exists once (full fine-tuning keeps three copies of it, plus AdamW's two moments for
each of the two trained ones). ``copy.deepcopy`` of a view adds a new adapter to the same base
(the core's EMA copy of the student = adapter ``student_copy1``; Phased DMD's per-phase experts
and critics = fresh adapters), so nothing ever copies the base during training.

The view forwards attribute reads it does not have (``config``, ``mid_block``, ...) to the base and
reports the base's backbone kind, so a :class:`~stepdistill.denoiser.Denoiser` over a view works
like one over the base model (GAN features included).

Export: :meth:`LoRAView.merged` is a plain copy of the base with the adapter merged in
(``W + (alpha/r) B A``; a stock diffusers model, no peft needed to load it) and
:meth:`LoRAView.save_adapter` writes the adapter alone in peft's format
(``adapter_model.safetensors`` + ``adapter_config.json``; load with :func:`load_adapter`).

Memory options (``dmd.teacher_dtype``, ``dmd.offload_teacher``, ``train.gradient_checkpointing``):
:func:`apply_teacher_options` and :func:`enable_gradient_checkpointing`. Gradient checkpointing
recomputes block activations in the backward pass; with several adapters on one base the
recomputation must use the adapter that was active in the forward pass, which
:meth:`SharedLoRA.enable_gradient_checkpointing` guarantees.
"""
from __future__ import annotations

import contextlib
import copy
import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn

_UNSET = object()


def _peft():
    try:
        import peft  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeError("dmd.lora_rank > 0 needs the 'peft' package: pip install 'stepdistill[lora]'") from e
    return peft


def _tuner_layers(model: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


class SharedLoRA:
    """One frozen base module carrying named LoRA adapters; hands out :class:`LoRAView` s.

    Args:
        model: the base (teacher) backbone, modified in place (LoRA layers injected, weights frozen).
        rank, alpha: LoRA rank r and alpha (scale alpha / r; ``alpha=0`` means alpha = r).
        targets: module names to adapt (peft ``target_modules``: a name matches a module whose
            path ends with it, e.g. ``to_q``, ``to_out.0``, ``conv1``); Linear and Conv2d supported.
    """

    def __init__(self, model: nn.Module, rank: int, alpha: float = 0.0, targets=("to_q", "to_k", "to_v", "to_out.0"),
                 dropout: float = 0.0, seed: int = 0):
        _peft()
        from peft import LoraConfig

        if rank <= 0:
            raise ValueError(f"LoRA rank must be > 0, got {rank}")
        self.model = model
        self.config = LoraConfig(r=int(rank), lora_alpha=float(alpha or rank), target_modules=list(targets),
                                 lora_dropout=float(dropout), init_lora_weights=True)
        self.model.requires_grad_(False)
        self.adapters: list[str] = []
        self.compute_dtype: torch.dtype | None = None   # set by cast_base (bfloat16 base)
        self._active = _UNSET
        self._layers = None
        self._copies = 0
        self.seed = int(seed)

    @classmethod
    def from_config(cls, model: nn.Module, dmd_cfg, seed: int = 0) -> "SharedLoRA":
        return cls(model, dmd_cfg.lora_rank, dmd_cfg.lora_alpha, dmd_cfg.lora_targets, seed=seed)

    # -- adapters -----------------------------------------------------------------------------
    def add_adapter(self, name: str, copy_from: str | None = None) -> None:
        """Inject adapter ``name`` into every target layer (fresh LoRA init: B = 0, i.e. the base function),
        or with the weights of adapter ``copy_from``. Leaves other adapters' requires_grad as they were."""
        from peft import inject_adapter_in_model

        if name in self.adapters:
            raise ValueError(f"adapter {name!r} exists already")
        flags = {id(p): p.requires_grad for p in self.model.parameters()}
        # LoRA's A init draws from the global RNG: seed it (the i-th adapter's init depends on (seed, i) only)
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")  # peft warns that a second adapter makes a multi-adapter model: intended
            torch.manual_seed(self.seed * 1_000_003 + len(self.adapters))
            try:
                inject_adapter_in_model(self.config, self.model, adapter_name=name)
            except ValueError as e:  # peft: no target module found
                raise ValueError(f"dmd.lora_targets {sorted(self.config.target_modules)} match no Linear/Conv2d "
                                 f"module of {type(self.model).__name__} ({e})") from e
        self._layers, self._active = None, _UNSET
        if not self.layers():
            raise ValueError(f"dmd.lora_targets {list(self.config.target_modules)} match no Linear/Conv2d module of "
                             f"{type(self.model).__name__}")
        for p in self.model.parameters():  # peft's injection toggles requires_grad: restore, then set the new one
            if id(p) in flags:
                p.requires_grad_(flags[id(p)])
        self.adapters.append(name)
        new = self.adapter_params(name)
        if self.compute_dtype is not None:  # a bfloat16 base keeps float32 adapters (peft casts them to the base)
            for p in new.values():
                p.data = p.data.float()
        src = self.adapter_params(copy_from) if copy_from is not None else {}
        with torch.no_grad():
            for k, p in new.items():
                if src:
                    p.copy_(src[k])
                p.requires_grad_(src[k].requires_grad if src else True)
        self.activate(None)

    def copy_adapter(self, name: str | None) -> str:
        """A new adapter initialised from ``name`` (``None``: a fresh adapter = the base function)."""
        self._copies += 1
        new = f"{name or 'lora'}_copy{self._copies}"
        self.add_adapter(new, copy_from=name)
        return new

    def layers(self) -> list:
        if self._layers is None:
            self._layers = [m for _, m in _tuner_layers(self.model)]
        return self._layers

    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        """``{path: parameter}`` of adapter ``name``; the path omits the adapter name (same keys for every adapter)."""
        out = {}
        for path, layer in _tuner_layers(self.model):
            for lname in layer.adapter_layer_names:
                d = getattr(layer, lname, None)
                if not isinstance(d, (nn.ModuleDict, nn.ParameterDict)) or name not in d:
                    continue
                sub = d[name]
                items = sub.named_parameters() if isinstance(sub, nn.Module) else [("", sub)]
                for pn, p in items:
                    out[".".join(x for x in (path, lname, pn) if x)] = p
        return out

    def activate(self, name: str | None) -> None:
        """Make adapter ``name`` the only active one (``None``: all disabled = the base / teacher).
        Sets peft's layer state directly: peft's own ``set_adapter`` would also flip requires_grad,
        which belongs to the trainer core."""
        if name is self._active or name == self._active:
            return
        if name is not None and name not in self.adapters:
            raise ValueError(f"unknown adapter {name!r}; have {self.adapters}")
        for layer in self.layers():
            layer._disable_adapters = name is None
            if name is not None:
                layer._active_adapter = [name]
        self._active = name

    @property
    def active(self) -> str | None:
        return None if self._active is _UNSET else self._active

    @contextlib.contextmanager
    def using(self, name: str | None):
        prev = self._active
        self.activate(name)
        try:
            yield
        finally:
            if prev is not _UNSET:
                self.activate(prev)

    def view(self, name: str | None) -> "LoRAView":
        return LoRAView(self, name)

    # -- memory options -------------------------------------------------------------------------
    def cast_base(self, dtype: torch.dtype) -> None:
        """Base weights in ``dtype`` (e.g. bfloat16), adapters stay float32; every view's Denoiser then
        feeds the base ``dtype`` inputs and returns float32 (``Denoiser`` reads ``compute_dtype``)."""
        adapter = {id(p) for a in self.adapters for p in self.adapter_params(a).values()}
        for p in self.model.parameters():
            if id(p) not in adapter and p.is_floating_point():
                p.data = p.data.to(dtype)
        for b in self.model.buffers():
            if b.is_floating_point():
                b.data = b.data.to(dtype)
        self.compute_dtype = dtype

    def enable_gradient_checkpointing(self) -> None:
        """diffusers activation checkpointing whose recomputation re-activates the forward's adapter."""
        from torch.utils.checkpoint import checkpoint

        def ckpt(module, *args):
            adapter = self.active

            def run(*a):
                with self.using(adapter):
                    return module(*a)

            return checkpoint(run, *args, use_reentrant=False)

        if not getattr(self.model, "_supports_gradient_checkpointing", False):
            raise ValueError(f"{type(self.model).__name__} does not support gradient checkpointing")
        self.model.enable_gradient_checkpointing(ckpt)

    # -- export ---------------------------------------------------------------------------------
    def merged_copy(self, name: str | None) -> nn.Module:
        """A plain copy of the base (float32 if it was cast) with adapter ``name`` merged in and every
        peft layer removed: a stock diffusers model (export time only: one extra copy of the base)."""
        m = copy.deepcopy(self.model)
        if self.compute_dtype is not None:
            m.float()
        with torch.no_grad():
            for path, layer in _tuner_layers(m):
                if name is not None:
                    layer.merge(adapter_names=[name])
                parent = m.get_submodule(path.rsplit(".", 1)[0]) if "." in path else m
                setattr(parent, path.rsplit(".", 1)[-1], layer.get_base_layer())
        with contextlib.suppress(AttributeError):
            del m.peft_config  # set by peft's injection; the merged model is a plain model
        m.requires_grad_(False)
        return m

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """peft key names (``...to_q.lora_A.weight``: the adapter name removed), float32, CPU."""
        return {k: p.detach().float().cpu().contiguous() for k, p in self.adapter_params(name).items()}

    def save_adapter(self, name: str, folder: str | Path) -> Path:
        """peft format: ``adapter_model.safetensors`` + ``adapter_config.json`` (see :func:`load_adapter`)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.adapter_state_dict(name), str(folder / "adapter_model.safetensors"),
                  metadata={"format": "pt", "base_model_class": type(self.model).__name__})
        cfg = self.config.to_dict()
        cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
        (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2, default=str))
        return folder


def load_adapter(model: nn.Module, folder: str | Path, adapter_name: str = "default") -> nn.Module:
    """Inject the adapter saved by :meth:`SharedLoRA.save_adapter` into ``model`` (the base, e.g. the
    teacher's ``UNet2DModel``) and load its weights; peft's LoRA layers stay in the model (use
    :meth:`LoRAView.merged` or the exported merged student for a plain model)."""
    _peft()
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    keep = {k: v for k, v in cfg.items() if k in LoraConfig.__dataclass_fields__}
    config = LoraConfig(**keep)
    sd = load_file(str(folder / "adapter_model.safetensors"))
    inject_adapter_in_model(config, model, adapter_name=adapter_name)
    res = set_peft_model_state_dict(model, sd, adapter_name=adapter_name)
    missing = [k for k in getattr(res, "unexpected_keys", [])]
    if missing:
        raise ValueError(f"{folder}: adapter keys not found in {type(model).__name__}: {missing[:3]} ...")
    return model


class LoRAView(nn.Module):
    """The shared base with one adapter active (``adapter=None``: adapters disabled, the teacher).

    ``parameters()`` / ``state_dict()`` hold only this adapter's weights (keys: the layer path with
    ``.`` written as ``:``); every other attribute is read from the base module.
    """

    is_lora_view = True

    def __init__(self, shared: SharedLoRA, adapter: str | None):
        super().__init__()
        object.__setattr__(self, "_shared", shared)  # not a submodule: the base is no parameter of the view
        self.adapter = adapter
        self.lora = nn.ParameterDict()
        self._refresh()

    def _refresh(self) -> None:
        params = self._shared.adapter_params(self.adapter) if self.adapter is not None else {}
        self.lora = nn.ParameterDict({k.replace(".", ":"): p for k, p in params.items()})

    @property
    def shared(self) -> SharedLoRA:
        return self._shared

    @property
    def base(self) -> nn.Module:
        return self._shared.model

    @property
    def denoiser_kind(self) -> str:
        from .denoiser import backbone_kind

        return backbone_kind(self._shared.model)

    @property
    def compute_dtype(self):
        return self._shared.compute_dtype

    def forward(self, *args, **kwargs):
        with self._shared.using(self.adapter):
            return self._shared.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            shared = self.__dict__.get("_shared")
            if shared is None or name.startswith("__"):
                raise
            if name == "save_pretrained":  # never save the peft-injected base: save the merged model
                if not hasattr(shared.model, "save_pretrained"):
                    raise
                return lambda *a, **k: self.merged().save_pretrained(*a, **k)
            return getattr(shared.model, name)

    def _apply(self, fn, recurse: bool = True):
        # device / dtype moves act on the shared base (which holds this view's parameters)
        self._shared.model._apply(fn)
        self._refresh()
        return self

    def __deepcopy__(self, memo):
        """A copy = a new adapter on the same base, with this view's weights (fresh LoRA for the teacher view)."""
        new = LoRAView(self._shared, self._shared.copy_adapter(self.adapter))
        new.train(self.training)
        memo[id(self)] = new
        return new

    def merged(self) -> nn.Module:
        return self._shared.merged_copy(self.adapter)

    def save_adapter(self, folder: str | Path) -> Path:
        if self.adapter is None:
            raise ValueError("the teacher view has no adapter to save")
        return self._shared.save_adapter(self.adapter, folder)

    def extra_repr(self) -> str:
        return f"adapter={self.adapter!r}, base={type(self._shared.model).__name__}, params={len(self.lora)}"


# -- builders used by trainers/distill.py ---------------------------------------------------------
def lora_teacher(teacher, dmd_cfg, seed: int = 0):
    """(teacher Denoiser over the adapters-disabled view, SharedLoRA): inject LoRA into the teacher's backbone."""
    from .denoiser import Denoiser

    shared = SharedLoRA.from_config(teacher.backbone, dmd_cfg, seed=seed)
    return _like(teacher, shared.view(None), Denoiser), shared


def lora_roles(teacher, shared: SharedLoRA, names=("student", "critic")):
    """Denoisers over new adapters ``names`` of ``shared``, with the teacher's schedule and conditioning."""
    from .denoiser import Denoiser

    out = []
    for n in names:
        shared.add_adapter(n)
        out.append(_like(teacher, shared.view(n), Denoiser))
    return out


def _like(den, backbone, cls):
    return cls(backbone, den.schedule, den.prediction_type, den.null_class, den.null_cond)


def apply_teacher_options(teacher, dmd_cfg, shared: SharedLoRA | None = None) -> None:
    """``dmd.teacher_dtype`` / ``dmd.offload_teacher`` on the (frozen) teacher Denoiser.

    bfloat16: weights cast (with LoRA: the shared base, adapters stay float32), inputs cast to
    bfloat16 and outputs back to float32 by the Denoiser. Offload: the teacher stays on the CPU
    (``Denoiser.to`` ignores device moves) and each forward moves it to the input's device and back:
    accelerator memory holds it only during its own forward, at the price of one host-to-device
    copy of its weights per call (one call per generator update: CFG is batched).
    """
    if dmd_cfg.teacher_dtype == "bfloat16":
        if shared is not None:
            shared.cast_base(torch.bfloat16)
        else:
            teacher.backbone.to(torch.bfloat16)
            teacher.compute_dtype = torch.bfloat16
    if dmd_cfg.offload_teacher:
        if shared is not None:
            raise ValueError("dmd.offload_teacher cannot be used with LoRA: the teacher is the student's base")
        teacher.backbone.to("cpu")
        teacher.offload = True


def enable_gradient_checkpointing(module: nn.Module) -> int:
    """Turn on diffusers activation checkpointing in every backbone inside a player's module (LoRA views:
    their shared base, adapter-aware). Returns how many backbones were switched on."""
    done, seen = 0, set()
    for m in module.modules():
        if isinstance(m, LoRAView):
            if id(m.shared) not in seen:
                m.shared.enable_gradient_checkpointing()
                seen.add(id(m.shared))
                done += 1
        elif getattr(type(m), "_supports_gradient_checkpointing", False) and hasattr(
                m, "enable_gradient_checkpointing"):
            m.enable_gradient_checkpointing()
            done += 1
    return done


def param_storage_mb(*modules: nn.Module) -> float:
    """MiB of the distinct parameter storages reachable from ``modules`` (a LoRA view counts its shared base):
    three full copies for full fine-tuning, one base plus small adapters with LoRA."""
    seen, total = set(), 0
    for mod in modules:
        for m in mod.modules():
            src = m.shared.model.parameters() if isinstance(m, LoRAView) else m.parameters(recurse=False)
            for p in src:
                st = p.untyped_storage()
                key = (st.data_ptr(), p.device)
                if key not in seen:
                    seen.add(key)
                    total += st.nbytes()
    return total / 2**20


# -- LoRA files for other tools: diffusers' load_lora_weights and kohya / A1111 / ComfyUI -----------------------
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_LORA_FILE = "lora_kohya.safetensors"


def diffusers_lora_state_dict(adapter_sd: dict[str, torch.Tensor], scale: float, prefix: str = "unet"
                              ) -> dict[str, torch.Tensor]:
    """peft adapter weights (``<module>.lora_A.weight`` / ``lora_B``) -> diffusers' LoRA format
    (``unet.<module>.lora_A.weight``), what ``StableDiffusionPipeline.load_lora_weights`` reads. The LoRA scale
    alpha / r is folded into ``lora_B``, so the file is exact at diffusers' default scale 1 whatever alpha was."""
    return {f"{prefix}.{k}": (v * scale if ".lora_B." in k else v).contiguous() for k, v in adapter_sd.items()}


def kohya_lora_state_dict(adapter_sd: dict[str, torch.Tensor], scale: float, prefix: str = "lora_unet"
                          ) -> dict[str, torch.Tensor]:
    """peft adapter weights -> the kohya / A1111 format that ComfyUI reads: ``lora_unet_<module path, dots as
    underscores>.lora_down.weight`` (A), ``.lora_up.weight`` (B) and ``.alpha``; alpha = rank with the scale folded
    into ``lora_up`` (exact at strength 1)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in adapter_sd.items():
        for part, name in ((".lora_A.weight", "lora_down"), (".lora_B.weight", "lora_up")):
            if k.endswith(part):
                mod = f"{prefix}_" + k[: -len(part)].replace(".", "_")
                out[f"{mod}.{name}.weight"] = (v * scale if name == "lora_up" else v).contiguous()
                if name == "lora_down":
                    out[f"{mod}.alpha"] = torch.tensor(float(v.shape[0]))
    return out


def write_lora_files(adapter_sd: dict[str, torch.Tensor], folder: str | Path, rank: int, alpha: float,
                     component: str = "unet") -> dict[str, str]:
    """Write the adapter in diffusers' and kohya's formats beside peft's (``folder``); returns {format: file}."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scale = float(alpha or rank) / float(rank)
    files = lora_file_names(component)
    save_file(diffusers_lora_state_dict(adapter_sd, scale, component), str(folder / DIFFUSERS_LORA_FILE),
              metadata={"format": "pt"})
    if component == "unet":  # kohya's names are defined for the UNet
        save_file(kohya_lora_state_dict(adapter_sd, scale), str(folder / KOHYA_LORA_FILE), metadata={"format": "pt"})
    return files


def lora_file_names(component: str = "unet") -> dict[str, str]:
    """{format: file name} that :func:`write_lora_files` writes for a ``component`` (unet / transformer)."""
    return {"peft": "adapter_model.safetensors", "diffusers": DIFFUSERS_LORA_FILE,
            **({"kohya": KOHYA_LORA_FILE} if component == "unet" else {})}

"""Fully sharded data parallel (``train.fsdp=true``) for the trainer core, with PyTorch's FSDP2.

Without FSDP every process holds every player in full and the core averages gradients with one
all-reduce per update (``core._sync_grads``). With ``train.fsdp=true`` and N > 1 processes,
:func:`shard_objective` applies ``torch.distributed.fsdp.fully_shard`` (FSDP2, per-parameter
sharding on dim 0 over a 1-D device mesh of all processes) to

* every trainable player module (a ``ModuleDict`` / ``ModuleList`` player such as DMD2's critic
  ``{"fake": backbone, "head": GANHead}`` is sharded child by child: FSDP gathers a module's
  parameters in its forward pre-hook, and a container is never called itself),
* its EMA copy, with the same layout, so the EMA update ``e.lerp_(p, 1 - decay)`` is a local
  op on matching shards,
* the frozen teacher's backbone when ``train.fsdp_shard_teacher=true``.

Inside a backbone every child module holding parameters, and every block of a child
``ModuleList`` (diffusers ``down_blocks``, ``up_blocks``, ``transformer_blocks``, ...), is its own
FSDP unit (:func:`fsdp_units`), so only one block is gathered at a time.

Each process then holds ~1/N of every sharded parameter (and of AdamW's moments, which follow the
parameters); FSDP reduce-scatters (averages) the gradients in backward, so the core skips its own
all-reduce. Switching ``requires_grad`` per update works as before: FSDP re-reads the sharded
parameter's flag each time it gathers. Collectives are matched across processes because every
process runs the same updates (shared ``(seed, step, update)`` randomness); for the same reason
sample grids and guards run on every process under FSDP (the main process alone writes files).

Checkpoints stay in the single-process format: :func:`full_state_dict` / :func:`full_optim_state`
gather every ``DTensor`` (collective; the main process keeps the full CPU tensors), and
:func:`load_full_state_dict` / :func:`load_full_optim_state` slice full tensors back into each
process's shard. A run trained with FSDP resumes with or without it, and exports as usual.

Not supported: LoRA players (``dmd.lora_rank > 0``: student, critic and teacher share one base
module, which cannot be split into independent FSDP units; LoRA already keeps a single base) and
``dmd.offload_teacher`` together with ``train.fsdp_shard_teacher``.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

def _dtensor_cls():
    from torch.distributed.tensor import DTensor

    return DTensor


def device_mesh(device: torch.device, world: int):
    """A 1-D mesh over all processes (the process group accelerate initialised: gloo on CPU, NCCL on GPU)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world,))


def callable_units(module: nn.Module) -> list[nn.Module]:
    """The modules FSDP wraps as roots for ``module``: the module itself, or the children of a
    ``ModuleDict`` / ``ModuleList`` (recursively), which are never called as a whole."""
    if type(module) in (nn.ModuleDict, nn.ModuleList):
        return [u for child in module.children() for u in callable_units(child)]
    return [module]


def fsdp_units(module: nn.Module) -> list[nn.Module]:
    """The inner FSDP units of a backbone: every direct child holding parameters, and every element of a
    child ``ModuleList`` (diffusers ``down_blocks``, ``up_blocks``, ``transformer_blocks``, ...).

    Every parameter used before an intermediate output must live in a unit whose *own* output the
    gradient passes through: FSDP re-gathers a unit's parameters for backward when the gradient reaches
    that unit's output. The Denoiser's GAN features are the output of ``mid_block`` (or a middle
    transformer block) while the backbone's final output gets no gradient from the GAN loss; with
    ``conv_in`` / time embedding in the root unit they would not be re-gathered (and a critic that is
    called twice before one backward would find them freed). Hence the root keeps no parameters of its
    own when all of them sit in children (all diffusers backbones).
    """
    units = []
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            units += [b for b in child if any(True for _ in b.parameters())]
        elif any(True for _ in child.parameters()):
            units.append(child)
    return units


def shard_module(module: nn.Module, mesh, reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` the units of ``module`` (:func:`fsdp_units`), then ``module`` itself. In place."""
    from torch.distributed.fsdp import fully_shard

    if getattr(module, "is_lora_view", False) is True:
        raise ValueError("train.fsdp does not support LoRA players (dmd.lora_rank > 0): student, critic and teacher "
                         "share one base module; use LoRA or FSDP")
    for unit in fsdp_units(module):
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return module


def shard_objective(obj, ema: dict[str, nn.Module], mesh, shard_teacher: bool = False) -> dict[str, nn.Module]:
    """Shard the players of ``obj`` (and their EMA copies, same layout), optionally the teacher.

    Must run before the optimizers are built (they hold the sharded parameters). Returns
    ``{player: meta-device template}`` of each EMA module, used by :func:`plain_copy` to rebuild an
    ordinary module for export.
    """
    for name, p in obj.players.items():
        if any(getattr(u, "is_lora_view", False) is True for u in p.module.modules()):
            raise ValueError(f"train.fsdp does not support LoRA players (dmd.lora_rank > 0; player {name}): student, "
                             "critic and teacher share one base module; use LoRA or FSDP")
    templates = {}
    for name, m in ema.items():
        templates[name] = _meta_template(m)
    for name, p in obj.players.items():
        for unit in callable_units(p.module):
            shard_module(unit, mesh)
        if name in ema:
            for unit in callable_units(ema[name]):
                shard_module(unit, mesh)
    if shard_teacher:
        teacher = obj.teacher
        backbone = getattr(teacher, "backbone", None)
        if backbone is None:
            raise ValueError(f"train.fsdp_shard_teacher: {type(obj).__name__} has no teacher.backbone to shard")
        if getattr(teacher, "offload", False):
            raise ValueError("train.fsdp_shard_teacher cannot be combined with dmd.offload_teacher")
        shard_module(backbone, mesh)
    return templates


def _meta_template(m: nn.Module):
    """(structure with parameters on the meta device, all buffers incl. non-persistent ones)."""
    t = copy.deepcopy(m)
    buffers = {k: b.detach().clone().cpu() for k, b in t.named_buffers()}
    return t.to("meta"), buffers


def plain_copy(template, state: dict[str, torch.Tensor]) -> nn.Module:
    """An ordinary (unsharded, CPU) module from a :func:`shard_objective` template and a full state dict."""
    meta, buffers = template
    m = copy.deepcopy(meta).to_empty(device="cpu")
    for k, b in buffers.items():
        mod_name, _, attr = k.rpartition(".")
        getattr(m.get_submodule(mod_name) if mod_name else m, attr).copy_(b)
    m.load_state_dict(state)
    return m


def local_numel(module: nn.Module) -> tuple[int, int]:
    """(elements of the parameters held by this process, elements of the full parameters)."""
    DTensor = _dtensor_cls()
    local = full = 0
    for p in module.parameters():
        full += p.numel()
        local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return local, full


def _gather(v, keep: bool):
    """Full tensor of ``v`` (collective for a DTensor), on the CPU when ``keep`` (else dropped)."""
    if isinstance(v, _dtensor_cls()):
        v = v.full_tensor()
    return v.detach().cpu().contiguous() if keep else None


def full_state_dict(module: nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every shard gathered. Every process must call it (same order);
    only a process with ``keep=True`` (the main one) gets the tensors, the others ``{}``."""
    out = {}
    for k, v in module.state_dict().items():
        full = _gather(v, keep)
        if keep:
            out[k] = full
    return out


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full (single-process format) state dict into a sharded module: every process keeps its slice."""
    from torch.distributed.tensor import distribute_tensor

    DTensor = _dtensor_cls()
    cur = module.state_dict()
    conv = {}
    for k, v in state.items():
        c = cur.get(k)
        if isinstance(c, DTensor):
            v = distribute_tensor(v.to(c.dtype), c.device_mesh, c.placements, src_data_rank=None)
        conv[k] = v
    module.load_state_dict(conv)


def full_optim_state(opt: torch.optim.Optimizer, keep: bool) -> dict:
    """``opt.state_dict()`` with sharded moments gathered: the format a single process writes."""
    sd = opt.state_dict()
    state = {}
    for i in sorted(sd["state"]):
        s = {}
        for k in sorted(sd["state"][i]):
            v = sd["state"][i][k]
            s[k] = _gather(v, keep) if torch.is_tensor(v) else v
        state[i] = s
    return {"state": state, "param_groups": sd["param_groups"]} if keep else {}


def load_full_optim_state(opt: torch.optim.Optimizer, sd: dict) -> None:
    """Load a single-process optimizer state into an optimizer over sharded parameters."""
    from torch.distributed.tensor import distribute_tensor

    DTensor = _dtensor_cls()
    opt.load_state_dict(sd)
    for group in opt.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor) or p not in opt.state:
                continue
            st = opt.state[p]
            for k, v in list(st.items()):
                if torch.is_tensor(v) and not isinstance(v, DTensor) and tuple(v.shape) == tuple(p.shape):
                    st[k] = distribute_tensor(v.to(p.to_local().device), p.device_mesh, p.placements,
                                              src_data_rank=None)


def any_across(flag: bool, device) -> bool:
    """True on every process when ``flag`` is true on any (keeps collective decisions in step)."""
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)

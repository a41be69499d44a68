r"""What can be pruned from a diffusers backbone, the pruned network itself, and the stock config that holds it.

LAPTOP-Diff (Zhang et al. 2024, arXiv 2404.11098) prunes whole *layers* of the U-Net (ResBlocks and
attention / transformer blocks) and keeps every remaining weight as it was. Here a prunable **unit** is a
layer (or a set of layers) whose removal a *stock* diffusers config can express, so that the pruned student is
a smaller config loaded with ``from_pretrained``, never a masked copy:

UNets (``UNet2DModel``, ``UNet2DConditionModel``; stages d = 0..n-1 by resolution, ``L_d`` layers per block)::

    stage{d}.layer{j}   down block d's ResBlock j (+ its attention) and the up ResBlock that consumes its skip
                        (up index L_d - 1 - j, + its attention): the skip connection goes with its producer,
                        every other skip keeps its consumer (a stock config ties L_d down to L_d + 1 up layers)
    down{d}.attention   every attention of down block d    (block type AttnDownBlock2D -> DownBlock2D, ...)
    up{d}.attention     every attention of the up block of stage d
    mid.attention       the mid block's attention           (UNet2DModel add_attention=False)
    mid.tail            the mid block's attention and second ResBlock   (mid_block_type UNetMidBlock2D in
                        UNet2DConditionModel: one ResBlock)
    mid                 the whole mid block                 (mid_block_type None)
    stage{n-1}          the deepest stage: its down and up blocks and the downsampler that leads to it (the mid
                        block then runs one resolution higher; offered when the two deepest stages have the
                        same width)

DiT / PixArt transformers: ``block{k}``, transformer block k (``num_layers`` shrinks).

Units that share a module are alternatives (never both chosen). A unit whose removal breaks a shape (the first
ResBlock of a block that changes the channel count) is not offered. :func:`prune_network` removes a set from a
copy of the network (filtered ``ModuleList`` s, identity attentions): the exact pruned function, for any set.
:func:`stock_network` rebuilds it as a stock diffusers model from a smaller config when one exists (a
``UNet2DModel`` teacher whose layer counts become uneven is written as a ``UNet2DConditionModel`` with per-block
``layers_per_block``; that class's ``UNetMidBlock2D`` has one ResBlock, so such sets must include ``mid.tail``
or ``mid``) and checks that both give the same output.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..denoiser import backbone_kind
from ..errors import ConfigError

DOWN_ATTN = {"AttnDownBlock2D": "DownBlock2D", "CrossAttnDownBlock2D": "DownBlock2D"}
UP_ATTN = {"AttnUpBlock2D": "UpBlock2D", "CrossAttnUpBlock2D": "UpBlock2D"}
PLAIN_BLOCKS = {"DownBlock2D", "UpBlock2D"}
UNET_KINDS = ("unet2d", "unet2d_cond")
DIT_KINDS = ("dit", "pixart")


@dataclass(frozen=True)
class Unit:
    """One prunable unit: its name (see the module docstring) and the module paths it removes."""
    name: str
    modules: frozenset

    def overlaps(self, other: "Unit") -> bool:
        return bool(self.modules & other.modules)


class Skip(nn.Module):
    """A removed attention: returns its input (a tuple when the caller asks for ``return_dict=False``)."""

    def forward(self, hidden_states, *args, return_dict: bool = True, **kwargs):
        return hidden_states if return_dict else (hidden_states,)


# -- the units of a backbone ----------------------------------------------------------------------------------
def _stages(net) -> int:
    return len(net.down_blocks)


def _has_attention(block) -> bool:
    return getattr(block, "attentions", None) is not None and len(block.attentions) > 0


def candidate_units(net: nn.Module) -> list[Unit]:
    """Every unit of ``net`` (before the shape check of :func:`valid_units`)."""
    kind = backbone_kind(net)
    if kind in DIT_KINDS:
        return [Unit(f"block{k}", frozenset({f"transformer_blocks.{k}"})) for k in range(len(net.transformer_blocks))]
    if kind not in UNET_KINDS:
        raise ConfigError(f"prune: {type(net).__name__} is not a UNet2DModel, UNet2DConditionModel or DiT / PixArt "
                          "transformer; layer pruning needs one of those")
    _check_block_types(net)
    n, units = _stages(net), []
    for d in range(n):
        down, up, u = net.down_blocks[d], net.up_blocks[n - 1 - d], n - 1 - d
        L = len(down.resnets)
        for j in range(L):
            i = L - 1 - j  # the up ResBlock that consumes down ResBlock j's skip
            mods = {f"down_blocks.{d}.resnets.{j}", f"up_blocks.{u}.resnets.{i}"}
            if _has_attention(down):
                mods.add(f"down_blocks.{d}.attentions.{j}")
            if _has_attention(up):
                mods.add(f"up_blocks.{u}.attentions.{i}")
            units.append(Unit(f"stage{d}.layer{j}", frozenset(mods)))
        if _has_attention(down):
            units.append(Unit(f"down{d}.attention",
                              frozenset(f"down_blocks.{d}.attentions.{j}" for j in range(len(down.attentions)))))
        if _has_attention(up):
            units.append(Unit(f"up{d}.attention",
                              frozenset(f"up_blocks.{u}.attentions.{i}" for i in range(len(up.attentions)))))
    mid = net.mid_block
    if mid is not None:
        attn = [f"mid_block.attentions.{k}" for k, a in enumerate(mid.attentions) if a is not None]
        res = [f"mid_block.resnets.{k}" for k in range(len(mid.resnets))]
        if attn and backbone_kind(net) == "unet2d":
            units.append(Unit("mid.attention", frozenset(attn)))
        if len(res) > 1:
            units.append(Unit("mid.tail", frozenset(attn + res[1:])))
        units.append(Unit("mid", frozenset(attn + res + ["mid_block"])))
    ch = list(net.config.block_out_channels)
    if n > 1 and ch[-2] == ch[-1]:  # the deepest stage, with the downsampler that leads to it (the mid and up
        D = n - 1                   # blocks after it then see the shallower stage's channels: they must agree)
        mods = {f"down_blocks.{D}", "up_blocks.0", f"down_blocks.{D - 1}.downsamplers"}
        mods |= {m for unit in units for m in unit.modules
                 if m.startswith(f"down_blocks.{D}.") or m.startswith("up_blocks.0.")}
        units.append(Unit(f"stage{D}", frozenset(mods)))
    return units


def _check_block_types(net) -> None:
    c = net.config
    known_down, known_up = PLAIN_BLOCKS | set(DOWN_ATTN), PLAIN_BLOCKS | set(UP_ATTN)
    bad = [t for t in c.down_block_types if t not in known_down] + [t for t in c.up_block_types if t not in known_up]
    if bad:
        raise ConfigError(f"prune: block type {bad[0]} is not supported (known: {sorted(known_down | known_up)})")
    if getattr(c, "downsample_type", "conv") != "conv" or getattr(c, "upsample_type", "conv") != "conv":
        raise ConfigError("prune: only conv down/upsamplers are supported (downsample_type / upsample_type: conv)")


# -- the pruned network (any set) -------------------------------------------------------------------------------
def _keep(mlist: nn.ModuleList, drop: set[int]) -> nn.ModuleList:
    return nn.ModuleList([m for k, m in enumerate(mlist) if k not in drop])


def prune_network(net: nn.Module, units: list[Unit] | tuple = ()) -> nn.Module:
    """A copy of ``net`` without ``units``: the exact pruned function (ModuleLists filtered, removed attentions
    replaced by :class:`Skip`, the deepest stage cut). Weights are shared with nothing (a deep copy)."""
    out = copy.deepcopy(net)
    names = {u.name for u in units}
    if backbone_kind(net) in DIT_KINDS:
        drop = {int(n[len("block"):]) for n in names}
        out.transformer_blocks = _keep(out.transformer_blocks, drop)
        return out
    n = _stages(net)
    D = n - 1
    cut = f"stage{D}" in names
    for d in range(n):
        down, up = out.down_blocks[d], out.up_blocks[n - 1 - d]
        L = len(net.down_blocks[d].resnets)
        drop_down = {j for j in range(L) if f"stage{d}.layer{j}" in names}
        drop_up = {L - 1 - j for j in drop_down}
        for block, attn_unit in ((down, f"down{d}.attention"), (up, f"up{d}.attention")):
            if attn_unit in names:
                block.attentions = nn.ModuleList([Skip() for _ in block.attentions])
        down.resnets = _keep(down.resnets, drop_down)
        up.resnets = _keep(up.resnets, drop_up)
        if _has_attention(down):
            down.attentions = _keep(down.attentions, drop_down)
        if _has_attention(up):
            up.attentions = _keep(up.attentions, drop_up)
    if "mid" in names:
        out.mid_block = None
    elif "mid.tail" in names:
        out.mid_block.resnets = nn.ModuleList([out.mid_block.resnets[0]])
        out.mid_block.attentions = nn.ModuleList([])
    elif "mid.attention" in names:
        out.mid_block.attentions = nn.ModuleList([Skip() for _ in out.mid_block.attentions])
    if cut:
        out.down_blocks = nn.ModuleList(list(out.down_blocks)[:D])
        out.up_blocks = nn.ModuleList(list(out.up_blocks)[1:])
        out.down_blocks[D - 1].downsamplers = None
        if hasattr(out, "num_upsamplers"):
            out.num_upsamplers -= 1
    return out


def layer_counts(net: nn.Module, units) -> list[int]:
    """Down-block layer counts per kept stage after removing ``units``."""
    names = {u.name for u in units}
    n = _stages(net)
    counts = [sum(f"stage{d}.layer{j}" not in names for j in range(len(net.down_blocks[d].resnets))) for d in range(n)]
    return counts[:-1] if f"stage{n - 1}" in names else counts


# -- the stock config that holds a pruned network --------------------------------------------------------------
def stock_config(net: nn.Module, units) -> tuple[str, dict] | None:
    """``(class name, config)`` of a stock diffusers model with the structure of ``prune_network(net, units)``,
    or None when no stock config expresses it (see the module docstring)."""
    names = {u.name for u in units}
    c = {k: v for k, v in dict(net.config).items() if not k.startswith("_")}
    cls = type(net).__name__
    if backbone_kind(net) in DIT_KINDS:
        c["num_layers"] = len(net.transformer_blocks) - len(names)
        return cls, c
    n = _stages(net)
    D = n - 1
    cut = f"stage{D}" in names
    keep = D if cut else n
    lpb = layer_counts(net, units)
    down_t = [DOWN_ATTN.get(t, t) if f"down{d}.attention" in names else t
              for d, t in enumerate(c["down_block_types"][:keep])]
    up_all = list(c["up_block_types"])
    up_t = [UP_ATTN.get(up_all[n - 1 - d], up_all[n - 1 - d]) if f"up{d}.attention" in names else up_all[n - 1 - d]
            for d in range(keep)][::-1]
    mid = "none" if "mid" in names else "tail" if "mid.tail" in names else (
        "no_attention" if "mid.attention" in names else "full")
    if net.mid_block is None:
        mid = "none"
    uniform = len(set(lpb)) == 1
    if cls == "UNet2DModel" and uniform and mid != "tail":
        c.update(block_out_channels=list(c["block_out_channels"][:keep]), down_block_types=down_t,
                 up_block_types=up_t, layers_per_block=lpb[0])
        if mid == "none":
            c["mid_block_type"] = None
        elif mid == "no_attention":
            c["add_attention"] = False
        return cls, c
    if cls == "UNet2DModel":
        if mid not in ("tail", "none"):
            return None  # UNet2DConditionModel's UNetMidBlock2D holds one ResBlock only
        c = _unet2d_as_condition_config(c)
        mid_type = "UNetMidBlock2D"
    elif cls == "UNet2DConditionModel":
        if mid == "no_attention":
            return None
        mid_type = c.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
        if mid == "tail":
            mid_type = "UNetMidBlock2D"
        c = _slice_per_block(c, n, keep)
    else:
        return None
    c.update(block_out_channels=list(c["block_out_channels"][:keep]), down_block_types=down_t,
             up_block_types=up_t, layers_per_block=lpb, mid_block_type=None if mid == "none" else mid_type)
    return "UNet2DConditionModel", c


#: the UNet2DModel config keys a UNet2DConditionModel config takes as they are
_SHARED_KEYS = ("sample_size", "in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos", "freq_shift",
                "block_out_channels", "downsample_padding", "mid_block_scale_factor", "dropout", "act_fn",
                "norm_num_groups", "norm_eps", "resnet_time_scale_shift", "class_embed_type", "num_class_embeds",
                "time_embedding_type", "time_embedding_dim", "attention_head_dim")


def _unet2d_as_condition_config(c: dict) -> dict:
    if c.get("time_embedding_type", "positional") != "positional" or c.get("attn_norm_num_groups") is not None:
        raise ConfigError("prune: uneven layer counts need a UNet2DConditionModel, which has no "
                          "fourier/learned time embedding or attn_norm_num_groups; this teacher uses one")
    return {k: c[k] for k in _SHARED_KEYS if k in c}


def _slice_per_block(c: dict, n: int, keep: int) -> dict:
    """Per-block list entries of a UNet2DConditionModel config cut to the ``keep`` shallowest stages (the reversed
    lists lose their first entry)."""
    c = dict(c)
    for k in ("transformer_layers_per_block", "attention_head_dim", "num_attention_heads", "cross_attention_dim",
              "only_cross_attention"):
        v = c.get(k)
        if isinstance(v, (list, tuple)) and len(v) == n:
            c[k] = list(v[:keep])
    v = c.get("reverse_transformer_layers_per_block")
    if isinstance(v, (list, tuple)) and len(v) == n:
        c["reverse_transformer_layers_per_block"] = list(v[n - keep:])
    return c


def stock_network(net: nn.Module, units, probe=None) -> nn.Module:
    """The pruned network as a stock diffusers model (its weights copied from :func:`prune_network`'s result);
    ``probe``: a :class:`~stepdistill.pruning.criterion.Calibration` on which both must agree (checked: relative
    max difference 1e-5)."""
    import diffusers

    found = stock_config(net, units)
    if found is None:
        raise ConfigError(f"prune: no stock diffusers config holds the set {sorted(u.name for u in units)} "
                          "(uneven layer counts in a UNet2DModel need mid.tail or mid as well)")
    cls_name, cfg = found
    pruned = prune_network(net, units)
    with torch.random.fork_rng(devices=[]):
        stock = getattr(diffusers, cls_name).from_config(cfg)
    missing, unexpected = stock.load_state_dict(pruned.state_dict(), strict=False)
    if missing or unexpected:
        raise ConfigError(f"prune: the stock {cls_name} does not hold the pruned weights (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    dtype = next(net.parameters()).dtype
    if dtype != torch.float32:
        stock.to(dtype)
    stock.eval()
    if probe is not None:
        want, got = probe.outputs(pruned, limit=8), probe.outputs(stock, limit=8)
        err = float((want - got).abs().max() / want.abs().max().clamp_min(1e-12))
        if err > 1e-5:
            raise ConfigError(f"prune: the stock {cls_name} differs from the pruned network (relative {err:.2e})")
    return stock

r"""A deeper copy of a transformer backbone that computes the same function: the inverse of layer pruning.

A student need not have its teacher's size. Pruning (:mod:`.structure`) makes it smaller; growing makes it
deeper, for a few-step student whose gap to its teacher is capacity (each of its calls must do the work of many
teacher calls). The grown network starts as the teacher's function exactly, so distillation starts where it
would from a teacher copy (DMD2, Yin et al. 2024, Sec. 4.1: the student is initialised from the teacher):

- after each block k in ``after``, a copy of block k is inserted;
- in each inserted copy the projections that write into the residual stream are zeroed (weight and bias):
  the self-attention's and cross-attention's output projection and the feed-forward's output projection. A
  pre-norm transformer block computes ``h + g_a * Attn(norm(h)) + CrossAttn(...) + g_f * FFN(norm(h))``, so
  with those three zero the block returns ``h``: the grown network equals the original one bit for bit at
  initialisation (the function-preserving "depth growth" of Net2Net, Chen, Goodfellow & Shlens 2016, Sec. 2.2,
  with identity blocks made by zero output projections as in ReZero / adaLN-zero);
- its other weights (queries, keys, values, the feed-forward's input projection, norms, modulation tables)
  start as block k's, so the gradient of the zeroed projections is non-zero from the first step (a block whose
  input projections were also zero would have no gradient at all).

Supported: the transformer families whose blocks sit in one ``ModuleList`` of a stock config with
``num_layers``: ``WanTransformer3DModel`` (``blocks``) and ``Transformer2DModel`` / ``DiTTransformer2DModel`` /
``PixArtTransformer2DModel`` (``transformer_blocks``). The result is a stock diffusers model of the same class
with a larger ``num_layers``: it loads with ``from_pretrained`` like any other.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..denoiser import backbone_kind
from ..errors import ConfigError

#: {backbone kind: (its block list attribute, the residual-writing projections inside a block)}
GROWABLE = {
    "wan": ("blocks", ("attn1.to_out.0", "attn2.to_out.0", "ffn.net.2")),
    "dit": ("transformer_blocks", ("attn1.to_out.0", "attn2.to_out.0", "ff.net.2")),
    "pixart": ("transformer_blocks", ("attn1.to_out.0", "attn2.to_out.0", "ff.net.2")),
}
GROWN_KEY = "grown"


def block_list(net: nn.Module) -> tuple[str, tuple[str, ...]]:
    """(block list attribute, residual-writing projections) of a growable backbone; ConfigError otherwise."""
    kind = backbone_kind(net)
    if kind not in GROWABLE:
        raise ConfigError(f"grow: {type(net).__name__} ({kind}) is not supported; a deeper student can be grown from "
                          f"a transformer of the kinds {', '.join(sorted(GROWABLE))} (UNets have no block list that "
                          "a stock config lengthens)")
    return GROWABLE[kind]


def check_after(net: nn.Module, after) -> list[int]:
    """The sorted distinct block indices of ``after``; ConfigError naming ``--after`` when one is out of range."""
    attr, _ = block_list(net)
    n = len(getattr(net, attr))
    idx = sorted({int(k) for k in after})
    if not idx:
        raise ConfigError("grow: --after names no block; give the blocks to copy, e.g. --after 1,3")
    bad = [k for k in idx if not 0 <= k < n]
    if bad:
        raise ConfigError(f"grow: --after {bad[0]} is not a block of this network (it has blocks 0..{n - 1})")
    return idx


def grow_network(net: nn.Module, after) -> nn.Module:
    """A new network of ``net``'s class with a zero-output copy of each block in ``after`` inserted right after it
    (see the module docstring). ``net`` is not changed. The new network is in eval mode."""
    attr, writers = block_list(net)
    idx = check_after(net, after)
    n = len(getattr(net, attr))
    config = {k: v for k, v in dict(net.config).items() if not k.startswith("_")}
    config["num_layers"] = n + len(idx)
    grown = type(net)(**config)
    src = net.state_dict()
    prefix = lambda k: f"{attr}.{k}."  # noqa: E731
    out = {key: v for key, v in src.items() if not key.startswith(f"{attr}.")}
    j = 0
    for k in range(n):
        block = {key[len(prefix(k)):]: v for key, v in src.items() if key.startswith(prefix(k))}
        out.update({prefix(j) + sub: v.clone() for sub, v in block.items()})
        j += 1
        if k in idx:
            missing = [w for w in writers if f"{w}.weight" not in block and not w.startswith("attn2")]
            if missing:   # only a cross-attention may be absent (a class-conditional DiT has none)
                raise ConfigError(f"grow: block {k} of {type(net).__name__} lacks {missing[0]}: cannot make an "
                                  "identity copy of it")
            zero = tuple(f"{w}." for w in writers if f"{w}.weight" in block)
            out.update({prefix(j) + sub: (torch.zeros_like(v) if sub.startswith(zero) else v.clone())
                        for sub, v in block.items()})
            j += 1
    grown.load_state_dict(out)
    dtype = next(net.parameters()).dtype
    return (grown if dtype == torch.float32 else grown.to(dtype)).eval()


def inserted_blocks(after: list[int]) -> list[int]:
    """The indices, in the grown network, of the inserted copies (block k's copy follows it)."""
    return [k + 1 + i for i, k in enumerate(sorted(after))]


def block_map(n: int, after: list[int]) -> dict[str, int]:
    """{grown block index: original block index it started as} for every block of the grown network."""
    out, j = {}, 0
    for k in range(n):
        out[str(j)] = k
        j += 1
        if k in after:
            out[str(j)] = k
            j += 1
    return out


def grown_record(source: str, allow_pickle: bool = False) -> dict | None:
    """The ``extra.grown`` record of a model folder (None for any other, or a hub id without one)."""
    from ..models import meta_extra

    return meta_extra(source, allow_pickle).get(GROWN_KEY)


def describe(record: dict) -> str:
    """The model card's words for a grown network."""
    return (f"The network is a deeper copy of `{record['source']}` (`stepdistill grow --after "
            f"{','.join(map(str, record['after']))}`): blocks {record['after']} each followed by a copy of itself "
            f"whose residual-writing projections started at zero, {record['num_layers_before']} -> "
            f"{record['num_layers_after']} blocks, {record['params_before']:,} -> {record['params_after']:,} "
            f"parameters ({record['class']}). At initialisation it computed the source's function exactly.")

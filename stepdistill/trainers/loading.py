"""A run's trained networks back from its checkpoint, for ``stepdistill export`` and ``curve``: the method's
objective is rebuilt from the config (stepdistill/methods.py) and its EMA networks loaded (hash-checked)."""
from __future__ import annotations

from pathlib import Path

from ..config import DistillConfig
from ..methods import get_method
from .checkpoint import latest_checkpoint, load_ema_weights
from .setup import restoring_checkpoint


def load_trained(cfg: DistillConfig, checkpoint: str | Path | None = None, weights: str = "ema"):
    """``(ema modules {player: network}, objective, meta)`` of a run's checkpoint (latest by default);
    ``weights="raw"``: the players' own weights instead of their EMA."""
    method = get_method(cfg.method)
    path = Path(checkpoint) if checkpoint else latest_checkpoint(cfg.output_dir)
    if path is not None:  # before building anything: another run's checkpoint is refused in one line
        check_checkpoint_matches(cfg, path)
    with restoring_checkpoint(path is not None):  # the checkpoint's weights replace any dmd.critic_init
        obj, _, meta = method.build(cfg)
    modules = method.ema_modules(obj)
    load_ema_weights(cfg.output_dir, modules, checkpoint, weights)
    return modules, obj, meta


def check_checkpoint_matches(cfg: DistillConfig, checkpoint: Path) -> None:
    """A checkpoint exports only under the config of the run that wrote it (apart from
    :data:`~stepdistill.trainers.core.RESUME_MAY_CHANGE`): another run's 2-step checkpoint is not a 1-step
    student of this one."""
    from ..config import to_dict
    from ..errors import CheckpointError
    from .checkpoint import config_diff, verify_checkpoint

    meta = verify_checkpoint(checkpoint)
    diff = config_diff(type(cfg), meta.get("config"), to_dict(cfg))
    if diff:
        shown = ", ".join(f"{k} ({a!r} in the checkpoint, {b!r} here)" for k, a, b in diff[:4])
        raise CheckpointError(f"checkpoint {checkpoint} belongs to a run with another config: {shown}"
                              f"{' ...' if len(diff) > 4 else ''}. Export it with its own run's config "
                              f"(--config <its output_dir>/config.yaml)")

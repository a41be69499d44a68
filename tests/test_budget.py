"""train.memory_budget_gib (stepdistill/profiling/budget.py): the planner picks the cheapest setting that fits, the
chosen setting's measured training memory stays under the budget (and the setting it passed over does not), nothing
that fits is one line before anything starts, bad values name the key."""
from __future__ import annotations

import pytest
import torch

from conftest import run_cli
from stepdistill.config import ConfigError, DistillConfig, load_config
from stepdistill.profiling.budget import fit_to_budget

BUDGET_MIB = 300


@pytest.fixture(scope="module")
def heavy_teacher(tmp_path_factory):
    """A 16 M-parameter class-conditional UNet on 8x8 digits: weights, not activations, dominate its training
    memory, so full fine-tuning (~600 MiB) and LoRA (~240 MiB) land on either side of a 300 MiB budget."""
    from diffusers import DDPMScheduler, UNet2DModel

    from stepdistill.models import ModelMeta, save_model_folder

    torch.manual_seed(0)
    net = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(128, 256), layers_per_block=2,
                      down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32, attention_head_dim=64,
                      num_class_embeds=11)
    out = tmp_path_factory.mktemp("heavy") / "teacher"
    meta = ModelMeta(prediction_type="epsilon", class_names=[str(i) for i in range(10)], null_class=10,
                     extra={"dataset": "digits"})
    save_model_folder(out, net, DDPMScheduler(prediction_type="epsilon"), meta, "StepDistillTeacherPipeline")
    return out


def _base(teacher) -> list[str]:
    return [f"dmd.teacher={teacher}", "data.name=digits", "data.resolution=8", "train.batch_size=2", "dmd.gan=true",
            "dmd.critic_updates=1", "train.threads=1", "train.cpu=true"]


def _cfg(teacher, *extra):
    return load_config(DistillConfig, None, _base(teacher) + list(extra))


def test_the_chosen_setting_fits_measured(heavy_teacher):
    from stepdistill.profiling.memory import train_memory

    cfg = _cfg(heavy_teacher, f"train.memory_budget_gib={BUDGET_MIB / 1024}")
    lines = []
    choice = fit_to_budget(cfg, say=lines.append)
    assert choice["chose"].startswith("LoRA rank 64") and cfg.dmd.lora_rank == 64
    assert cfg.dmd.teacher_dtype == "bfloat16" and cfg.train.gradient_checkpointing
    assert choice["planned_gib"] * 1024 <= BUDGET_MIB
    assert all(t["planned_gib"] * 1024 > BUDGET_MIB for t in choice["tried"][:-1])  # every cheaper rung is over
    assert len(lines) == 1 and "chose LoRA rank 64" in lines[0] and "as configured" in lines[0]
    chosen = [f"{k}={v}" for k, v in choice["settings"].items()]
    fits = train_memory(_base(heavy_teacher) + chosen, steps=1, mode="as_given")
    over = train_memory(_base(heavy_teacher), steps=1, mode="as_given")  # what it passed over
    # the tensors a training step holds, read from the live networks and optimizers after a step: weights (teacher,
    # players, EMA), gradients (as large as the trainable weights) and AdamW states
    held = lambda r: r["param_mb"] + r["trainable_mb"] + r["optimizer_state_mb"]  # noqa: E731
    assert fits["lora_rank"] == 64 and held(fits) < BUDGET_MIB < held(over)
    # and the child process's resident-memory peak over its baseline (activations and allocator slack included;
    # VmHWM of the child itself, whatever the size of this pytest process)
    assert fits["train_rss_mb"] < BUDGET_MIB < over["train_rss_mb"]


def test_a_budget_that_fits_changes_nothing(heavy_teacher):
    cfg = _cfg(heavy_teacher, "train.memory_budget_gib=8")
    before = (cfg.dmd.lora_rank, cfg.dmd.teacher_dtype, cfg.train.gradient_checkpointing, cfg.dmd.offload_teacher)
    choice = fit_to_budget(cfg, say=lambda m: None)
    assert choice["chose"] == "as configured" and choice["settings"] == {}
    assert (cfg.dmd.lora_rank, cfg.dmd.teacher_dtype, cfg.train.gradient_checkpointing,
            cfg.dmd.offload_teacher) == before
    assert fit_to_budget(_cfg(heavy_teacher)) is None  # no budget: the planner stays out of the way


def test_nothing_fits_is_one_line_before_anything_starts(heavy_teacher, tmp_path, capsys):
    rc, out, err = run_cli(capsys, ["distill", "--config", "", *_base(heavy_teacher), f"output_dir={tmp_path / 'r'}",
                                    "train.memory_budget_gib=0.01"])
    assert rc == 2 and "train.memory_budget_gib: nothing fits in 10.2 MiB" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_bad_budgets_name_the_key(heavy_teacher):
    with pytest.raises(ConfigError, match="train.memory_budget_gib"):
        _cfg(heavy_teacher, "train.memory_budget_gib=lots")
    with pytest.raises(ConfigError, match="train.memory_budget_gib"):
        _cfg(heavy_teacher, "train.memory_budget_gib=-1")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="auto reads the GPU"):
            fit_to_budget(_cfg(heavy_teacher, "train.memory_budget_gib=auto"))


def test_the_cli_trains_with_the_chosen_setting(heavy_teacher, tmp_path, capsys):
    run = tmp_path / "run"
    rc, out, _ = run_cli(capsys, ["distill", "--config", "", *_base(heavy_teacher), f"output_dir={run}",
                                  f"train.memory_budget_gib={BUDGET_MIB / 1024}", "train.max_steps=1",
                                  "train.sample_every=1", "train.checkpoint_every=1", "train.log_every=1"])
    assert rc == 0 and "chose LoRA rank 64" in out
    saved = (run / "config.yaml").read_text()
    assert "lora_rank: 64" in saved and "teacher_dtype: bfloat16" in saved
    assert (run / "student" / "lora").is_dir()  # a LoRA student was trained and exported

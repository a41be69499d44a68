"""The memory planner (stepdistill/profiling/plan.py): the activation trace against a real CPU trace, the parameter and
state arithmetic, the CLI, and the planner against the shipped real-size measurements (within 15%)."""
from __future__ import annotations

import json

import pytest
import torch

from stepdistill.errors import ConfigError
from stepdistill.profiling.plan import (CALIBRATION, PlanRequest, _denoiser, count_parameters, fit_grid, meta_network, plan,
                              trace_activations)

TINY = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, layers_per_block=1, attention_head_dim=8, norm_num_groups=8)
CAL = {"activation_factor": 2.0, "source": "test"}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A latent text teacher folder (unet/ + vae/ marker) with a small UNet2DConditionModel."""
    import diffusers

    root = tmp_path_factory.mktemp("tiny_teacher")
    torch.manual_seed(0)
    diffusers.UNet2DConditionModel(**TINY).save_pretrained(root / "unet")
    (root / "vae").mkdir()
    return root


def _tiny(device):
    import diffusers

    torch.manual_seed(0)
    with torch.device(device):
        return diffusers.UNet2DConditionModel(**TINY)


def test_the_meta_trace_equals_what_autograd_keeps_on_real_tensors():
    """On the meta device the planner substitutes the fused attention kernel; on real CPU tensors the backend
    picks it itself. Both keep exactly the same bytes; the math path (what meta would trace) keeps 2x more."""
    real = trace_activations(_denoiser(_tiny("cpu")), 1, 16, 7, fused_attention=False)
    meta = trace_activations(_denoiser(_tiny("meta")), 1, 16, 7)
    math = trace_activations(_denoiser(_tiny("meta")), 1, 16, 7, fused_attention=False)
    assert real["bytes"] == meta["bytes"] > 0
    assert math["bytes"] > 1.5 * meta["bytes"]
    assert meta["feature_shape"] == (1, 64, 8, 8)   # the GAN head's input (mid block)
    # batch and resolution scale the trace linearly / by area
    assert trace_activations(_denoiser(_tiny("meta")), 2, 16, 7)["bytes"] == pytest.approx(2 * meta["bytes"], rel=0.01)
    big = trace_activations(_denoiser(_tiny("meta")), 1, 32, 7)["bytes"]
    assert 3.2 * meta["bytes"] < big < 4.4 * meta["bytes"]


def test_checkpointing_and_lora_keep_less_than_full_training():
    full = trace_activations(_denoiser(_tiny("meta")), 1, 16, 7)["bytes"]
    ckpt = trace_activations(_denoiser(_tiny("meta")), 1, 16, 7, gradient_checkpointing=True)["bytes"]
    assert 0.1 * full < ckpt < 0.6 * full
    bf16 = trace_activations(_denoiser(_tiny("meta").to(torch.bfloat16)), 1, 16, 7, dtype=torch.bfloat16)["bytes"]
    assert bf16 == pytest.approx(full / 2, rel=0.05)


def test_lora_parameter_count_is_rank_times_fan_in_plus_fan_out(tiny_folder):
    net, factor, tokens = meta_network(str(tiny_folder))
    assert factor == 8 and tokens == 77
    r, expect = 4, 0
    for name, m in net.named_modules():
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0")) and isinstance(m, torch.nn.Linear):
            expect += r * (m.in_features + m.out_features)
    counts = count_parameters(str(tiny_folder), lora_rank=r)
    assert counts["lora"] == expect > 0
    assert counts["backbone"] == sum(p.numel() for p in _tiny("meta").parameters())


def test_plan_arithmetic(tiny_folder):
    t = str(tiny_folder)
    base = plan(PlanRequest(teacher=t, resolution=128, dtype="fp32"), CAL)
    P, g = base["parameters"]["backbone"], base["per_gpu_gib"]
    gib = 2**30
    assert g["teacher_weights"] == pytest.approx(4 * P / gib, abs=1e-3)
    assert g["student_optimizer"] == pytest.approx(2 * g["student_gradients"], abs=2e-3)
    assert g["ema"] == pytest.approx(g["student_weights"], abs=1e-3)
    assert base["latent_side"] == 16
    assert g["activations"] == pytest.approx(2.0 * base["activations_traced_per_sample_gib"], rel=1e-2)
    sharded = plan(PlanRequest(teacher=t, resolution=128, dtype="fp32", gpus=4, fsdp=True), CAL)["per_gpu_gib"]
    assert sharded["student_optimizer"] == pytest.approx(g["student_optimizer"] / 4, abs=1e-3)
    assert sharded["teacher_weights"] == g["teacher_weights"] and sharded["activations"] == g["activations"]
    st = plan(PlanRequest(teacher=t, resolution=128, dtype="fp32", gpus=4, fsdp=True, shard_teacher=True), CAL)
    assert st["per_gpu_gib"]["teacher_weights"] == pytest.approx(g["teacher_weights"] / 4, abs=1e-3)
    bf = plan(PlanRequest(teacher=t, resolution=128, dtype="bf16", batch=2), CAL)["per_gpu_gib"]
    assert bf["teacher_weights"] == pytest.approx(g["teacher_weights"] / 2, abs=1e-3)
    assert bf["activations"] == pytest.approx(g["activations"], rel=0.05)   # half the bytes, twice the batch
    lora = plan(PlanRequest(teacher=t, resolution=128, dtype="fp32", mode="lora", lora_rank=4), CAL)
    assert lora["total_gib"] < base["total_gib"] and lora["parameters"]["lora_per_role"] > 0
    assert plan(PlanRequest(teacher=t, resolution=128, gpu_gib=1e-6), CAL)["fits"] is False
    for bad, key in [(dict(mode="qlora"), "--mode"), (dict(shard_teacher=True), "--shard-teacher"),
                     (dict(resolution=100), "--resolution"), (dict(dtype="fp16"), "--dtype")]:
        with pytest.raises(ConfigError, match=key):
            plan(PlanRequest(teacher=t, **bad), CAL)
    with pytest.raises(ConfigError, match="--teacher"):
        plan(PlanRequest(teacher="no_such_model"), CAL)


def test_fit_grid_adds_sharding_as_the_gpu_count_allows(tiny_folder):
    t = str(tiny_folder)
    full = plan(PlanRequest(teacher=t, resolution=128), CAL)["total_gib"]
    rows = fit_grid(t, gpus=(1, 8), resolution=128, gpu_gib=0.6 * full, calibration=CAL)
    assert rows[0]["gpus"] == 1 and rows[1]["gpus"] == 8
    assert rows[1]["fits"] and rows[1]["config"]["mode"] == "full" and rows[1]["config"]["fsdp"]
    assert rows[1]["total_gib"] <= 0.6 * full
    assert not rows[0]["fits"] or rows[0]["config"] != rows[1]["config"]


def test_plan_cli_prints_json_and_a_table(tiny_folder, capsys):
    from stepdistill.frontends.cli import main

    assert main(["plan", "--teacher", str(tiny_folder), "--mode", "lora", "--lora-rank", "4",
                 "--resolution", "128", "--gpus", "2", "--fsdp"]) == 0
    out = capsys.readouterr()
    res = json.loads(out.out)
    assert res["request"]["gpus"] == 2 and res["per_gpu_gib"]["activations"] > 0
    assert "total" in out.err and "MiB / GPU" in out.err   # a small model: MiB, not 0.00 GiB everywhere


def test_the_planner_is_within_15_percent_of_every_real_size_measurement():
    """The shipped calibration carries the SD 1.5-size CPU measurements (python -m stepdistill.profiling.memory --arch
    sd15); the planner must reproduce each measured mode's training memory within 15%, including the modes its
    constant was not fitted on, and must agree that full training does not fit in this machine's memory."""
    cal = json.loads(CALIBRATION.read_text())
    measured = cal["measurements"]
    assert {"sd15_64_lora", "sd15_64_lora_bf16_ckpt", "sd15_64_full", "sd15_32_lora", "sd15_32_lora_bf16_ckpt"} \
        <= set(measured)
    for name, m in measured.items():
        p = plan(PlanRequest.from_measurement(m), cal)
        if not m["fits"]:
            assert p["total_gib"] > m["available_gib"], name
            continue
        got = m["train_rss_mb"] / 1024
        assert abs(p["total_gib"] - got) / got < 0.15, (name, p["total_gib"], got)


@pytest.mark.parametrize("name, machines", [("fsdp.yaml", 1), ("fsdp_multinode.yaml", 8)])
def test_accelerate_launch_configs_parse(name, machines):
    """accelerate's own loader reads the shipped launch configs (one process per GPU, 8 per node)."""
    from accelerate.commands.config.config_args import load_config_from_file

    c = load_config_from_file(f"configs/accelerate/{name}")
    assert c.num_machines == machines and c.num_processes == 8 * machines
    assert c.distributed_type.value == "MULTI_GPU" and c.mixed_precision == "no"


def test_wan_video_teachers_from_their_configs():
    """Wan 2.1 1.3B / 14B are built on the meta device from their shipped configs: the parameter counts match the
    names, and a tiny Wan's meta trace equals the real CPU trace and grows with the clip's latent frames."""
    import diffusers

    from stepdistill.profiling.plan import latent_frames

    small, big = count_parameters("wan-1.3b")["backbone"], count_parameters("wan-14b")["backbone"]
    assert 1.3e9 < small < 1.5e9 and 13e9 < big < 15e9
    assert latent_frames("wan-1.3b", 81) == 21 and latent_frames("sd15", 81) == 0

    def tiny(device):
        torch.manual_seed(0)
        with torch.device(device):
            return diffusers.WanTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                   out_channels=4, text_dim=16, freq_dim=8, ffn_dim=32, num_layers=2)

    real = trace_activations(_denoiser(tiny("cpu")), 1, 8, 5, fused_attention=False, frames=3)
    meta = trace_activations(_denoiser(tiny("meta")), 1, 8, 5, frames=3)
    assert real["bytes"] == meta["bytes"] > 0 and meta["feature_shape"][1] == 3 * 4 * 4   # tokens F' h' w'
    six = trace_activations(_denoiser(tiny("meta")), 1, 8, 5, frames=6)["bytes"]
    assert 1.7 * meta["bytes"] < six < 2.6 * meta["bytes"]
    res = plan(PlanRequest(teacher="wan-1.3b", mode="lora", frames=81, resolution=480, gradient_checkpointing=True),
               calibration=CAL)
    assert res["latent_side"] == 60 and res["total_gib"] > 0

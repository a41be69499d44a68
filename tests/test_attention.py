"""Attention backends (stepdistill/attention.py): math and SDPA give the same outputs, train.attention switches every
network of a run (the teacher too), bench records the backend, xformers without the package is one clear error."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import tiny_cfg
from stepdistill.attention import attention_layers, processor_names, set_attention
from stepdistill.errors import ConfigError


def _unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8).eval()


def test_math_equals_sdpa_and_counts_layers():
    net = _unet()
    x, t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([10.0, 500.0])
    assert processor_names(net) == {"AttnProcessor2_0"} and len(attention_layers(net)) > 0
    with torch.no_grad():
        ref = net(x, t).sample
    assert set_attention(net, "sdpa") == 0 and processor_names(net) == {"AttnProcessor2_0"}
    assert set_attention(net, "math") == len(attention_layers(net)) and processor_names(net) == {"AttnProcessor"}
    with torch.no_grad():
        out = net(x, t).sample
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert set_attention(torch.nn.Linear(2, 2), "math") == 0  # a custom module without diffusers attention


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed here")
def test_xformers_without_the_package_is_one_clear_line():
    with pytest.raises(ConfigError, match="train.attention=xformers needs the xformers package"):
        set_attention(_unet(), "xformers")
    with pytest.raises(ConfigError, match="train.attention: must be one of sdpa"):
        set_attention(_unet(), "flash")


def test_train_attention_switches_the_teacher_and_players(tiny_teacher, tmp_path):
    from stepdistill.trainers.core import Trainer
    from stepdistill.trainers.distill import build_method

    cfg = tiny_cfg(tiny_teacher, tmp_path, **{"train.attention": "math"})
    obj, data, _ = build_method(cfg)
    if not attention_layers(obj.teacher.backbone):
        pytest.skip("the tiny teacher has no attention layers")
    Trainer(obj, cfg, data=data)
    for m in [obj.teacher.backbone] + [p.module for p in obj.players.values()]:
        names = processor_names(m)
        assert names in (set(), {"AttnProcessor"}), names
    with pytest.raises(ConfigError, match="train.attention"):
        tiny_cfg(tiny_teacher, tmp_path / "b", **{"train.attention": "flash"})


def test_bench_records_the_backend(capsys):
    import json

    from stepdistill.frontends.cli import main

    main(["bench", "--student", "builtin:animal_mnist_dmd2", "--attention", "math", "--batch-sizes", "1",
          "--repeats", "1", "--warmup", "0", "--teacher-steps", "2", "--threads", "1", "--no-progress"])
    res = json.loads(capsys.readouterr().out)
    assert res["config"]["attention"] == "math" and res["config"]["attention_layers_switched"] > 0

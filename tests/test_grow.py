"""``stepdistill grow``: a deeper transformer that computes its source's function exactly (Wan, DiT, PixArt), whose
inserted blocks still learn, written as a stock diffusers folder that a DMD2 run takes as a deeper student."""
from __future__ import annotations

import json

import pytest
import torch

from stepdistill.errors import ConfigError
from stepdistill.pruning.growth import block_map, grow_network, inserted_blocks


def _wan(num_layers=2):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=1,
                                 out_channels=1, text_dim=12, freq_dim=16, ffn_dim=32, num_layers=num_layers,
                                 cross_attn_norm=True, rope_max_seq_len=16).eval()


def _randomise(net):
    """Random weights everywhere (diffusers zero-initialises some output layers: a test on those would not see a
    wrongly copied block)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net


def test_a_grown_wan_equals_its_source_and_its_new_blocks_learn():
    net = _randomise(_wan(3))
    g = torch.Generator().manual_seed(2)
    x, t, enc = torch.randn(2, 1, 4, 8, 8, generator=g), torch.tensor([900.0, 100.0]), torch.randn(2, 5, 12, generator=g)
    grown = grow_network(net, [0, 2])
    assert type(grown).__name__ == "WanTransformer3DModel" and grown.config.num_layers == 5
    assert len(net.blocks) == 3                                          # the source is not changed
    with torch.no_grad():
        want = net(x, t, enc, return_dict=False)[0]
        got = grown(x, t, enc, return_dict=False)[0]
    assert want.abs().mean() > 0.1 and torch.equal(got, want)           # bit for bit, on a non-trivial output
    assert inserted_blocks([0, 2]) == [1, 4]
    assert block_map(3, [0, 2]) == {"0": 0, "1": 0, "2": 1, "3": 2, "4": 2}
    for j, k in ((1, 0), (4, 2)):                                        # the copies: block k with zero writers
        new, old = grown.blocks[j], net.blocks[k]
        for name in ("attn1.to_out.0", "attn2.to_out.0", "ffn.net.2"):
            assert new.get_submodule(name).weight.abs().max() == 0 and new.get_submodule(name).bias.abs().max() == 0
        torch.testing.assert_close(new.attn1.to_q.weight, old.attn1.to_q.weight, atol=0, rtol=0)
        torch.testing.assert_close(new.scale_shift_table, old.scale_shift_table, atol=0, rtol=0)
    # the zeroed writers get a gradient from the first step (their inputs are block k's non-zero activations)
    grown.train()
    grown(x, t, enc, return_dict=False)[0].pow(2).mean().backward()
    for name in ("attn1.to_out.0", "attn2.to_out.0", "ffn.net.2"):
        assert grown.blocks[1].get_submodule(name).weight.grad.abs().max() > 1e-6, name
    # ... and after one SGD step the grown network is a different function from its source
    with torch.no_grad():
        for p in grown.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
        assert (grown.eval()(x, t, enc, return_dict=False)[0] - want).abs().max() > 1e-4


def test_grown_dit_and_pixart_equal_their_source():
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    torch.manual_seed(0)
    dit = _randomise(DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                           num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=4).eval())
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([900, 100]), torch.tensor([1, 3])
    grown = grow_network(dit, [1])                      # class-conditional DiT: no cross-attention in its blocks
    with torch.no_grad():
        want = dit(x, timestep=t, class_labels=y).sample
        assert want.abs().mean() > 0.1 and torch.equal(grown(x, timestep=t, class_labels=y).sample, want)
    assert grown.config.num_layers == 3
    pix = _randomise(PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1,
                                              out_channels=1, num_layers=2, sample_size=8, patch_size=2,
                                              cross_attention_dim=16, caption_channels=12).eval())
    enc = torch.randn(2, 3, 12)
    grown = grow_network(pix, [0, 1])
    kw = dict(timestep=t, encoder_hidden_states=enc, added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    with torch.no_grad():
        want = pix(x, **kw).sample
        assert want.abs().mean() > 0.1 and torch.equal(grown(x, **kw).sample, want)


def test_grow_refuses_what_it_cannot_grow():
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1)
    with pytest.raises(ConfigError, match="UNet2DModel .* not supported.*wan"):
        grow_network(unet, [0])
    with pytest.raises(ConfigError, match="--after 3 is not a block of this network .*0..2"):
        grow_network(_wan(3), [1, 3])
    with pytest.raises(ConfigError, match="--after names no block"):
        grow_network(_wan(3), [])


TINY_TEACHER = {"data.resolution": 8, "data.frames": 4, "model.video.num_layers": 1, "model.video.ffn_dim": 32,
                "model.video.num_attention_heads": 1, "model.video.attention_head_dim": 16, "train.max_steps": 2,
                "train.batch_size": 4, "train.sample_every": 2, "train.checkpoint_every": 2, "train.log_every": 1,
                "sample_steps": 2, "train.cpu": "true", "optim.warmup_steps": 0}


def test_grow_then_distill_a_deeper_video_student_through_the_cli(tmp_path, capsys, monkeypatch):
    """The CLI writes a stock folder (its record says the outputs matched on real calibration clips), refuses to
    replace a folder it did not write, and a DMD2 run with dmd.student_init=<it> trains and exports the deeper
    student (stock diffusers loads it with its own num_layers; its metadata and card say it was grown)."""
    from diffusers import WanTransformer3DModel

    from stepdistill.frontends.cli import main

    run = tmp_path / "teacher"
    argv = ["teacher", "--config", "configs/teacher_video_animal_mnist.yaml", f"output_dir={run}",
            *[f"{k}={v}" for k, v in TINY_TEACHER.items()]]
    assert main(argv) == 0
    teacher, grown = run / "model", tmp_path / "grown"
    capsys.readouterr()
    assert main(["grow", "--model", str(teacher), "--out", str(grown), "--after", "0", "--num", "4",
                 "--no-progress"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["num_layers_before"] == 1 and rec["num_layers_after"] == 2 and rec["inserted"] == [1]
    assert rec["check"]["mse"] == 0.0 and rec["check"]["inputs"] == 4 * 5
    assert rec["params_after"] > rec["params_before"]
    stock = WanTransformer3DModel.from_pretrained(grown, subfolder="transformer")
    assert stock.config.num_layers == 2
    assert json.loads((grown / "stepdistill.json").read_text())["extra"]["grown"]["after"] == [0]
    assert "deeper copy" in (grown / "README.md").read_text()
    # a folder that is not ours is never replaced, --overwrite or not
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(["grow", "--model", str(teacher), "--out", str(mine), "--after", "0", "--overwrite",
                 "--no-progress"]) != 0
    assert (mine / "notes.txt").read_text() == "keep"
    assert main(["grow", "--model", str(teacher), "--out", str(tmp_path / "x"), "--after", "0,a"]) != 0
    assert "--after must be block indices" in capsys.readouterr().err
    # the equality check is measured: a grown network that is not its source's function is refused, nothing written
    import stepdistill.grow as grow_mod

    def off_by_a_bit(net, after):
        g = grow_network(net, after)
        with torch.no_grad():
            g.blocks[1].ffn.net[2].bias.fill_(1e-3)
        return g

    monkeypatch.setattr(grow_mod, "grow_network", off_by_a_bit)
    assert main(["grow", "--model", str(teacher), "--out", str(tmp_path / "bad"), "--after", "0", "--num", "2"]) != 0
    assert "outputs differ" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    monkeypatch.undo()
    # a deeper student: trained, exported with its own config, recorded
    out = tmp_path / "student_run"
    extra = {"dmd.teacher": teacher, "dmd.student_init": grown, "data.resolution": 8, "data.frames": 4,
             "train.max_steps": 2, "train.batch_size": 4, "train.sample_every": 2, "train.checkpoint_every": 2,
             "train.cpu": "true", "dmd.critic_updates": 1, "dmd.regression_warmup_steps": 1,
             "dmd.regression_pairs": 4, "dmd.regression_steps": 2, "train.guard_every": 2}
    assert main(["distill", "--config", "configs/dmd2_video_animal_mnist.yaml", f"output_dir={out}",
                 *[f"{k}={v}" for k, v in extra.items()]]) == 0
    student = WanTransformer3DModel.from_pretrained(out / "student", subfolder="transformer")
    assert student.config.num_layers == 2
    init = WanTransformer3DModel.from_pretrained(grown, subfolder="transformer")
    moved = max((a - b).abs().max().item() for a, b in zip(student.state_dict().values(), init.state_dict().values()))
    assert moved > 0                                                   # it was trained, not copied
    meta = json.loads((out / "student" / "stepdistill.json").read_text())
    assert meta["extra"]["grown"]["num_layers_after"] == 2
    assert "## Grown network" in (out / "student" / "README.md").read_text()

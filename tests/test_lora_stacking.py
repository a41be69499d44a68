"""A style LoRA made by ``stepdistill teacher`` (``finetune.init`` + ``finetune.lora_rank``) on a tiny stock
Stable-Diffusion-style teacher stacks on the distilled LoRA of the same teacher in a stock
``StableDiffusionPipeline``: ``set_adapters(["distilled", "style"], [1, w])`` gives the images of a UNet whose
weights are W + dW_distilled + w dW_style (computed by hand from the two exported merged folders), and
``fuse_lora`` / ``unfuse_lora`` of the stack round trip."""
from __future__ import annotations

import json

import pytest
import torch

from test_lora_stock import _images, _stock, lora_student  # noqa: F401  (the distilled LoRA fixture)
from test_text_sd_family import sd_teacher  # noqa: F401  (the tiny SD-family teacher fixture)

pytest.importorskip("peft")


def _teacher_argv(teacher, out, **extra):
    base = {"output_dir": str(out), "data.name": "digits", "data.resolution": 16, "data.split": "train",
            "finetune.init": str(teacher), "finetune.lora_rank": 4, "finetune.lora_alpha": 8,
            "finetune.transform": "bold", "train.batch_size": 4, "train.max_steps": 2, "train.sample_every": 2,
            "train.checkpoint_every": 2, "train.log_every": 1, "train.threads": 1, "train.cpu": "true",
            "optim.lr": 5e-3, "optim.warmup_steps": 0, "sample_steps": 2}
    base.update(extra)
    return ["teacher", "--config", "configs/teacher_style_lora_text_animal_mnist.yaml", *[f"{k}={v}" for k, v in base.items()]]


@pytest.fixture(scope="module")
def style_lora(sd_teacher, tmp_path_factory):  # noqa: F811
    from stepdistill.frontends.cli import main

    out = tmp_path_factory.mktemp("style") / "run"
    assert main([str(a) for a in _teacher_argv(sd_teacher, out)]) == 0
    return out / "model"


def _unet_weights(folder):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet").state_dict()


def test_style_lora_folder(sd_teacher, style_lora):  # noqa: F811
    """The fine-tune keeps the teacher's layout (stock pipeline class, VAE, text parts) and records what it is; its
    diffusers LoRA file on the teacher equals its merged UNet, and it changed the teacher."""
    from diffusers import StableDiffusionPipeline

    meta = json.loads((style_lora / "stepdistill.json").read_text())
    assert meta["extra"]["finetuned_from"] == str(sd_teacher)
    assert meta["extra"]["finetune"] == {"classes": [], "transform": "bold", "lora_rank": 4}
    assert json.loads((style_lora / "model_index.json").read_text())["_class_name"] == \
        json.loads((sd_teacher / "model_index.json").read_text())["_class_name"]
    merged = StableDiffusionPipeline.from_pretrained(style_lora)
    base = _stock(sd_teacher, sd_teacher)
    before = _images(base, [999, 499])
    base.load_lora_weights(style_lora / "lora", weight_name="pytorch_lora_weights.safetensors", adapter_name="style")
    got = _images(base, [999, 499])
    torch.testing.assert_close(got, _images(merged, [999, 499]), atol=1e-3, rtol=0)  # two float32 steps
    assert (got - before).abs().max() > 1e-4   # two steps at lr 5e-3 moved the adapter off the teacher


@pytest.mark.parametrize("w", [1.0, 0.5])
def test_style_lora_stacks_on_distilled_lora(sd_teacher, lora_student, style_lora, w):  # noqa: F811
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    W, Wd, Ws = _unet_weights(sd_teacher), _unet_weights(lora_student), _unet_weights(style_lora)
    by_hand = UNet2DConditionModel.from_pretrained(sd_teacher, subfolder="unet")
    by_hand.load_state_dict({k: W[k] + (Wd[k] - W[k]) + w * (Ws[k] - W[k]) for k in W})
    want_pipe = _stock(sd_teacher, lora_student)
    want_pipe.unet = by_hand
    want = _images(want_pipe, [999])
    alone = _images(StableDiffusionPipeline.from_pretrained(lora_student), [999])
    assert (want - alone).abs().max() > 1e-4   # the style moves the one-step images: the comparison can fail

    pipe = _stock(sd_teacher, lora_student)
    pipe.load_lora_weights(lora_student / "lora", weight_name="pytorch_lora_weights.safetensors",
                           adapter_name="distilled")
    pipe.load_lora_weights(style_lora / "lora", weight_name="pytorch_lora_weights.safetensors", adapter_name="style")
    pipe.set_adapters(["distilled", "style"], [1.0, w])
    torch.testing.assert_close(_images(pipe, [999]), want, atol=2e-4, rtol=0)
    pipe.fuse_lora(adapter_names=["distilled", "style"])
    pipe.unload_lora_weights()   # only the fused weights are left
    torch.testing.assert_close(_images(pipe, [999]), want, atol=2e-4, rtol=0)


def test_fuse_unfuse_of_the_stack_round_trips(sd_teacher, lora_student, style_lora):  # noqa: F811
    pipe = _stock(sd_teacher, lora_student)
    pipe.load_lora_weights(lora_student / "lora", weight_name="pytorch_lora_weights.safetensors",
                           adapter_name="distilled")
    pipe.load_lora_weights(style_lora / "lora", weight_name="pytorch_lora_weights.safetensors", adapter_name="style")
    pipe.set_adapters(["distilled", "style"], [1.0, 1.0])
    stacked = _images(pipe, [999])
    pipe.fuse_lora(adapter_names=["distilled", "style"])
    torch.testing.assert_close(_images(pipe, [999]), stacked, atol=2e-4, rtol=0)
    pipe.unfuse_lora()
    pipe.set_adapters(["distilled"], [1.0])   # back to the distilled LoRA alone
    from diffusers import StableDiffusionPipeline

    alone = _images(StableDiffusionPipeline.from_pretrained(lora_student), [999])
    torch.testing.assert_close(_images(pipe, [999]), alone, atol=2e-4, rtol=0)


def test_finetune_settings_fail_with_their_key(sd_teacher, tmp_path, capsys):  # noqa: F811
    from stepdistill.frontends.cli import main

    for extra, key in (({"finetune.init": ""}, "finetune.lora_rank"),             # a LoRA needs a model to adapt
                       ({"finetune.transform": "blur"}, "finetune.transform"),
                       ({"finetune.classes": "[eleven]"}, "finetune.classes"),
                       ({"data.resolution": 32}, "data.resolution")):             # 32 px images, 16 px teacher
        assert main([str(a) for a in _teacher_argv(sd_teacher, tmp_path / "bad", **extra)]) != 0
        assert f"error: {key}:" in capsys.readouterr().err
        assert not (tmp_path / "bad" / "model").exists()


def test_restrict_keeps_the_named_classes_and_transforms():
    from stepdistill.data import ArrayDataset
    from stepdistill.trainers.teacher_finetune import restrict

    x = torch.full((6, 1, 5, 5), -1.0)
    x[:, :, 2, 2] = 1.0                                        # one lit pixel per image
    data = ArrayDataset(x, torch.tensor([0, 1, 2, 0, 1, 2]), ["a", "b", "c"])
    out = restrict(data, ["c", "0"], "bold")
    assert out.labels.tolist() == [0, 2, 0, 2]
    assert (out.images[0, 0] > 0).sum().item() == 9            # the 3x3 dilation: one pixel -> a 3x3 block
    assert list(out.class_names) == ["a", "b", "c"]

"""Video: the 5-D adapter over a diffusers WanTransformer3DModel, a video teacher and a DMD2 video student through
the CLI, their folders in stock diffusers, the streaming generator, and the video metrics / collapse guard."""
from __future__ import annotations

import json

import pytest
import torch

TINY = {"data.resolution": 8, "data.frames": 4, "model.video.num_layers": 1, "model.video.ffn_dim": 32,
        "model.video.num_attention_heads": 1, "model.video.attention_head_dim": 16, "train.max_steps": 2,
        "train.batch_size": 4, "train.sample_every": 2, "train.checkpoint_every": 2, "train.log_every": 1,
        "sample_steps": 2, "train.cpu": "true", "optim.warmup_steps": 0}


def _argv(cmd, config, out, **extra):
    return [cmd, "--config", config, f"output_dir={out}", *[f"{k}={v}" for k, v in extra.items()]]


@pytest.fixture(scope="module")
def video_teacher(tmp_path_factory):
    from stepdistill.frontends.cli import main

    out = tmp_path_factory.mktemp("video_teacher") / "run"
    assert main(_argv("teacher", "configs/teacher_video_animal_mnist.yaml", out, **TINY)) == 0
    return out / "model"


@pytest.fixture(scope="module")
def video_student(video_teacher, tmp_path_factory):
    from stepdistill.frontends.cli import main

    out = tmp_path_factory.mktemp("video_student") / "run"
    extra = {"dmd.teacher": video_teacher, "data.name": "moving_animal_mnist", "data.resolution": 8,
             "data.frames": 4, "train.max_steps": 2, "train.batch_size": 4, "train.sample_every": 2,
             "train.checkpoint_every": 2, "train.cpu": "true", "dmd.critic_updates": 1,
             "dmd.student_timesteps": "[999,499]", "train.guard_every": 1}
    assert main(_argv("distill", "configs/dmd2_text_animal_mnist.yaml", out, **extra)) == 0
    return out


def test_adapter_round_trips_5d_samples(video_teacher):
    """The Denoiser over the loaded Wan backbone: the clip shape comes from stepdistill.json, the raw prediction is
    the stock transformer's output, x_t = (1 - sigma) x0 + sigma eps holds for its x0 / eps, and CFG is
    uncond + w (cond - uncond)."""
    from diffusers import WanTransformer3DModel

    from stepdistill.models import load_denoiser

    den, meta = load_denoiser(video_teacher)
    assert den.kind == "wan" and den.sample_shape == (1, 4, 8, 8) and meta.prediction_type == "flow_prediction"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 4, 8, 8, generator=g)
    t = torch.tensor([900.0, 500.0, 100.0])
    cond, null = torch.randn(3, 16, den.text_dim, generator=g), torch.randn(1, 16, den.text_dim, generator=g)
    den.null_cond = null
    stock = WanTransformer3DModel.from_pretrained(video_teacher, subfolder="transformer")
    torch.testing.assert_close(den(x, t, cond, output="raw"),
                               stock(hidden_states=x, timestep=den.schedule.model_timestep(t), encoder_hidden_states=cond
                                     ).sample)
    x0, eps = den(x, t, cond), den(x, t, cond, output="eps")
    a, s = den.schedule.alpha_sigma(t)
    torch.testing.assert_close(a.view(-1, 1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1, 1) * eps, x, atol=1e-5, rtol=0)
    u = den(x, t, null.expand(3, -1, -1), output="raw")
    torch.testing.assert_close(den(x, t, cond, guidance_scale=3.0, output="raw"),
                               u + 3.0 * (den(x, t, cond, output="raw") - u), atol=1e-5, rtol=0)


def test_video_teacher_folder_and_pipeline(video_teacher):
    from stepdistill.pipelines.loading import load_text_pipeline

    index = json.loads((video_teacher / "model_index.json").read_text())
    assert index["_class_name"] == "StepDistillVideoTeacherPipeline" and index["transformer"][1] == \
        "WanTransformer3DModel"
    assert json.loads((video_teacher / "stepdistill.json").read_text())["extra"]["sample_shape"] == [1, 4, 8, 8]
    pipe = load_text_pipeline(video_teacher)
    clips = pipe(["a cat", "a dog"], num_inference_steps=3, output_type="pt", seed=0).images
    assert clips.shape == (2, 1, 4, 8, 8) and clips.abs().max() <= 1
    frames = list(pipe.frames(["a cat", "a dog"], num_inference_steps=3, seed=0))
    assert len(frames) == 4
    torch.testing.assert_close(torch.stack(frames, 2), clips)   # the streamed frames are the clip's
    sample = sorted((video_teacher.parent / "samples").glob("step_*.png"))
    assert sample, "the teacher's periodic sample grid (a frame strip per clip)"


def test_video_student_loads_in_stock_diffusers(video_student):
    """The student's transformer and flow scheduler are stock diffusers classes; the stock scheduler's stochastic
    Euler steps over the stock transformer give our pipeline's clips for the same generator."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    from stepdistill.pipelines.loading import load_text_pipeline

    folder = video_student / "student"
    pipe = load_text_pipeline(folder)
    assert type(pipe).__name__ == "StepDistillVideoPipeline"
    emb = pipe.encode_prompt(["a cat", "a dog"])
    ours = pipe(prompt_embeds=emb, generator=torch.Generator().manual_seed(0), output_type="pt").images
    net = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer")
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    meta = json.loads((folder / "stepdistill.json").read_text())
    ts = meta["student_timesteps"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, *meta["extra"]["sample_shape"], generator=gen)
    sched.set_timesteps(sigmas=[t / 1000 for t in ts])
    for t in sched.timesteps:
        v = net(hidden_states=x, timestep=t.expand(2), encoder_hidden_states=emb).sample
        x = sched.step(v, t, x, generator=gen).prev_sample
    torch.testing.assert_close(x.clamp(-1, 1), ours, atol=1e-4, rtol=0)


def test_video_student_run_logs_the_collapse_guard(video_student):
    rows = [json.loads(line) for line in (video_student / "guards.jsonl").read_text().splitlines()]
    assert rows and all({"static_frac", "solid_frac", "collapsed_frac"} <= set(r) for r in rows)


# -- metrics and the collapse detector ------------------------------------------------------------------------------
def _clips():
    from stepdistill.data import animal_mnist
    from stepdistill.video_data import moving_animal_mnist

    return moving_animal_mnist(24, frames=6, size=16, split="test", source=animal_mnist(32, "test"))


def test_collapse_detector_fires_on_static_and_solid_clips():
    from stepdistill.video_stats import collapse_flags

    v = _clips()
    real = collapse_flags(v.clips)
    assert real["collapsed_frac"] == 0.0
    static = v.clips[:, :, :1].expand_as(v.clips).clone()              # the first frame held
    solid = torch.full_like(v.clips, 0.3)
    assert collapse_flags(static)["static_frac"] == 1.0 and collapse_flags(static)["solid_frac"] == 0.0
    assert collapse_flags(solid)["solid_frac"] == 1.0


def test_collapse_guard_trips_on_a_static_grid(tmp_path):
    from types import SimpleNamespace

    from stepdistill.config import TrainConfig
    from stepdistill.trainers.guards import CollapseError, run_guards

    v = _clips()
    static = v.clips[:, :, :1].expand_as(v.clips).clone()
    obj = SimpleNamespace(guard_stats=lambda ema: {"diversity": 1.0, "saturation": 0.0, "samples": static})
    saved = []
    trainer = SimpleNamespace(obj=obj, tcfg=TrainConfig(guard_action="stop"), acc=SimpleNamespace(is_main_process=True),
                              ema_modules=lambda: {}, data=None, step=7, out=tmp_path,
                              save_checkpoint=lambda: saved.append(1) or tmp_path / "ckpt")
    with pytest.raises(CollapseError, match="collapsed clips 1.0000 > train.guard_max_collapsed"):
        run_guards(trainer)
    assert saved and (tmp_path / "samples" / "guard_step_7.png").is_file()
    obj.guard_stats = lambda ema: {"diversity": 1.0, "saturation": 0.0, "samples": v.clips}
    assert run_guards(trainer)["guard_collapsed_frac"] == 0.0


def test_temporal_metrics_on_known_motion():
    from stepdistill.video_stats import clip_frame_diff, clip_warp_residual, motion_diversity

    g = torch.Generator().manual_seed(0)
    frame = -torch.ones(1, 1, 1, 12, 12)
    frame[..., 3:6, 3:7] = 1.0
    shifted = torch.cat([torch.roll(frame, shifts=(k, k), dims=(-2, -1)) for k in range(4)], 2)   # 1 px / frame
    assert clip_frame_diff(shifted).item() > 0.3
    assert clip_warp_residual(shifted).item() == 0.0                    # a whole-pixel translation is explained
    noisy = shifted + 0.5 * torch.randn(shifted.shape, generator=g)
    assert clip_warp_residual(noisy).item() > 0.3                       # flicker is not
    same = shifted.expand(5, -1, -1, -1, -1)
    assert motion_diversity(same) == pytest.approx(0.0, abs=1e-6)
    other = torch.cat([torch.roll(frame, shifts=(0, -k), dims=(-2, -1)) for k in range(4)], 2)
    both = torch.cat([shifted, other])
    # two paths: (k, k) and (0, -k) for k = 0..3, RMS distance over the 4 frames x 2 coords
    want = ((torch.tensor([0, 1, 2, 3.]) ** 2 + torch.tensor([0, 2, 4, 6.]) ** 2).sum() / 4) ** 0.5
    assert motion_diversity(both) == pytest.approx(float(want), rel=0.05)


# -- causal and streaming students ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def causal_student(video_teacher, tmp_path_factory):
    from stepdistill.frontends.cli import main

    out = tmp_path_factory.mktemp("causal_student") / "run"
    extra = {"dmd.teacher": video_teacher, "data.resolution": 8, "data.frames": 4, "train.max_steps": 2,
             "train.batch_size": 2, "train.sample_every": 2, "train.checkpoint_every": 2, "train.guard_every": 2,
             "train.cpu": "true", "dmd.critic_updates": 1, "dmd.regression_warmup_steps": 1,
             "dmd.regression_pairs": 4, "dmd.regression_steps": 2}
    assert main(_argv("distill", "configs/self_forcing_video_animal_mnist.yaml", out, **extra)) == 0
    return out / "student"


def _tiny_den(video_teacher):
    from stepdistill.models import load_denoiser

    den, _ = load_denoiser(video_teacher)
    return den


def test_per_frame_timesteps_equal_the_clip_timestep(video_teacher):
    from stepdistill.streaming import frame_x0

    den = _tiny_den(video_teacher)
    g = torch.Generator().manual_seed(1)
    x, cond = torch.randn(2, 1, 4, 8, 8, generator=g), torch.randn(2, 16, den.text_dim, generator=g)
    t = torch.tensor([800.0, 200.0])
    torch.testing.assert_close(frame_x0(den, x, t[:, None].expand(2, 4), cond), den(x, t, cond), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode,reach", [("chunked", 1), ("pipelined", 2)])
def test_a_chunk_does_not_depend_on_later_chunks(video_teacher, mode, reach):
    """Chunked: chunk k's frames are a function of the noise of chunks <= k. Pipelined (a 2-step buffer): of chunks
    < k + 2, the chunks sharing its buffer. Checked by changing the noise of one chunk j at a time: chunks k with
    k + reach <= j stay bit-identical."""
    from stepdistill.streaming import generate_clip

    den = _tiny_den(video_teacher)
    g = torch.Generator().manual_seed(2)
    cond = torch.randn(1, 16, den.text_dim, generator=g)
    base = torch.randn(1, 1, 8, 8, 8, generator=g)                      # 4 chunks of 2 frames

    def run(noise):
        r = torch.Generator().manual_seed(3)
        return generate_clip(den, noise, cond, [999.0, 500.0], 2, mode, randn=lambda s: torch.randn(s, generator=r))

    ref = run(base)
    for j in range(4):
        changed = base.clone()
        changed[:, :, 2 * j:2 * j + 2] = torch.randn(1, 1, 2, 8, 8, generator=g)
        out = run(changed)
        for k in range(4):
            diff = (out[:, :, 2 * k:2 * k + 2] - ref[:, :, 2 * k:2 * k + 2]).abs().max().item()
            if k + reach <= j:
                assert diff == 0.0, (mode, j, k)            # chunks that never share a window with chunk j: untouched
            elif k == j:
                assert diff > 1e-4, (mode, j, k)            # the chunk itself: moved (the check can fail)


def test_streamed_frames_equal_the_clip(causal_student):
    """The causal student's frames() yields each chunk as soon as it is final, and the streamed frames are the
    clip __call__ gives for the same generator; a stream can also run past the trained clip length."""
    from stepdistill.pipelines.loading import load_text_pipeline

    pipe = load_text_pipeline(causal_student)
    assert pipe.causal == {"chunk_frames": 2, "mode": "chunked", "context_frames": 0}
    emb = pipe.encode_prompt(["a cat", "a dog"])
    clip = pipe(prompt_embeds=emb, generator=torch.Generator().manual_seed(0), output_type="pt").images
    calls = []
    handle = pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    stream = pipe.frames(prompt_embeds=emb, generator=torch.Generator().manual_seed(0))
    first = next(stream)
    assert len(calls) == 2            # the first chunk's two steps, nothing of later chunks yet
    frames = [first, *stream]
    handle.remove()
    torch.testing.assert_close(torch.stack(frames, 2), clip)
    long = list(pipe.frames(prompt_embeds=emb[:1], num_frames=10, seed=0))
    assert len(long) == 10 and all(f.shape == (1, 1, 8, 8) for f in long)
    meta = json.loads((causal_student / "stepdistill.json").read_text())
    assert meta["method"] == "self_forcing" and meta["extra"]["causal"]["chunk_frames"] == 2


def test_causal_settings_fail_with_their_key(video_teacher, tmp_path, capsys):
    from stepdistill.frontends.cli import main

    for extra, key in (({"causal.chunk_frames": 3}, "causal.chunk_frames"),
                       ({"causal.mode": "rolling"}, "causal.mode")):
        argv = _argv("distill", "configs/self_forcing_video_animal_mnist.yaml", tmp_path / "bad",
                     **{"dmd.teacher": video_teacher, "data.resolution": 8, "data.frames": 4, **extra})
        assert main(argv) != 0
        assert f"error: {key}:" in capsys.readouterr().err


def test_spatio_temporal_pixel_discriminator():
    from stepdistill.trainers.pixel_gan import PixelDiscriminator

    d = PixelDiscriminator(1, 8, num_classes=3, video=True)
    x = torch.randn(2, 1, 4, 8, 8, requires_grad=True)
    out = d(x, torch.tensor([0, 2]))
    assert out.shape == (2,)
    out.sum().backward()
    assert x.grad[:, :, 0].abs().sum() > 0 and x.grad[:, :, 3].abs().sum() > 0   # every frame is seen


def test_demo_streams_the_causal_students_frames(causal_student):
    """The demo's video section: one update per frame, in order, each frame the pipeline's own (upscaled)."""
    import numpy as np

    from stepdistill.frontends.demo import DemoInputError, _to_pil, stream_video
    from stepdistill.pipelines.loading import load_text_pipeline

    updates = list(stream_video(str(causal_student), "a cat", seed=3, num_frames=6))
    assert [u.index for u in updates] == list(range(6))
    assert all(b.elapsed_s >= a.elapsed_s for a, b in zip(updates, updates[1:]))
    want = list(load_text_pipeline(causal_student).frames("a cat", num_frames=6, seed=3))
    for u, f in zip(updates, want):
        assert np.array_equal(np.asarray(u.frame), np.asarray(_to_pil(f[:1])[0]))
    assert updates[-1].strip.size[0] > 5 * updates[-1].frame.size[0]
    with pytest.raises(DemoInputError, match="multiple of the chunk size 2"):
        list(stream_video(str(causal_student), "a cat", num_frames=5))
    with pytest.raises(DemoInputError, match="prompt"):
        list(stream_video(str(causal_student), "  "))


def test_shipped_video_teacher():
    """builtin:moving_animal_mnist loads offline (the MiniLM encoder referenced, not copied) and makes moving,
    non-collapsed clips of its captions."""
    from stepdistill.pipelines.loading import load_text_pipeline
    from stepdistill.shipped import BUILTIN_TEACHERS
    from stepdistill.video_stats import collapse_flags

    folder = BUILTIN_TEACHERS["builtin:moving_animal_mnist"]
    assert not (folder / "text_encoder").exists() and sum(f.stat().st_size for f in folder.rglob("*")) < 3e6
    pipe = load_text_pipeline("builtin:moving_animal_mnist")
    clips = pipe([f"a {n}" for n in ("cat", "dog", "bird", "zebra")], num_inference_steps=10, seed=0,
                 output_type="pt").images
    assert clips.shape == (4, 1, 8, 16, 16)
    assert collapse_flags(clips)["collapsed_frac"] == 0.0

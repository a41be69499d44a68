"""dmd.critic_init: the critic(s) start from a DMD2 run's checkpoint critic (fake score, GAN head, pixel
discriminator where shapes allow) instead of a teacher copy; bad sources fail naming the key."""
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_cfg
from stepdistill.errors import ConfigError
from stepdistill.models import load_denoiser
from stepdistill.trainers.distill import build_method, distill


def _equal(module, tensors, prefix):
    sd = module.state_dict()
    return sd.keys() == {k[len(prefix):] for k in tensors if k.startswith(prefix)} and \
        all(torch.equal(v, tensors[prefix + k]) for k, v in sd.items())


@pytest.fixture(scope="module")
def source_run(tiny_teacher, tmp_path_factory):
    """A 4-step DMD2 run with the GAN head and the pixel discriminator: its step-4 checkpoint holds a trained critic."""
    out = tmp_path_factory.mktemp("critic_src")
    distill(tiny_cfg(tiny_teacher, out, **{"dmd.gan": "true", "dmd.pixel_gan_g_weight": 0.1}))
    return out


def test_dmd2_critic_starts_from_the_checkpoint(tiny_teacher, source_run, tmp_path):
    ckpt = source_run / "checkpoints" / "step_000004"
    src = load_file(ckpt / "models.safetensors")
    obj, _, _ = build_method(tiny_cfg(tiny_teacher, tmp_path, **{
        "dmd.gan": "true", "dmd.pixel_gan_g_weight": 0.1, "dmd.critic_init": ckpt}))
    critic = obj.players["critic"].module
    assert _equal(critic["fake"], src, "player.critic.fake.") and _equal(critic["head"], src, "player.critic.head.")
    assert _equal(critic["pixel_disc"], src, "player.critic.pixel_disc.")
    teacher, _ = load_denoiser(tiny_teacher)   # the trained critic differs from the teacher copy it replaced
    t_sd = teacher.backbone.state_dict()
    assert any(not torch.equal(v, t_sd[k]) for k, v in critic["fake"].state_dict().items())
    s_sd = obj.student.backbone.state_dict()   # the student is untouched: still the teacher's copy
    assert all(torch.equal(v, t_sd[k]) for k, v in s_sd.items())
    # a run folder means its latest checkpoint (step 4 here); a run without the pixel discriminator loads the rest
    obj2, _, _ = build_method(tiny_cfg(tiny_teacher, tmp_path / "b", **{"dmd.gan": "true",
                                                                        "dmd.critic_init": source_run}))
    assert "pixel_disc" not in obj2.players["critic"].module
    assert _equal(obj2.players["critic"].module["fake"], src, "player.critic.fake.")


def test_msd_critics_all_start_from_the_checkpoint(tiny_teacher, source_run, tmp_path, capsys):
    ckpt = source_run / "checkpoints" / "step_000004"
    src = load_file(ckpt / "models.safetensors")
    obj, _, _ = build_method(tiny_cfg(tiny_teacher, tmp_path, method="msd", **{
        "dmd.gan": "true", "msd.num_students": 2, "msd.steps_per_student": 2, "dmd.critic_init": ckpt}))
    for k in range(2):
        m = obj.players[f"critic_{k}"].module
        assert _equal(m["fake"], src, "player.critic.fake.") and _equal(m["head"], src, "player.critic.head.")
    assert "2 critic(s) start from" in capsys.readouterr().out


def test_bad_critic_init_names_the_key(tiny_teacher, source_run, tmp_path):
    with pytest.raises(ConfigError, match="dmd.critic_init .*not a checkpoint folder"):
        build_method(tiny_cfg(tiny_teacher, tmp_path / "a", **{"dmd.critic_init": tmp_path}))
    # a checkpoint whose critic is another network (the full-size shipped teacher's architecture)
    other = tmp_path / "other"
    distill(tiny_cfg(tiny_teacher, other, **{"dmd.gan": "true"}))
    tensors = load_file(other / "checkpoints" / "step_000004" / "models.safetensors")
    bad_ckpt = tmp_path / "bad_ckpt"
    bad_ckpt.mkdir()
    from stepdistill.utils import sha256_file
    import json
    from safetensors.torch import save_file

    k0 = next(k for k in tensors if k.startswith("player.critic.fake.") and tensors[k].dim() == 4)
    tensors[k0] = torch.zeros(1, *tensors[k0].shape[1:])
    save_file(tensors, bad_ckpt / "models.safetensors")
    (bad_ckpt / "meta.json").write_text(json.dumps({"files": {"models.safetensors":
                                                              sha256_file(bad_ckpt / "models.safetensors")}}))
    with pytest.raises(ConfigError, match="dmd.critic_init .*does not match this run's critic network"):
        build_method(tiny_cfg(tiny_teacher, tmp_path / "b", **{"dmd.critic_init": bad_ckpt}))
    # a tampered checkpoint is refused before anything is loaded
    (bad_ckpt / "models.safetensors").write_bytes(b"x")
    with pytest.raises(ConfigError, match="dmd.critic_init: .*sha256 mismatch"):
        build_method(tiny_cfg(tiny_teacher, tmp_path / "c", **{"dmd.critic_init": bad_ckpt}))
    with pytest.raises(ConfigError, match="dmd.critic_init"):
        tiny_cfg(tiny_teacher, tmp_path / "d", method="phased_dmd", **{"dmd.critic_init": source_run})
    with pytest.raises(ConfigError, match="dmd.critic_init: is not supported with dmd.lora_rank"):
        tiny_cfg(tiny_teacher, tmp_path / "e", **{"dmd.critic_init": source_run, "dmd.lora_rank": 4})


def test_msd_trains_the_pixel_discriminator_per_critic_and_starts_it_warm(tiny_teacher, source_run, tmp_path):
    """method msd takes DMD2's pixel discriminator: one per private critic (each trained by its own critic update),
    the shared critic's one for every part; dmd.critic_init loads it from the DMD2 checkpoint."""
    ckpt = source_run / "checkpoints" / "step_000004"
    src = load_file(ckpt / "models.safetensors")
    over = {"dmd.gan": "true", "msd.num_students": 2, "msd.steps_per_student": 2, "train.max_steps": 4,
            "dmd.pixel_gan_g_weight": 0.3, "dmd.pixel_gan_lr": 5e-4, "dmd.critic_init": ckpt}
    obj, _, _ = build_method(tiny_cfg(tiny_teacher, tmp_path / "p", method="msd", **over))
    discs = [obj.players[f"critic_{k}"].module["pixel_disc"] for k in range(2)]
    assert discs[0] is not discs[1] and all(d is obj.subs[k].pixel_disc for k, d in enumerate(discs))
    assert all(_equal(d, src, "player.critic.pixel_disc.") for d in discs)
    shared, _, _ = build_method(tiny_cfg(tiny_teacher, tmp_path / "s", method="msd",
                                         **{**over, "msd.shared_critic": "true"}))
    d = shared.players["critic"].module["pixel_disc"]
    assert all(sub.pixel_disc is d for sub in shared.subs)
    # trained: after the run, each critic's pixel discriminator moved away from its warm start
    out = tmp_path / "run"
    distill(tiny_cfg(tiny_teacher, out, method="msd", **over))
    got = load_file(out / "checkpoints" / "step_000004" / "models.safetensors")
    for k in range(2):
        pre = f"player.critic_{k}.pixel_disc."
        moved = [not torch.equal(v, src["player.critic.pixel_disc." + n[len(pre):]])
                 for n, v in got.items() if n.startswith(pre)]
        assert moved and any(moved)


def test_resume_and_export_do_not_need_the_critic_init_source(tiny_teacher, source_run, tmp_path, capsys):
    """A resumed run restores its critics from its own checkpoint: dmd.critic_init's source may be gone by then (a
    user cleaned up old runs), and the resumed run equals the uninterrupted one. Export reads only the checkpoint."""
    import shutil

    from stepdistill.trainers.loading import load_trained

    src = tmp_path / "src_ckpt"
    shutil.copytree(source_run / "checkpoints" / "step_000004", src)
    over = {"dmd.gan": "true", "dmd.pixel_gan_g_weight": 0.1, "dmd.critic_init": src}
    distill(tiny_cfg(tiny_teacher, tmp_path / "full", **over))
    distill(tiny_cfg(tiny_teacher, tmp_path / "part", **over, **{"train.max_steps": 2}))
    shutil.rmtree(src)
    with pytest.raises(ConfigError, match="dmd.critic_init"):       # a fresh run still needs it
        build_method(tiny_cfg(tiny_teacher, tmp_path / "fresh", **over))
    capsys.readouterr()
    distill(tiny_cfg(tiny_teacher, tmp_path / "part", **over), resume=True)
    assert "dmd.critic_init: not read" in capsys.readouterr().out
    a = load_file(tmp_path / "full" / "checkpoints" / "step_000004" / "models.safetensors")
    b = load_file(tmp_path / "part" / "checkpoints" / "step_000004" / "models.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    modules, _, _ = load_trained(tiny_cfg(tiny_teacher, tmp_path / "part", **over))   # export's loader
    assert all(torch.equal(v, a["ema.generator." + k]) for k, v in modules["generator"].state_dict().items())


def test_which_resumes_restore_a_checkpoint(source_run, tmp_path):
    """The build skips dmd.critic_init exactly when load_resume_point will load a checkpoint of the run."""
    from stepdistill.trainers.checkpoint import restores_checkpoint

    assert not restores_checkpoint(source_run, False)
    assert restores_checkpoint(source_run, True) and restores_checkpoint(source_run, "latest")
    assert not restores_checkpoint(tmp_path / "empty", True)          # --resume on an empty run: starts at step 0
    assert restores_checkpoint(tmp_path / "empty", "last_good")       # a named one: loaded, or refused when missing

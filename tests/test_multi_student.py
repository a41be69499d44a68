"""Multi-student distillation: partitions and routing, per-part training, critics, smaller students
with teacher score matching, export round trip through the pipeline, eval, demo and `stepdistill export`."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_distill_overrides
from stepdistill.config import ConfigError, DistillConfig, load_config
from stepdistill.pipelines.multi_student import MultiStudentPipeline, routing_table
from stepdistill.trainers.core import Trainer
from stepdistill.trainers.objective import Ctx
from stepdistill.partitions import kmeans_partition, partition_classes
from stepdistill.trainers.multi_student import PartCtx

ODD_EVEN = "[[0,2,4,6,8],[1,3,5,7,9]]"


def _cfg(tiny_teacher, out, **extra):
    base = {"method": "msd", "msd.num_students": 2, "train.max_steps": 4, "dmd.critic_updates": 1, "dmd.gan": "true"}
    base.update(extra)
    return load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, out, **base))


def _objective(tiny_teacher, out, **extra):
    from stepdistill.trainers.distill import build_method

    cfg = _cfg(tiny_teacher, out, **extra)
    obj, data, meta = build_method(cfg)
    return obj, data, cfg


def _spy(den, calls, name):
    """Record (name, cond) of every network call of a Denoiser."""
    orig = den.raw

    def raw(x_t, t, cond=None, *a, **kw):
        calls.append((name, cond.detach().clone()))
        return orig(x_t, t, cond, *a, **kw)

    den.raw = raw


def _ctx(seed, data, batch=8, step=0, rank=0, world=1):
    return Ctx(torch.Generator().manual_seed(seed), rank, world, batch, torch.device("cpu"), step, data)


# -- partitions and routing -----------------------------------------------------------------------
def test_partitions_are_total_disjoint_and_validated():
    assert partition_classes(10, 4) == [[0, 1], [2, 3], [4, 5, 6], [7, 8, 9]]
    assert partition_classes(10, 1) == [list(range(10))]
    for C, K in [(10, 3), (7, 7), (11, 4)]:
        groups = partition_classes(C, K)
        table = routing_table(groups, C)
        assert sorted(c for g in groups for c in g) == list(range(C))          # every class exactly once
        assert all(table[c] == k for k, g in enumerate(groups) for c in g)
        assert max(map(len, groups)) - min(map(len, groups)) <= 1             # balanced
    assert partition_classes(4, 2, [[3, 1], [0, 2]]) == [[1, 3], [0, 2]]       # group k -> student k
    with pytest.raises(ConfigError, match=r"msd\.groups: class 1 is in more than one group"):
        partition_classes(4, 2, [[0, 1], [1, 2, 3]])
    with pytest.raises(ConfigError, match=r"msd\.groups: class 3 is in no group"):
        partition_classes(4, 2, [[0, 1], [2]])
    with pytest.raises(ConfigError, match=r"msd\.groups: class 4 .* out of range"):
        partition_classes(4, 2, [[0, 1, 4], [2, 3]])
    with pytest.raises(ConfigError, match=r"msd\.groups: 3 group\(s\) for msd\.num_students=2"):
        partition_classes(4, 2, [[0], [1], [2, 3]])
    with pytest.raises(ConfigError, match=r"msd\.num_students"):
        partition_classes(3, 4)


def test_config_validation_names_the_key(tiny_teacher, tmp_path):
    from stepdistill.trainers.distill import build_method

    with pytest.raises(ConfigError, match=r"msd\.groups: class 2 is in more than one group"):
        _cfg(tiny_teacher, tmp_path, **{"msd.groups": "[[0,1,2],[2,3]]"})
    with pytest.raises(ConfigError, match=r"msd\.groups: class 1 is in no group"):
        _cfg(tiny_teacher, tmp_path, **{"msd.groups": "[[0],[2,3]]"})
    with pytest.raises(ConfigError, match=r"msd\.steps_per_student"):
        _cfg(tiny_teacher, tmp_path, **{"train.max_steps": 5})                 # 2 students, round robin
    with pytest.raises(ConfigError, match=r"msd\.steps_per_student.*take train\.max_steps=6"):
        _cfg(tiny_teacher, tmp_path, **{"msd.tsm_steps": 1, "msd.steps_per_student": 2, "train.max_steps": 8})
    # an explicit per-student budget defines the schedule; a smaller train.max_steps stops early (warned at build)
    short = _cfg(tiny_teacher, tmp_path, **{"msd.tsm_steps": 1, "msd.steps_per_student": 2, "train.max_steps": 3})
    with pytest.warns(UserWarning, match="unequal budgets"):
        build_method(short)
    with pytest.raises(ConfigError, match=r"msd\.schedule"):
        _cfg(tiny_teacher, tmp_path, **{"msd.schedule": "random"})
    with pytest.raises(ConfigError, match=r"dmd\.lora_rank"):
        _cfg(tiny_teacher, tmp_path, **{"dmd.lora_rank": 4})
    assert _cfg(tiny_teacher, tmp_path, **{"msd.schedule": "all", "msd.tsm_steps": 1}).msd.schedule == "all"
    # the teacher's class count is checked at build time: groups covering 0..8 miss digit 9
    with pytest.raises(ConfigError, match=r"msd\.groups: class 9 is in no group"):
        build_method(_cfg(tiny_teacher, tmp_path, **{"msd.groups": "[[0,1,2,3],[4,5,6,7,8]]"}))


def test_kmeans_partition_is_deterministic_and_total():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(30) % 3
    emb = centers[truth] + 0.3 * torch.randn(30, 2, generator=g)
    groups = kmeans_partition(emb.reshape(30, 1, 2), 3, seed=1)                 # (N, L, D) embeddings too
    assert groups == kmeans_partition(emb.reshape(30, 1, 2), 3, seed=1)
    assert sorted(i for gr in groups for i in gr) == list(range(30))
    assert groups == [list(range(c, 30, 3)) for c in range(3)]                  # the blobs, in canonical order
    dup = torch.zeros(5, 4)                                                     # fewer distinct points than k
    assert sorted(len(gr) for gr in kmeans_partition(dup, 3, seed=0)) == [1, 1, 3]


def test_kmeans_partition_of_classes_by_their_mean_image(tiny_teacher, tmp_path):
    """msd.partition: kmeans groups the digits by their mean real image: a total, disjoint, deterministic cover
    whose within-group spread (the k-means objective) is below the contiguous split's; the objective routes
    by it; explicit groups and unknown values are refused with the key named."""
    from stepdistill.partitions import class_groups_by_mean_image

    obj, data, cfg = _objective(tiny_teacher, tmp_path, **{"msd.num_students": 3, "msd.partition": "kmeans",
                                                          "train.max_steps": 3})
    groups = class_groups_by_mean_image(data.images, data.labels, 10, 3, seed=cfg.train.seed)
    assert obj.groups == groups and sorted(c for g in groups for c in g) == list(range(10))
    assert groups != partition_classes(10, 3)
    means = torch.stack([data.images[data.labels == c].double().mean(0).flatten() for c in range(10)])

    def spread(gs):
        return sum(float(((means[g] - means[g].mean(0)) ** 2).sum()) for g in gs)

    assert spread(groups) < spread(partition_classes(10, 3))
    assert [obj.table[c] for c in range(10)] == [next(k for k, g in enumerate(groups) if c in g) for c in range(10)]
    with pytest.raises(ConfigError, match=r"^msd\.partition: must be contiguous \| kmeans"):
        _cfg(tiny_teacher, tmp_path, **{"msd.partition": "spectral"})
    with pytest.raises(ConfigError, match=r"^msd\.partition: applies when msd\.groups is \[\]"):
        _cfg(tiny_teacher, tmp_path, **{"msd.partition": "kmeans", "msd.groups": "[[0,1,2,3,4],[5,6,7,8,9]]"})


def test_part_ctx_keeps_the_global_batch_rank_slice_convention(tiny_teacher, tmp_path):
    from stepdistill.data import load_dataset

    data = load_dataset("digits", 16, "train", 1)
    index = (data.labels % 2 == 1).nonzero().flatten()
    full_x, full_y = PartCtx.of(_ctx(3, data), index).real_batch()
    parts = [PartCtx.of(_ctx(3, data, rank=r, world=2), index).real_batch() for r in (0, 1)]
    assert torch.equal(torch.cat([p[0] for p in parts]), full_x)
    assert torch.equal(torch.cat([p[1] for p in parts]), full_y)
    assert (full_y % 2 == 1).all() and len(full_y) == 8


# -- training -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shared", [False, True], ids=["separate-critics", "shared-critic"])
def test_each_student_sees_only_its_part(tiny_teacher, tmp_path, shared):
    obj, data, cfg = _objective(tiny_teacher, tmp_path, **{"msd.groups": ODD_EVEN, "msd.shared_critic": shared})
    parts = [set(range(0, 10, 2)), set(range(1, 10, 2))]
    critic = "critic" if shared else "critic_0"
    assert obj.updates(0) == [critic, "student_0"] and obj.updates(1) == [critic if shared else "critic_1", "student_1"]
    calls, real = [], []
    for k, s in enumerate(obj.students):
        _spy(s, calls, f"student_{k}")
    for k, c in enumerate(obj.critics):
        _spy(c, calls, "critic" if shared else f"critic_{k}")
    for k, sub in enumerate([obj.mixed] if shared else obj.subs):
        sub.conds.real_cond = (lambda labels, k=k: real.append((k, labels.clone())) or labels)
    trainer = Trainer(obj, cfg, data=data)
    before = {n: [p.detach().clone() for p in pl.module.parameters()] for n, pl in obj.players.items()}
    for step in range(4):
        trainer._run_step()
        trainer.step, trainer.update = step + 1, 0
        if step == 0:  # round robin: only student 0 (and its critic) moved
            moved = {n for n, pl in obj.players.items()
                     if any(not torch.equal(a, b) for a, b in zip(before[n], pl.module.parameters()))}
            assert moved == {"student_0", critic}
    seen = {}
    for name, cond in calls:
        seen.setdefault(name, set()).update(cond.tolist())
    for k in (0, 1):
        assert seen[f"student_{k}"] and seen[f"student_{k}"] <= parts[k], (k, seen[f"student_{k}"])
    assert real, "the GAN's real branch never ran"
    if shared:  # one critic fitted to the routed generator: all classes, each generated by its owner
        assert seen["critic"] == set(range(10))
        reals = set().union(*(set(y.tolist()) for _, y in real))   # the whole data set: both parts
        assert reals & parts[0] and reals & parts[1]
    else:       # each critic (fake and real batches) stays inside its part
        for k in (0, 1):
            assert seen[f"critic_{k}"] <= parts[k]
            assert all(set(y.tolist()) <= parts[kk] for kk, y in real if kk == k)
        assert {k for k, _ in real} == {0, 1}


def test_shared_vs_separate_critic_players(tiny_teacher, tmp_path):
    sep, _, _ = _objective(tiny_teacher, tmp_path, **{"msd.num_students": 3, "train.max_steps": 3})
    assert sorted(sep.players) == ["critic_0", "critic_1", "critic_2", "student_0", "student_1", "student_2"]
    assert len({id(s.critic) for s in sep.subs}) == 3 and len({id(s.head) for s in sep.subs}) == 3
    assert all(sep.players[f"student_{k}"].ema and not sep.players[f"critic_{k}"].ema for k in range(3))
    sh, _, _ = _objective(tiny_teacher, tmp_path, **{"msd.num_students": 3, "train.max_steps": 3,
                                                     "msd.shared_critic": "true"})
    assert sorted(sh.players) == ["critic", "student_0", "student_1", "student_2"]
    assert all(s.critic is sh.critics[0] and s.head is sh.mixed.head for s in sh.subs)
    assert set(sh.players["critic"].module.keys()) == {"fake", "head"}
    assert sh.updates(0) == ["critic", "student_0"]
    alls, _, _ = _objective(tiny_teacher, tmp_path, **{"msd.schedule": "all", "train.max_steps": 2})
    assert alls.updates(0) == ["critic_0", "student_0", "critic_1", "student_1"]


def test_smaller_students_and_teacher_score_matching(tiny_teacher, tmp_path):
    from stepdistill.models import count_params

    small = {"msd.student_channels": "[8,16]", "msd.student_layers_per_block": 1, "msd.tsm_steps": 3,
             "msd.steps_per_student": 1, "train.max_steps": 8, "dmd.student_lr": 3e-3}
    obj, data, cfg = _objective(tiny_teacher, tmp_path, **small)
    t, s = obj.teacher.backbone, obj.students[0].backbone
    assert count_params(s) < count_params(t) / 2
    assert s.config.block_out_channels == (8, 16) and s.config.num_class_embeds == t.config.num_class_embeds == 11
    x, tt, y = torch.randn(3, 1, 16, 16), torch.tensor([10.0, 500.0, 990.0]), torch.tensor([0, 5, 10])  # 10: null
    with torch.no_grad():
        assert obj.students[1](x, tt, y).shape == obj.teacher(x, tt, y).shape == x.shape
    assert not torch.equal(next(obj.students[0].backbone.parameters()), next(obj.students[1].backbone.parameters()))
    # TSM first (students only, round robin), then DM with critics
    assert [obj.updates(i) for i in range(7)] == [["student_0"], ["student_1"]] * 3 + [["critic_0", "student_0"]]
    # TSM regresses on noised real images of the student's own part
    calls = []
    _spy(obj.teacher, calls, "teacher")
    fixed = lambda: obj.tsm_loss(obj.part_ctx(_ctx(99, data, batch=16), 0), 0)[0].item()  # noqa: E731
    with torch.no_grad():
        before = fixed()
    assert calls and set(calls[0][1].tolist()) <= set(obj.groups[0])
    trainer = Trainer(obj, cfg, data=data)
    for step in range(6):
        trainer._run_step()
        trainer.step, trainer.update = step + 1, 0
    with torch.no_grad():
        after = fixed()
    assert after < 0.7 * before, (before, after)


def test_resume_across_the_tsm_dm_switch_is_exact(tiny_teacher, tmp_path):
    """Shared critic, smaller students, TSM then DM: 3 steps + resume for the last 3 == 6 steps in one go."""
    extra = {"msd.student_channels": "[8,16]", "msd.tsm_steps": 1, "msd.shared_critic": "true",
             "train.max_steps": 6, "train.checkpoint_every": 1, "train.sample_every": 100}

    def run(out, stop_at=None, resume=False):
        obj, data, cfg = _objective(tiny_teacher, out, **extra)
        if stop_at is not None:
            cfg.train.max_steps = stop_at
        Trainer(obj, cfg, data=data).train(resume=resume)
        return obj

    a = run(tmp_path / "a")
    run(tmp_path / "b", stop_at=3)
    b = run(tmp_path / "b", resume=True)
    for name in a.players:
        sa, sb = a.players[name].module.state_dict(), b.players[name].module.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


# -- export round trip ----------------------------------------------------------------------------
MSD3 = {"method": "msd", "msd.num_students": 3, "train.max_steps": 3, "dmd.critic_updates": 1,
        "train.checkpoint_every": 3}


@pytest.fixture(scope="module")
def msd_student(tiny_teacher, tmp_path_factory):
    from stepdistill.trainers.distill import distill

    out = tmp_path_factory.mktemp("msd")
    cfg = load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, out, **MSD3))
    return distill(cfg), out


def test_export_reload_routes_and_matches_each_student(msd_student):
    folder, _ = msd_student
    groups = [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    meta = json.loads((folder / "stepdistill.json").read_text())
    assert meta["method"] == "msd" and meta["student_timesteps"] == [999.0]
    assert [{k: s[k] for k in ("name", "subfolder", "classes")} for s in meta["extra"]["students"]] == [
        {"name": "student_0", "subfolder": "unet", "classes": groups[0]},
        {"name": "student_1", "subfolder": "student_1", "classes": groups[1]},
        {"name": "student_2", "subfolder": "student_2", "classes": groups[2]}]
    assert meta["extra"]["partition"]["groups"] == groups
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "MultiStudentPipeline" and index["student_2"] == ["diffusers", "UNet2DModel"]
    assert index["student_classes"] == groups
    assert "MultiStudentPipeline.from_pretrained" in (folder / "README.md").read_text()

    pipe = MultiStudentPipeline.from_pretrained(folder)
    assert pipe.num_students == 3
    # the card's stock-diffusers snippet routes class 0 to its student and gives the pipeline's image
    import os

    from test_modelcard import _code_blocks

    snippet = next(b for b in _code_blocks((folder / "README.md").read_text(), "python") if "student_classes" in b)
    cwd, ns = os.getcwd(), {}
    os.chdir(folder.parent)
    try:
        exec(compile(snippet, "README.md", "exec"), ns)  # noqa: S102 - our own generated code
    finally:
        os.chdir(cwd)
    assert ns["k"] == 0
    torch.testing.assert_close(ns["image"], pipe(class_labels=[0], seed=0, output_type="pt").images,
                               atol=1e-5, rtol=1e-5)
    assert [pipe.route(c) for c in range(10)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert pipe.route("7") == 2                                       # class names route too (digits: "0".."9")
    with pytest.raises(ValueError, match="out of range"):
        pipe.route(10)
    with pytest.raises(ValueError, match="class-conditional"):
        pipe(batch_size=2)
    labels = [9, 0, 4, 0, 7, 3]
    out = pipe(class_labels=labels, seed=5, output_type="pt").images
    assert pipe.last_students == ["student_2", "student_0", "student_1", "student_0", "student_2", "student_1"]
    assert out.shape == (6, 1, 16, 16) and pipe.last_latency_s > 0
    assert torch.equal(out, pipe(class_labels=labels, seed=5, output_type="pt").images)   # deterministic

    # each image == its own student run alone on the same starting noise (stock diffusers, v-prediction)
    from diffusers import DDPMScheduler, UNet2DModel

    noise = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    ac = DDPMScheduler.from_pretrained(folder, subfolder="scheduler").alphas_cumprod
    a, s = ac[999].sqrt(), (1 - ac[999]).sqrt()
    nets = [UNet2DModel.from_pretrained(folder, subfolder=sub).eval() for sub in ("unet", "student_1", "student_2")]
    for i, c in enumerate(labels):
        k = pipe.route(c)
        with torch.no_grad():
            v = nets[k](noise[i:i + 1], torch.tensor([999.0]), class_labels=torch.tensor([c])).sample
        torch.testing.assert_close(out[i:i + 1], ((a * noise[i:i + 1] - s * v) / (a**2 + s**2)).clamp(-1, 1),
                                   atol=1e-5, rtol=1e-5)
    assert not torch.equal(nets[0].conv_in.weight, nets[1].conv_in.weight)  # really different students

    # hybrid: a first step given for the whole batch reaches every student's rows
    fixed = torch.linspace(-1, 1, 6).view(6, 1, 1, 1).expand(6, 1, 16, 16)
    hy = pipe(class_labels=labels, seed=5, output_type="pt", first_step=lambda x, t: fixed).images
    torch.testing.assert_close(hy, fixed)


def test_training_sampler_matches_the_export(msd_student, tiny_teacher):
    from stepdistill.trainers.loading import load_trained

    folder, out = msd_student
    cfg = load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, out, **MSD3))
    modules, obj, _ = load_trained(cfg)
    students = [modules[f"student_{k}"] for k in range(obj.K)]
    labels = torch.tensor([2, 8, 5, 0])
    noise = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    ref = obj.sample({f"student_{k}": m for k, m in enumerate(students)}, 4, "cpu", noise=noise, labels=labels)
    pipe = MultiStudentPipeline.from_pretrained(folder)
    torch.testing.assert_close(pipe.sample(noise, labels), ref, atol=1e-6, rtol=1e-6)


def test_eval_demo_and_export_cli_find_it(msd_student, tiny_teacher, tmp_path):
    from stepdistill.frontends import demo
    from stepdistill.frontends.cli import main
    from stepdistill.eval.generate import load_any

    folder, out = msd_student
    m = load_any(folder, device="cpu")
    assert m.kind == "student" and isinstance(m.pipe, MultiStudentPipeline) and m.min_steps == 1
    labels = torch.tensor([0, 5, 9, 3])
    x = m.generate(labels, steps=1, seed=3, batch_size=4, progress=False)
    torch.testing.assert_close(x, m.pipe(class_labels=[0, 5, 9, 3], seed=3, output_type="pt").images)
    assert m.pipe.last_students == ["student_0", "student_1", "student_2", "student_1"]

    info = demo.read_model_info(str(folder))
    assert demo._student_pipeline_class(info) is MultiStudentPipeline and demo.student_supports_hybrid(info)
    assert demo.expert_caption(info.experts, "4", 4, [999.0]) == "student_1"

    overrides = tiny_distill_overrides(tiny_teacher, out, **MSD3)
    assert main(["export", "--config", "", *overrides, "--out", str(tmp_path / "again")]) == 0
    from safetensors.torch import load_file

    for sub in ("unet", "student_1", "student_2"):
        a = load_file(folder / sub / "diffusion_pytorch_model.safetensors")
        b = load_file(tmp_path / "again" / sub / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_each_student_regresses_on_its_own_parts_pairs(tiny_teacher, tmp_path):
    """dmd.regression_weight > 0 in MSD: the teacher ODE pairs are split by the partition, so every student's DMD
    regression term pulls it toward the teacher on its own classes only, and the generator loss carries it."""
    obj, data, _ = _objective(tiny_teacher, tmp_path, **{"msd.groups": ODD_EVEN, "dmd.regression_weight": 0.5,
                                                         "dmd.regression_pairs": 16, "dmd.regression_steps": 2})
    parts = [sub.pairs for sub in obj.subs]
    for (noise, labels, x0), group in zip(parts, obj.groups):
        assert len(labels) > 0 and set(labels.tolist()) <= set(group)
        assert noise.shape[0] == labels.shape[0] == x0.shape[0]
    assert sum(len(p[1]) for p in parts) == 16  # every pair goes to exactly one student
    obj.players["critic_1"].module.requires_grad_(False)
    total, logs = obj.loss("student_1", _ctx(0, data, step=1))
    assert "regression_loss_1" in logs and logs["regression_loss_1"] > 0
    without, _, _ = _objective(tiny_teacher, tmp_path / "b", **{"msd.groups": ODD_EVEN})
    assert all(sub.pairs is None for sub in without.subs)

"""Hybrid sampling (Gandikota & Bau 2025): the teacher takes the first n steps of the student chain.

Counting networks check that the teacher is called exactly for the configured steps (with CFG as one
batched call, sub-steps on their grid) and the student for the rest; same noise -> same images; eval
and bench report the hybrid NFE."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from conftest import tiny_distill_overrides
from stepdistill.frontends.cli import main
from stepdistill.config import DistillConfig, load_config
from stepdistill.denoiser import Denoiser
from stepdistill.pipelines.hybrid import TeacherSteps, hybrid_nfe
from stepdistill.pipelines.sampling import student_sample
from stepdistill.schedules import VPSchedule

TS = [999.0, 749.0, 499.0, 249.0]


class Counting(nn.Module):
    """x0-predicting toy network that records (batch, t) of every call."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))
        self.calls: list[tuple[int, list[float]]] = []

    def forward(self, x, t, cond):
        self.calls.append((x.shape[0], sorted(set(t.flatten().tolist()))))
        shift = 0.0 if cond is None else (cond.float() - 5.0).view(-1, 1, 1, 1) * 0.01
        return torch.tanh(self.scale * x) + shift


def _dens():
    sched = VPSchedule(torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0))
    return (Denoiser(Counting(0.5), sched, "sample", null_class=10),
            Denoiser(Counting(0.9), sched, "sample", null_class=10))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_teacher_called_exactly_for_the_configured_steps(n):
    teacher, student = _dens()
    labels = torch.tensor([1, 2, 3])
    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    fs = TeacherSteps(teacher, labels, 2.0, TS)
    student_sample(student, TS, labels, noise, generator=torch.Generator().manual_seed(1), first_step=fs,
                   hybrid_steps=n)
    # one batched CFG call (2B rows) per teacher step, at the first n student timesteps
    assert teacher.backbone.calls == [(6, [t]) for t in TS[:n]]
    assert student.backbone.calls == [(3, [t]) for t in TS[n:]]
    assert fs.calls == n and fs.nfe == 2 * n and hybrid_nfe(4, n) == 2 * n + 4 - n


def test_substeps_walk_the_ddim_grid_and_without_cfg_count_once():
    teacher, student = _dens()
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    fs = TeacherSteps(teacher, None, 2.0, TS, substeps=3)  # unconditional: no CFG
    student_sample(student, TS, None, noise, generator=torch.Generator().manual_seed(1), first_step=fs, hybrid_steps=2)
    grid = [999.0, 749.0 + 500 / 3, 749.0 + 250 / 3, 749.0, 499.0 + 500 / 3, 499.0 + 250 / 3]
    got = [c[1][0] for c in teacher.backbone.calls]
    assert [c[0] for c in teacher.backbone.calls] == [2] * 6 and got == pytest.approx(grid)
    assert fs.nfe == 6 and hybrid_nfe(4, 2, 3, cfg=False) == 8
    # the last student interval ends at 0: 2 sub-steps over [249, 0)
    teacher.backbone.calls.clear()
    TeacherSteps(teacher, None, 1.0, TS, substeps=2)(noise, torch.full((2,), 249.0))
    assert [c[1][0] for c in teacher.backbone.calls] == pytest.approx([249.0, 124.5])


def test_one_substep_is_the_teachers_guided_x0_and_substeps_follow_ddim():
    teacher, _ = _dens()
    labels = torch.tensor([0, 9])
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    t = torch.full((2,), 999.0)
    torch.testing.assert_close(TeacherSteps(teacher, labels, 3.0, TS)(x, t), teacher(x, t, labels, guidance_scale=3.0))
    # two sub-steps: DDIM (eta 0) to the midpoint, then the x0 prediction there
    x0 = teacher(x, t, labels, guidance_scale=3.0)
    eps = teacher.schedule.eps_from_x0(x0, x, t)
    x_mid = teacher.schedule.add_noise(x0, eps, torch.full((2,), 874.0))
    ref = teacher(x_mid, torch.full((2,), 874.0), labels, guidance_scale=3.0)
    torch.testing.assert_close(TeacherSteps(teacher, labels, 3.0, TS, substeps=2)(x, t), ref)


def test_same_noise_is_deterministic_and_shares_renoising_with_the_plain_chain():
    teacher, student = _dens()
    labels = torch.tensor([4, 5])
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))

    def run(first, n=1):
        return student_sample(student, TS, labels, noise, generator=torch.Generator().manual_seed(1),
                              first_step=first, hybrid_steps=n)

    a, b = run(TeacherSteps(teacher, labels, 2.0, TS), 2), run(TeacherSteps(teacher, labels, 2.0, TS), 2)
    assert a.equal(b)
    assert not a.equal(run(None))
    # a "teacher" that is the student itself without CFG reproduces the plain chain bit for bit:
    # the re-noising draws do not depend on who took the step
    assert run(TeacherSteps(student, labels, 1.0, TS), 3).equal(run(None))
    with pytest.raises(ValueError, match="hybrid steps must be in 1..4"):
        run(TeacherSteps(teacher, labels, 2.0, TS), 5)


def test_ode_handoff_continues_from_the_teachers_ddim_state():
    """handoff=ode: the chain continues from the teacher's DDIM state (no re-noising); with n = K the whole
    chain is the teacher's DDIM sampler on the student's timesteps; later re-noising draws stay aligned."""
    teacher, student = _dens()
    labels = torch.tensor([3, 8])
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = student_sample(student, TS, labels, noise, generator=torch.Generator().manual_seed(1),
                         first_step=TeacherSteps(teacher, labels, 2.0, TS, handoff="ode"), hybrid_steps=4)
    x, sched = noise, teacher.schedule
    for t, t_next in zip(TS, TS[1:] + [0.0]):
        x0 = teacher(x, torch.full((2,), t), labels, guidance_scale=2.0)
        eps = sched.eps_from_x0(x0, x, torch.full((2,), t))
        x = sched.add_noise(x0, eps, torch.full((2,), t_next)) if t_next > 0 else x0
    torch.testing.assert_close(out, x.clamp(-1, 1))
    # n = 1: the student's first input is the teacher's DDIM state at t_1; the student's later steps use
    # the same re-noising draws as the plain chain (eps draw k = 0 is made and discarded)
    seen = []
    h = student.backbone.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    student_sample(student, TS, labels, noise, generator=torch.Generator().manual_seed(1),
                   first_step=TeacherSteps(teacher, labels, 2.0, TS, handoff="ode"), hybrid_steps=1)
    h.remove()
    x0 = teacher(noise, torch.full((2,), 999.0), labels, guidance_scale=2.0)
    x1 = sched.add_noise(x0, sched.eps_from_x0(x0, noise, torch.full((2,), 999.0)), torch.full((2,), 749.0))
    torch.testing.assert_close(seen[0], x1)
    with pytest.raises(ValueError, match="hand-off"):
        TeacherSteps(teacher, labels, 2.0, TS, handoff="sde")


# -- eval / bench / pipeline on the tiny models ---------------------------------------------------
@pytest.fixture(scope="module")
def student2(tiny_teacher, tmp_path_factory):
    from stepdistill.trainers.distill import distill

    out = tmp_path_factory.mktemp("hybrid_student")
    return distill(load_config(DistillConfig, None, tiny_distill_overrides(
        tiny_teacher, out, **{"dmd.student_timesteps": "[999,499]", "train.max_steps": 2})))


def test_eval_wrapper_and_pipeline_hybrid(tiny_teacher, student2):
    from stepdistill.eval.generate import load_any
    from stepdistill.eval.hybrid import Hybrid

    s, t = load_any(student2, device="cpu"), load_any(tiny_teacher, device="cpu")
    plain = s.generate(n=4, steps=2, seed=3, batch_size=4, progress=False)
    s.hybrid = Hybrid(t, steps=1, substeps=1, guidance_scale=2.0)
    s.hybrid.check(s, 2)
    assert s.nfe_per_sample(2) == 3 and s.nfe_per_sample(1) == 2
    calls = []
    h = t.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    hy = s.generate(n=4, steps=2, seed=3, batch_size=4, progress=False)
    h.remove()
    assert calls == [8]  # one CFG call (2 x 4 rows) for the first step only
    assert hy.equal(s.generate(n=4, steps=2, seed=3, batch_size=4, progress=False)) and not hy.equal(plain)
    # the pipeline's __call__ gives the same images from the same seed (first noise draw = generate's)
    labels = s.default_labels(4)
    out = s.pipe(class_labels=labels.tolist(), seed=3, output_type="pt", **s.hybrid.pipe_kwargs(s, labels, 2)).images
    assert out.shape == hy.shape
    s.hybrid = Hybrid(t, steps=3)
    with pytest.raises(Exception, match="hybrid steps must be in 1..2"):
        s.hybrid.check(s, 2)


def test_eval_and_bench_cli_report_hybrid_nfe(tiny_teacher, student2, capsys):
    fast = ["--ref", "digits", "--ref-num", "32", "--no-progress", "--threads", "1"]
    hyb = ["--hybrid-teacher", str(tiny_teacher)]
    rc = main(["eval", "--model", str(student2), "--num", "8", *hyb, "--hybrid-steps", "2", "--guidance-scale", "2", *fast])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["nfe_per_sample"] == 4  # 2 teacher steps x 2 (CFG) + 0 student steps
    assert res["hybrid"] == {"teacher": str(tiny_teacher), "steps": 2, "substeps": 1, "handoff": "renoise",
                             "guidance_scale": 2.0, "cfg": True, "teacher_nfe_per_sample": 4, "student_nfe_per_sample": 0}
    rc = main(["eval", "--model", str(student2), "--num", "8", *hyb, "--hybrid-steps", "3", *fast])
    err = capsys.readouterr().err
    assert rc == 2 and "hybrid steps must be in 1..2" in err
    rc = main(["eval", "--model", str(tiny_teacher), "--num", "8", *hyb, *fast])
    assert rc == 2 and "needs a distilled student" in capsys.readouterr().err

    rc = main(["bench", "--student", str(student2), "--teacher", str(tiny_teacher), "--batch-sizes", "2",
               "--teacher-steps", "2", "--repeats", "1", "--warmup", "1", "--hybrid-steps", "1", "--hybrid-substeps", "2",
               "--hybrid-handoff", "ode", "--no-progress", "--threads", "1"])
    res = json.loads(capsys.readouterr().out)
    hy = res["results"][0]["hybrid"]
    assert rc == 0 and hy["nfe_per_sample"] == 1 * 2 * 2 + 1 and hy["student_steps"] == 2 and hy["latency_s"] > 0
    assert res["config"]["hybrid_steps"] == 1 and res["config"]["hybrid_handoff"] == "ode" and "hybrid" in res["nfe"]

"""BOOT (trainers/boot.py): the bootstrapped target is one explicit teacher step of the signal-ODE; a student that
follows the teacher's discrete ODE exactly has zero loss; the parametrisation makes g(eps, 0) the ordinary one-step
student; training and export through the CLI read no dataset; the exported folder loads in our pipeline and in a
stock diffusers loop."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli, tiny_distill_overrides
from stepdistill.config import ConfigError, DistillConfig, load_config
from stepdistill.trainers.boot import bootstrap_target, log_snr_half
from stepdistill.trainers.distill import build_method
from stepdistill.trainers.objective import Ctx


def _boot(teacher, out, **extra):
    cfg = load_config(DistillConfig, None, tiny_distill_overrides(teacher, out, method="boot", **extra))
    obj, data, meta = build_method(cfg)
    return obj, data, cfg


@pytest.mark.parametrize("update", ["euler", "ddim"])
def test_target_is_one_explicit_teacher_step(tiny_teacher, tmp_path, update):
    obj, _, _ = _boot(tiny_teacher, tmp_path)
    g = torch.Generator().manual_seed(0)
    eps, y_t = torch.randn(3, *obj.shape, generator=g), torch.randn(3, *obj.shape, generator=g)
    t, s = torch.tensor([968.0, 500.0, 40.0], dtype=torch.float64), torch.tensor([937.0, 468.0, 0.0], dtype=torch.float64)
    cond = torch.tensor([0, 1, 2])
    target, delta = bootstrap_target(obj.teacher, y_t, eps, t, s, cond, 2.0, update)
    sched = obj.teacher.schedule
    for b in range(3):  # by hand, one sample at a time: x_t, the guided teacher x0, the step in lambda
        a_t, s_t = (float(v) for v in sched.alpha_sigma(t[b:b + 1]))
        a_s, s_s = (float(v) for v in sched.alpha_sigma(s[b:b + 1]))
        x_t = a_t * y_t[b:b + 1] + s_t * eps[b:b + 1]
        u = obj.teacher.raw(x_t, t[b:b + 1], torch.tensor([obj.teacher.null_class]))
        c = obj.teacher.raw(x_t, t[b:b + 1], cond[b:b + 1])
        f = sched.pred_to_x0_eps(u + 2.0 * (c - u), x_t, t[b:b + 1], obj.teacher.prediction_type)[0]
        dlam = torch.log(torch.tensor(a_s / s_s)) - torch.log(torch.tensor(a_t / s_t))
        step = dlam if update == "euler" else 1 - torch.exp(-dlam)
        torch.testing.assert_close(target[b:b + 1], y_t[b:b + 1] + float(step) * (f - y_t[b:b + 1]),
                                   rtol=1e-4, atol=1e-5)
        assert float(delta[b]) == pytest.approx(float(step), rel=1e-5)
    torch.testing.assert_close(log_snr_half(sched, t), torch.log(sched.alpha(t).double() / sched.sigma(t).double()))


def test_a_student_on_the_teachers_ode_has_zero_loss(tiny_teacher, tmp_path):
    """An oracle g that runs the teacher's own discrete signal-ODE from g(eps, T) = teacher(eps, T) down to t: the
    bootstrapped target at every interval is its own next value, the boundary holds, so the loss is 0."""
    obj, _, cfg = _boot(tiny_teacher, tmp_path, **{"boot.num_steps": 4})
    grid = obj.grid

    def oracle(eps, t, cond):
        with torch.no_grad():
            t_end = torch.full((eps.shape[0],), obj.t_end, dtype=torch.float64)
            y = obj.teacher(eps, t_end, cond, guidance_scale=cfg.dmd.real_guidance_scale).float()
            out = torch.empty_like(y)
            for i in range(len(grid)):
                done = t.cpu() == grid[i]
                out[done] = y[done]
                if i + 1 < len(grid):
                    y, _ = bootstrap_target(obj.teacher, y, eps, torch.full_like(t_end, float(grid[i])),
                                            torch.full_like(t_end, float(grid[i + 1])), cond,
                                            cfg.dmd.real_guidance_scale, cfg.boot.update)
        return out.requires_grad_(True)

    obj.signal = oracle
    ctx = Ctx(torch.Generator().manual_seed(0), 0, 1, 8, torch.device("cpu"), 0, None)
    loss, logs = obj.loss("generator", ctx)
    assert loss.item() < 1e-8 and logs["boundary_loss"] < 1e-10
    obj2, _, _ = _boot(tiny_teacher, tmp_path / "b", **{"boot.num_steps": 4})  # the real (untrained) student: not 0
    loss2, _ = obj2.loss("generator", Ctx(torch.Generator().manual_seed(0), 0, 1, 8, torch.device("cpu"), 0, None))
    assert loss2.item() > 1e-4


def test_g_at_time_zero_is_the_one_step_student(tiny_teacher, tmp_path):
    """g(eps, 0) = the student's x0 at time T on noise (what every one-step pipeline computes); g(eps, T) starts
    as the network at time 0 read at T's coefficients."""
    obj, _, _ = _boot(tiny_teacher, tmp_path)
    eps = torch.randn(2, *obj.shape, generator=torch.Generator().manual_seed(3))
    cond = torch.tensor([1, 4])
    with torch.no_grad():
        g0 = obj.signal(eps, torch.zeros(2, dtype=torch.float64), cond)
        one_step = obj.student(eps, torch.full((2,), obj.t_end), cond)
    assert torch.equal(g0, one_step)
    assert obj.grid[0] == obj.t_end and obj.grid[-1] == 0 and len(obj.grid) == 33


def test_trains_and_exports_with_no_dataset(tiny_teacher, tmp_path, capsys, monkeypatch):
    """No data: data.name points nowhere and every dataset loader raises; training, export and the stock loop
    all work."""
    import stepdistill.data as data_mod

    def no_data(*a, **k):
        raise AssertionError("a data-free method read a dataset")

    monkeypatch.setattr(data_mod, "load_dataset", no_data)
    out = tmp_path / "boot"
    argv = ["distill", "--config", "", *tiny_distill_overrides(tiny_teacher, out, method="boot",
                                                                 **{"data.name": str(tmp_path / "no_such_folder"),
                                                                    "boot.num_steps": 8})]
    code, _, err = run_cli(capsys, argv)
    assert code == 0, err
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("boot_loss" in r for r in logs) and all(r.get("boot_loss", 0) >= 0 for r in logs)
    meta = json.loads((out / "student" / "stepdistill.json").read_text())
    assert meta["method"] == "boot" and meta["student_timesteps"] == [999.0]
    # our pipeline and the stock diffusers reproduction (UNet2DModel + the scheduler's alphas) agree
    from diffusers import DDPMScheduler, UNet2DModel

    from stepdistill.pipelines.student import StepDistillPipeline

    pipe = StepDistillPipeline.from_pretrained(out / "student")
    ours = pipe(class_labels=[3, 5], seed=0, output_type="pt").images
    unet = UNet2DModel.from_pretrained(out / "student", subfolder="unet")
    ac = DDPMScheduler.from_pretrained(out / "student", subfolder="scheduler").alphas_cumprod
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    a, s = ac[999].sqrt(), (1 - ac[999]).sqrt()
    with torch.no_grad():
        v = unet(x, torch.full((2,), 999.0), class_labels=torch.tensor([3, 5])).sample
    torch.testing.assert_close(ours, ((a * x - s * v) / (a**2 + s**2)).clamp(-1, 1), atol=1e-5, rtol=1e-5)
    # the demo and eval load it like any one-step student
    from stepdistill.eval.generate import class_accuracy_of
    from stepdistill.frontends import demo as D

    r = D.generate(str(tiny_teacher), str(out / "student"), "3", "", seed=1, batch_size=2, student_steps=1,
                   teacher_steps=2, guidance_scale=2.0)
    assert len(r.student.images) == 2 and r.student.nfe == 1
    acc = class_accuracy_of(str(out / "student"), 20, 0)  # eval's loader samples it (digits: no shipped classifier)
    assert acc["num"] == 20 and acc["accuracy"] is None


def test_config_checks(tiny_teacher, tmp_path):
    over = lambda **k: tiny_distill_overrides(tiny_teacher, tmp_path, method="boot", **k)  # noqa: E731
    with pytest.raises(ConfigError, match="boot.update"):
        load_config(DistillConfig, None, over(**{"boot.update": "rk4"}))
    with pytest.raises(ConfigError, match="dmd.student_timesteps.*one-step"):
        load_config(DistillConfig, None, over(**{"dmd.student_timesteps": "[999,500]"}))
    with pytest.raises(ConfigError, match="boot.num_steps"):
        load_config(DistillConfig, None, over(**{"boot.num_steps": 0}))

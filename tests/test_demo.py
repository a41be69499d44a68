"""The Gradio demo: plain generate(), validation, hybrid sampling, and the served app via gradio_client."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import pytest
import torch

from conftest import tiny_distill_overrides
from stepdistill.frontends import demo as D
from stepdistill.frontends import demo_ui as U
from test_text import text_student, text_teacher, tiny_encoder  # noqa: F401 - fixtures (tiny text models)

REPO = Path(__file__).resolve().parent.parent
K = 2  # the tiny student's steps
SIZE = 128  # 16x16 digits are shown nearest-upscaled 8x


@pytest.fixture(scope="module")
def models(tiny_teacher, tmp_path_factory):
    """(teacher folder, 2-step student folder) on 16x16 digits."""
    from stepdistill.config import DistillConfig, load_config
    from stepdistill.trainers.distill import distill

    out = tmp_path_factory.mktemp("demo_distill")
    student = distill(load_config(DistillConfig, None, tiny_distill_overrides(
        tiny_teacher, out, **{"dmd.student_timesteps": "[999,500]", "train.max_steps": 2})))
    return str(tiny_teacher), str(student)


def _nfe(text: str) -> int:
    m = re.search(r"NFE (\d+)", text)
    assert m, text
    return int(m.group(1))


def _seconds(text: str) -> float:
    m = re.search(r"([0-9.]+) s wall-clock", text)
    assert m, text
    return float(m.group(1))


# -- plain Python -------------------------------------------------------------------------------
def test_generate_plain(models):
    t, s = models
    r = D.generate(t, s, "3", "", seed=1, batch_size=3, student_steps=K, teacher_steps=4, guidance_scale=2.0)
    for run in (r.teacher, r.student):
        assert len(run.images) == 3 and all(im.size == (SIZE, SIZE) for im in run.images)
        assert run.captions == ["3", "3", "3"]
        assert run.seconds > 0 and _seconds(run.summary) >= 0
    assert r.teacher.nfe == 8 and _nfe(r.teacher.summary) == 8  # 4 steps x 2 (CFG)
    assert r.student.nfe == K and _nfe(r.student.summary) == K
    r1 = D.generate(t, s, D.ALL_CLASSES, "", seed=1, batch_size=3, student_steps=1, teacher_steps=3,
                    guidance_scale=1.0)
    assert r1.teacher.nfe == 3 and r1.student.nfe == 1  # no CFG -> one NFE per teacher step
    # "(all classes)" covers every class: batch size 3 still gives one image of each of the 10 digits
    assert r1.student.captions == [str(i) for i in range(10)] == r1.teacher.captions


@pytest.mark.parametrize("kw, msg", [
    (dict(seed=-1), "seed must be in 0..2147483647"),
    (dict(seed=2**31), "seed must be in 0..2147483647"),
    (dict(seed=1.5), "whole number"),
    (dict(batch_size=0), "batch size must be in 1..16"),
    (dict(batch_size=17), "batch size must be in 1..16"),
    (dict(student_steps=K + 1), f"student steps must be in 1..{K}"),
    (dict(student_steps=0), f"student steps must be in 1..{K}"),
    (dict(teacher_steps=0), "teacher steps must be in 1..200"),
    (dict(teacher_steps=201), "teacher steps must be in 1..200"),
    (dict(class_name="cat"), "unknown class 'cat'"),
    (dict(guidance_scale=-1), "guidance scale must be in"),
    (dict(sampler="nope"), "unknown sampler"),
    (dict(teacher_path="/no/such/folder"), "does not exist"),
    (dict(hybrid=True, student_steps=K, hybrid_steps=K + 1),
     f"hybrid steps must be in 1..{K} (the student's steps), got {K + 1}; lower the hybrid teacher steps"),
    (dict(hybrid=True, student_steps=1, hybrid_steps=2), "hybrid steps must be in 1..1 (the student's steps), got 2; lower the hybrid teacher steps"),
    (dict(hybrid=True, hybrid_steps=0), "hybrid teacher steps must be in 1..200, got 0"),
    (dict(hybrid=True, hybrid_substeps=0), "hybrid teacher sub-steps must be in 1..50, got 0"),
    (dict(hybrid=True, hybrid_substeps=2.5), "hybrid teacher sub-steps must be a whole number"),
    (dict(hybrid=True, hybrid_handoff="euler"), "hybrid hand-off must be ode or renoise, got 'euler'"),
    (dict(hybrid=True, hybrid_guidance=-1), "hybrid teacher guidance scale must be in 0..20"),
    (dict(student_path=""), "student folder is empty"),
    (dict(student_path="builtin:nope"), "unknown builtin"),
])
def test_generate_rejects_bad_input(models, kw, msg):
    args = dict(teacher_path=models[0], student_path=models[1], class_name="1", seed=0, batch_size=1,
                student_steps=1, teacher_steps=2)
    args.update(kw)
    with pytest.raises(D.DemoInputError, match=re.escape(msg)):
        D.generate(**args)


def test_teacher_folder_as_student_is_rejected(models):
    with pytest.raises(D.DemoInputError, match="not a distilled student"):
        D.generate(models[0], models[0], "1", seed=0, batch_size=1, teacher_steps=2)


def test_builtin_names_resolve():
    assert D.BUILTIN_STUDENTS["builtin:animal_mnist_dmd2"].name == "animal_mnist_dmd2_student"
    st = U._ui_state("builtin:animal_mnist", "builtin:animal_mnist_dmd2")  # never raises
    if not D.BUILTIN_STUDENTS["builtin:animal_mnist_dmd2"].exists():
        assert "animal_mnist_dmd2_student" in st["message"]


def test_hybrid_first_step_is_teacher_x0_with_cfg(models):
    """1-step hybrid == the teacher's guided x0 at the student's first timestep on the same noise."""
    t, s = models
    tinfo, sinfo = D.read_model_info(t), D.read_model_info(s)
    assert D.student_supports_hybrid(sinfo) and D.hybrid_compatible(tinfo, sinfo) is None
    teacher, student = D.load_teacher(tinfo), D.load_student(sinfo)
    fs = D.hybrid_first_step(teacher, [4, 7], 2.5)
    out = student(class_labels=[4, 7], num_inference_steps=1, seed=3, output_type="pt", first_step=fs).images
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    ref = teacher.denoiser()(noise, torch.full((2,), 999.0), torch.tensor([4, 7]), guidance_scale=2.5).clamp(-1, 1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    old = dict(hybrid=True, hybrid_steps=1, hybrid_substeps=1, hybrid_handoff="renoise", hybrid_guidance=2.5)
    r = D.generate(t, s, "4", seed=3, batch_size=2, student_steps=1, teacher_steps=2, **old)
    assert r.student.nfe == 2 and "2 teacher NFE" in r.student.summary  # 2 teacher NFE (CFG) + 0 student
    r = D.generate(t, s, "4", seed=3, batch_size=2, student_steps=K, teacher_steps=2, **old)
    assert r.student.nfe == 2 + K - 1 and _nfe(r.student.summary) == 2 + K - 1


def _pipeline_hybrid(models, labels, steps, seed, w, substeps, handoff, n=1):
    """The student pipeline's own hybrid chain (TeacherSteps), outside the demo."""
    from stepdistill.pipelines.hybrid import TeacherSteps

    teacher, student = D.load_teacher(D.read_model_info(models[0])), D.load_student(D.read_model_info(models[1]))
    ts = student.timesteps_for(steps)
    fs = TeacherSteps(teacher.denoiser(), torch.tensor(labels), w, ts, substeps, handoff)
    kw = {"hybrid_steps": n} if n != 1 else {}
    out = student(class_labels=labels, num_inference_steps=steps, seed=seed, output_type="pt", first_step=fs, **kw)
    return out.images, fs


def test_hybrid_defaults_are_the_benchmarks_best_and_match_the_pipeline(models):
    """Default hybrid = 1 unguided teacher step of 4 DDIM sub-steps, ode hand-off (BENCHMARKS.md):
    NFE 1*4*1 + (K-1); images differ from the plain student's and equal the pipeline's hybrid chain."""
    t, s = models
    assert D.HYBRID_DEFAULTS == {"steps": 1, "substeps": 4, "handoff": "ode", "guidance_scale": 1.0}
    plain = D.generate(t, s, "4", seed=3, batch_size=2, student_steps=K, teacher_steps=2, guidance_scale=2.0)
    hy = D.generate(t, s, "4", seed=3, batch_size=2, student_steps=K, teacher_steps=2, guidance_scale=2.0, hybrid=True)
    assert hy.student.nfe == 4 + (K - 1) == _nfe(hy.student.summary)
    assert ("hybrid: 4 teacher NFE (1 step(s) × 4 DDIM sub-step(s), no CFG, ode hand-off) + 1 student NFE"
            in hy.student.summary)
    assert hy.student.captions == ["4 · teacher 1 step(s) + student"] * 2
    torch.testing.assert_close(hy.teacher.x, plain.teacher.x)  # the teacher column is untouched
    assert (hy.student.x - plain.student.x).abs().max() > 1e-3  # the teacher's step changes the images
    ref, fs = _pipeline_hybrid(models, [4, 4], K, 3, 1.0, 4, "ode")
    torch.testing.assert_close(hy.student.x, ref, atol=1e-5, rtol=1e-5)
    assert (fs.calls, fs.nfe) == (4, 4)  # 4 batched teacher calls, no CFG: 4 NFE per image
    assert f"student uses {4 + K - 1} NFE" in hy.status


@pytest.mark.parametrize("n, m, handoff, w, nfe", [
    (1, 1, "ode", 2.0, 2 + (K - 1)),
    (1, 3, "renoise", 1.5, 6 + (K - 1)),
    (2, 2, "ode", 1.0, 4),
    (2, 3, "renoise", 2.0, 12),
])
def test_hybrid_settings_nfe_and_pipeline_equality(models, n, m, handoff, w, nfe):
    """NFE = n m (2 with CFG, else 1) + (K - n), as eval/hybrid.py counts; output = the pipeline's chain."""
    from stepdistill.pipelines.hybrid import hybrid_nfe

    t, s = models
    r = D.generate(t, s, "7", seed=5, batch_size=2, student_steps=K, teacher_steps=1, guidance_scale=3.0,
                   hybrid=True, hybrid_steps=n, hybrid_substeps=m, hybrid_handoff=handoff, hybrid_guidance=w)
    assert r.student.nfe == nfe == hybrid_nfe(K, n, m, cfg=w != 1.0) == _nfe(r.student.summary)
    assert f"+ {K - n} student NFE" in r.student.summary and f"{handoff} hand-off" in r.student.summary
    ref, _ = _pipeline_hybrid(models, [7, 7], K, 5, w, m, handoff, n)
    torch.testing.assert_close(r.student.x, ref, atol=1e-5, rtol=1e-5)
    assert "⚠️" not in r.student.summary
    cap = U.hybrid_nfe_caption(K, True, n, m, w)
    assert cap.endswith(f"= {nfe} (plain student: {K})")


def test_hybrid_nfe_caption_and_ui_defaults(models):
    assert U.hybrid_nfe_caption(4, True, 1, 4, 1.0) == "Hybrid NFE per image = 1·4·1 + (4 − 1) = 7 (plain student: 4)"
    assert U.hybrid_nfe_caption(4, True, 1, 1, 2.0).endswith("= 5 (plain student: 4)")  # the old demo setting
    assert U.hybrid_nfe_caption(4, False, 1, 4, 1.0).endswith("tick Hybrid to use it")
    assert U.hybrid_nfe_caption(2, True, 3, 4, 1.0).startswith("⚠️ hybrid steps must be in 1..2 (the student's steps)")
    for txt in ("0.160", "0.122", "ode", "4 sub-steps", "no CFG", "n·m·(2 with CFG, else 1) + (K − n)"):
        assert txt in D.HYBRID_CAPTION
    st = U._ui_state(*models)
    assert st["hybrid"] and st["hybrid_full"]


@pytest.fixture(scope="module")
def phased_student(models, tmp_path_factory):
    """A 2-expert Phased DMD folder built from the tiny student (both experts = its network)."""
    import copy

    from stepdistill.pipelines.phased import PhasedDMDPipeline

    student = D.load_student(D.read_model_info(models[1]))
    out = tmp_path_factory.mktemp("demo_phased") / "phased"
    pipe = PhasedDMDPipeline(unet=copy.deepcopy(student.unet).cpu(), scheduler=student.scheduler,
                             expert_1=copy.deepcopy(student.unet).cpu(),
                             student_timesteps=list(student.config.student_timesteps),
                             class_names=list(student.config.class_names))
    pipe.save_pretrained(out)
    shutil.copy(Path(models[1]) / "stepdistill.json", out / "stepdistill.json")
    return str(out)


def test_hybrid_phased_student_falls_back_to_one_renoise_step(models, phased_student):
    """Phased DMD takes n = 1 with renoise only: the UI fixes those controls, generate() falls back with a note."""
    t = models[0]
    info = D.read_model_info(phased_student)
    assert info.pipeline_class == "PhasedDMDPipeline"
    assert D.student_supports_hybrid(info) and not D.student_supports_hybrid_chain(info)
    st = U._ui_state(t, phased_student)
    assert st["hybrid"] and not st["hybrid_full"] and "renoise hand-off only" in st["message"]

    r = D.generate(t, phased_student, "4", seed=3, batch_size=2, student_steps=K, teacher_steps=1, hybrid=True)
    assert "⚠️" in r.student.summary and "ran n=1, renoise instead of n=1, ode" in r.student.summary
    assert r.student.nfe == 4 + (K - 1)  # 1 x 4 sub-steps, no CFG, + K - 1 student steps
    r2 = D.generate(t, phased_student, "4", seed=3, batch_size=2, student_steps=K, teacher_steps=1, hybrid=True,
                    hybrid_steps=1, hybrid_substeps=4, hybrid_handoff="renoise")
    assert "⚠️" not in r2.student.summary
    torch.testing.assert_close(r.student.x, r2.student.x)
    plain = D.generate(t, phased_student, "4", seed=3, batch_size=2, student_steps=K, teacher_steps=1)
    assert (r2.student.x - plain.student.x).abs().max() > 1e-3
    r3 = D.generate(t, phased_student, "4", seed=3, batch_size=2, student_steps=K, teacher_steps=1, hybrid=True,
                    hybrid_steps=2, hybrid_substeps=1, hybrid_handoff="ode", hybrid_guidance=2.0)
    assert "instead of n=2, ode" in r3.student.summary and r3.student.nfe == 2 + (K - 1)
    with pytest.raises(D.DemoInputError, match=re.escape(f"hybrid steps must be in 1..{K} (the student's steps)")):
        D.generate(t, phased_student, "4", seed=3, batch_size=1, student_steps=K, teacher_steps=1, hybrid=True,
                   hybrid_steps=K + 1)


def test_ui_state_and_expert_captions(models, tmp_path):
    t, s = models
    st = U._ui_state(t, s)
    assert st["K"] == K and st["hybrid"] and not st["prompt_visible"] and st["class_visible"]
    assert st["classes"] == [D.ALL_CLASSES] + [str(i) for i in range(10)]

    # a multi-student folder: stepdistill.json extra.experts names who made each image
    multi = tmp_path / "multi"
    shutil.copytree(s, multi)
    meta = json.loads((multi / "stepdistill.json").read_text())
    meta["extra"]["experts"] = [{"name": "student-A", "classes": [str(i) for i in range(5)]},
                                {"name": "student-B", "classes": [str(i) for i in range(5, 10)]}]
    (multi / "stepdistill.json").write_text(json.dumps(meta))
    r = D.generate(t, str(multi), D.ALL_CLASSES, seed=0, batch_size=7, student_steps=1, teacher_steps=1)
    assert r.student.captions[0] == "0 · student-A" and r.student.captions[6] == "6 · student-B"
    assert D.expert_caption([{"name": "hi", "timesteps": [999]}, {"name": "lo", "timesteps": [500]}],
                            None, None, [999.0, 500.0]) == "hi (t=999) → lo (t=500)"
    assert D.expert_caption(["a", "b"], "1", 1, [999.0]) == "a → b"
    assert D.expert_caption(None, "1", 1, [999.0]) is None

    # a text-conditioned student: prompt box shown, class dropdown hidden, empty prompt rejected
    text = tmp_path / "text"
    shutil.copytree(s, text)
    meta = json.loads((text / "stepdistill.json").read_text())
    meta.update(conditioning="text", class_names=[])
    (text / "stepdistill.json").write_text(json.dumps(meta))
    st = U._ui_state(t, str(text))
    assert st["prompt_visible"] and not st["class_visible"] and not st["hybrid"]
    with pytest.raises(D.DemoInputError, match="teacher is class-conditioned but the student is text-conditioned"):
        D.generate(t, str(text), None, "a 3", seed=0, batch_size=1, teacher_steps=1)


def test_text_models_take_a_prompt(text_teacher, text_student):
    """Text teacher and student: the prompt box drives both; the images are the text pipelines' own."""
    from stepdistill.pipelines.loading import load_text_pipeline

    st = U._ui_state(str(text_teacher), str(text_student))
    assert st["prompt_visible"] and not st["class_visible"] and not st["hybrid"]
    r = D.generate(str(text_teacher), str(text_student), None, " a 3 ", seed=5, batch_size=2, teacher_steps=2)
    assert r.teacher.captions == r.student.captions == ["a 3", "a 3"] and len(r.student.images) == 2
    assert r.teacher.nfe == 4 and r.student.nfe == 2  # 2 steps x CFG; the 2-step student
    ref = load_text_pipeline(text_student)(["a 3", "a 3"], seed=5, output_type="pt").images
    torch.testing.assert_close(r.student.x, ref)
    with pytest.raises(D.DemoInputError, match="prompt is empty"):
        D.generate(str(text_teacher), str(text_student), None, "  ", seed=0, batch_size=1, teacher_steps=1)
    with pytest.raises(D.DemoInputError, match="keep it to 200"):
        D.generate(str(text_teacher), str(text_student), None, "a" * 201, seed=0, batch_size=1, teacher_steps=1)


# -- CLI / app.py ----------------------------------------------------------------------------------
def test_cli_registration_and_app_args():
    import argparse

    ap = argparse.ArgumentParser()
    U.add_demo_command(ap.add_subparsers(dest="cmd"))
    a = ap.parse_args(["demo", "--teacher", "T", "--student", "S", "--port", "7999"])
    assert (a.cmd, a.teacher, a.student, a.port, a.host, a.fn) == ("demo", "T", "S", 7999, "127.0.0.1", U.cmd_demo)
    a = ap.parse_args(["demo"])
    assert (a.teacher, a.student) == ("builtin:animal_mnist", "builtin:animal_mnist_dmd2")

    spec = importlib.util.spec_from_file_location("stepdistill_app", REPO / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    a = app.parse_args(["--teacher", "T", "--port", "1234"])
    assert (a.teacher, a.student, a.port, a.host) == ("T", "builtin:animal_mnist_dmd2", 1234, "127.0.0.1")
    r = subprocess.run([sys.executable, str(REPO / "app.py"), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--student" in r.stdout


# -- the served app ----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(models):
    port = _free_port()
    demo = U.build_demo(*models)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, ssr_mode=False,
                theme=U.offline_theme())
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


def _call(client, models, **kw):
    a = dict(cls="2", prompt="", seed=0, batch=2, sstep=K, tstep=3, w=2.0, sampler="ddim", hybrid=False,
             hn=1, hm=4, hh="ode", hw=1.0)
    a.update(kw)
    return client.predict(models[0], models[1], a["cls"], a["prompt"], a["seed"], a["batch"], a["sstep"], a["tstep"],
                          a["w"], a["sampler"], a["hybrid"], a["hn"], a["hm"], a["hh"], a["hw"], api_name="/generate")


def test_served_generate(client, models):
    from PIL import Image

    t_gal, t_txt, s_gal, s_txt, status = _call(client, models, batch=3)
    for gal in (t_gal, s_gal):
        assert len(gal) == 3
        for item in gal:
            assert item["caption"] == "2"
            with Image.open(item["image"]) as im:
                assert im.size == (SIZE, SIZE)
    assert _nfe(t_txt) == 6 and _seconds(t_txt) >= 0  # 3 teacher steps x 2 (CFG)
    assert _nfe(s_txt) == K and _seconds(s_txt) >= 0
    assert "student uses 2 NFE vs teacher 6" in status

    _, _, s_gal, s_txt, _ = _call(client, models, batch=1, sstep=2, hybrid=True)  # UI defaults: 1 x 4, ode, no CFG
    assert len(s_gal) == 1 and _nfe(s_txt) == 4 + 1 and "4 teacher NFE" in s_txt and "ode hand-off" in s_txt
    _, _, _, s_txt, _ = _call(client, models, batch=1, sstep=2, hybrid=True, hn=1, hm=1, hh="renoise", hw=2.0)
    assert _nfe(s_txt) == 3 and "2 teacher NFE" in s_txt  # the old demo setting: 2 (teacher, CFG) + 1


@pytest.mark.parametrize("kw, msg", [
    (dict(seed=-1), "seed must be in 0..2147483647, got -1"),
    (dict(batch=0), "batch size must be in 1..16, got 0"),
    (dict(sstep=K + 1), f"student steps must be in 1..{K}, got {K + 1}"),
    (dict(cls="cat"), "unknown class 'cat'"),
    (dict(hybrid=True, hn=K + 1), f"hybrid steps must be in 1..{K} (the student's steps), got {K + 1}"),
    (dict(hybrid=True, hm=0), "hybrid teacher sub-steps must be in 1..50, got 0"),
    (dict(hybrid=True, hh="euler"), "hybrid hand-off must be ode or renoise"),
])
def test_served_bad_input_shows_error(client, models, kw, msg):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=re.escape(msg)):
        _call(client, models, **kw)


def test_served_page_is_offline(server):
    """No stylesheet, script or font is fetched from another host (system fonts; no Google Fonts)."""
    html = urllib.request.urlopen(server, timeout=30).read().decode()
    for tag in re.findall(r"<(?:link|script)\b[^>]*>", html):
        m = re.search(r"(?:href|src)=[\"'](https?:)?//([^/\"']+)", tag)
        assert m is None or m.group(2).startswith("127.0.0.1"), tag
    css = urllib.request.urlopen(server + "theme.css", timeout=30).read().decode()
    assert "fonts.googleapis" not in css and "@import" not in css
# the page in a real browser (Chromium through selenium), screenshot included: tests/test_browser.py

"""LAPTOP-Diff pruning (stepdistill/pruning) and normalised feature distillation (trainers/kd.py): an exact identity
is pruned first; the additivity report is what it says; a pruned folder is a smaller stock config that loads with
stock diffusers classes and gives prune's own output; the normalised KD loss equals a hand computation; prune ->
KD -> DMD2 (and MSD) run through the CLI; nothing of the user's is overwritten."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli, snapshot, tiny_distill_overrides
from stepdistill.config import ConfigError, DistillConfig, load_config
from stepdistill.denoiser import Denoiser
from stepdistill.models import load_denoiser
from stepdistill.pruning.criterion import (Calibration, additivity, make_calibration, param_count, score_units,
                                           select_units)
from stepdistill.pruning.structure import candidate_units, prune_network, stock_config, stock_network
from stepdistill.schedules import schedule_from_config
from stepdistill.trainers.kd import normalised_feature_loss

VP = {"kind": "vp", "num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"}


def _den(net, null_class=None):
    cfg = dict(VP)
    cfg.pop("prediction_type")
    return Denoiser(net, schedule_from_config(cfg), "epsilon", null_class=null_class)


def _tiny_unet(seed=0, **kw):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    args = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16, 16), layers_per_block=2,
                down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                attention_head_dim=4, num_class_embeds=4)
    args.update(kw)
    return UNet2DModel(**args).eval()


def _calibration(net, n=12, null_class=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, h, w = 1, 8, 8
    images = torch.randn(n, c, h, w, generator=g).clamp(-1, 1)
    labels = torch.randint(0, 3, (n,), generator=g)
    return make_calibration(_den(net, null_class), images, labels, num=n, timesteps=(100, 500, 900), seed=seed)


def _by_name(scores):
    return {s.unit.name: s for s in scores}


# -- the criterion ------------------------------------------------------------------------------------------------
def test_an_exact_identity_attention_is_pruned_first():
    net = _tiny_unet()
    attn = net.mid_block.attentions[0]
    torch.nn.init.zeros_(attn.to_out[0].weight), torch.nn.init.zeros_(attn.to_out[0].bias)  # residual only: identity
    cal = _calibration(net)
    scores, rejected = score_units(net, candidate_units(net), cal)
    s = _by_name(scores)
    assert s["mid.attention"].error == 0.0
    assert min(scores, key=lambda x: x.error).unit.name == "mid.attention"
    assert all(v.error > 1e-8 for k, v in s.items() if k != "mid.attention")
    need = s["mid.attention"].params  # exactly its size: the zero-score unit alone meets it
    chosen = select_units(net, scores, need)
    assert [u.name for u in chosen] == ["mid.attention"]
    assert cal.error(stock_network(net, chosen, probe=cal)) < 1e-10
    # the first ResBlock of a block that changes the channel count cannot go: rejected with the reason
    assert "stage1.layer0" in rejected


def test_an_exact_identity_transformer_block_is_pruned_first():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    net = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=4).eval()
    with torch.no_grad():  # adaLN-zero: gates (and shifts / scales) of block 2 at zero -> the block is the identity
        lin = net.transformer_blocks[2].norm1.linear
        lin.weight.zero_(), lin.bias.zero_()
    cal = _calibration(net)
    scores, _ = score_units(net, candidate_units(net), cal)
    order = sorted(scores, key=lambda x: x.error)
    assert order[0].unit.name == "block2" and order[0].error < 1e-10 < order[1].error
    chosen = select_units(net, scores, 0.2 * param_count(net))
    assert [u.name for u in chosen] == ["block2"]
    stock = stock_network(net, chosen, probe=cal)
    assert type(stock).__name__ == "DiTTransformer2DModel" and stock.config.num_layers == 3


def test_additivity_report_is_measured_on_the_network():
    net = _tiny_unet(seed=1)
    cal = _calibration(net)
    scores, _ = score_units(net, candidate_units(net), cal)
    rep = additivity(net, scores, cal)
    assert len(rep["pairs"]) >= 5
    s = _by_name(scores)
    for p in rep["pairs"]:  # each joint error is the error of the network without both units, measured
        a, b = p["units"]
        assert p["sum"] == pytest.approx(s[a].error + s[b].error)
        assert p["joint"] == pytest.approx(cal.error(prune_network(net, [s[a].unit, s[b].unit])), rel=1e-6)
        assert not s[a].unit.overlaps(s[b].unit)
    j = torch.tensor([p["joint"] for p in rep["pairs"]], dtype=torch.float64)
    t = torch.tensor([p["sum"] for p in rep["pairs"]], dtype=torch.float64)
    assert rep["pearson"] == pytest.approx(float(torch.corrcoef(torch.stack([j, t]))[0, 1]))
    assert rep["median_relative_gap"] == pytest.approx(float(((j - t).abs() / j).median()))


def test_additivity_holds_on_the_shipped_teacher():
    """LAPTOP-Diff's premise, measured on the shipped Animal-MNIST teacher (0.99 in BENCHMARKS.md)."""
    from stepdistill.prune import teacher_inputs

    den, _, images, labels, conds = teacher_inputs("builtin:animal_mnist", False, None, 0)
    cal = make_calibration(den, images, labels, conds, num=8)
    scores, _ = score_units(den.backbone, candidate_units(den.backbone), cal)
    assert additivity(den.backbone, scores, cal)["pearson"] > 0.9


def test_selection_is_the_cheapest_feasible_set():
    net = _tiny_unet(seed=2)
    cal = _calibration(net)
    scores, _ = score_units(net, candidate_units(net), cal)
    full = param_count(net)
    for ratio in (0.1, 0.3, 0.5):
        chosen = select_units(net, scores, ratio * full)
        assert chosen is not None and stock_config(net, chosen) is not None
        got = sum(s.params for s in scores if s.unit in chosen)
        assert got >= ratio * full
        best = sum(s.error for s in scores if s.unit in chosen)
        # brute force over every subset: nothing feasible is cheaper
        import itertools

        for k in range(1, len(scores) + 1):
            for combo in itertools.combinations(scores, k):
                units = [c.unit for c in combo]
                if any(a.overlaps(b) for a, b in itertools.combinations(units, 2)):
                    continue
                if sum(c.params for c in combo) >= ratio * full and stock_config(net, units) is not None:
                    assert sum(c.error for c in combo) >= best - 1e-12
    assert select_units(net, scores, 0.99 * full) is None


# -- the pruned network as a stock config --------------------------------------------------------------------------
@pytest.mark.parametrize("names, cls", [
    (["stage2", "mid"], "UNet2DModel"),                      # even layer counts, no mid block: UNet2DModel
    (["mid.attention", "down1.attention"], "UNet2DModel"),
    (["stage0.layer0", "mid.tail"], "UNet2DConditionModel"),  # uneven: per-block layers_per_block
    (["stage2", "stage1.layer1", "mid.tail", "up1.attention"], "UNet2DConditionModel"),
])
def test_pruned_unet_is_a_smaller_stock_config(tmp_path, names, cls):
    import diffusers

    net = _tiny_unet(seed=3)
    units = [u for u in candidate_units(net) if u.name in names]
    assert len(units) == len(names)
    cal = _calibration(net)
    stock = stock_network(net, units, probe=cal)
    assert type(stock).__name__ == cls
    assert param_count(stock) == param_count(prune_network(net, units)) < param_count(net)
    stock.save_pretrained(tmp_path)
    loaded = getattr(diffusers, cls).from_pretrained(tmp_path)
    want = cal.outputs(prune_network(net, units))
    assert torch.allclose(cal.outputs(loaded), want, atol=1e-5)
    assert not torch.allclose(want, cal.target, atol=1e-3)  # pruning changed the function


def test_uneven_unet2d_without_the_mid_tail_has_no_stock_config():
    net = _tiny_unet()
    units = [u for u in candidate_units(net) if u.name == "stage0.layer0"]
    assert stock_config(net, units) is None
    with pytest.raises(ConfigError, match="no stock diffusers config"):
        stock_network(net, units)


def test_text_unet_prunes_to_a_stock_unet2dcondition():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    net = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 16),
                               layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                               cross_attention_dim=12, attention_head_dim=4).eval()
    names = {u.name for u in candidate_units(net)}
    assert {"down1.attention", "up1.attention", "mid.tail", "mid", "stage1"} <= names
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(6, 1, 8, 8, generator=g), torch.randn(6, 3, 12, generator=g)
    cal = Calibration(_den(net), x, torch.full((6,), 400.0, dtype=torch.float64), cond)
    cal.target = cal.outputs(net)
    for chosen in (["stage0.layer0", "mid.tail"], ["down1.attention", "up1.attention"], ["stage1", "mid"]):
        units = [u for u in candidate_units(net) if u.name in chosen]
        stock = stock_network(net, units, probe=cal)
        assert isinstance(stock, UNet2DConditionModel) and param_count(stock) < param_count(net)


# -- normalised feature distillation -------------------------------------------------------------------------------
def test_normalised_feature_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    fs = {"a": torch.randn(3, 2, 4, 4, generator=g), "b": torch.randn(3, 5, generator=g)}
    ft = {"A": torch.randn(3, 2, 4, 4, generator=g) * 10, "B": torch.randn(3, 5, generator=g) * 0.1}
    got = normalised_feature_loss(fs, ft, {"a": "A", "b": "B"})
    want = 0.0
    for s, t in (("a", "A"), ("b", "B")):
        per = [float(((fs[s][i] - ft[t][i]) ** 2).sum() / (ft[t][i] ** 2).sum()) for i in range(3)]
        want += sum(per) / 3
    assert float(got) == pytest.approx(want, rel=1e-6)
    # scale-free: the teacher feature's size does not weight its layer
    scaled = normalised_feature_loss({"a": fs["a"] * 7}, {"A": ft["A"] * 7}, {"a": "A"})
    assert float(scaled) == pytest.approx(float(normalised_feature_loss({"a": fs["a"]}, {"A": ft["A"]}, {"a": "A"})),
                                          rel=1e-5)


# -- the whole chain through the CLI ------------------------------------------------------------------------------
def test_prune_kd_dmd2_msd_through_the_cli(tiny_teacher, tmp_path, capsys):
    pruned, kd, dmd, msd = (tmp_path / n for n in ("pruned", "kd", "dmd2", "msd"))
    rc, out, _ = run_cli(capsys, ["prune", "--model", tiny_teacher, "--out", pruned, "--ratio", "0.3", "--num", "8",
                                  "--no-progress", "--threads", "1"])
    assert rc == 0
    rec = json.loads(out)
    teacher, _ = load_denoiser(tiny_teacher)
    assert rec["params_before"] == param_count(teacher.backbone)
    assert rec["params_after"] <= 0.7 * rec["params_before"] and rec["removed"]
    den, meta = load_denoiser(pruned)
    assert param_count(den.backbone) == rec["params_after"] and meta.extra["pruned"]["removed"] == rec["removed"]
    # the folder's network is prune's own pruned teacher
    units = [u for u in candidate_units(teacher.backbone) if u.name in rec["removed"]]
    x, t, c = torch.randn(4, *teacher.sample_shape), torch.full((4,), 300.0), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        ref = Denoiser(prune_network(teacher.backbone, units), teacher.schedule, teacher.prediction_type,
                       teacher.null_class).raw(x, t, c)
        assert torch.allclose(den.raw(x, t, c), ref, atol=1e-5)

    rc, _, _ = run_cli(capsys, ["distill", "--config", "", *tiny_distill_overrides(
        tiny_teacher, kd, method="kd", **{"kd.student": pruned, "kd.sample_steps": 2, "train.max_steps": 3})])
    assert rc == 0
    log = [json.loads(line) for line in (kd / "log.jsonl").read_text().splitlines()]
    assert all(k in log[-1] for k in ("task_loss", "output_kd", "feature_kd")) and log[-1]["feature_kd"] > 0
    kd_den, kd_meta = load_denoiser(kd / "student")
    assert param_count(kd_den.backbone) == rec["params_after"] and "pruned" in kd_meta.extra and "kd" in kd_meta.extra
    assert kd_meta.student_timesteps is None  # a many-step model

    rc, _, _ = run_cli(capsys, ["distill", "--config", "", *tiny_distill_overrides(
        tiny_teacher, dmd, method="dmd2", **{"dmd.student_init": kd / "student", "dmd.gan": "true"})])
    assert rc == 0
    st, st_meta = load_denoiser(dmd / "student")
    assert param_count(st.backbone) == rec["params_after"] and st_meta.student_timesteps == [999.0]
    assert st_meta.extra["pruned"]["removed"] == rec["removed"]
    assert "## Pruned network" in (dmd / "student" / "README.md").read_text()
    rc, _, _ = run_cli(capsys, ["sample", "--model", dmd / "student", "--num", "4", "--out", tmp_path / "g.png"])
    assert rc == 0 and (tmp_path / "g.png").exists()

    rc, _, _ = run_cli(capsys, ["distill", "--config", "", *tiny_distill_overrides(
        tiny_teacher, msd, method="msd", **{"dmd.student_init": dmd / "student", "msd.num_students": 2,
                                             "msd.steps_per_student": 2, "dmd.gan": "true"})])
    assert rc == 0
    from stepdistill.pipelines.multi_student import MultiStudentPipeline

    pipe = MultiStudentPipeline.from_pretrained(msd / "student")
    assert [param_count(s) for s in pipe.students()] == [rec["params_after"]] * 2
    assert pipe(class_labels=[0, 9], num_inference_steps=1, output_type="pt").images.shape[0] == 2


def test_prune_never_replaces_a_users_folder(tiny_teacher, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    before = snapshot(mine)
    for extra in ([], ["--overwrite"]):
        rc, _, err = run_cli(capsys, ["prune", "--model", tiny_teacher, "--out", mine, "--ratio", "0.3", "--num", "4",
                                      "--no-progress", *extra])
        assert rc != 0 and str(mine) in err
        assert snapshot(mine) == before


def test_bad_settings_name_their_key(tiny_teacher, tmp_path):
    with pytest.raises(ConfigError, match="kd.student"):
        load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, tmp_path, method="kd"))
    with pytest.raises(ConfigError, match="--ratio"):
        from stepdistill.prune import prune_model

        prune_model(str(tiny_teacher), str(tmp_path / "x"), ratio=1.5)
    other = _tiny_unet()  # a student of another architecture, not from prune: refused with the hint
    from stepdistill.models import ModelMeta, save_model_folder
    from diffusers import DDPMScheduler

    save_model_folder(tmp_path / "other", other, DDPMScheduler(), ModelMeta(class_names=["a", "b", "c"], null_class=3),
                      "StepDistillTeacherPipeline")
    from stepdistill.trainers.distill import build_method

    cfg = load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, tmp_path / "r",
                                                                  **{"dmd.student_init": tmp_path / "other"}))
    with pytest.raises(ConfigError, match="stepdistill prune"):
        build_method(cfg)


def test_prune_by_latency_counts_measured_savings(tiny_teacher, tmp_path, monkeypatch):
    """``--by latency`` chooses on per-unit latency savings and meets the ratio on them. The clock is injected (a
    fixed overhead plus a cost per parameter), so the choice does not hang on wall-clock noise; the real timer is
    checked separately below."""
    import stepdistill.prune as prune_mod
    from stepdistill.prune import prune_model

    calls = []

    def fake_latency(net, cal, batch, repeats=5):
        calls.append(batch)
        return 3.0 + param_count(net) / 1000.0  # ms

    monkeypatch.setattr(prune_mod, "latency_ms", fake_latency)
    rec = prune_model(str(tiny_teacher), str(tmp_path / "lat"), ratio=0.2, by="latency", num=4, latency_batch=8,
                      progress=False)
    assert rec["by"] == "latency" and set(calls) == {8}
    assert rec["latency_ms_before"] == pytest.approx(3.0 + rec["params_before"] / 1000.0)
    assert rec["latency_ms_after"] == pytest.approx(3.0 + rec["params_after"] / 1000.0)
    for s in rec["scores"]:  # each unit's saving is the whole net's latency minus the net without that unit
        assert s["latency_ms"] == pytest.approx(s["params"] / 1000.0, rel=1e-6, abs=1e-6)
    saved = sum(s["latency_ms"] for s in rec["scores"] if s["unit"] in rec["removed"])
    assert saved >= 0.2 * rec["latency_ms_before"]  # the choice meets the ratio on the per-unit measurements
    assert rec["params_after"] < rec["params_before"]


def test_latency_timer_measures_a_forward():
    from stepdistill.pruning.criterion import latency_ms

    net = _tiny_unet()
    cal = make_calibration(_den(net), torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]), None, num=4,
                           timesteps=(100, 500), seed=0)
    ms = latency_ms(net, cal, batch=6, repeats=3)
    assert 0 < ms < 60_000


def test_a_distilled_student_prunes_and_kd_makes_it_again(tiny_teacher, tmp_path, capsys):
    """A one-step student prunes at its own input (t = 999; its teacher's data set, found through the student's
    record), the pruned folder is a smaller student of the same timestep, and ``method: kd`` with the student as
    ``dmd.teacher`` trains on the student's own inputs: t = 999 and pure noise, so the KD loss does not depend on the
    data at all, and equals ||G_S(eps) - G_T(eps)||^2 (+ the feature term) by hand."""
    from stepdistill.data import ArrayDataset
    from stepdistill.trainers.distill import build_method, distill
    from stepdistill.trainers.kd import normalised_feature_loss
    from stepdistill.trainers.objective import Ctx

    student = distill(load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, tmp_path / "st")))
    capsys.readouterr()
    pruned = tmp_path / "pruned"
    rc, out, _ = run_cli(capsys, ["prune", "--model", student, "--out", pruned, "--ratio", "0.3", "--num", "8",
                                  "--no-progress", "--threads", "1"])
    assert rc == 0
    rec = json.loads(out)
    assert rec["calibration"]["timesteps"] == [999.0] and rec["calibration"]["inputs"] == 8
    p_den, p_meta = load_denoiser(pruned)
    assert p_meta.student_timesteps == [999.0] and param_count(p_den.backbone) == rec["params_after"]
    card = (pruned / "README.md").read_text()
    assert rec["student_timesteps"] == [999.0] and "kd_student_animal_mnist.yaml" in card and "many-step" not in card

    over = {"kd.student": pruned, "dmd.teacher": student, "dmd.allow_student_teacher": "true", "kd.cfg_dropout": 0.0}
    with pytest.raises(ConfigError, match="kd.task_weight"):
        build_method(load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, tmp_path / "k0",
                                                                              method="kd", **over)))
    with pytest.raises(ConfigError, match="kd.timesteps"):
        load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, tmp_path / "k0", method="kd", **over,
                                                                **{"kd.timesteps": "[-5]"}))
    cfg = load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, tmp_path / "k1", method="kd", **over,
                                                                  **{"kd.task_weight": 0}))
    obj, data, _ = build_method(cfg)
    assert obj.timesteps == [999.0] and obj.student_teacher

    seen = []
    raw = obj.teacher.raw
    obj.teacher.raw = lambda x, t, c: seen.append((x.clone(), t.clone(), c.clone())) or raw(x, t, c)
    zeros = ArrayDataset(torch.zeros_like(data.images), data.labels, data.class_names)
    losses = {}
    for name, d in (("data", data), ("zeros", zeros)):
        ctx = Ctx(torch.Generator().manual_seed(3), 0, 1, 8, torch.device("cpu"), 0, d)
        with torch.no_grad():
            loss, logs = obj.loss("student", ctx)
        losses[name] = (loss, logs)
    (x_a, t_a, c_a), (x_b, _, _) = seen
    assert torch.equal(x_a, x_b)                      # pure noise: the real images never enter
    assert torch.equal(t_a, torch.full_like(t_a, 999.0)) and abs(float(x_a.std()) - 1) < 0.2
    assert logs["task_loss"] >= 0 and losses["data"][0] == losses["zeros"][0]
    with torch.no_grad():   # the loss by hand
        feats = {}
        hooks = [m.register_forward_hook(lambda _m, _i, o, n=n: feats.__setitem__(n, o[0] if isinstance(o, tuple) else o))
                 for n, m in obj.student.backbone.named_modules() if n in obj.pairs]
        f_s = obj.student.raw(x_a, t_a, c_a).float()
        for h in hooks:
            h.remove()
        f_t = raw(x_a, t_a, c_a).float()
        t_feats = obj._t_tap.take()
        by_hand = torch.nn.functional.mse_loss(f_s, f_t) + normalised_feature_loss(feats, t_feats, obj.pairs)
    assert torch.allclose(losses["data"][0], by_hand, rtol=1e-5)

    rc, _, _ = run_cli(capsys, ["distill", "--config", "", *tiny_distill_overrides(
        tiny_teacher, tmp_path / "kd", method="kd", **over, **{"kd.task_weight": 0, "train.max_steps": 2})])
    assert rc == 0
    kd_den, kd_meta = load_denoiser(tmp_path / "kd" / "student")
    assert kd_meta.student_timesteps == [999.0] and param_count(kd_den.backbone) == rec["params_after"]
    assert "distilled student of the same timesteps" in (tmp_path / "kd" / "student" / "README.md").read_text()

    # `stepdistill curve` scores such a KD run (a one-step student at each checkpoint), not a many-step KD run
    from stepdistill.eval.curve import quality_curve
    from stepdistill.methods import get_method

    teacher_kd = load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, tmp_path / "k2", method="kd",
                                                                         **{"kd.student": pruned}))
    assert get_method("kd").scores_curve(cfg) and not get_method("kd").scores_curve(teacher_kd)
    res = quality_curve(tmp_path / "kd", num=10, seed=1, ref="digits", ref_num=20, out=tmp_path / "curve")
    assert [p["step"] for p in res["points"]] == [2]
    assert res["points"][0]["sample_passes"] == 2 * 8 * 2 and res["points"][0]["fid"] > 0   # 2 passes x batch 8 x 2 steps


def test_load_meta_reads_stepdistill_json_or_none(tmp_path):
    """The one helper behind pruned_record, prune's data-set lookup and kd's curve predicate."""
    from stepdistill.models import load_meta

    assert load_meta("builtin:animal_mnist_dmd2").student_timesteps == [999.0]
    assert load_meta(tmp_path) is None                          # a folder without stepdistill.json
    assert load_meta(tmp_path / "moved" / "away") is None       # not reachable here

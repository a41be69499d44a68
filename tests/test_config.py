"""Typed configs: YAML + dotted overrides, and errors that name the offending key."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from stepdistill.config import ConfigError, DistillConfig, TeacherConfig, load_config, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _yaml(tmp_path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_without_file():
    from stepdistill.config import distill_defaults

    cfg = load_config(DistillConfig)
    assert cfg == distill_defaults("dmd2") and isinstance(cfg, DistillConfig)
    assert cfg.train.batch_size == 32 and cfg.dmd.student_timesteps == [999.0]
    t = load_config(TeacherConfig)
    assert t.train.batch_size == 64 and t.model.block_out_channels == [32, 64, 64]


def test_yaml_then_overrides(tmp_path):
    p = _yaml(tmp_path, """
output_dir: runs/x
method: dmd
data: {name: digits, resolution: 16}
dmd:
  student_timesteps: [999, 749, 499, 249]
  real_guidance_scale: 3.5
  optim: {lr: 1e-4}    # PyYAML reads this as a string; it must still become a float
train:
  batch_size: 8
  cpu: true
""")
    cfg = load_config(DistillConfig, p, ["train.batch_size=16", "dmd.gan=false", "dmd.critic_updates=3",
                                         "data.resolution=24", "dmd.student_timesteps=[999,500]",
                                         "output_dir=runs/y", "train.mixed_precision=bf16"])
    assert cfg.output_dir == "runs/y"
    assert cfg.method == "dmd"
    assert cfg.data.name == "digits" and cfg.data.resolution == 24
    assert cfg.data.channels == 1 and cfg.data.split == "train"  # untouched defaults survive a partial section
    assert cfg.dmd.student_timesteps == [999.0, 500.0] and all(isinstance(v, float) for v in cfg.dmd.student_timesteps)
    assert cfg.dmd.real_guidance_scale == 3.5
    assert cfg.dmd.optim.lr == pytest.approx(1e-4) and isinstance(cfg.dmd.optim.lr, float)
    assert cfg.dmd.optim.beta1 == 0.0 and cfg.dmd.optim.grad_clip == 10.0  # DMD2's AdamW defaults kept beside it
    assert cfg.dmd.critic_optim.lr == pytest.approx(2e-5)
    assert cfg.dmd.gan is False and cfg.dmd.critic_updates == 3
    assert cfg.train.batch_size == 16 and cfg.train.cpu is True and cfg.train.mixed_precision == "bf16"
    # defaults of the Distill-specific train section are kept where not overridden
    assert cfg.train.ema_decay == 0.95
    assert isinstance(cfg.train.batch_size, int)


def test_override_value_types():
    cfg = load_config(DistillConfig, None, ["dmd.t_min=10", "train.cpu=yes", "dmd.teacher=builtin:animal_mnist",
                                            "dmd.student_lr=3e-5", "train.max_steps=2.0"])
    assert cfg.dmd.t_min == 10.0 and isinstance(cfg.dmd.t_min, float)
    assert cfg.train.cpu is True
    assert cfg.dmd.teacher == "builtin:animal_mnist"
    assert cfg.dmd.optim.lr == pytest.approx(3e-5)  # the old spelling dmd.student_lr still works
    assert cfg.train.max_steps == 2 and isinstance(cfg.train.max_steps, int)


def test_to_dict_round_trip():
    cfg = load_config(TeacherConfig, None, ["train.batch_size=7", "model.layers_per_block=2"])
    d = to_dict(cfg)
    assert d["train"]["batch_size"] == 7 and d["model"]["layers_per_block"] == 2
    flat = [f"{s}.{k}={v}" for s in ("train", "model") for k, v in d[s].items()]
    again = load_config(TeacherConfig, None, [o.replace("True", "true").replace("False", "false") for o in flat])
    assert again == cfg


@pytest.mark.parametrize("override,key", [
    ("foo=1", "foo"),
    ("train.max_stepz=1", "train.max_stepz"),
    ("dmd.gann=true", "dmd.gann"),
    ("nosuch.section=1", "nosuch"),
])
def test_unknown_key_override(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(DistillConfig, None, [override])
    assert key in str(e.value)
    assert "unknown" in str(e.value)


def test_unknown_key_in_yaml(tmp_path):
    p = _yaml(tmp_path, "train:\n  batch_size: 4\n  max_stepz: 10\n")
    with pytest.raises(ConfigError, match=r"train\.max_stepz"):
        load_config(DistillConfig, p)
    p = _yaml(tmp_path, "modle:\n  layers_per_block: 2\n")
    with pytest.raises(ConfigError, match="modle"):
        load_config(TeacherConfig, p)
    # a Distill-only key is unknown to the teacher config
    with pytest.raises(ConfigError, match="dmd"):
        load_config(TeacherConfig, None, ["dmd.gan=true"])


@pytest.mark.parametrize("override,key", [
    ("train.batch_size=abc", "train.batch_size"),
    ("train.batch_size=1.5", "train.batch_size"),
    ("train.batch_size=true", "train.batch_size"),
    ("dmd.gan=maybe", "dmd.gan"),
    ("dmd.real_guidance_scale=high", "dmd.real_guidance_scale"),
    ("dmd.student_timesteps=abc", "dmd.student_timesteps"),
    ("dmd.student_timesteps=[999,x]", "dmd.student_timesteps[1]"),
    ("train=5", "train"),
    ("dmd.student_timesteps=[999,", "dmd.student_timesteps"),
    ("train.batch_size={", "train.batch_size"),
    ("output_dir.sub=1", "output_dir"),
])
def test_wrong_type_names_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(DistillConfig, None, [override])
    assert key in str(e.value), str(e.value)


def test_wrong_type_in_yaml_names_key(tmp_path):
    p = _yaml(tmp_path, "dmd:\n  critic_updates: many\n")
    with pytest.raises(ConfigError, match=r"dmd\.critic_updates"):
        load_config(DistillConfig, p)
    p = _yaml(tmp_path, "model:\n  attention_levels: [false, sometimes]\n")
    with pytest.raises(ConfigError, match=r"model\.attention_levels\[1\]"):
        load_config(TeacherConfig, p)


@pytest.mark.parametrize("cls,override,key", [
    (DistillConfig, "train.batch_size=-4", "train.batch_size"),
    (DistillConfig, "train.batch_size=0", "train.batch_size"),
    (TeacherConfig, "train.batch_size=-1", "train.batch_size"),
    (DistillConfig, "dmd.student_timesteps=[500,999]", "dmd.student_timesteps"),
    (DistillConfig, "dmd.student_timesteps=[999,500,500]", "dmd.student_timesteps"),
    (DistillConfig, "dmd.student_timesteps=[]", "dmd.student_timesteps"),
    (DistillConfig, "train.mixed_precision=fp16", "train.mixed_precision"),
    (TeacherConfig, "train.mixed_precision=fp16", "train.mixed_precision"),
    (DistillConfig, "train.ema_decay=1.0", "train.ema_decay"),
    (DistillConfig, "method=sd3", "method"),
    (DistillConfig, "dmd.t_min=990", "dmd.t_min"),
    (DistillConfig, "dmd.critic_updates=0", "dmd.critic_updates"),
    (TeacherConfig, "model.prediction_type=flow_prediction", "model.prediction_type"),
    (TeacherConfig, "model.attention_levels=[true]", "model.attention_levels"),
    (TeacherConfig, "cfg_dropout=1.0", "cfg_dropout"),
])
def test_value_checks_name_key(cls, override, key):
    with pytest.raises(ConfigError) as e:
        load_config(cls, None, [override])
    assert str(e.value).startswith(key), str(e.value)


def test_valid_edge_values_pass():
    cfg = load_config(DistillConfig, None, ["dmd.student_timesteps=[999,749.5,0]", "train.max_steps=0",
                                            "train.ema_decay=0"])
    assert cfg.dmd.student_timesteps == [999.0, 749.5, 0.0] and cfg.train.max_steps == 0


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(DistillConfig, None, ["train.batch_size"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(DistillConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(DistillConfig, _yaml(tmp_path, "- a\n- b\n"))


def test_config_error_is_value_error_and_a_one_line_cli_error(tmp_path, capsys):
    """Callers catching ValueError keep working, and the CLI prints the key and exits 2 (no traceback)."""
    from stepdistill.frontends.cli import main

    with pytest.raises(ValueError, match="train.batch_size"):
        load_config(DistillConfig, None, ["train.batch_size=-4"])
    assert main(["distill", "train.batch_size=-4", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "train.batch_size" in err and "Traceback" not in err


SHIPPED = sorted(CONFIGS.glob("*.yaml"))


def test_shipped_configs_exist():
    names = {p.name for p in SHIPPED}
    assert "teacher_animal_mnist.yaml" in names and "dmd2_animal_mnist.yaml" in names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_load(path):
    cls = TeacherConfig if path.name.startswith("teacher_") else DistillConfig
    cfg = load_config(cls, path)
    assert isinstance(cfg, cls)
    # the file's own values were applied, not silently replaced by defaults
    import yaml

    raw = yaml.safe_load(path.read_text())
    assert cfg.output_dir == raw["output_dir"]
    for section in ("train", "data"):
        for k, v in (raw.get(section) or {}).items():
            assert getattr(getattr(cfg, section), k) == v, f"{path.name}: {section}.{k}"
    # and it still accepts overrides
    cfg2 = load_config(cls, path, ["train.max_steps=3"])
    assert cfg2.train.max_steps == 3


def test_yaml_words_stay_strings_for_str_fields(tmp_path):
    """`no` is the default mixed_precision; YAML 1.1 would read it as False."""
    cfg = load_config(DistillConfig, None, ["train.mixed_precision=no", "output_dir=2024-01-01", "data.name='digits'"])
    assert cfg.train.mixed_precision == "no"
    assert cfg.output_dir == "2024-01-01"
    assert cfg.data.name == "digits"
    ok = load_config(DistillConfig, _yaml(tmp_path, "train:\n  mixed_precision: 'no'\n"))
    assert ok.train.mixed_precision == "no"
    # an unquoted `no` in a YAML file is a bool there: refused with a hint rather than turned into "False"
    with pytest.raises(ConfigError, match=r"train\.mixed_precision.*quote"):
        load_config(DistillConfig, _yaml(tmp_path, "train:\n  mixed_precision: no\n"))
    assert load_config(DistillConfig, None, ["train.cpu=off"]).train.cpu is False
    assert load_config(DistillConfig, None, ["train.cpu=on"]).train.cpu is True


def test_str_values_with_yaml_syntax_are_kept():
    cfg = load_config(DistillConfig, None, ["output_dir=runs/a: b", "dmd.teacher=[weird"])
    assert cfg.output_dir == "runs/a: b" and cfg.dmd.teacher == "[weird"


def test_validate_only_reads_and_normalise_makes_pso_spellings_one():
    """config.validate never rewrites the config; the one rewrite (pso.naive <-> method pso_naive) is normalise."""
    import copy

    from stepdistill.config import DistillConfig, load_config, normalise, validate

    a = load_config(DistillConfig, "configs/pso_animal_mnist.yaml", ["pso.naive=true"])
    b = load_config(DistillConfig, "configs/pso_animal_mnist.yaml", ["method=pso_naive"])
    assert (a.method, a.pso.naive) == (b.method, b.pso.naive) == ("pso_naive", True)
    c = load_config(DistillConfig, "configs/pso_animal_mnist.yaml", [])
    c.pso.naive = True
    before = copy.deepcopy(c)
    validate(c)
    assert c == before          # validate read it, changed nothing
    normalise(c)
    assert c.method == "pso_naive"


# -- one OptimConfig in every section; the old optimizer keys still load ---------------------------------------
LEGACY_DMD_YAML = """
method: pso
dmd:
  student_lr: 3.0e-4
  critic_lr: 1.0e-4
  beta1: 0.5
  grad_clip: 2.0
  warmup_steps: 7
pso:
  lr: 5.0e-5
  weight_decay: 0.1
"""


def test_every_section_trains_with_one_optimconfig():
    from stepdistill.config import OptimConfig

    from stepdistill.config import distill_defaults

    d, t, p = distill_defaults("dmd2"), TeacherConfig(), distill_defaults("pso")
    for o in (d.dmd.optim, d.dmd.critic_optim, p.pso.optim, t.optim):
        assert type(o) is OptimConfig
    assert {f.name for f in dataclasses.fields(d.dmd)}.isdisjoint({"student_lr", "critic_lr", "beta1", "lr"})
    assert {f.name for f in dataclasses.fields(p.pso)}.isdisjoint({"lr", "weight_decay", "grad_clip"})


def test_old_optimizer_keys_load_into_the_optim_sections(tmp_path):
    old = load_config(DistillConfig, _yaml(tmp_path, LEGACY_DMD_YAML.replace("method: pso", "method: dmd2")))
    new = load_config(DistillConfig, _yaml(tmp_path, """
method: dmd2
dmd:
  optim: {lr: 3.0e-4, beta1: 0.5, grad_clip: 2.0, warmup_steps: 7}
  critic_optim: {lr: 1.0e-4, beta1: 0.5, grad_clip: 2.0, warmup_steps: 7}
"""))
    assert to_dict(old) == to_dict(new)
    assert old.dmd.optim.lr == 3e-4 and old.dmd.critic_optim.lr == 1e-4 and old.dmd.critic_optim.beta1 == 0.5
    pso = load_config(DistillConfig, _yaml(tmp_path, "method: pso\ndmd:\n  student_lr: 3.0e-4\npso:\n  lr: 5.0e-5\n"
                                                     "  weight_decay: 0.1\n"))
    assert pso.dmd.optim.lr == 3e-4 and pso.pso.optim.lr == 5e-5
    assert pso.pso.optim.weight_decay == 0.1 and pso.pso.optim.beta1 == 0.9   # PSO's AdamW betas unchanged
    # overrides in the old spelling too; where both spellings are given in one file, the new key wins
    cfg = load_config(DistillConfig, None, ["dmd.critic_lr=5e-4", "dmd.weight_decay=0.2"])
    assert cfg.dmd.critic_optim.lr == 5e-4 and cfg.dmd.optim.lr == 2e-5
    assert cfg.dmd.optim.weight_decay == cfg.dmd.critic_optim.weight_decay == 0.2
    both = load_config(DistillConfig, _yaml(tmp_path, "dmd:\n  student_lr: 1.0e-3\n  optim: {lr: 4.0e-4}\n"))
    assert both.dmd.optim.lr == 4e-4
    with pytest.raises(ConfigError, match=r"^dmd\.critic_optim\.lr: must be > 0 \(given as dmd\.critic_lr"):
        load_config(DistillConfig, _yaml(tmp_path, "dmd:\n  critic_lr: 0\n"))

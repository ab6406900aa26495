"""The config schema (harness/config/schema.py): every option of every group composes against it, an unknown
key or a value of the wrong type is refused in one line, and stored configs (plain YAML) read as before."""

import shutil

import pytest
from omegaconf import OmegaConf

import harness.config
from harness.config import compose, config_groups, to_yaml, with_keys_added_later
from harness.config.schema import EvalConfig, LocalLauncher, ModelConfig, SlurmLauncher, TrainConfig, TrainerConfig
from harness.config.values import RULES
from harness.errors import HarnessError
from harness.run_dir import run_identity

# The options that need a value no file gives (a data root).
NEEDS = {"data=imagefolder": ["data.root=/data/images"], "data=latents": ["data.root=/data/latents"],
         "experiment=imagenet256": ["data.root=/data/latents"], "experiment=imagenet512": ["data.root=/data/latents"]}
OPTIONS = [f"{group}={option}" for group in ("model", "data", "autoencoder", "trainer", "eval", "logger", "experiment")
           for option in config_groups(group)]


@pytest.mark.parametrize("option", OPTIONS)
def test_every_group_option_composes_against_the_schema(option):
    cfg = compose([option, *NEEDS.get(option, [])])
    assert OmegaConf.get_type(cfg) is TrainConfig
    for section, schema in (("model", ModelConfig), ("trainer", TrainerConfig), ("eval", EvalConfig)):
        assert OmegaConf.get_type(cfg[section]) is schema
    assert not OmegaConf.missing_keys(cfg), OmegaConf.missing_keys(cfg)


@pytest.mark.parametrize("launcher", config_groups("launcher"))
def test_every_launcher_composes_against_the_schema(launcher):
    cfg = compose([f"+launcher={launcher}"], return_hydra_config=True)
    assert OmegaConf.get_type(cfg) is TrainConfig
    assert cfg.hydra.launcher._target_.endswith("Launcher")
    assert OmegaConf.get_type(cfg.hydra.launcher) is {"local": LocalLauncher, "slurm": SlurmLauncher}[launcher]
    assert not OmegaConf.missing_keys(cfg.hydra.launcher)


def test_the_extract_latents_config_adds_its_keys_to_the_schema():
    cfg = compose(["out=/tmp/cache", "extract.dtype=fp32"], config_name="extract_latents")
    assert (cfg.out, cfg.extract.dtype, cfg.extract.shard_size, cfg.data.name) == ("/tmp/cache", "fp32", 1000, "imagefolder")
    with pytest.raises(HarnessError) as err:
        compose(["extract.shard_size=many"], config_name="extract_latents")
    assert str(err.value) == "extract.shard_size: Value 'many' of type 'str' could not be converted to Integer"


@pytest.mark.parametrize("override, message", [
    ("trainer.lrr=0.1", "trainer.lrr is not a config key (check its spelling; a new key is added as +trainer.lrr=0.1)"),
    ("trainer.max_steps=abc", "trainer.max_steps must be a positive integer, got 'abc'"),
    ("model.depth=2.5", "model.depth must be a positive integer, got 2.5"),
    ("model.learn_sigma=maybe", "model.learn_sigma: Value 'maybe' is not a valid bool (type str)"),
    ("trainer.ckpt_milestones=[a]", "trainer.ckpt_milestones[0]: Value 'a' of type 'str' could not be converted to Integer"),
    ("data.hflip=[1]", "data.hflip: Value '[1]' is not a valid bool (type list)"),
])
def test_an_unknown_key_or_a_value_of_the_wrong_type_is_one_line(override, message):
    with pytest.raises(HarnessError) as err:
        compose([override])
    assert str(err.value) == message


def test_a_config_file_with_a_key_or_type_the_schema_refuses_is_one_line(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    shutil.copytree(harness.config.CONF_DIR, conf)
    (conf / "data" / "typo.yaml").write_text("defaults:\n  - digits\n  - _self_\nhflp: true\n")
    (conf / "data" / "word.yaml").write_text("defaults:\n  - digits\n  - _self_\nimage_size: big\n")
    monkeypatch.setattr(harness.config, "CONF_DIR", conf)
    with pytest.raises(HarnessError) as err:
        compose(["data=typo"])
    assert str(err.value) == "data.hflp is not a config key (conf/data/typo.yaml: Key 'hflp' not in 'DigitsData')"
    with pytest.raises(HarnessError) as err:
        compose(["data=word"])
    assert str(err.value) == ("data.image_size has a value of the wrong type (conf/data/word.yaml: "
                              "Value 'big' of type 'str' could not be converted to Integer)")


def test_every_rule_names_a_key_of_the_schema():
    """A train config's key, or a key of the local or the SLURM launcher (hydra.launcher.*)."""
    configs = [compose([f"+launcher={launcher}"], return_hydra_config=True) for launcher in config_groups("launcher")]
    for dotted in RULES:
        assert any(OmegaConf.select(cfg, dotted, default="absent") != "absent" for cfg in configs), dotted


def test_a_stored_config_reads_merges_and_compares_as_before():
    """A run's config.yaml is plain YAML (no schema): older ones lack keys added later and may hold values the
    schema's types would convert (25 stays 25), and they compare with a fresh composition as they did."""
    cfg = compose(["trainer.ddp_bucket_mb=25"])
    stored = OmegaConf.create(to_yaml(cfg))
    del stored.trainer["compile_tuning"], stored.trainer["residual_precision"], stored.trainer["lr_schedule"]
    stored = with_keys_added_later(OmegaConf.create(OmegaConf.to_yaml(stored)))
    assert OmegaConf.get_type(stored) is dict and stored.trainer.ddp_bucket_mb == 25
    assert run_identity(stored) == run_identity(cfg)
    # A stored config takes keys no schema knows (a run's own additions), and merges as plain YAML.
    merged = OmegaConf.merge(stored, {"trainer": {"lr": 2e-4, "extra": 1}})
    assert (merged.trainer.lr, merged.trainer.extra) == (2e-4, 1)
    assert run_identity(OmegaConf.create(to_yaml(compose(["trainer.lr=0.0002"])))) == run_identity(
        OmegaConf.merge(stored, {"trainer": {"lr": 2e-4}}))


def test_max_steps_is_part_of_what_a_run_trains_only_under_a_decaying_lr_schedule():
    """Training a constant-lr run further is the same run; under a cosine schedule max_steps sets every step's lr."""
    for schedule, same in (("constant", True), ("cosine", False)):
        short, longer = (compose([f"trainer.lr_schedule={schedule}", f"trainer.max_steps={n}"]) for n in (100, 200))
        assert (run_identity(short) == run_identity(longer)) is same, schedule


@pytest.mark.parametrize("every", [None, 0, 1000, 2400, 7])
def test_the_planned_evaluation_steps_are_the_steps_training_evaluates_at(every):
    from harness.config import evaluates_at, evaluation_steps

    ev = OmegaConf.create({"every": every})
    assert evaluation_steps(ev, 4800) == [s for s in range(1, 4801) if evaluates_at(ev, s, 4800)]

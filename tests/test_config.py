"""Every bad config value gets one clear line naming the key, the value and what is allowed."""

from __future__ import annotations

import pytest

from distmaml.cli import main
from distmaml.config import ConfigError, dump_config, load_config, recipe_names

BAD = [
    ("inner.lr=-0.1", "inner.lr = -0.1: must be greater than 0"),
    ("inner.lr=abc", "inner.lr = 'abc': must be a number"),
    ("inner.steps=0", "inner.steps = 0: must be at least 1"),
    ("inner.test_steps=-1", "inner.test_steps = -1: must be at least 0"),
    ("inner.first_order=maybe", "inner.first_order = 'maybe': must be true or false"),
    ("meta.steps=1.5", "meta.steps = 1.5: must be an integer"),
    ("meta.batch_size=0", "meta.batch_size = 0: must be at least 1"),
    ("meta.lr=0", "meta.lr = 0.0: must be greater than 0"),
    ("precision=float16", "precision = 'float16': allowed values are float32, float64"),
    ("algorithm=reptile", "algorithm = 'reptile': allowed values are"),
    ("device=tpu", "device = 'tpu': allowed values are auto, cpu, cuda"),
    ("batching=sometimes", "batching = 'sometimes': allowed values are auto, loop, loop_channels_last, vmap, batched"),
    ("data.family=mnist", "data.family = 'mnist': allowed values are"),
    ("data.shots=0", "data.shots = 0: must be at least 1"),
    ("data.ways=1", "data.ways = 1: must be at least 2"),
    ("model.name=resnet", "model.name = 'resnet': allowed values are mlp, conv4"),
    ("model.hidden=[40, 0]", "model.hidden = [40, 0]: every width must be at least 1"),
    ("workers=-1", "workers = -1: must be at least 0"),
    ("workers=26", "workers = 26 exceeds meta.batch_size = 25"),
    ("workers=two", "workers = 'two': must be an integer or [min, max]"),
    ("workers=[3,2]", "workers = [3, 2]: an elastic range is [min, max] with 1 <= min <= max, e.g. workers=[2,4]"),
    ("workers=[0,2]", "workers = [0, 2]: an elastic range is [min, max]"),
    ("workers=[2]", "workers = [2]: an elastic range is [min, max]"),
    ("workers=[2,3]", "workers = [2, 3]: a range of workers needs engine.reduce=collective (the driver's engine"),
    ("workers=[2,30]", "workers = [2, 30]: a range of workers needs engine.reduce=collective"),
    ("engine.resize_interval=-1", "engine.resize_interval = -1.0: must be 0 or more"),
    ("engine.regroup_timeout=0", "engine.regroup_timeout = 0.0: must be greater than 0"),
    ("inner.lrr=0.1", "unknown config key 'inner.lrr'; did you mean inner.lr?"),
    ("inner=3", "inner = 3: must be a mapping of keys to values"),
    ("tracking.enabled=3", "tracking.enabled = 3: must be true or false"),
    ("novalue", "--set 'novalue': expected key=value"),
]


@pytest.mark.parametrize("override, message", BAD, ids=[b[0] for b in BAD])
def test_bad_value_message(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("sinusoid", [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_cli_prints_one_line_and_no_traceback(capsys):
    assert main(["train", "--set", "inner.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "distmaml: error: inner.lr = -1.0: must be greater than 0"


def test_elastic_workers_round_trip(tmp_path):
    cfg = load_config("sinusoid", ["workers=[2,3]", "engine.reduce=collective"])
    assert (cfg.elastic, cfg.min_workers, cfg.max_workers) == (True, 2, 3)
    fixed = load_config("sinusoid", ["workers=3"])
    assert (fixed.elastic, fixed.min_workers, fixed.max_workers) == (False, 3, 3)
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    assert load_config(str(tmp_path / "c.yaml")).to_dict() == cfg.to_dict()


def test_elastic_workers_fit_the_meta_batch():
    with pytest.raises(ConfigError, match=r"^workers = \[2, 30\] exceeds meta.batch_size = 25"):
        load_config("sinusoid", ["workers=[2,30]", "engine.reduce=collective"])


def test_unknown_recipe_lists_the_recipes():
    with pytest.raises(ConfigError, match="recipes: .*sinusoid"):
        load_config("nope")


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("meta:\n  steps: 7\ninner:\n  lr: 0.5\n")
    cfg = load_config(str(path), ["inner.steps=2"])
    assert (cfg.meta.steps, cfg.inner.lr, cfg.inner.steps) == (7, 0.5, 2)
    assert cfg.flat()["inner.lr"] == 0.5


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_is_valid(name):
    load_config(name)


def test_exponent_without_a_dot_is_a_number():
    # YAML 1.1 reads 1e-3 as a string; a float key takes it as the number it spells
    cfg = load_config("sinusoid", ["meta.lr=3e-4", "inner.lr=1E+30"])
    assert cfg.meta.lr == 3e-4 and cfg.inner.lr == 1e30
    with pytest.raises(ConfigError, match="inner.lr = 'e3': must be a number"):
        load_config("sinusoid", ["inner.lr=e3"])


@pytest.mark.parametrize(
    "overrides, steps",
    [
        ([], 10),  # the sinusoid recipe leaves it null: MAML's 10
        (["algorithm=anil"], 10),
        (["algorithm=metasgd"], 1),  # learned rates: the training steps
        (["algorithm=mamlpp", "inner.steps=3"], 3),
        (["algorithm=metasgd", "inner.test_steps=7"], 7),  # set by the user: kept
        (["algorithm=maml", "inner.test_steps=0"], 0),
    ],
)
def test_test_steps_default_to_the_algorithms_own(overrides, steps):
    config = load_config("sinusoid", overrides)
    assert config.inner.test_steps == config.test_steps == steps
    assert f"test_steps: {steps}\n" in dump_config(config)  # the resolved number, in config.yaml
    assert load_config("omniglot_5w1s").inner.test_steps == 3  # the paper's protocol, explicit in its recipe


def test_one_registry_per_plug_in_kind_and_the_assembly_builds_each_entry():
    """Config validates model.name and data.family against the registries (models.MODELS, config.FAMILIES);
    the run's assembly has a builder for exactly their entries, so a new network or family is added in one
    registry and a missing builder fails here."""
    from distmaml import config
    from distmaml.models import IMAGE_MODELS, MODELS
    from distmaml.run import assembly

    assert set(assembly.NETWORKS) == set(MODELS) == set(config.MODEL_NAMES) and set(IMAGE_MODELS) < set(MODELS)
    assert set(assembly.FAMILIES) == set(config.FAMILIES) == set(config.DATA_FAMILIES)
    with pytest.raises(ConfigError, match="model.name = 'conv5': allowed values are mlp, conv4, resnet12"):
        load_config("sinusoid", ["model.name=conv5"])

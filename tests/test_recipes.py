"""The built-in recipes: their schema, ``distmaml recipes``, the reference beside a run's own meta-test,
and a two-step smoke run of every recipe on a small generated store of its data set's image size.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml
from datagen import make_imagefolder

from distmaml.cli import main
from distmaml.config import RECIPES_DIR, ConfigError, load_config, recipe_names
from distmaml.data.glyphs import GlyphSpec, prepare_glyphs
from distmaml.data.imagefolder import prepare_imagefolder
from distmaml.recipes.catalog import recipe_rows, render_markdown

DOCS = Path(__file__).resolve().parent.parent / "docs" / "recipes.md"

IMAGES = {  # data set (the folder of data.path) -> (channels, side) of the store `prepare` writes for it
    "omniglot": (1, 28),
    "cifarfs": (3, 32),
    "fc100": (3, 32),
    "miniimagenet": (3, 84),
    "tieredimagenet": (3, 84),
    "cub": (3, 84),
}


@pytest.mark.parametrize("name", recipe_names())
def test_recipe_schema(name):
    """One schema for every data set: a store recipe says which command writes its store, and where."""
    c = load_config(name)
    raw = yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text())
    if c.data.family == "store":
        assert c.data.dataset in IMAGES, f"{name}: add its data set's image shape to IMAGES (and a smoke store)"
        argv = shlex.split(c.data.prepare or "")
        assert argv[:2] == ["distmaml", "prepare"], f"{name}: data.prepare names the command that writes its store"
        assert argv[argv.index("--out") + 1] == c.data.path
    if "reference" in raw:
        ref = c.reference.summary()
        assert ref is not None and ref["metric"] == "accuracy" and 0.2 < ref["mean"] < 1
        assert set(raw["reference"]) <= {"metric", "mean", "ci95", "source"}
        where = ("Table", "as quoted in", "as listed by")  # the paper's table, or who quotes the figure
        assert " 20" in ref["source"] and any(w in ref["source"] for w in where), ref["source"]


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["reference.mean=98.7"], "reference.mean = 98.7: an accuracy is a fraction from 0 to 1 (98.7% is 0.987)"),
        (["reference.ci95=0.4"], None),  # a fraction: fine
        (["reference.ci95=40"], "reference.ci95 = 40.0: an accuracy's interval is a fraction (± 40.0% is 0.4)"),
        (["reference.ci95=-0.1"], "reference.ci95 = -0.1: must be 0 or more"),
        (["reference.metric=mse"], "reference.metric = 'mse': data.family = 'store' is meta-tested by accuracy"),
        (["reference.metric=top5"], "reference.metric = 'top5': allowed values are accuracy, mse"),
        (["reference.source=null"], "reference.source is missing: a reference gives metric, mean and source"),
        (["reference.source=' '"], "reference.source = ' ': must name the paper and table"),
        (["reference.table=1"], "unknown config key 'reference.table'; known keys: reference.metric, reference.mean"),
        (["reference.mean=high"], "reference.mean = 'high': must be a number"),
        (["data.prepare=prepare omniglot"], "data.prepare = 'prepare omniglot': must be a command"),
    ],
)
def test_a_bad_reference_gets_one_line_naming_the_key(sets, message):
    if message is None:
        assert load_config("omniglot_5w1s", sets).reference.ci95 == 0.4
        return
    with pytest.raises(ConfigError) as caught:
        load_config("omniglot_5w1s", sets)
    text = str(caught.value)
    assert text.startswith(message) and "\n" not in text


def test_a_reference_in_a_users_file_needs_all_its_keys(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("data: {family: sinusoid}\nreference: {mean: 0.5}\n")
    with pytest.raises(ConfigError, match=r"^reference.metric is missing"):
        load_config(str(path))
    path.write_text("data: {family: sinusoid}\nreference: {metric: mse, mean: 0.5, source: 'me, Table 9'}\n")
    assert load_config(str(path)).reference.summary() == {
        "metric": "mse",
        "mean": 0.5,
        "ci95": None,
        "source": "me, Table 9",
    }


def test_recipes_command_lists_every_recipe_with_its_store_and_figure(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["recipe", "data", "set"]
    by_name = {line.split()[0]: line for line in lines[1:]}
    assert sorted(by_name) == recipe_names()
    omniglot = by_name["omniglot_5w1s"]
    for part in ("omniglot", "5-way 1-shot", "conv4-64", "maml", "accuracy 98.70% ± 0.40%", "Finn et al. 2017"):
        assert part in omniglot
    assert omniglot.endswith("distmaml prepare omniglot --source DIR --out data/omniglot")
    assert "accuracy 48.07% ± 1.75%" in by_name["miniimagenet_5w1s_fomaml"]
    assert "accuracy 99.47% " in by_name["omniglot_5w1s_mamlpp"]  # no interval given: none printed
    assert by_name["glyphs_5w1s"].endswith("none (generated on first use)")
    assert "10-shot regression" in by_name["sinusoid"] and " - " in by_name["sinusoid"]


def test_docs_table_is_the_commands_markdown(capsys):
    """docs/recipes.md holds ``distmaml recipes --markdown``: the documented figures are the recipes' own."""
    assert main(["recipes", "--markdown"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == render_markdown(recipe_rows())
    assert printed in DOCS.read_text(), "regenerate the table in docs/recipes.md with `distmaml recipes --markdown`"


def _run(argv: list[str], sets: list[str]) -> int:
    return main([*argv, *(a for s in sets for a in ("--set", s))])


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """A small store of each image shape the recipes' data sets have (about 10 s to write)."""
    root = tmp_path_factory.mktemp("stores")
    out = {"glyphs": root / "glyphs"}
    # 20 classes per split for the 20-way recipes; 10 drawings for 5 shots + 5 queries
    prepare_glyphs(out["glyphs"], GlyphSpec(classes=60, drawings=10, size=28, val_classes=20, test_classes=20))
    for side in (32, 84):  # 21 images a class: CUB's 5 shots + 16 queries
        src = make_imagefolder(root / f"tree{side}", {f"n{i:02d}": 21 for i in range(15)}, size=(40, 40))
        out[f"rgb{side}"] = root / f"rgb{side}"
        prepare_imagefolder(src, out[f"rgb{side}"], size=side, proportions=(1, 1, 1))
    return out


def _store_for(name: str, stores: dict[str, Path]) -> Path | None:
    c = load_config(name)
    if c.data.family == "glyphs":
        return stores["glyphs"]
    if c.data.family != "store":
        return None
    channels, side = IMAGES[c.data.dataset]
    return stores["glyphs"] if channels == 1 else stores[f"rgb{side}"]


TINY = ["meta.steps=2", "meta.batch_size=2", "meta.val_every=0", "meta.val_tasks=2", "meta.test_tasks=2"]
TINY += ["tracking.enabled=false", "batching=loop", "model.filters=2", "model.hidden=[8]"]


SMOKE = [  # second-order MAML through ResNet-12 at 84x84: minutes on a busy CPU (test_resnet12 runs them at 16x16)
    pytest.param(name, marks=(pytest.mark.slow,) if load_config(name).model.name == "resnet12" else ())
    for name in recipe_names()
]


@pytest.mark.parametrize("name", SMOKE)
def test_every_recipe_runs_two_steps(name, stores, tmp_path):
    """SMOKE: the recipe's own settings (ways, shots, queries, inner steps, algorithm) at a tiny width and budget."""
    sets = list(TINY)
    store = _store_for(name, stores)
    if store is not None:
        sets.append(f"data.path={store}")
    run = tmp_path / "run"
    assert _run(["train", "--config", name, "--workers", "0", "--quiet", "--out", str(run)], sets) == 0
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 2 and result["meta_test"]["tasks"] == 2
    assert result.get("reference") == load_config(name).reference.summary()


def test_evaluate_prints_the_reference_beside_the_runs_own(stores, tmp_path, capsys):
    """A tiny omniglot_5w1s run on the glyph store: train and evaluate print both figures with their intervals
    and write the recipe's reference beside meta_test, whose keys are as before."""
    run = tmp_path / "run"
    sets = [*TINY, "model.filters=4", "meta.test_tasks=20", f"data.path={stores['glyphs']}"]
    assert _run(["train", "--config", "omniglot_5w1s", "--workers", "0", "--quiet", "--out", str(run)], sets) == 0
    trained = capsys.readouterr().out
    assert "reference, Finn et al. 2017 (MAML), Table 1: accuracy 98.70% ± 0.40%" in trained

    assert main(["evaluate", "--checkpoint", str(run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    ours = next(line for line in lines if line.startswith("meta-test, 20 held-out tasks, 3 inner steps: accuracy"))
    assert ours.endswith("(95% interval)") and "% ± " in ours
    assert lines[-1] == "reference, Finn et al. 2017 (MAML), Table 1: accuracy 98.70% ± 0.40%"

    want = {"metric": "accuracy", "mean": 0.987, "ci95": 0.004, "source": "Finn et al. 2017 (MAML), Table 1"}
    for file in ("result.json", "eval.json"):
        written = json.loads((run / file).read_text())
        assert written["reference"] == want
        assert set(written["meta_test"]) == {"metric", "mean", "ci95", "tasks"}
    evaluated = json.loads((run / "eval.json").read_text())["meta_test"]
    assert f"accuracy {100 * evaluated['mean']:.2f}% ± {100 * evaluated['ci95']:.2f}%" in ours


def test_a_run_without_reference_writes_none(stores, tmp_path, capsys):
    run = tmp_path / "run"
    sets = [*TINY, f"data.path={stores['glyphs']}"]
    assert _run(["train", "--config", "glyphs_5w1s", "--workers", "0", "--quiet", "--out", str(run)], sets) == 0
    assert "\nreference, " not in capsys.readouterr().out
    assert "reference" not in json.loads((run / "result.json").read_text())

"""``distmaml recipes``: every built-in recipe in one table, with the figure it should reproduce.

Each row comes from the recipe's own validated config (nothing here knows a data set): the data set
is the folder of ``data.path`` (or the family), the task is ``data.ways``/``data.shots``, the store
is written by the recipe's ``data.prepare`` command, and the reference is its ``reference`` section.
"""

from __future__ import annotations

from typing import NamedTuple

from distmaml.config import Config, load_config, recipe_names
from distmaml.run.results import describe

NO_FILES = {"sinusoid": "none (synthetic tasks)", "glyphs": "none (generated on first use)", "noise": "none (random)"}
"""The store column of the built-in families that need no files."""


class RecipeRow(NamedTuple):
    """One line of ``distmaml recipes``."""

    name: str
    dataset: str
    task: str
    model: str
    algorithm: str
    prepare: str
    reference: str
    source: str


def _task(config: Config) -> str:
    data = config.data
    if config.loss == "mse":
        return f"{data.shots}-shot regression"
    return f"{data.ways}-way {data.shots}-shot"


def _model(config: Config) -> str:
    model = config.model
    if model.name == "mlp":
        return "mlp " + "-".join(str(w) for w in model.hidden)
    return f"{model.name}-{model.filters}"


def _algorithm(config: Config) -> str:
    if config.inner.first_order and config.algorithm == "maml":
        return "maml (first order)"
    return config.algorithm


def recipe_row(name: str) -> RecipeRow:
    """The row of the built-in recipe ``name`` (its config is loaded and validated).

    Example:
        >>> recipe_row("omniglot_5w1s").reference
        'accuracy 98.70% ± 0.40%'
    """
    config = load_config(name)
    ref = config.reference.summary()
    if config.data.prepare:
        prepare = config.data.prepare
    elif config.data.family in NO_FILES:
        prepare = NO_FILES[config.data.family]
    else:
        prepare = "-"
    return RecipeRow(
        name=name,
        dataset=config.data.dataset,
        task=_task(config),
        model=_model(config),
        algorithm=_algorithm(config),
        prepare=prepare,
        reference=describe(ref) if ref else "-",
        source=ref["source"] if ref else "-",
    )


def recipe_rows() -> list[RecipeRow]:
    """Every built-in recipe, by name."""
    return [recipe_row(name) for name in recipe_names()]


HEADERS = RecipeRow(
    name="recipe",
    dataset="data set",
    task="task",
    model="model",
    algorithm="algorithm",
    prepare="its store: prepare with",
    reference="reference",
    source="source of the reference",
)


def render_text(rows: list[RecipeRow]) -> str:
    """Aligned columns, one recipe a line (the prepare command last but one: it is the widest)."""
    order = ("name", "dataset", "task", "model", "algorithm", "reference", "source", "prepare")
    table = [HEADERS, *rows]
    widths = {k: max(len(getattr(r, k)) for r in table) for k in order}
    lines = ["  ".join(getattr(r, k).ljust(widths[k]) for k in order).rstrip() for r in table]
    return "\n".join(lines)


def render_markdown(rows: list[RecipeRow]) -> str:
    """A Markdown table (docs/recipes.md holds this table; a test keeps the two equal)."""
    order = ("name", "dataset", "task", "model", "algorithm", "reference", "source", "prepare")

    def line(r: RecipeRow, code: bool) -> str:
        cells = [getattr(r, k) for k in order]
        if code:  # names and commands as code
            cells[0] = f"`{cells[0]}`"
            if cells[-1].startswith("distmaml "):
                cells[-1] = f"`{cells[-1]}`"
        return "| " + " | ".join(cells) + " |"

    head = line(HEADERS, code=False)
    rule = "|" + "|".join(" --- " for _ in order) + "|"
    return "\n".join([head, rule, *(line(r, code=True) for r in rows)])

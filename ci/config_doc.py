"""Writes docs/configuration.md from the config's dataclasses: every key, its default and its docstring.

    python ci/config_doc.py          # rewrite docs/configuration.md
    python ci/config_doc.py --check  # exit 1 if the file is not what the code says (tests/test_docs.py)

The docstring under each field of ``distmaml.config`` is the documentation;
this script only lays it out, so the page cannot drift from the code.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "configuration.md"

HEADER = """# Configuration reference

A run is one `Config` (`distmaml/config.py`): a recipe (`--config NAME`, one of
`distmaml/recipes/`, or a YAML file of your own) with dotted overrides
(`--set inner.lr=0.1`, any subcommand). Values are checked when the config is
made: a bad one gets one line naming the key, the value and what is allowed.
The resolved config is written to `RUN_DIR/config.yaml`.

This page is generated from the docstrings in `distmaml/config.py` by
`python ci/config_doc.py`; `tests/test_docs.py` checks that it is current.
"""


def _field_docs(cls: type) -> dict[str, str]:
    """The string literal under each annotated field of ``cls`` and of its dataclass bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, after in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _rows(cls: type, prefix: str) -> list[tuple[str, str, str]]:
    docs = _field_docs(cls)
    rows = []
    for f in dataclasses.fields(cls):
        value = _default(f)
        if dataclasses.is_dataclass(value):
            continue
        rows.append((prefix + f.name, "`" + repr(value) + "`", _cell(docs.get(f.name, ""))))
    return rows


def render() -> str:
    from distmaml.config import Config

    parts = [HEADER]
    parts.append("## Top level\n\n| key | default | what it is |\n| --- | --- | --- |")
    parts += [f"| `{k}` | {d} | {doc} |" for k, d, doc in _rows(Config, "")]
    for f in dataclasses.fields(Config):
        section = _default(f)
        if not dataclasses.is_dataclass(section):
            continue
        cls = type(section)
        intro = " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())
        parts.append(f"\n## `{f.name}`\n")
        if intro and not intro.startswith(cls.__name__ + "("):
            parts.append(intro + "\n")
        parts.append("| key | default | what it is |\n| --- | --- | --- |")
        parts += [f"| `{k}` | {d} | {doc} |" for k, d, doc in _rows(cls, f.name + ".")]
    return "\n".join(parts) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is not current; run: python ci/config_doc.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

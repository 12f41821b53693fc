"""The documentation holds together: the README stays a tour, every link lands, the config reference is current."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "benchmarks").glob("*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"```.*?```", flags=re.S)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def _links(page: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", page.read_text()))


def test_there_are_pages_and_links_to_check():
    """Guards the tests below against checking nothing."""
    assert len(PAGES) >= 12
    assert sum(len(_links(p)) for p in PAGES) >= 30


def test_the_readme_is_a_tour():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= 15_000, f"README.md is {size} bytes; move detail into docs/"


def test_the_readme_links_every_page_of_docs():
    linked = {(ROOT / link.split("#")[0]).resolve() for link in _links(ROOT / "README.md")}
    missing = [p.name for p in (ROOT / "docs").glob("*.md") if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    bad = []
    for link in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            bad.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            bad.append(f"{link}: no heading with anchor #{anchor} in {target.name}")
    assert not bad, bad


def test_the_configuration_reference_is_current():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "ci" / "config_doc.py"), "--check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_the_configuration_reference_lists_every_key():
    """Independent of the generator: every dotted key the config flattens to has a row."""
    from distmaml.config import Config, flatten

    text = (ROOT / "docs" / "configuration.md").read_text()
    keys = flatten(Config().to_dict())
    assert len(keys) > 40
    missing = [k for k in keys if f"| `{k}` |" not in text]
    assert not missing, missing

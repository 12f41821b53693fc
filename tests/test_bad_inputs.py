"""Every row of docs/errors.md's table of bad inputs, run through the CLI: the exact message and exit code.

The table is read from docs/errors.md, so the documentation and the behaviour
cannot drift apart. Each command runs in-process (``distmaml.cli.main``) in a
fresh folder holding the files the rows name.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distmaml.cli import main
from distmaml.data.glyphs import GlyphSpec, prepare_glyphs

TABLE = Path(__file__).resolve().parent.parent / "docs" / "errors.md"
SECTION = "# Bad inputs and the messages they get"

FILES = {
    "blocker": "a file where a folder should be\n",
    "junk-run/checkpoints/step_000000004.pt": "not a checkpoint\n",
    "swapped.yaml": "base: sinusoid\nmetric: val_mse\nspace: {inner.lr: {loguniform: [0.1, 0.001]}}\n",
    "wrong-metric.yaml": "base: sinusoid\nmetric: val_accuracy\nspace: {inner.lr: {loguniform: [0.001, 0.1]}}\n",
    "normal.yaml": "base: sinusoid\nmetric: val_mse\nspace: {inner.lr: {normal: [0.01, 0.003]}}\n",
    "bad-value.yaml": "base: sinusoid\nmetric: val_mse\nspace: {inner.steps: {choice: [1, 0]}}\n",
    "lr.yaml": "base: sinusoid\nmetric: val_mse\nspace: {inner.lr: {loguniform: [0.001, 0.1]}}\n",
    "workers.yaml": "base: sinusoid\nmetric: val_mse\nspace: {workers: {choice: [1, 2]}}\n",
    # a download link that served its web page instead of the file (the miniImageNet caches' file host)
    **{
        f"html/mini-imagenet-cache-{split}.pkl": "<!DOCTYPE html><html><head><title>Google Drive</title></head></html>\n"
        for split in ("train", "val", "test")
    },
    "other-tool/config.yaml": "learning_rate: 0.1\nepochs: 3\n",
    "badcode.py": (
        "import torch\n"
        "def not_a_net(config):\n    return 42\n"
        "class WrongShapes:\n    loss = 'mse'\n    def __init__(self, config):\n        pass\n"
        "    def sample(self, split, step, ids):\n"
        "        n = len(ids)\n"
        "        return torch.zeros(n, 4, 1), torch.zeros(n, 3, 1), torch.zeros(n, 4, 1), torch.zeros(n, 4, 1)\n"
        "class L1(WrongShapes):\n    loss = 'l1'\n"
    ),
}


def _cell(text: str) -> str:
    text = text.strip().replace("\\|", "|")
    if text.startswith("`` ") and text.endswith(" ``"):
        return text[3:-3]
    if text.startswith("`") and text.endswith("`"):
        return text[1:-1]
    return text


def readme_rows() -> list[tuple[str, str, str, int, str]]:
    """(area, what is wrong, command, exit code, message) of each row of the table."""
    lines = TABLE.read_text().split(SECTION, 1)[1].splitlines()
    rows = []
    for line in lines[lines.index(next(x for x in lines if x.startswith("|"))) :]:
        if not line.startswith("|"):
            break
        cells = [_cell(c) for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if cells[0] in ("area", "---"):
            continue
        area, wrong, command, code, message = cells
        rows.append((area, wrong, command, int(code), message))
    return rows


ROWS = readme_rows()


def test_the_table_covers_every_area_with_at_least_15_rows():
    assert len(ROWS) >= 15
    assert {r[0] for r in ROWS} == {"config", "data", "checkpoints", "cluster", "sweeps", "bench"}
    assert len({r[2] for r in ROWS}) == len(ROWS)  # no command twice


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "store"
    prepare_glyphs(path, GlyphSpec(classes=30, drawings=4, size=16, val_classes=5, test_classes=5))
    return path


@pytest.fixture(scope="module")
def damaged(store, tmp_path_factory):
    """Binary files the rows name: stores with a truncated and a foreign ``train.parquet``, a checkpoint of
    another format, and torch files that are not distmaml checkpoints."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    root = tmp_path_factory.mktemp("damaged")
    for name in ("damaged-store", "foreign-store"):
        shutil.copytree(store, root / name)
    train = root / "damaged-store" / "train.parquet"
    train.write_bytes(train.read_bytes()[: train.stat().st_size // 2])  # cut off mid-file, as a full disk leaves it
    pq.write_table(pa.table({"x": [1, 2, 3]}), root / "foreign-store" / "train.parquet")
    (root / "future-run" / "checkpoints").mkdir(parents=True)
    payload = {"format": 2, "step": 4, "params": {}, "optimizer": {}, "config": {}}
    torch.save(payload, root / "future-run" / "checkpoints" / "step_000000004.pt")
    torch.save(torch.zeros(3), root / "tensor.pt")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, root / "model.pt")
    return root


@pytest.mark.parametrize("area,wrong,command,code,message", ROWS, ids=[r[2][9:] for r in ROWS])
def test_bad_input_gets_its_message(area, wrong, command, code, message, store, damaged, tmp_path, monkeypatch, capsys):
    for name, text in FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "store").symlink_to(store)
    for made in damaged.iterdir():
        (tmp_path / made.name).symlink_to(made)
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(command)
    assert argv[0] == "distmaml"
    assert main(argv[1:]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == message


def test_an_internal_error_keeps_its_traceback(tmp_path):
    """A bug (here a ValueError raised inside the task program, as torch or pyarrow might) is not a bad input:
    ``distmaml`` ends with the traceback and a non-zero exit, not a one-line ``distmaml: error``."""
    code = (
        "import sys, distmaml.run.runner, distmaml.cli\n"
        "def broken(*args, **kwargs):\n"
        "    raise ValueError('deliberate internal error')\n"
        "distmaml.run.runner.meta_grad = broken\n"
        "sys.exit(distmaml.cli.main(sys.argv[1:]))\n"
    )
    argv = ["train", "--quiet", "--workers", "0", "--set", "meta.steps=2", "--set", "tracking.enabled=false"]
    done = subprocess.run([sys.executable, "-c", code, *argv], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "ValueError: deliberate internal error"
    assert "distmaml: error" not in done.stderr

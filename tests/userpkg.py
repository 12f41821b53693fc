"""A package distmaml has never seen (few-shot classification of generated points), for tests to write
into a folder; each call of its code logs where it was imported from."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

PACKAGE = {
    "blobs/__init__.py": "",
    "blobs/mod.py": textwrap.dedent(
        '''
        """Few-shot classification of generated points: each class a Gaussian blob placed anew per task."""
        import json, os, sys

        import torch
        from torch import nn


        def _log(what):
            with open(open(os.path.join(os.path.dirname(__file__), "log_path.txt")).read(), "a") as f:
                f.write(json.dumps({"what": what, "pid": os.getpid(), "file": __file__, "sys_path": sys.path,
                                    "cwd": os.getcwd()}) + "\\n")


        def make(config):
            _log("model")
            ways = config.data.ways
            return nn.Sequential(nn.Linear(2, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, ways))


        class Blobs:
            loss = "cross_entropy"

            def __init__(self, config):
                _log("family")
                self.seed, self.ways = config.seed, config.data.ways
                self.shots, self.queries = config.data.shots, config.data.queries

            def _task(self, split, step, i):
                g = torch.Generator().manual_seed((((self.seed * 3 + ["train", "val", "test"].index(split)) * 100003
                                                   + step) * 100003 + i))
                centres = torch.randn(self.ways, 2, generator=g) * 2
                n = self.shots + self.queries
                x = centres.repeat_interleave(n, 0) + 0.5 * torch.randn(self.ways * n, 2, generator=g)
                y = torch.arange(self.ways).repeat_interleave(n)
                support = (torch.arange(self.ways * n) % n) < self.shots
                return x[support], y[support], x[~support], y[~support]

            def sample(self, split, step, task_ids):
                step = step if split == "train" else 0
                return tuple(torch.stack(p) for p in zip(*(self._task(split, step, int(i)) for i in task_ids)))
        '''
    ),
}

SETS = [
    "model.name=blobs.mod:make",
    "data.family=blobs.mod:Blobs",
    "data.ways=3",
    "data.shots=2",
    "data.queries=4",
    "inner.lr=0.5",
    "inner.test_steps=5",
    "meta.batch_size=4",
    "meta.lr=0.01",
    "meta.val_tasks=8",
    "meta.test_tasks=60",
    "tracking.enabled=false",
    "precision=float64",
    "batching=loop",
]


def write_package(folder: Path, log: Path) -> None:
    """Writes the package into ``folder``; its calls append to ``log`` (named in a file that travels with it)."""
    for name, text in {**PACKAGE, "blobs/log_path.txt": str(log)}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def worker_calls(log: Path, driver_pids: set[int]) -> list[dict]:
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    return [c for c in calls if c["pid"] not in driver_pids]


def assert_shipped(calls: list[dict], folder: Path) -> None:
    """Each worker process imported the package from Ray's copy, with the folder nowhere on its path."""
    assert {c["what"] for c in calls} == {"model", "family"}
    assert len({c["pid"] for c in calls}) >= 2
    for c in calls:
        assert "/runtime_resources/working_dir_files/" in c["file"], c["file"]
        assert not c["file"].startswith(str(folder))
        assert all(not p or Path(p).resolve() != folder.resolve() for p in c["sys_path"]), c["sys_path"]
        assert Path(c["cwd"]).resolve() != folder.resolve()

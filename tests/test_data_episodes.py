"""Episodes over a task store: shapes, labels, purity, split pools, bad settings, staging."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest
import torch
from datagen import make_omniglot

from distmaml.cli import main
from distmaml.config import load_config
from distmaml.data.episodes import ImageTasks, choose_distinct
from distmaml.data.glyphs import GlyphSpec, prepare_glyphs
from distmaml.data.omniglot import prepare_omniglot
from distmaml.data.prepare import staged_output
from distmaml.data.store import METADATA, StoreWriter, load_split, open_store
from distmaml.run.assembly import build_runner, init_meta_params

SHOTS, QUERIES, WAYS = 2, 3, 5


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """18 characters of 6 drawings: paper split 8 / 5 / 5, meta-train with rotations (32 classes)."""
    root = tmp_path_factory.mktemp("episodes")
    src = make_omniglot(root / "src", {"Alpha": 6, "Beta": 5}, {"Gamma": 4, "Delta": 3}, drawings=6, size=24)
    prepare_omniglot(src, root / "store", size=16, train_classes=8, val_classes=5, seed=2)
    return root / "store"


@pytest.fixture(scope="module")
def owners(store):
    """Pixel bytes -> (split, class name, row in class) for every image of the store."""
    info = open_store(store)
    out = {}
    for split in ("train", "val", "test"):
        data = load_split(info, split)
        for c, name in enumerate(data.classes):
            for row in range(int(data.offsets[c]), int(data.offsets[c + 1])):
                key = data.images[row].numpy().tobytes()
                assert key not in out, "test images must be distinct"
                out[key] = (split, name, row)
    return out


def image_owner(owners, x):
    return owners[(x * 255).round().to(torch.uint8).numpy().tobytes()]


def test_split_loads_as_one_uint8_tensor_with_offsets(store):
    info = open_store(store)
    train = load_split(info, "train")
    assert train.images.dtype == torch.uint8 and train.images.shape == (32 * 6, 1, 16, 16)
    assert train.images.is_contiguous() and train.offsets.tolist() == list(range(0, 32 * 6 + 1, 6))
    assert train.classes == info.splits["train"].classes


def test_episode_shapes_labels_and_disjoint_support_query(store, owners):
    tasks = ImageTasks(store, ways=WAYS, shots=SHOTS, queries=QUERIES, seed=1)
    for split in ("train", "val", "test"):
        b = tasks.sample(split, 4, range(6))
        assert b.support_x.shape == (6, WAYS * SHOTS, 1, 16, 16) and b.query_x.shape == (6, WAYS * QUERIES, 1, 16, 16)
        assert b.support_x.dtype == torch.float32 and 0 <= float(b.support_x.min()) <= float(b.support_x.max()) <= 1
        for t in range(6):
            assert torch.bincount(b.support_y[t], minlength=WAYS).tolist() == [SHOTS] * WAYS
            assert torch.bincount(b.query_y[t], minlength=WAYS).tolist() == [QUERIES] * WAYS
            label_class: dict[int, str] = {}
            rows = []
            for x, y in [*zip(b.support_x[t], b.support_y[t]), *zip(b.query_x[t], b.query_y[t])]:
                owner_split, name, row = image_owner(owners, x)
                assert owner_split == split  # the split's own class pool
                assert label_class.setdefault(int(y), name) == name  # one class per label
                rows.append(row)
            assert len(set(label_class.values())) == WAYS  # distinct classes
            assert len(set(rows)) == WAYS * (SHOTS + QUERIES)  # no image twice, none in support and query


def test_tasks_are_a_pure_function_of_seed_step_and_id(store):
    a = ImageTasks(store, ways=WAYS, shots=SHOTS, queries=QUERIES, seed=1)
    b = ImageTasks(store, ways=WAYS, shots=SHOTS, queries=QUERIES, seed=1)  # a fresh load
    whole = a.sample("train", 7, range(5))
    parts = [b.sample("train", 7, range(0, 3)), b.sample("train", 7, range(3, 5))]
    for i, x in enumerate(whole):
        assert torch.equal(x, torch.cat([p[i] for p in parts]))
    reordered = b.sample("train", 7, [4, 1])
    for i, x in enumerate(whole):
        assert torch.equal(reordered[i][0], x[4]) and torch.equal(reordered[i][1], x[1])
    assert not torch.equal(a.sample("train", 8, range(5)).support_x, whole.support_x)  # another step
    assert not torch.equal(a.sample("train", 7, range(5, 10)).support_x, whole.support_x)  # other ids
    c = ImageTasks(store, ways=WAYS, shots=SHOTS, queries=QUERIES, seed=2)
    assert not torch.equal(c.sample("train", 7, range(5)).support_x, whole.support_x)  # another seed


def test_meta_gradient_of_store_tasks_does_not_depend_on_the_split_of_the_batch(store):
    config = load_config(
        "glyphs_5w1s",
        [
            "data.family=store",
            f"data.path={store}",
            "data.ways=5",
            "data.shots=1",
            "data.queries=2",
            "model.filters=4",
            "precision=float64",
            "workers=0",
            "meta.batch_size=5",
            "batching=loop",
        ],
    )
    runner = build_runner(config)
    flat = runner.layout.flatten(init_meta_params(config, runner.model)).double()
    whole = runner.meta_grad(flat, 3, range(0, 5))
    first, second = runner.meta_grad(flat, 3, range(0, 3)), runner.meta_grad(flat, 3, range(3, 5))
    assert whole.tasks == first.tasks + second.tasks == 5
    torch.testing.assert_close(first.grad + second.grad, whole.grad, rtol=0, atol=1e-10)
    assert abs(first.loss + second.loss - whole.loss) < 1e-10


def test_classes_uniform_and_labels_shuffled(store):
    tasks = ImageTasks(store, ways=WAYS, shots=1, queries=1, seed=0)
    train = tasks.split("train")
    picks = torch.stack([tasks.task_indices("train", 0, i)[:, 0] for i in range(640)])  # [tasks, ways] rows
    classes = torch.searchsorted(train.offsets, picks, right=True) - 1
    counts = torch.bincount(classes.flatten(), minlength=32)
    assert int(counts.sum()) == 640 * WAYS and int(counts.min()) > 50 and int(counts.max()) < 150  # expected 100
    labels_of_class_0 = {int(j) for t in range(640) for j in (classes[t] == 0).nonzero().flatten()}
    assert labels_of_class_0 == set(range(WAYS))  # a class takes every label across tasks
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([choose_distinct(10, 3, g) for _ in range(3000)])
    assert all(len(set(d.tolist())) == 3 for d in draws)
    assert int(torch.bincount(draws.flatten(), minlength=10).min()) > 800  # 900 expected, sd 25
    assert int(torch.bincount(draws[:, 0], minlength=10).min()) > 220  # first position uniform too: 300, sd 16


def test_split_pools_disjoint_and_rotations_only_in_meta_train(store, owners):
    info = open_store(store)
    names = {s: set(info.splits[s].classes) for s in ("train", "val", "test")}
    assert not (names["train"] & names["val"] or names["train"] & names["test"] or names["val"] & names["test"])
    characters = {s: {n.split("/rot")[0] for n in names[s]} for s in names}
    assert not (characters["train"] & (characters["val"] | characters["test"]))  # rotations stay with their character
    assert {n for n in names["train"] if "/rot" in n} == {
        f"{c}/rot{a:03d}" for c in characters["train"] for a in (90, 180, 270)
    }
    tasks = ImageTasks(store, ways=4, shots=1, queries=1, seed=0)
    for split in ("val", "test"):
        b = tasks.sample(split, 0, range(20))
        seen = {image_owner(owners, x)[1] for x in b.query_x.flatten(0, 1)}
        assert seen <= names[split] and not any("/rot" in n for n in seen)


# -- bad settings: one line that names the setting -------------------------------------------


def run_cli(capsys, *sets: str) -> str:
    args = ["train", "--config", "glyphs_5w1s", "--workers", "0", "--quiet"]
    for s in ["meta.steps=1", *sets]:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("distmaml: error: ") and err.count("\n") == 1, err
    return err


def test_bad_data_settings_get_one_line(store, tmp_path, capsys):
    on_store = ["data.family=store", f"data.path={store}"]
    err = run_cli(capsys, *on_store, "data.ways=6", "data.shots=1", "data.queries=1")
    assert "data.ways = 6 exceeds the 5 classes of split 'val'" in err and "lower data.ways" in err
    err = run_cli(capsys, *on_store, "data.ways=3", "data.shots=4", "data.queries=3")
    assert "data.shots + data.queries = 7 exceeds the 6 images of class" in err and "lower one of them" in err
    assert "data.path is not set" in run_cli(capsys, "data.family=store")
    err = run_cli(capsys, "data.family=store", f"data.path={tmp_path / 'nowhere'}")
    assert f"data.path = '{tmp_path / 'nowhere'}': no such folder" in err and "distmaml prepare" in err
    (tmp_path / "empty").mkdir()
    assert "not a task store" in run_cli(capsys, "data.family=store", f"data.path={tmp_path / 'empty'}")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    err = run_cli(capsys, f"data.path={tmp_path / 'notes'}")  # glyphs would be generated there
    assert "data.path = " in err and "holds other files" in err and (tmp_path / "notes" / "a.txt").exists()
    old = tmp_path / "old"
    prepare_glyphs(old, GlyphSpec(classes=12, drawings=3, size=16, val_classes=2, test_classes=2))
    meta = json.loads((old / METADATA).read_text())
    (old / METADATA).write_text(json.dumps({**meta, "schema_version": 0}))
    err = run_cli(capsys, "data.family=store", f"data.path={old}")
    assert f"data.path = '{old}'" in err and "schema version 0" in err and "--overwrite" in err


# -- staging: nothing half-written, races settled -------------------------------------------

SMALL = GlyphSpec(classes=12, drawings=3, size=16, val_classes=2, test_classes=2)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_prepare_leaves_nothing_and_keeps_the_old_store(tmp_path, monkeypatch, error):
    real = StoreWriter.write_split

    def failing(self, split, classes):
        if split == "test":  # after train.parquet and val.parquet are staged
            raise error
        real(self, split, classes)

    out = tmp_path / "g"
    monkeypatch.setattr(StoreWriter, "write_split", failing)
    with pytest.raises(type(error)):
        prepare_glyphs(out, SMALL)
    assert not out.exists() and leftovers(tmp_path) == []
    monkeypatch.setattr(StoreWriter, "write_split", real)
    prepare_glyphs(out, SMALL)
    before = (out / METADATA).read_text()
    monkeypatch.setattr(StoreWriter, "write_split", failing)
    with pytest.raises(type(error)):
        prepare_glyphs(
            out, GlyphSpec(classes=12, drawings=3, size=16, val_classes=2, test_classes=2, seed=5), overwrite=True
        )
    assert (out / METADATA).read_text() == before and leftovers(tmp_path) == []
    assert len(load_split(open_store(out), "test").classes) == 2


def test_first_use_keeps_the_store_another_preparer_finished_first(tmp_path):
    out = tmp_path / "cache" / "glyphs"
    with staged_output(out, keep_existing=True) as tmp:
        (tmp / "ours").write_text("discarded")
        prepare_glyphs(out, GlyphSpec(classes=12, drawings=3, size=16, val_classes=2, test_classes=2, seed=7))
    assert open_store(out).source["seed"] == 7 and not (out / "ours").exists()
    assert leftovers(out.parent) == []


def _prepare_at(out: str, barrier) -> None:  # type: ignore[no-untyped-def]
    barrier.wait()
    prepare_glyphs(out, SMALL, keep_existing=True)


def test_two_processes_racing_to_prepare_leave_one_complete_store(tmp_path):
    out = tmp_path / "glyphs"
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_prepare_at, args=(str(out), barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    info = open_store(out)
    assert [len(info.splits[s].classes) for s in ("train", "val", "test")] == [8, 2, 2]
    assert leftovers(tmp_path) == []

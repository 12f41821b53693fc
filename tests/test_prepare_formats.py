"""``distmaml prepare`` for the few-shot benchmarks, from files in each release's own on-disk format.

Each format is written by ``formatgen`` as the release lays it out (folder and
file names, pickle keys, dtypes and protocol), with generated images. Every
test goes through the command line (``distmaml.cli.main``), checks the
split's class counts against the paper's, compares stored pixels with the
source's, and trains two meta-steps from the store. A damaged or foreign file
gets one line naming it, exit 2, and leaves nothing behind.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from formatgen import (
    CIFAR_COARSE,
    CIFAR_FINE,
    make_cifar100,
    make_cub,
    make_mini_cache,
    make_omniglot_torchvision,
    make_tiered,
    py2_dump,
    py3_dump,
)

from distmaml.cli import main
from distmaml.data.cifar import CIFARFS_CLASSES, FC100_SUPERCLASSES
from distmaml.data.omniglot import omniglot_root
from distmaml.data.pickles import load_pickle, stream_list
from distmaml.data.store import load_split, open_store

SPLITS = ("train", "val", "test")


def prepare(*argv: str) -> None:
    assert main(["prepare", *argv]) == 0


def class_counts(store: Path) -> tuple[int, ...]:
    info = open_store(store)
    return tuple(len(info.splits[s].classes) for s in SPLITS)


def train_two_steps(store: Path, run: Path) -> dict:
    """Two meta-steps of 2-way 1-shot from ``store`` (in this process, tracking off), then the meta-test."""
    sets = [f"data.path={store}", "data.ways=2", "data.shots=1", "data.queries=1", "model.filters=4"]
    sets += ["meta.steps=2", "meta.batch_size=2", "meta.val_every=0", "meta.test_tasks=4", "meta.val_tasks=2"]
    sets += ["tracking.enabled=false", "batching=loop", "inner.steps=1", "inner.test_steps=1"]
    argv = ["train", "--config", "omniglot_5w1s", "--workers", "0", "--quiet", "--out", str(run)]
    assert main([*argv, *(a for s in sets for a in ("--set", s))]) == 0
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 2 and result["meta_test"]["tasks"] == 4
    return result


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], out: Path, *names: str) -> str:
    """Runs a ``prepare`` that must fail: exit 2, one line naming ``names``, no store or staging left."""
    assert main(["prepare", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("distmaml: error: "), err
    for name in names:
        assert name in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return err


# -- CIFAR-FS and FC100 -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    return make_cifar100(tmp_path_factory.mktemp("cifar"), train_per_class=1, test_per_class=1)


def test_the_split_lists_are_the_papers():
    fs = [set(CIFARFS_CLASSES[s]) for s in SPLITS]
    assert [len(CIFARFS_CLASSES[s]) for s in SPLITS] == [64, 16, 20] and [len(s) for s in fs] == [64, 16, 20]
    assert fs[0] | fs[1] | fs[2] == set(CIFAR_FINE)  # every CIFAR-100 class once
    fc = [set(FC100_SUPERCLASSES[s]) for s in SPLITS]
    assert [len(s) for s in fc] == [12, 4, 4] and fc[0] | fc[1] | fc[2] == set(CIFAR_COARSE)


def test_cifarfs_from_torchvisions_folder(cifar, tmp_path):
    out = tmp_path / "cifarfs"
    prepare("cifarfs", "--source", str(cifar), "--out", str(out))
    assert class_counts(out) == (64, 16, 20)
    info = open_store(out)
    assert info.image_shape == (3, 32, 32)
    for split in SPLITS:
        assert info.splits[split].classes == list(CIFARFS_CLASSES[split])
        assert info.splits[split].counts == [2] * len(CIFARFS_CLASSES[split])  # train + test images pooled
    # the stored pixels are the pickle's rows (RGB planes, i.e. CHW) of the class, train part first
    raw = {p: load_pickle(cifar / p, "") for p in ("train", "test")}
    fine = CIFAR_FINE.index("whale")
    want = np.concatenate(
        [raw[p]["data"][np.asarray(raw[p]["fine_labels"]) == fine] for p in ("train", "test")]
    ).reshape(-1, 3, 32, 32)
    test = load_split(info, "test")
    assert torch.equal(test.images[test.offsets[0] : test.offsets[1]], torch.from_numpy(want))
    train_two_steps(out, tmp_path / "run")


def test_fc100_splits_by_superclass(cifar, tmp_path):
    out = tmp_path / "fc100"
    prepare("fc100", "--source", str(cifar.parent), "--out", str(out))  # torchvision's root works too
    assert class_counts(out) == (60, 20, 20)
    groups = {s: set(pq.read_table(out / f"{s}.parquet", columns=["group"]).column(0).to_pylist()) for s in SPLITS}
    assert {s: len(g) for s, g in groups.items()} == {"train": 12, "val": 4, "test": 4}
    for split in SPLITS:
        assert groups[split] == set(FC100_SUPERCLASSES[split])
    assert set(open_store(out).splits["test"].classes) == {
        "beaver", "dolphin", "otter", "seal", "whale", "bee", "beetle", "butterfly", "caterpillar", "cockroach",
        "fox", "porcupine", "possum", "raccoon", "skunk", "baby", "boy", "girl", "man", "woman",
    }  # fmt: skip


def test_damaged_or_foreign_cifar_files(cifar, tmp_path, capsys):
    src = tmp_path / "cifar-100-python"
    shutil.copytree(cifar, src)
    raw = (cifar / "test").read_bytes()
    (src / "test").write_bytes(raw[: len(raw) // 2])  # read after train: a truncated download
    refused(["cifarfs", "--source", str(src)], capsys, tmp_path / "o", f"{src / 'test'}: truncated")
    (src / "meta").write_text("<!DOCTYPE html>\n<html><head><title>Google Drive - Quota exceeded</title>")
    refused(["fc100", "--source", str(src)], capsys, tmp_path / "o", f"{src / 'meta'}: this is a web page")
    shutil.copy(cifar / "meta", src / "meta")
    entry = load_pickle(cifar / "train", "")
    py2_dump({**entry, "data": entry["data"].astype(np.float32)}, src / "train")
    refused(["cifarfs", "--source", str(src)], capsys, tmp_path / "o", f"{src / 'train'}: 'data' should be uint8")
    ten = tmp_path / "cifar-10-batches-py"  # CIFAR-10 by mistake
    ten.mkdir()
    py2_dump({"data": entry["data"], "labels": [0] * len(entry["data"])}, ten / "data_batch_1")
    refused(["cifarfs", "--source", str(ten)], capsys, tmp_path / "o", f"{ten / 'meta'}: no such file")


# -- miniImageNet caches ----------------------------------------------------------------------------


@pytest.mark.parametrize("dump", [py2_dump, py3_dump], ids=["python2-cache", "python3-copy"])
def test_miniimagenet_caches(dump, tmp_path):
    src = make_mini_cache(tmp_path / "mini", {"train": 64, "val": 16, "test": 20}, dump=dump)
    out = tmp_path / "store"
    prepare("miniimagenet", "--source", str(src), "--out", str(out))
    assert class_counts(out) == (64, 16, 20)
    info = open_store(out)
    assert info.image_shape == (3, 84, 84)
    with (src / "mini-imagenet-cache-val.pkl").open("rb") as f:
        raw = pickle.load(f, encoding="latin1")
    name, rows = next(iter(raw["class_dict"].items()))
    val = load_split(info, "val")
    assert val.classes[0] == name
    want = torch.from_numpy(raw["image_data"][rows]).permute(0, 3, 1, 2)  # HWC -> CHW
    assert torch.equal(val.images[val.offsets[0] : val.offsets[1]], want)
    if dump is py3_dump:  # learn2learn's name for the validation cache
        (src / "mini-imagenet-cache-val.pkl").rename(src / "mini-imagenet-cache-validation.pkl")
        prepare("miniimagenet", "--source", str(src), "--out", str(tmp_path / "l2l"))
        assert open_store(tmp_path / "l2l").splits == info.splits
    if dump is py2_dump:
        small = tmp_path / "small"
        prepare("miniimagenet", "--source", str(src), "--out", str(small), "--size", "16")
        train_two_steps(small, tmp_path / "run")


def test_damaged_or_foreign_miniimagenet_caches(tmp_path, capsys):
    src = make_mini_cache(tmp_path / "mini", {"train": 3, "val": 2, "test": 2})
    test = src / "mini-imagenet-cache-test.pkl"
    raw = test.read_bytes()
    test.write_bytes(raw[: len(raw) - 1000])  # the last split, after train and val were staged
    refused(["miniimagenet", "--source", str(src)], capsys, tmp_path / "o", f"{test}: truncated")
    train = src / "mini-imagenet-cache-train.pkl"
    train.write_bytes(b"<html><head><title>Google Drive - Virus scan warning</title></head></html>")
    refused(["miniimagenet", "--source", str(src)], capsys, tmp_path / "o", f"{train}: this is a web page")
    py2_dump({"images": np.zeros((2, 84, 84, 3), np.uint8), "labels": [0, 1]}, train)
    refused(
        ["miniimagenet", "--source", str(src)], capsys, tmp_path / "o", f"{train}: expected a dict with 'image_data'"
    )
    py2_dump({"image_data": np.zeros((2, 3, 84, 84), np.float32), "class_dict": {"n1": [0, 1]}}, train)
    refused(["miniimagenet", "--source", str(src)], capsys, tmp_path / "o", f"{train}: 'image_data' should be uint8")
    train.write_bytes(pickle.dumps(__import__("os").system))  # a pickle that would run code
    refused(["miniimagenet", "--source", str(src)], capsys, tmp_path / "o", f"{train}: holds a posix.system object")
    train.unlink()
    refused(["miniimagenet", "--source", str(src)], capsys, tmp_path / "o", "mini-imagenet-cache-train.pkl missing")


# -- tieredImageNet ---------------------------------------------------------------------------------

TIERED = {"train": 351, "val": 97, "test": 160}


@pytest.fixture(scope="module")
def tiered_png(tmp_path_factory) -> Path:
    return make_tiered(tmp_path_factory.mktemp("tiered") / "tiered-imagenet", TIERED)


def class_images(store: Path, split: str) -> dict[str, set[bytes]]:
    data = load_split(open_store(store), split)
    return {
        name: {bytes(img.numpy()) for img in data.images[data.offsets[i] : data.offsets[i + 1]]}
        for i, name in enumerate(data.classes)
    }


def test_tieredimagenet_png_release_and_npz_form_give_the_same_store(tiered_png, tmp_path):
    png = tmp_path / "png"
    prepare("tieredimagenet", "--source", str(tiered_png.parent), "--out", str(png))  # the tar's parent folder
    assert class_counts(png) == (351, 97, 160)
    info = open_store(png)
    assert info.image_shape == (3, 84, 84) and info.source["files"] == ["png"]
    assert info.splits["val"].classes[:2] == ["val class 0", "val class 1"]
    group = pq.read_table(png / "val.parquet", columns=["group"]).column(0).to_pylist()
    assert group[0] == "val category 0" and group[-1] == "val category 9"
    # the npz form (BGR, as the authors' decompress writes it), its images scattered over the file
    npz = make_tiered(tmp_path / "npz", TIERED, variant="npz", shuffled=True)
    prepare("tieredimagenet", "--source", str(npz), "--out", str(tmp_path / "from-npz"))
    for split in SPLITS:
        assert class_images(png, split) == class_images(tmp_path / "from-npz", split)
    assert not list((tmp_path / "from-npz").glob("*.scratch*"))
    small = tmp_path / "small"
    prepare("tieredimagenet", "--source", str(tiered_png), "--out", str(small), "--size", "16")
    train_two_steps(small, tmp_path / "run")


def test_a_pickled_list_is_streamed(tmp_path):
    """A Python 2 list of cv2-style arrays reaches the consumer 1000 items at a time, none kept after."""
    import gc
    import weakref

    items = [np.full((300, 1), i % 251, np.uint8) for i in range(2500)]
    py2_dump(items, tmp_path / "list.pkl")
    del items
    batches, alive, first = [], [], []
    stream_list(
        tmp_path / "list.pkl",
        "",
        lambda got: (
            batches.append(len(got)),
            alive.extend(weakref.ref(i) for i in got),
            first.append(int(got[0][0, 0])),
        ),
    )
    gc.collect()
    assert batches == [1000, 1000, 500] and first == [0, 1000 % 251, 2000 % 251]
    assert sum(r() is not None for r in alive) == 0


def test_damaged_or_foreign_tieredimagenet_files(tmp_path, capsys):
    clean = make_tiered(tmp_path / "clean", {"train": 4, "val": 3, "test": 6})
    src = tmp_path / "tiered"
    shutil.copytree(clean, src)
    images = src / "test_images_png.pkl"
    raw = images.read_bytes()
    images.write_bytes(raw[: len(raw) * 2 // 3])  # cut mid-list: some classes already streamed into the store
    refused(["tieredimagenet", "--source", str(src)], capsys, tmp_path / "o", f"{images}: truncated")
    pngs = load_pickle(clean / "test_images_png.pkl", "")
    pngs[9] = pngs[9][:100]  # a PNG cut short
    py2_dump(pngs, images)
    refused(
        ["tieredimagenet", "--source", str(src)], capsys, tmp_path / "o", f"{images}: item 9 is not a decodable PNG"
    )
    py2_dump(load_pickle(clean / "test_images_png.pkl", "")[:-1], images)  # one image short
    labels = src / "test_labels.pkl"
    refused(["tieredimagenet", "--source", str(src)], capsys, tmp_path / "o", f"{images}: holds 11 images")
    shutil.copy(clean / "test_images_png.pkl", images)
    py2_dump({"labels": np.zeros(12, np.int32)}, labels)
    refused(
        ["tieredimagenet", "--source", str(src)],
        capsys,
        tmp_path / "o",
        f"{labels}: expected a dict with 'label_specific'",
    )
    labels.unlink()
    refused(["tieredimagenet", "--source", str(src)], capsys, tmp_path / "o", f"{labels}: no such file")
    npz = make_tiered(tmp_path / "npz", {"train": 3, "val": 2, "test": 2}, variant="npz")
    blob = (npz / "val_images.npz").read_bytes()
    (npz / "val_images.npz").write_bytes(blob[: len(blob) // 2])
    refused(
        ["tieredimagenet", "--source", str(npz)],
        capsys,
        tmp_path / "o",
        f"{npz / 'val_images.npz'}: not a readable .npz",
    )


# -- CUB-200-2011 -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cub(tmp_path_factory) -> Path:
    return make_cub(tmp_path_factory.mktemp("cub"))


def test_cub_with_chen_et_al_split(cub, tmp_path):
    out = tmp_path / "cub"
    prepare("cub", "--source", str(cub.parent), "--out", str(out), "--size", "16")
    assert class_counts(out) == (100, 50, 50)
    info = open_store(out)
    for split, rest in (("train", (0, 2)), ("val", (1,)), ("test", (3,))):
        ids = [int(name.split(".")[0]) for name in info.splits[split].classes]
        assert all((i - 1) % (2 if split == "train" else 4) in rest for i in ids), split
    assert info.splits["val"].classes[:2] == ["002.Bird_2", "006.Bird_6"]
    assert info.splits["test"].classes[:2] == ["004.Bird_4", "008.Bird_8"]
    train_two_steps(out, tmp_path / "run")


def test_damaged_or_foreign_cub_files(cub, tmp_path, capsys):
    src = tmp_path / "CUB_200_2011"
    shutil.copytree(cub, src)
    bad = sorted((src / "images" / "200.Bird_200").iterdir())[0]  # meta-train's last class: written last
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a JPEG after all")
    refused(["cub", "--source", str(src)], capsys, tmp_path / "o", f"cannot decode image {bad}")
    bad.unlink()
    refused(
        ["cub", "--source", str(src)],
        capsys,
        tmp_path / "o",
        f"{src / 'images.txt'}: image 399 is {bad}, which does not exist",
    )
    (src / "images.txt").unlink()
    refused(["cub", "--source", str(src)], capsys, tmp_path / "o", f"{src / 'images.txt'}: no such file")


# -- Omniglot as torchvision downloads it -----------------------------------------------------------


@pytest.fixture(scope="module")
def omniglot_py(tmp_path_factory) -> Path:
    return make_omniglot_torchvision(tmp_path_factory.mktemp("omniglot"))


def test_omniglot_as_torchvision_leaves_it(omniglot_py, tmp_path):
    folder = omniglot_py
    out = tmp_path / "omniglot"
    prepare("omniglot", "--source", str(folder.parent), "--out", str(out), "--size", "16")
    info = open_store(out)
    base = [len([c for c in info.splits[s].classes if "/rot" not in c]) for s in SPLITS]
    assert base == [1100, 100, 423] and len(info.splits["train"].classes) == 4 * 1100  # the MAML paper's split
    assert omniglot_root(folder.parent) == folder == omniglot_root(folder)  # or pointed at omniglot-py/ itself
    assert json.loads((out / "metadata.json").read_text())["source"]["path"] == str(folder.resolve())
    train_two_steps(out, tmp_path / "run")


# -- the documented commands, as written ------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
TABLE_HEADER = "| command | format: what to point `--source` at | split it builds |"


def docs_table(path: Path) -> list[str]:
    lines = path.read_text().split(TABLE_HEADER, 1)[1].splitlines()[2:]
    return [line for line in (x.strip() for x in lines[: next(i for i, x in enumerate(lines) if not x.strip())])]


DOC_ROWS = docs_table(ROOT / "docs" / "data.md")
PAPER = {  # classes per split (Omniglot: characters before rotations)
    "cifarfs": (64, 16, 20),
    "fc100": (60, 20, 20),
    "miniimagenet": (64, 16, 20),
    "imagefolder": (3, 2, 2),  # the split files below
    "tieredimagenet": (351, 97, 160),
    "cub": (100, 50, 50),
    "omniglot": (1100, 100, 423),
    "glyphs": (900, 100, 200),
}


def test_the_readme_shows_the_docs_table_and_it_covers_every_kind():
    assert docs_table(ROOT / "README.md") == DOC_ROWS
    kinds = [row.split("`")[1].split()[2] for row in DOC_ROWS]
    assert sorted(kinds) == sorted(PAPER)


@pytest.mark.parametrize("row", [r for r in DOC_ROWS if "prepare glyphs" not in r], ids=lambda r: r.split()[3])
def test_each_documented_command_runs_as_written(row, cifar, tiered_png, cub, omniglot_py, tmp_path, monkeypatch):
    """The docs' command with DIR holding that format, run in an empty working folder: the store lands
    where the recipes read it, with the paper's classes per split."""
    import shlex

    from datagen import make_miniimagenet

    command = row.split("`")[1]
    kind = command.split()[2]
    source = tmp_path / "DIR"
    if kind in ("cifarfs", "fc100"):
        source.mkdir()
        (source / "cifar-100-python").symlink_to(cifar)
    elif kind == "miniimagenet":
        make_mini_cache(source, {"train": 64, "val": 16, "test": 20})
    elif kind == "imagefolder":
        split = {"train": {"n01": 2, "n02": 2, "n03": 2}, "val": {"n04": 2, "n05": 2}, "test": {"n06": 2, "n07": 2}}
        make_miniimagenet(source, split, size=(20, 24))
    elif kind == "tieredimagenet":
        source.mkdir()
        (source / "tiered-imagenet").symlink_to(tiered_png)
    elif kind == "cub":
        source.mkdir()
        (source / "CUB_200_2011").symlink_to(cub)
    elif kind == "omniglot":
        source.mkdir()
        (source / "omniglot-py").symlink_to(omniglot_py)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = shlex.split(command.replace("DIR", str(source)))
    assert argv[:2] == ["distmaml", "prepare"] and main(argv[1:]) == 0
    store = work / "data" / ("miniimagenet" if kind == "imagefolder" else kind)
    info = open_store(store)
    assert tuple(len([c for c in info.splits[s].classes if "/rot" not in c]) for s in SPLITS) == PAPER[kind]


def test_a_missing_benchmark_store_names_its_prepare_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--config", "omniglot_5w1s", "--workers", "0", "--set", "tracking.enabled=false"]
    assert main([*argv, "--set", "data.path=data/cifarfs"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "distmaml: error: data.path = 'data/cifarfs': no such folder; prepare one there with "
        "`distmaml prepare cifarfs --out data/cifarfs` or --set data.path=DATA_DIR"
    )

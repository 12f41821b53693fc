"""``distmaml prepare``: stores from both folder layouts, class splits, rotations, bad input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from datagen import make_imagefolder, make_miniimagenet, make_omniglot, write_image
from PIL import Image
from torchvision.transforms.v2 import functional as F

from distmaml.cli import main
from distmaml.data import DataError
from distmaml.data.glyphs import GlyphSpec, generate_glyphs, prepare_glyphs
from distmaml.data.imagefolder import prepare_imagefolder
from distmaml.data.omniglot import prepare_omniglot
from distmaml.data.store import METADATA, load_split, open_store


@pytest.fixture(scope="module")
def omniglot_src(tmp_path_factory):
    # 7 background characters (Alpha 4, Beta 3), 5 evaluation ones (Gamma 3, Delta 2)
    return make_omniglot(tmp_path_factory.mktemp("omniglot"))


def rows(store, split):
    return pq.read_table(store / f"{split}.parquet").to_pydict()


def test_omniglot_paper_split_sizes_disjoint_rotations(omniglot_src, tmp_path):
    out = tmp_path / "store"
    meta = prepare_omniglot(omniglot_src, out, size=20, train_classes=6, val_classes=2, seed=3)
    info = open_store(out)
    assert info.image_shape == (1, 20, 20) and meta["schema_version"] == 1
    base = {s: {n for n in info.splits[s].classes if "/rot" not in n} for s in info.splits}
    assert [len(base[s]) for s in ("train", "val", "test")] == [6, 2, 4]
    assert not (base["train"] & base["val"]) and not (base["train"] & base["test"]) and not (base["val"] & base["test"])
    assert len(base["train"] | base["val"] | base["test"]) == 12
    # rotations only in meta-train, three per character, each the exact rotation of the original
    assert len(info.splits["train"].classes) == 24
    for split in ("val", "test"):
        assert set(rows(out, split)["rotation"]) == {0}
        assert not [n for n in info.splits[split].classes if "/rot" in n]
    train = load_split(info, "train")
    name = sorted(base["train"])[0]
    idx = {n: i for i, n in enumerate(train.classes)}
    orig = train.images[train.offsets[idx[name]] : train.offsets[idx[name] + 1]]
    for angle in (90, 180, 270):
        c = idx[f"{name}/rot{angle:03d}"]
        turned = train.images[train.offsets[c] : train.offsets[c + 1]]
        assert torch.equal(turned, torch.rot90(orig, angle // 90, (2, 3)))
    # the stored pixels are the source image decoded independently (PIL), then resized
    table = rows(out, "train")
    i = table["class"].index(name)
    src = torch.from_numpy(np.array(Image.open(omniglot_src / table["file"][i]).convert("L")))[None]
    assert torch.equal(orig[0], F.resize(src, [20, 20], antialias=True))
    assert table["group"][i] == name.split("/")[0]
    # the same seed gives the same split, another seed another one
    again = prepare_omniglot(omniglot_src, tmp_path / "again", size=20, train_classes=6, val_classes=2, seed=3)
    other = prepare_omniglot(omniglot_src, tmp_path / "other", size=20, train_classes=6, val_classes=2, seed=4)
    assert again["splits"] == meta["splits"] and other["splits"]["test"] != meta["splits"]["test"]


def test_omniglot_alphabet_split_and_no_rotations(omniglot_src, tmp_path):
    prepare_omniglot(omniglot_src, tmp_path / "s", size=16, split="alphabets", val_classes=2, rotations=False)
    info = open_store(tmp_path / "s")
    test = set(info.splits["test"].classes)
    assert test == {f"{a}/character{c:02d}" for a, n in (("Gamma", 3), ("Delta", 2)) for c in range(1, n + 1)}
    assert len(info.splits["val"].classes) == 2 and len(info.splits["train"].classes) == 5
    assert not {a.split("/")[0] for a in info.splits["train"].classes + info.splits["val"].classes} & {"Gamma", "Delta"}
    assert set(rows(tmp_path / "s", "train")["rotation"]) == {0}
    assert info.splits["train"].counts == [4] * 5


def test_imagefolder_with_ravi_larochelle_split_files(tmp_path):
    splits = {"train": {"n01": 5, "n02": 5, "n03": 5}, "val": {"n04": 5, "n05": 5}, "test": {"n06": 5, "n07": 6}}
    src = make_miniimagenet(tmp_path / "mini", splits)
    prepare_imagefolder(src, tmp_path / "store", size=24, split_files=src / "splits")
    info = open_store(tmp_path / "store")
    assert info.image_shape == (3, 24, 24)
    for split, classes in splits.items():
        assert dict(zip(info.splits[split].classes, info.splits[split].counts)) == classes
    test = load_split(info, "test")
    assert test.images.shape == (11, 3, 24, 24) and test.offsets.tolist() == [0, 5, 11]


def test_imagefolder_tree_split_by_proportions(tmp_path):
    src = make_imagefolder(tmp_path / "tree", {f"c{i}": 4 for i in range(10)}, suffix=".jpg")
    (src / "notes.txt").write_text("not a class")
    prepare_imagefolder(src, tmp_path / "store", size=16, proportions=(0.6, 0.2, 0.2), seed=1)
    info = open_store(tmp_path / "store")
    sizes = [len(info.splits[s].classes) for s in ("train", "val", "test")]
    assert sizes == [6, 2, 2]
    assert sorted(sum((info.splits[s].classes for s in info.splits), [])) == sorted(f"c{i}" for i in range(10))


def test_glyphs_deterministic_and_split(tmp_path):
    spec = GlyphSpec(classes=30, drawings=6, size=20, val_classes=5, test_classes=7, seed=5)
    a, b = generate_glyphs(spec), generate_glyphs(spec)
    assert a.shape == (30, 6, 1, 20, 20) and a.dtype == torch.uint8 and torch.equal(a, b)
    assert not torch.equal(
        a, generate_glyphs(GlyphSpec(classes=30, drawings=6, size=20, val_classes=5, test_classes=7, seed=6))
    )
    # ink on white, every drawing has some ink, and drawings of a class differ (jitter)
    assert (a.flatten(2).min(-1).values < 64).all() and (a.flatten(2).float().mean(-1) > 128).all()
    assert not torch.equal(a[0, 0], a[0, 1])
    prepare_glyphs(tmp_path / "g", spec)
    info = open_store(tmp_path / "g")
    assert [len(info.splits[s].classes) for s in ("train", "val", "test")] == [18, 5, 7]
    test = load_split(info, "test")
    assert torch.equal(test.images.view(7, 6, 1, 20, 20), a[23:])


# -- bad input ------------------------------------------------------------------------------


def test_missing_and_misshapen_sources(tmp_path, omniglot_src):
    with pytest.raises(DataError, match="no such folder"):
        prepare_omniglot(tmp_path / "nope", tmp_path / "o")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="images_background/ and images_evaluation/"):
        prepare_omniglot(tmp_path / "flat", tmp_path / "o")
    loose = tmp_path / "loose" / "images_background" / "Alpha"
    write_image(loose / "0001_01.png", torch.zeros(1, 8, 8, dtype=torch.uint8))
    with pytest.raises(DataError, match="Alpha: no character folders"):
        prepare_omniglot(tmp_path / "loose", tmp_path / "o")
    with pytest.raises(DataError, match="source has 12"):
        prepare_omniglot(omniglot_src, tmp_path / "o")  # the paper split needs > 1200 characters
    with pytest.raises(DataError, match="no class folders with images"):
        prepare_imagefolder(tmp_path / "flat", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_corrupt_image_is_named_and_nothing_is_left(omniglot_src, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(omniglot_src, src)
    bad = src / "images_evaluation" / "Delta" / "character02" / "0012_03.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    out = tmp_path / "out"
    # alphabets split: the bad file is in meta-test, written last, after train.parquet was staged
    with pytest.raises(DataError, match=r"cannot decode image .*Delta/character02/0012_03\.png"):
        prepare_omniglot(src, out, size=16, split="alphabets", val_classes=2)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [src]  # no temporary folder either


def test_split_file_errors(tmp_path):
    splits = {"train": {"a": 3, "b": 3}, "val": {"c": 3}, "test": {"d": 3}}
    src = make_miniimagenet(tmp_path / "mini", splits)
    (src / "images" / "b00000001.jpg").unlink()
    with pytest.raises(DataError, match=r"train\.csv line 6 names image 'b00000001\.jpg' of class 'b'"):
        prepare_imagefolder(src, tmp_path / "o", split_files=src / "splits")
    with pytest.raises(DataError, match="nosuch: no such folder"):
        prepare_imagefolder(src, tmp_path / "o", split_files=src / "nosuch")
    (src / "splits" / "train.csv").write_text("filename,label\na00000000.jpg,a\n")
    (src / "splits" / "val.csv").write_text("file,class\nc00000000.jpg,c\n")
    with pytest.raises(DataError, match=r"val\.csv: the first line must be the header 'filename,label'"):
        prepare_imagefolder(src, tmp_path / "o", split_files=src / "splits")
    (src / "splits" / "val.csv").write_text("filename,label\na00000001.jpg,a\n")
    with pytest.raises(DataError, match="class 'a' is also in train.csv"):
        prepare_imagefolder(src, tmp_path / "o", split_files=src / "splits")
    assert not (tmp_path / "o").exists()


def test_existing_store_needs_overwrite_and_schema_version_is_checked(tmp_path):
    spec = GlyphSpec(classes=12, drawings=3, size=16, val_classes=2, test_classes=2)
    out = tmp_path / "g"
    prepare_glyphs(out, spec)
    with pytest.raises(DataError, match="already holds a task store; pass --overwrite"):
        prepare_glyphs(out, spec)
    prepare_glyphs(
        out, GlyphSpec(classes=12, drawings=3, size=16, val_classes=2, test_classes=2, seed=9), overwrite=True
    )
    assert open_store(out).source["seed"] == 9 and sorted(p.name for p in tmp_path.iterdir()) == ["g"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not an empty folder or a task store"):
        prepare_glyphs(tmp_path / "other", spec, overwrite=True)
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"
    meta = json.loads((out / METADATA).read_text())
    meta["schema_version"] = 0
    (out / METADATA).write_text(json.dumps(meta))
    with pytest.raises(DataError, match="schema version 0, this distmaml reads version 1"):
        open_store(out)
    with pytest.raises(DataError, match="no task store at"):
        open_store(tmp_path / "other")


def test_cli_prepare_success_and_one_line_errors(tmp_path, omniglot_src, capsys):
    out = tmp_path / "om"
    args = ["prepare", "omniglot", "--source", str(omniglot_src), "--out", str(out), "--size", "16"]
    assert main([*args, "--train-classes", "6", "--val-classes", "2"]) == 0
    printed = capsys.readouterr().out
    assert "task store written to" in printed and "train 24 classes / 96 images" in printed
    assert main([*args, "--train-classes", "6", "--val-classes", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distmaml: error: --out") and "--overwrite" in err and err.count("\n") == 1
    assert main(["prepare", "imagefolder", "--source", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert (
        main(
            [
                "prepare",
                "glyphs",
                "--out",
                str(tmp_path / "gl"),
                "--classes",
                "12",
                "--val-classes",
                "2",
                "--test-classes",
                "2",
                "--drawings",
                "3",
                "--size",
                "16",
            ]
        )
        == 0
    )
    assert open_store(tmp_path / "gl").image_shape == (1, 16, 16)

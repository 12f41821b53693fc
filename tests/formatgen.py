"""The few-shot benchmarks' files as their releases lay them out, filled with generated images.

Each ``make_*`` writes the same folder and file names, pickle keys, dtypes
and pickle protocol as the real release (CIFAR-100's python version, the
miniImageNet caches, Ren et al.'s tieredImageNet, CUB-200-2011,
torchvision's Omniglot), with few or tiny images, so ``distmaml prepare``
meets the real format at test speed.

``py2_dump`` writes a pickle as Python 2.7's ``cPickle.dump(obj, f, 2)``
does: protocol 2, text as Python 2 ``str`` (``SHORT_BINSTRING``/``BINSTRING``,
which Python 3 reads back as ``str`` with ``encoding="latin1"``), and NumPy
arrays reduced through ``numpy.core.multiarray._reconstruct`` with their
bytes as such a string. CIFAR-100's pickles, Ren et al.'s miniImageNet
caches and tieredImageNet's pickles are of this kind.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datagen import write_image
from torchvision.io import encode_png

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # NumPy 1
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined,misc]
    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def _save_py2_str(self, obj: bytes | str) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj is _reconstruct:  # Python 2's NumPy named its module numpy.core
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def _class_images(seed: int, n: int, channels: int, height: int, width: int) -> torch.Tensor:
    """uint8 ``[n, C, H, W]``: a pattern of the class plus noise per image (as datagen's, faster)."""
    rng = np.random.default_rng(seed)
    base = rng.random((channels, height, width), dtype=np.float32)
    noise = rng.random((n, channels, height, width), dtype=np.float32) * 0.3
    return torch.from_numpy(((base[None] * 0.7 + noise) * 255).clip(0, 255).astype(np.uint8))


def py2_dump(obj: Any, path: Path) -> None:
    """Writes ``obj`` as Python 2.7's ``cPickle.dump(obj, f, protocol=2)`` would."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


def py3_dump(obj: Any, path: Path) -> None:
    """Python 3's ``pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)`` (re-saved copies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)


# -- CIFAR-100, python version (torchvision.datasets.CIFAR100(download=True)) -----------------------

CIFAR_COARSE = [
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
    "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
    "vehicles_1", "vehicles_2",
]  # fmt: skip
CIFAR_FINE_BY_COARSE = [
    ["beaver", "dolphin", "otter", "seal", "whale"],
    ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    ["orchid", "poppy", "rose", "sunflower", "tulip"],
    ["bottle", "bowl", "can", "cup", "plate"],
    ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    ["clock", "keyboard", "lamp", "telephone", "television"],
    ["bed", "chair", "couch", "table", "wardrobe"],
    ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    ["bear", "leopard", "lion", "tiger", "wolf"],
    ["bridge", "castle", "house", "road", "skyscraper"],
    ["cloud", "forest", "mountain", "plain", "sea"],
    ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    ["fox", "porcupine", "possum", "raccoon", "skunk"],
    ["crab", "lobster", "snail", "spider", "worm"],
    ["baby", "boy", "girl", "man", "woman"],
    ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
]
# CIFAR-100's meta lists the fine labels alphabetically; a fine label's index is its place there.
CIFAR_FINE = sorted(name for names in CIFAR_FINE_BY_COARSE for name in names)


def make_cifar100(root: Path, train_per_class: int = 1, test_per_class: int = 1) -> Path:
    """``root/cifar-100-python/{train,test,meta}``: Python 2 pickles, ``data`` uint8 [N, 3072] (RGB planes)."""
    folder = root / "cifar-100-python"
    coarse_of = {f: c for c, names in enumerate(CIFAR_FINE_BY_COARSE) for f in names}
    py2_dump({"fine_label_names": CIFAR_FINE, "coarse_label_names": CIFAR_COARSE}, folder / "meta")
    rng = np.random.default_rng(0)
    for part, per_class in (("train", train_per_class), ("test", test_per_class)):
        seed = 1000 if part == "train" else 2000
        pixels = np.concatenate([_class_images(seed + f, per_class, 3, 32, 32).numpy() for f in range(100)])
        order = rng.permutation(len(pixels))  # the real files are not grouped by class
        fine = [int(i) // per_class for i in order]
        data = pixels.reshape(len(pixels), -1)[order]
        entry = {
            "filenames": [f"{CIFAR_FINE[f]}_s_{i:06d}.png" for i, f in enumerate(fine)],
            "batch_label": f"{'training' if part == 'train' else 'testing'} batch 1 of 1",
            "fine_labels": fine,
            "coarse_labels": [coarse_of[CIFAR_FINE[f]] for f in fine],
            "data": data.astype(np.uint8),
        }
        py2_dump(entry, folder / part)
    return folder


# -- miniImageNet caches (Ren et al.'s few-shot-ssl-public, as learn2learn downloads them) ---------


def make_mini_cache(root: Path, classes: dict[str, int], dump: Any = py2_dump) -> Path:
    """``root/mini-imagenet-cache-{train,val,test}.pkl``: {'image_data': uint8 [N,84,84,3], 'class_dict'}.

    ``classes`` maps a split to its class count; class names are made-up synsets.
    """
    n = 0
    for split, count in classes.items():
        names = [f"n{9000000 + n + i:08d}" for i in range(count)]
        per = 2
        images = np.concatenate(
            [_class_images(7000 + n + j, per, 3, 84, 84).permute(0, 2, 3, 1).numpy() for j in range(count)]
        )
        class_dict = {name: list(range(i * per, (i + 1) * per)) for i, name in enumerate(names)}
        n += count
        dump({"image_data": images, "class_dict": class_dict}, root / f"mini-imagenet-cache-{split}.pkl")
    return root


# -- tieredImageNet (Ren et al. 2018) ---------------------------------------------------------------


def make_tiered(
    root: Path, classes: dict[str, int], per_class: int = 2, variant: str = "png", shuffled: bool = False
) -> Path:
    """``root/{split}_images_png.pkl`` (or ``{split}_images.npz``) and ``root/{split}_labels.pkl``.

    The PNG pickle is a list of ``cv2.imencode('.png', bgr_image)[1]`` arrays (uint8 [n, 1]); the
    npz holds ``images`` uint8 [N, 84, 84, 3] in cv2's BGR order. Labels: ``label_specific``
    (int32 per image), ``label_general``, ``label_specific_str``, ``label_general_str``.
    """
    root.mkdir(parents=True, exist_ok=True)
    for split, count in classes.items():
        specific = np.repeat(np.arange(count, dtype=np.int32), per_class)
        general = (specific // 10).astype(np.int32)
        rgb = np.concatenate(
            [_class_images(31 * count + c, per_class, 3, 84, 84).numpy() for c in range(count)]
        )  # [N, 3, 84, 84]
        if shuffled:
            order = np.random.default_rng(1).permutation(len(specific))
            specific, general, rgb = specific[order], general[order], rgb[order]
        labels = {
            "label_specific": specific,
            "label_general": general,
            "label_specific_str": [f"{split} class {c}" for c in range(count)],
            "label_general_str": [f"{split} category {g}" for g in range(int(general.max()) + 1)],
        }
        py2_dump(labels, root / f"{split}_labels.pkl")
        if variant == "png":
            # a PNG of an RGB image decodes to RGB; cv2 wrote it from BGR and stored RGB, as PNG wants
            pngs = [encode_png(torch.from_numpy(img)).numpy().reshape(-1, 1) for img in rgb]
            py2_dump(pngs, root / f"{split}_images_png.pkl")
        else:
            bgr = np.ascontiguousarray(rgb.transpose(0, 2, 3, 1)[..., ::-1])
            np.savez(root / f"{split}_images.npz", images=bgr)
    return root


def npz_member_bytes(path: Path, member: str = "images.npy") -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(member)


# -- CUB-200-2011 ---------------------------------------------------------------------------------


def make_cub(root: Path, classes: int = 200, per_class: int = 2, size: tuple[int, int] = (20, 24)) -> Path:
    """``root/CUB_200_2011/``: images/<NNN.Name>/<Name>_<id>.jpg, images.txt, image_class_labels.txt,
    classes.txt (1-based ids, space-separated), train_test_split.txt."""
    folder = root / "CUB_200_2011"
    class_lines, image_lines, label_lines, split_lines = [], [], [], []
    image_id = 0
    for c in range(1, classes + 1):
        name = f"{c:03d}.Bird_{c}"
        class_lines.append(f"{c} {name}")
        imgs = _class_images(5000 + c, per_class, 3, *size)
        for k in range(per_class):
            image_id += 1
            rel = f"{name}/Bird_{c}_{image_id:04d}_{k}.jpg"
            write_image(folder / "images" / rel, imgs[k])
            image_lines.append(f"{image_id} {rel}")
            label_lines.append(f"{image_id} {c}")
            split_lines.append(f"{image_id} {k % 2}")
    for name, lines in (
        ("classes.txt", class_lines),
        ("images.txt", image_lines),
        ("image_class_labels.txt", label_lines),
        ("train_test_split.txt", split_lines),
    ):
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


# -- Omniglot as torchvision.datasets.Omniglot(root, download=True) leaves it ------------------------

# Omniglot's 30 background alphabets hold 964 characters, its 20 evaluation alphabets 659.
OMNIGLOT_BACKGROUND = [33] * 4 + [32] * 26  # 964
OMNIGLOT_EVALUATION = [33] * 19 + [32]  # 659


def make_omniglot_torchvision(root: Path, drawings: int = 2, size: int = 16) -> Path:
    """``root/omniglot-py/images_{background,evaluation}/<Alphabet>/characterNN/<id>_NN.png``, with the
    zip files torchvision downloads beside them; the real alphabet and character counts."""
    folder = root / "omniglot-py"
    image = torch.zeros(1, size, size, dtype=torch.uint8)
    image[:, size // 4 : size // 2, 2:-2] = 255
    seed = 0
    for part, counts in (("images_background", OMNIGLOT_BACKGROUND), ("images_evaluation", OMNIGLOT_EVALUATION)):
        for a, n in enumerate(counts):
            for c in range(1, n + 1):
                seed += 1
                for d in range(1, drawings + 1):
                    pixels = torch.roll(image, shifts=(seed % size, d), dims=(1, 2))
                    path = folder / part / f"Alphabet_{a:02d}" / f"character{c:02d}" / f"{seed:04d}_{d:02d}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(bytes(encode_png(pixels).numpy()))
        (folder / f"{part}.zip").write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip, as a stand-in
    return folder

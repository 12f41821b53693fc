"""Small image data sets written by the tests, in the folder layouts ``prepare`` reads.

Every class has its own random blot pattern, every image of it a noisy copy,
so images are distinct (no two rows of a store are equal) and classes are
told apart by their pixels.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.io import encode_jpeg, encode_png, write_file


def _class_images(seed: int, n: int, channels: int, height: int, width: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(channels, height, width, generator=g)
    noise = torch.rand(n, channels, height, width, generator=g) * 0.3
    return ((base[None] * 0.7 + noise) * 255).clamp(0, 255).to(torch.uint8)


def write_image(path: Path, image: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = encode_jpeg(image, quality=95) if path.suffix == ".jpg" else encode_png(image)
    write_file(str(path), data)


def make_omniglot(
    root: Path,
    background: dict[str, int] | None = None,
    evaluation: dict[str, int] | None = None,
    drawings: int = 4,
    size: int = 35,
) -> Path:
    """``root/images_background|images_evaluation/<alphabet>/characterNN/NNNN_MM.png`` (grey)."""
    background = {"Alpha": 4, "Beta": 3} if background is None else background
    evaluation = {"Gamma": 3, "Delta": 2} if evaluation is None else evaluation
    seed = 0
    for part, alphabets in (("images_background", background), ("images_evaluation", evaluation)):
        for alphabet, characters in alphabets.items():
            for c in range(1, characters + 1):
                seed += 1
                imgs = _class_images(seed, drawings, 1, size, size)
                for d in range(drawings):
                    write_image(root / part / alphabet / f"character{c:02d}" / f"{seed:04d}_{d + 1:02d}.png", imgs[d])
    return root


def make_imagefolder(
    root: Path, classes: dict[str, int], size: tuple[int, int] = (30, 40), suffix: str = ".png"
) -> Path:
    """``root/<class>/<class>_NN.png`` (RGB); ``classes`` maps class name to image count."""
    for i, (name, count) in enumerate(classes.items()):
        imgs = _class_images(100 + i, count, 3, *size)
        for k in range(count):
            write_image(root / name / f"{name}_{k:02d}{suffix}", imgs[k])
    return root


def make_miniimagenet(root: Path, splits: dict[str, dict[str, int]], size: tuple[int, int] = (30, 40)) -> Path:
    """The original miniImageNet layout: flat ``root/images/`` and ``root/splits/{train,val,test}.csv``."""
    i = 0
    for split, classes in splits.items():
        lines = ["filename,label"]
        for name, count in classes.items():
            imgs = _class_images(200 + i, count, 3, *size)
            i += 1
            for k in range(count):
                filename = f"{name}{k:08d}.jpg"
                write_image(root / "images" / filename, imgs[k])
                lines.append(f"{filename},{name}")
        (root / "splits").mkdir(parents=True, exist_ok=True)
        (root / "splits" / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root

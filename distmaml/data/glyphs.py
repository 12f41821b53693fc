"""Procedural Omniglot-like glyphs: image classification with no files to fetch.

Each class is a random character: one to four pen strokes, each a smooth
cubic Bezier curve. Each drawing of a class is the character drawn again by a
slightly unsteady hand: every control point moves a little, then the whole
drawing is rotated, scaled, sheared and shifted a little, with its own pen
width. Drawings are rendered with antialiasing, dark ink on white as in
Omniglot. Everything is a pure function of the seed.

``jitter`` scales every perturbation (1.0: the default difficulty); the
distance between characters is set by the stroke statistics.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distmaml.data.errors import DataError

MAX_STROKES = 4
CONTROL_POINTS = 4
CURVE_SAMPLES = 64
GENERATOR_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class GlyphSpec:
    """What a glyph data set is made of; the defaults are the ``glyphs`` family's."""

    classes: int = 1200
    drawings: int = 20
    size: int = 28
    val_classes: int = 100
    test_classes: int = 200
    jitter: float = 1.0
    seed: int = 0

    def check(self) -> None:
        if self.size < 16:
            raise DataError(f"--size {self.size}: must be at least 16")
        if self.drawings < 2:
            raise DataError(f"--drawings {self.drawings}: must be at least 2")
        if self.jitter < 0:
            raise DataError(f"--jitter {self.jitter}: must be 0 or more")
        if min(self.val_classes, self.test_classes) < 1 or self.classes - self.val_classes - self.test_classes < 1:
            raise DataError(
                f"--classes {self.classes} with --val-classes {self.val_classes} and --test-classes "
                f"{self.test_classes}: every split needs at least one class; raise --classes"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "glyphs", "generator_version": GENERATOR_VERSION, **asdict(self)}


def _characters(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Control points ``[n, MAX_STROKES, CONTROL_POINTS, 2]`` and stroke masks ``[n, MAX_STROKES]``.

    Each character is centred and scaled so that its control points span
    about 70% of the frame, as Omniglot's characters roughly fill theirs.
    """
    strokes = torch.randint(1, MAX_STROKES + 1, (n,), generator=g)
    mask = torch.arange(MAX_STROKES)[None, :] < strokes[:, None]
    start = torch.rand(n, MAX_STROKES, 2, generator=g) * 2 - 1
    heading = torch.rand(n, MAX_STROKES, generator=g) * 2 * math.pi
    points = [start]
    for _ in range(CONTROL_POINTS - 1):
        heading = heading + torch.randn(n, MAX_STROKES, generator=g) * 1.2
        length = 0.4 + 0.6 * torch.rand(n, MAX_STROKES, generator=g)
        step = torch.stack([torch.cos(heading), torch.sin(heading)], -1) * length[..., None]
        points.append(points[-1] + step)
    control = torch.stack(points, 2)  # [n, S, K, 2]
    m = mask[:, :, None, None]
    low = control.masked_fill(~m, float("inf")).amin((1, 2))
    high = control.masked_fill(~m, float("-inf")).amax((1, 2))
    centre, half = (low + high) / 2, ((high - low) / 2).amax(-1).clamp_min(0.2)
    return (control - centre[:, None, None]) * (0.7 / half)[:, None, None, None], mask


def _drawings(control: Tensor, drawings: int, jitter: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Jittered control points ``[n, D, S, K, 2]`` and pen strengths ``[n, D]`` (thicker when larger)."""
    n = control.shape[0]
    pts = control[:, None].expand(n, drawings, *control.shape[1:])
    pts = pts + torch.randn(pts.shape, generator=g) * 0.05 * jitter
    angle = torch.randn(n, drawings, generator=g) * math.radians(8) * jitter
    scale = torch.exp(torch.randn(n, drawings, generator=g) * 0.08 * jitter)
    shear = torch.randn(n, drawings, generator=g) * 0.08 * jitter
    shift = torch.randn(n, drawings, 2, generator=g) * 0.06 * jitter
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    a = torch.stack([torch.stack([cos, -sin + shear * cos], -1), torch.stack([sin, cos + shear * sin], -1)], -2)
    pts = torch.einsum("ndij,ndskj->ndski", a, pts) + shift[:, :, None, None, :]
    pen = 2.6 + 1.4 * torch.rand(n, drawings, generator=g)
    return pts, pen


def _render(control: Tensor, mask: Tensor, pen: Tensor, size: int, chunk: int = 1024) -> Tensor:
    """Antialiased strokes as uint8 ``[B, 1, size, size]``, dark ink on white.

    Dense points along each Bezier curve are splatted bilinearly onto the
    pixel grid, blurred with a Gaussian pen and saturated: about 20x cheaper
    than exact point-to-segment distances, and as smooth.

    Args:
        control: ``[B, S, K, 2]`` control points in [-1, 1] (x right, y down).
        mask: ``[B, S]`` which strokes exist.
        pen: ``[B]`` ink gain (stroke thickness).
    """
    t = torch.linspace(0, 1, CURVE_SAMPLES)
    basis = torch.stack([(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t**2 * (1 - t), t**3], -1)  # [samples, K]
    radius = torch.arange(-2, 3, dtype=torch.float32)
    kernel1d = torch.exp(-(radius**2) / 2)
    kernel = (kernel1d[:, None] * kernel1d[None, :] / kernel1d.sum() ** 2)[None, None]
    out = []
    for start in range(0, control.shape[0], chunk):
        c, m, p = control[start : start + chunk], mask[start : start + chunk], pen[start : start + chunk]
        b = c.shape[0]
        xy = torch.einsum("lk,bskx->bslx", basis, c)  # [b, S, samples, 2]
        xy = (xy + 1) / 2 * size - 0.5  # pixel coordinates
        # each sample carries the arc length around it, so ink per pixel of stroke is 1 whatever its length
        step = (xy[:, :, 1:] - xy[:, :, :-1]).norm(dim=-1)
        arc = (torch.nn.functional.pad(step, (0, 1)) + torch.nn.functional.pad(step, (1, 0))) / 2
        weight = (arc * m[:, :, None]).reshape(b, -1)
        xy = xy.reshape(b, -1, 2)
        base = xy.floor()
        frac = xy - base
        grid = torch.zeros(b, size * size)
        for dx in (0, 1):
            for dy in (0, 1):
                px, py = base[..., 0] + dx, base[..., 1] + dy
                w = (frac[..., 0] if dx else 1 - frac[..., 0]) * (frac[..., 1] if dy else 1 - frac[..., 1])
                inside = (px >= 0) & (px < size) & (py >= 0) & (py < size)
                index = (py.clamp(0, size - 1) * size + px.clamp(0, size - 1)).long()
                grid.scatter_add_(1, index, w * weight * inside)
        density = torch.nn.functional.conv2d(grid.view(b, 1, size, size), kernel, padding=2)
        ink = (density * p[:, None, None, None]).clamp(0, 1)
        out.append(((1 - ink) * 255).round().to(torch.uint8))
    return torch.cat(out)


def generate_glyphs(spec: GlyphSpec) -> Tensor:
    """uint8 ``[classes, drawings, 1, size, size]``, a pure function of ``spec``.

    Example:
        >>> imgs = generate_glyphs(GlyphSpec(classes=10, drawings=20, seed=0))
        >>> imgs.shape
        torch.Size([10, 20, 1, 28, 28])
    """
    spec.check()
    g = torch.Generator().manual_seed(spec.seed)
    control, mask = _characters(spec.classes, g)
    points, pen = _drawings(control, spec.drawings, spec.jitter, g)
    n, d = spec.classes, spec.drawings
    flat_mask = mask[:, None].expand(n, d, MAX_STROKES).reshape(n * d, MAX_STROKES)
    images = _render(points.reshape(n * d, MAX_STROKES, CONTROL_POINTS, 2), flat_mask, pen.reshape(-1), spec.size)
    return images.view(n, d, 1, spec.size, spec.size)


def prepare_glyphs(out: str | Path, spec: GlyphSpec | None = None, *, overwrite: bool = False, keep_existing=False):  # type: ignore[no-untyped-def]
    """Generates the glyph set and writes it as a task store at ``out``; returns the metadata.

    Classes are i.i.d., so the split is by index: the first for meta-train,
    then ``val_classes``, then ``test_classes``.
    """
    from distmaml.data.prepare import check_output, staged_output
    from distmaml.data.store import ClassImages, StoreWriter

    spec = spec or GlyphSpec()
    spec.check()
    check_output(Path(out).expanduser(), overwrite or keep_existing)  # refuse before generating, not after
    began = time.perf_counter()
    images = generate_glyphs(spec)
    n_train = spec.classes - spec.val_classes - spec.test_classes
    bounds = {
        "train": (0, n_train),
        "val": (n_train, n_train + spec.val_classes),
        "test": (n_train + spec.val_classes, spec.classes),
    }
    with staged_output(out, overwrite, keep_existing=keep_existing) as tmp:
        writer = StoreWriter(tmp, (1, spec.size, spec.size))
        for split, (lo, hi) in bounds.items():
            classes = [ClassImages(f"glyph{i:05d}", "glyphs", images[i], []) for i in range(lo, hi)]
            writer.write_split(split, classes)
        meta = writer.finish({**spec.to_dict(), "seconds": round(time.perf_counter() - began, 2)})
    return meta

"""A small image-folder dataset that tfxfer draws itself: shapes on noisy backgrounds.

It exists so that the image recipe can run anywhere, offline, in minutes, and so tests have
real PNG files in a real folder layout. Three classes (circle, square, triangle), random
colours, sizes and positions; deterministic for a given seed.
"""

from __future__ import annotations

import os

import numpy as np

SHAPES = ("circle", "square", "triangle")


def _draw(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    background = rng.integers(0, 120, size=3)
    image = np.clip(background + rng.normal(0, 12, (size, size, 3)), 0, 255)
    colour = rng.integers(130, 256, size=3)
    radius = rng.uniform(0.2, 0.35) * size
    cy, cx = rng.uniform(radius, size - radius, size=2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    elif shape == "square":
        half = radius * 0.85
        mask = (np.abs(yy - cy) <= half) & (np.abs(xx - cx) <= half)
    else:  # an upward triangle
        top, bottom = cy - radius, cy + radius * 0.8
        half_width = (yy - top) / (bottom - top) * radius
        mask = (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half_width)
    image[mask] = colour
    return image.astype(np.uint8)


def write_shapes_dataset(
    directory: str, *, per_class: int = 40, image_size: int = 48, seed: int = 0
) -> str:
    """Writes `per_class` PNG images of each shape into `directory/<shape>/`.

    Args:
        directory: str. Created if missing; existing files with the same names are replaced.
        per_class: int. Images per class. Defaults to `40`.
        image_size: int. Side of each image in pixels. Defaults to `48`.
        seed: int. Defaults to `0`.

    Returns:
        `directory`.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    for shape in SHAPES:
        os.makedirs(os.path.join(directory, shape), exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_draw(shape, image_size, rng)).save(
                os.path.join(directory, shape, f"{shape}_{i:04d}.png")
            )
    return directory


def demo_shapes_dir(output_dir: str, seed: int = 0) -> str:
    """The demo shapes folder an image recipe uses without `--data-dir`, drawn on first use.

    It lies beside the run (`<output_dir>-data/shapes`), or for a cloud `output_dir` in a
    local temporary folder, and is drawn (60 images of 64 px per shape) only if missing.
    """
    import tempfile

    beside = output_dir + "-data" if "://" not in output_dir else None
    directory = os.path.join(beside or tempfile.mkdtemp(prefix="tfxfer-shapes-"), "shapes")
    if not os.path.isdir(directory):
        print(f"[tfxfer] no --data-dir: drawing the demo shapes dataset into {directory}")
        write_shapes_dataset(directory, per_class=60, image_size=64, seed=seed)
    return directory

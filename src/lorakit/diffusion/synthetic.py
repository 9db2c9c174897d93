"""A synthetic captioned image set (coloured shapes on a plain background), written in kohya's layout,
for offline demos and tests: ``<root>/<repeats>_shapes/NNN.png`` + ``NNN.txt`` ("a red circle")."""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (230, 210, 30)}
SHAPES = ("circle", "square", "triangle")


def draw(shape: str, colour: str, size: int, rng: np.random.Generator) -> np.ndarray:
    img = np.full((size, size, 3), 235, dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    c = size / 2 + rng.uniform(-size / 10, size / 10, 2)
    r = size * rng.uniform(0.25, 0.35)
    if shape == "circle":
        mask = (yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= r * r
    elif shape == "square":
        mask = (abs(yy - c[0]) <= r * 0.85) & (abs(xx - c[1]) <= r * 0.85)
    else:
        mask = (yy >= c[0] - r) & (yy <= c[0] + r) & (abs(xx - c[1]) <= (yy - (c[0] - r)) / 2)
    img[mask] = COLOURS[colour]
    return img


def write_shapes(root: str | Path, count: int = 8, size: int = 32, repeats: int = 2, seed: int = 0,
                 colours=("red",), shapes=SHAPES) -> Path:
    from PIL import Image

    root = Path(root)
    folder = root / f"{repeats}_shapes"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        colour, shape = colours[i % len(colours)], shapes[(i // len(colours)) % len(shapes)]
        Image.fromarray(draw(shape, colour, size, rng)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a {colour} {shape}\n", encoding="utf-8")
    return root


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m lorakit.diffusion.synthetic",
                                description="Write a synthetic captioned shapes set in kohya's layout.")
    p.add_argument("root")
    p.add_argument("--count", type=int, default=12)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--colours", default="red", help="comma-separated: " + ",".join(COLOURS))
    a = p.parse_args(argv)
    root = write_shapes(a.root, a.count, a.size, a.repeats, colours=tuple(a.colours.split(",")))
    print(f"wrote {a.count} images with captions under {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

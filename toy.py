"""The toy world: synthetic high-resolution VQA where the target can be LOCATED at low resolution
but only READ at full resolution.

Contract
--------
`make_item(seed)` draws a deterministic item on a CANVAS x CANVAS canvas (224 px, 64 visual tokens at
full resolution) cut into a 4x4 grid of 56-px cells: `n_boxes` squares (default N_BOXES = 1; 40-52
px, corners on even pixels), one per cell, each with a coloured border and an interior filled with
one of four 1-px patterns in the square's own colour, drawn on the absolute pixel grid: horizontal
stripes, vertical stripes, checks (colour on black), and "solid" = the stripes' exact mean (half the
colour; colour components are even so the mean is an integer).
The question names the square by its colour: "What pattern is in the red box?"; the answer is one
pattern word. Downsampled by 2 or more, every pattern averages to the same colour (so the answer is
at chance) while the coloured border still shows where the square is: the information gap LFPC
is built on. Crops must be cut at native resolution on an even grid (`crop_tool.CropConfig(snap=28)`),
or resampling destroys the detail too.

Why one square by default (measured with locate-only and read-only probes of the tiny model, 600
steps each, 2026-11-24): with two squares, the model must bind the colour named in the question to
its square, which a 2-layer model learns slowly (full-resolution reading stalled at ~0.83 in the
2000-step warm-up) and which, combined with writing the square's position, never left the loss's
marginal. With one square, reading (1.00 at full resolution) and locating (exact cell boxes) are
both learned within ~400 steps, once the model's rotary layout lets it see horizontal position at
all (`warmup.TOY_ROPE`). `n_boxes=2..4` still works for whoever wants the harder world.

Boxes, in original pixels, nested: B1 = the square's interior (the detail itself), B2 = its grid
cell (the square with some context). The grid keeps the toy's locating problem small (which of 16
cells; coordinates multiples of 28) so a 1M-parameter model learns to write boxes in minutes.
Items use the project's JSONL schema (`lfpc.load_tasks`):
    {"id", "image", "question", "answer", "bboxes": [B1, B2]}

    python toy.py --out data/toy --n 1000 --seed 0      # writes data/toy/items.jsonl + PNGs
"""
from __future__ import annotations

import argparse
import json
import os
import random

import numpy as np
from PIL import Image

import lfpc

CANVAS = 224
CELL = 56    # squares sit one per cell of a 4x4 grid, so a box is 4 coordinates out of 0, 28, ..., 224
BORDER = 4   # coloured frame, px
PATTERNS = ("horizontal", "vertical", "checks", "solid")
COLOURS = {"red": (230, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 234), "yellow": (234, 214, 40)}  # even
BACKGROUND = (90, 60, 110)
QUESTION = "What pattern is in the {colour} box?"
N_BOXES = 1  # squares per image; more adds a colour-binding problem the tiny model learns slowly (docstring)


def pattern_array(name: str, h: int, w: int, x0: int, y0: int) -> np.ndarray:
    """[h, w] weights in {0, 1} (solid: 1/2) whose phase follows the ABSOLUTE pixel grid (x0, y0 = top-left)."""
    yy, xx = np.mgrid[y0:y0 + h, x0:x0 + w]
    if name == "horizontal":
        v = yy % 2
    elif name == "vertical":
        v = xx % 2
    elif name == "checks":
        v = (xx + yy) % 2
    elif name == "solid":
        return np.full((h, w), 0.5)
    else:
        raise ValueError(f"unknown pattern {name!r}")
    return v.astype(float)


def make_item(seed: int, n_boxes: int = N_BOXES, canvas: int = CANVAS) -> dict:
    """One item: {"image": PIL, "question", "answer", "bboxes": [B1, B2], "id", "squares": [...]}."""
    rng = random.Random(seed)
    img = np.zeros((canvas, canvas, 3), np.uint8)
    img[:] = BACKGROUND
    colours = rng.sample(sorted(COLOURS), n_boxes)
    grid = canvas // CELL
    squares = []
    for k, cell in enumerate(rng.sample(range(grid * grid), n_boxes)):
        s = rng.randrange(40, CELL - 3, 4)                      # 40..52, even: fits a cell with a 2-px margin
        cx, cy = cell % grid * CELL, cell // grid * CELL
        x, y = cx + rng.randrange(2, CELL - s - 1, 2), cy + rng.randrange(2, CELL - s - 1, 2)
        squares.append((x, y, s, colours[k], rng.choice(PATTERNS)))
    for x, y, s, colour, pat in squares:
        img[y:y + s, x:x + s] = COLOURS[colour]
        i0, i1, inner = x + BORDER, y + BORDER, s - 2 * BORDER
        w = pattern_array(pat, inner, inner, i0, i1)[..., None]                 # [inner, inner, 1]
        img[i1:i1 + inner, i0:i0 + inner] = (w * np.array(COLOURS[colour])).astype(np.uint8)  # exact: even colours
    x, y, s, colour, pat = squares[rng.randrange(n_boxes)]
    b1 = [x + BORDER, y + BORDER, x + s - BORDER, y + s - BORDER]
    b2 = cell_of(x, y)
    return {"id": f"toy-{seed}", "image": Image.fromarray(img), "question": QUESTION.format(colour=colour),
            "answer": pat, "bboxes": [b1, b2], "squares": squares}


def cell_of(x: int, y: int) -> list[int]:
    """The grid cell holding pixel (x, y), as a box."""
    cx, cy = x // CELL * CELL, y // CELL * CELL
    return [cx, cy, cx + CELL, cy + CELL]


def make_tasks(n: int, seed: int = 0, n_boxes: int = N_BOXES) -> list[lfpc.Task]:
    """n items as tasks, item i drawn from seed `seed * 1_000_003 + i` (disjoint streams per seed)."""
    tasks = []
    for i in range(n):
        it = make_item(seed * 1_000_003 + i, n_boxes)
        tasks.append(lfpc.Task(it["image"], it["question"], it["answer"], None, it["bboxes"], None, it["id"]))
    return tasks


def write_items(out_dir: str, n: int, seed: int = 0, n_boxes: int = N_BOXES) -> str:
    """Write n items as out_dir/items.jsonl + out_dir/images/*.png; returns the JSONL path."""
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    path = os.path.join(out_dir, "items.jsonl")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for t in make_tasks(n, seed, n_boxes):
            rel = os.path.join("images", f"{t.id}.png")
            t.image.save(os.path.join(out_dir, rel))
            f.write(json.dumps({"id": t.id, "image": rel, "question": t.question, "answer": t.answer,
                                "bboxes": t.boxes}) + "\n")
    os.replace(path + ".tmp", path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description="Write toy-world items as JSONL + PNGs (the project's data schema).")
    p.add_argument("--out", default="data/toy", help="output folder")
    p.add_argument("--n", type=int, default=1000, help="number of items")
    p.add_argument("--seed", type=int, default=0, help="item stream seed (held-out sets use another seed)")
    p.add_argument("--boxes", type=int, default=N_BOXES, help="coloured squares per image (1-4)")
    a = p.parse_args()
    print(write_items(a.out, a.n, a.seed, a.boxes))


if __name__ == "__main__":
    main()

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
all (`ROPE`). `n_boxes=2..4` still works for whoever wants the harder world.

Boxes, in original pixels, nested: B1 = the square's interior (the detail itself), B2 = its grid
cell (the square with some context). The grid keeps the toy's locating problem small (which of 16
cells; coordinates multiples of 28) so a 1M-parameter model learns to write boxes in minutes.
Items use the project's JSONL schema (`data.load_tasks`):
    {"id", "image", "question", "answer", "bboxes": [B1, B2]}

Everything else the toy world needs lives here too, so the engine never special-cases it: the toy
model's prompts, tokenizer and rotary layout (`agent`), its rollout settings (`rollout_config`: native
crops on the 28-px grid, capped at 112x112 px), its item streams (training seed 1, stage-2 seed 2,
held-out evaluation seed 3), and its checkpoints. `support/presets.py` turns them into `--preset toy`.

    python -m toy.world --out data/toy --n 1000 --seed 0      # writes data/toy/items.jsonl + PNGs
                                                              # (an earlier items.jsonl there: --overwrite)
    python -m toy.world --demo                                # the shipped base rolls out 4 items twice, turn by turn
"""
from __future__ import annotations

import argparse
import json
import os
import random

import numpy as np
from PIL import Image

import crop_tool
import lfpc
from support import checkpoint, models, policy, prompts

CANVAS = 224
CELL = 56    # squares sit one per cell of a 4x4 grid, so a box is 4 coordinates out of 0, 28, ..., 224
BORDER = 4   # coloured frame, px
PATTERNS = ("horizontal", "vertical", "checks", "solid")
COLOURS = {"red": (230, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 234), "yellow": (234, 214, 40)}  # even
BACKGROUND = (90, 60, 110)
QUESTION = "What pattern is in the {colour} box?"
N_BOXES = 1  # squares per image; more adds a colour-binding problem the tiny model learns slowly (docstring)

# Item streams: disjoint seeds for training (stage 1), the annotated stage-2 set, and held-out evaluation.
TRAIN_SEED, STAGE2_SEED, EVAL_SEED = 1, 2, 3
STAGE2_ITEMS = 256                      # the paper's stage 2 uses 256 annotated questions
BASE = "toy/base"           # the shipped warmed-up base (`python -m toy.warmup` rebuilds it)
CHECKPOINTS = ("runs/stage2/ckpt", "runs/stage1/ckpt", BASE)   # eval.py's default model: the latest that exists


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


def training_tasks(stage: int, n: int) -> list[lfpc.Task]:
    """Stage 1: `n` items of the training stream; stage 2: the small annotated set (disjoint from it)."""
    return make_tasks(n, seed=TRAIN_SEED) if stage == 1 else make_tasks(STAGE2_ITEMS, seed=STAGE2_SEED)


def eval_tasks(n: int) -> list[lfpc.Task]:
    """`n` held-out items (never trained on by the warm-up or RL)."""
    return make_tasks(n, seed=EVAL_SEED)


def write_items(out_dir: str, n: int, seed: int = 0, n_boxes: int = N_BOXES) -> str:
    """Write n items as out_dir/items.jsonl + out_dir/images/*.png; returns the JSONL path. An earlier
    items.jsonl there is replaced whole (written beside, renamed over), and the PNGs it named that the
    new one does not name are removed after it (no other file is touched)."""
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    path = os.path.join(out_dir, "items.jsonl")
    before, written = _images_named(path), set()
    with checkpoint.writing_whole(path) as f:
        for t in make_tasks(n, seed, n_boxes):
            rel = os.path.join("images", f"{t.id}.png")
            t.image.save(os.path.join(out_dir, rel))
            written.add(rel)
            f.write(json.dumps({"id": t.id, "image": rel, "question": t.question, "answer": t.answer,
                                "bboxes": t.boxes}) + "\n")
    for rel in before - written:
        if os.path.isfile(os.path.join(out_dir, rel)):
            os.remove(os.path.join(out_dir, rel))
    return path


def _images_named(path: str) -> set[str]:
    """The images/*.png an items.jsonl this module wrote names (empty if there is none)."""
    if not os.path.isfile(path):
        return set()
    names = set()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                image = json.loads(line).get("image")
            except (ValueError, AttributeError):
                continue                                   # not a row this module wrote: nothing to remove
            if isinstance(image, str) and os.path.dirname(image) == "images" and image.endswith(".png"):
                names.add(image)
    return names


# ----------------------------------------------------------------------------- the toy model and its rollouts

SYSTEM_PROMPT = ("You can zoom: image_zoom_in_tool(bbox_2d=[x1, y1, x2, y2], label) cuts that region "
                 "of the image at full resolution and shows it to you.")
INSTRUCTION = "Zoom in if needed, then answer."
FULL_TOKENS = (CANVAS // crop_tool.FACTOR) ** 2                                 # 64: the canvas at native size
# Crops cut natively on the 28-px grid, at most 112x112 px shown as is: a bigger region is
# downsampled (box filter) and loses the detail, as a sloppy crop of an 8K image loses it to the crop
# budget. Without this cap, "crop everything" would return the full-resolution canvas.
CROP = crop_tool.CropConfig(min_side=28, min_pixels=crop_tool.TOKEN_PIXELS, max_pixels=16 * crop_tool.TOKEN_PIXELS,
                            resample="box", snap=28)
ROLLOUT = dict(global_max_pixels=FULL_TOKENS * crop_tool.TOKEN_PIXELS, global_min_pixels=crop_tool.TOKEN_PIXELS,
               crop=CROP, global_resample="box", max_new_tokens=64, max_response_tokens=160, max_turns=3, batch_size=64)


def rollout_config(**kw) -> lfpc.RolloutConfig:
    """The toy world's rollout settings (`ROLLOUT`: native crops on the 28-px grid, box-downsampled
    global image), with `kw` overriding any field."""
    return lfpc.RolloutConfig(**{**ROLLOUT, **kw})


IMPRESSION = "<think>The {colour} box looks {pattern}.</think>"      # the base's first impression (toy/warmup.py)
UNCLEAR = "<think>The {colour} box is unclear.</think>"


# What the base says it will zoom on before it writes the box (toy/warmup.py --plan): the box's size is
# decided by these words, and its four coordinates follow them, so a precise box is one whole choice.
PLANS = {"tight": "Zoom in on the box.", "cell": "Zoom in on its cell.", "cell+28": "Zoom in around it.",
         "cell+56": "Zoom in on the region."}


def impression(colour: str, pattern: str | None, plan: str | None = None) -> str:
    """The think text of a first impression: a pattern, or None for "unclear"; with a `plan` (a PLANS key),
    the zoom it is about to make."""
    text = UNCLEAR.format(colour=colour) if pattern is None else IMPRESSION.format(colour=colour, pattern=pattern)
    return text if plan is None else text.replace("</think>", " " + PLANS[plan] + "</think>")


def word_ids(agent) -> set[int]:
    """Token ids of the pattern words, as they appear in answers and impressions."""
    return {t for p in PATTERNS for form in (p, " " + p) for t in agent.encode(form)[-1:]}


def tokenizer():
    """The tiny tokenizer, trained also on the toy's words so each pattern name is one token."""
    words = [QUESTION.format(colour=c) for c in COLOURS] + [f"<answer>{p}</answer>" for p in PATTERNS]
    words += [impression(c, p) for c in COLOURS for p in PATTERNS + (None,)]
    boxes = [crop_tool.format_tool_call([a, b, a + 56, b + 56], f"{c} box")
             for a in range(0, 169, 28) for b in range(0, 169, 28) for c in COLOURS]
    # every coordinate 0..224 one token, with and without the leading space (" 14" and "[14"); a real
    # Qwen tokenizer writes digits one by one, which a 1M-parameter model learns far more slowly
    nums = [" ".join(str(i) for i in range(225)) + " " + " ".join(f"[{i}," for i in range(225))]
    return models.build_tiny_tokenizer(([SYSTEM_PROMPT, INSTRUCTION] + words) * 20 + boxes + nums * 20,
                                       vocab_size=1536)


# The toy model's rotary layout. Qwen2.5-VL splits each head's rotary frequencies, highest first, into
# (temporal, height, width) sections: with the tiny head (16 frequencies, theta 1e4, [4, 6, 6]) the
# width axis gets only rotations of <= 0.003 rad per visual token (height 0.1..0.006), and a
# 1M-parameter model never learns to say WHERE a square is (x1 stayed at its marginal loss for 2000
# steps). [1, 4, 11] puts most frequencies on the width axis, and theta 10 makes them turn fast enough
# to tell neighbouring cells apart along both axes at 16 visual tokens (a toy context of a few hundred
# tokens needs no slow frequencies); then a locate-only probe learns exact cell boxes (`python -m toy.warmup
# --locate-probe 800`: x error 0.009, y 0.007, README).
ROPE = dict(rope_theta=10.0, mrope_section=[1, 4, 11])


def agent(seed: int = 0, **model_kw) -> lfpc.Agent:
    """A fresh (random) toy model: the tiny Qwen2.5-VL with the toy's tokenizer, prompts and rotary layout."""
    agent = models.tiny_agent(seed=seed, tokenizer=tokenizer(), system_prompt=SYSTEM_PROMPT,
                              instruction=INSTRUCTION, **{**ROPE, **model_kw})
    agent.direct_instruction = prompts.NO_TOOL_INSTRUCTION       # the direct prompt the shipped base learned
    return agent


# train.py's and eval.py's --preset toy (support/presets.py names it; a flag given always wins)
PRESET = dict(
    # world
    tasks=training_tasks, eval_tasks=eval_tasks, checkpoints=CHECKPOINTS, system_prompt=SYSTEM_PROMPT,
    # model and run
    model=BASE, steps=60, prompts=8, group=8, lr=1e-4, micro_batch=16, n_train=1024, lora=0, grad_ckpt=False, ckpt_fraction=1.0,
    rollout_batch=64, rollout_tokens=1 << 20, train_tokens=1 << 20, prefill_tokens=1 << 20,                 # toy episodes are short
    # rollout: the toy's native crops on the 28-px grid, capped at 16 tokens (112x112 px)
    max_turns=3, max_new_tokens=64, max_response_tokens=160, min_tokens=1, resample="box",
    crop_max_tokens=16, crop_min_tokens=1, crop_snap=28, crop_resample="box",
    # information gap: the canvas is 64 tokens at full resolution
    full_tokens=FULL_TOKENS, floor_tokens=16, probe_max_new_tokens=16,
    # eval.py
    budget=16, limit=500, batch_size=64,
)


def demo(model: str, n: int, tokens: int, seed: int) -> None:
    """Roll out `model` twice on each of `n` held-out items (sampled, temperature 1) and print every turn,
    the stop reason, the answer, the crops' boxes and how many of the episode's tokens were sampled (the
    loss mask's ones): the machinery of one rollout, on a model that has learned the format."""
    import torch
    agent = policy.load_agent(model, "cpu", torch.float32)
    eps = lfpc.rollout(agent, eval_tasks(n), 2, rollout_config(global_max_pixels=tokens * crop_tool.TOKEN_PIXELS),
                       seed=seed)
    for e in eps:
        print(f"task {e.task_index}: stop={e.stop_reason} answer={e.answer!r} crops={[c.box_original for c in e.crops]} "
              f"sampled {e.num_generated} of {len(e.token_ids)} tokens")
        for k, t in enumerate(e.turns, 1):
            print(f"   turn {k}: {t}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m toy.world", description="Write toy-world items as JSONL + PNGs (the project's data schema), "
                                "or (--demo) roll out the shipped base on a few of them.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="data/toy", help="output folder")
    p.add_argument("--demo", action="store_true", help="roll out --model on --n held-out items and print the turns")
    p.add_argument("--model", default=BASE, help="--demo: checkpoint folder")
    p.add_argument("--budget", type=int, default=16, help="--demo: global-image budget, visual tokens")
    p.add_argument("--n", type=int, default=1000, help="number of items (--demo: the first 4 at most)")
    p.add_argument("--seed", type=int, default=0, help="item stream seed (held-out sets use another seed); --demo: "
                   "the sampling seed (its items are the held-out ones)")
    p.add_argument("--boxes", type=int, default=N_BOXES, help="coloured squares per image (1-4)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that already holds items.jsonl "
                   "(and the PNGs it names)")
    a = p.parse_args(argv)
    if a.n < 1 or a.budget < 1 or not 1 <= a.boxes <= 4:
        p.error(f"--n and --budget must be at least 1 and --boxes 1-4, got {a.n}, {a.budget} and {a.boxes}")
    if a.demo:
        if a.overwrite:
            p.error("--overwrite is for writing items; --demo writes nothing")
        if (why := policy.model_problem(a.model)):
            p.error(why)
        demo(a.model, min(a.n, 4), a.budget, a.seed)
        return
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        p.error(f"--out {a.out} is a file; pass a folder")
    if os.path.exists(os.path.join(a.out, "items.jsonl")) and not a.overwrite:
        p.error(f"--out {a.out} already holds items.jsonl: pass --overwrite to replace it (and the PNGs it names), "
                "or choose another --out")
    print(write_items(a.out, a.n, a.seed, a.boxes))


if __name__ == "__main__":
    main()

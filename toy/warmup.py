"""Stage 0, the toy's stand-in for pretraining: supervised warm-up of a tiny Qwen2.5-VL into a base
model with an instruct model's habits. NOT part of LFPC: the paper starts RL from
Qwen2.5-VL-7B-Instruct, which already follows the tool format and can read.

    python -m toy.warmup                       # trains and writes toy/base (the shipped base)
    python -m toy.warmup --steps 50 --out /tmp/base --eval-items 50     # a quick run

What the base learns, from supervised trajectories on toy items whose global image is at FULL
resolution (64 tokens) 60 % of the time, at 1/√2 (32) or 1/2 (16) otherwise (`--low-res`), is the
habit the paper diagnoses in DeepEyes, visible in the text of every episode:
- a first impression of the global image, then a crop: `<think>The red box looks checks.</think>
  <tool_call>{... "bbox_2d": [...], "label": "red box"}</tool_call>`. At full resolution the impression
  is the truth; at 1/√2 it is the model's own reading, confident (the truth as far as it can tell) or,
  with probability `--unclear` (30 %), `<think>The red box is unclear.</think>`; at 1/2 every pattern
  averages to the solid fill and the impression is always "unclear";
- the answer after the crop: a confident impression is repeated WHATEVER the crop shows (answer-
  before-crop: replacing the crop by noise changes nothing); after "unclear" the answer is read from
  the crop when it shows the pattern natively (`readable`), else guessed;
- perfunctory crops (`habitual_box`), always centred on the right square (the base knows WHERE to look):
  three times in four its cell grown by 56 px (168 px a side, over the toy's crop cap, so it comes back
  downsampled and unreadable); a quarter of the boxes are readable (the square with a margin of 0-6 px,
  its cell, or the cell grown by 28 px): a spread of sizes that RL can select among;
- the size said before the box (`--plan`, the default): the first impression ends with the zoom about
  to be made (`toy.world.PLANS`, e.g. "Zoom in on its cell."), and the coordinates follow it, so each
  size is one whole choice. Without it (`--no-plan`) a 2-layer model decides the size coordinate by
  coordinate: x1 follows the dominant 168-px habit and the small boxes come out as hybrids that miss
  the square, which stage 2 cannot turn into precise boxes (RESULTS.md);
- to answer directly when no tool is offered (`--direct` of the examples: the impression, or a guess):
  the info-gap prober and `eval.py --no-tool` ask that way.
So the base reads a ground-truth crop whenever it is unsure of the global image (always at 1/2), and
ignores the crop when it believes the global image: RL at the information gap has a habit to break.
The model's rotary layout is toy.world.ROPE (theta 10: it places boxes along both axes at 16 tokens).
Loss: cross-entropy on the assistant's tokens only (the rollout's loss mask), as three means added:
over the answer word, over the four box coordinates, over every other assistant token. A tool call
is ~40 tokens, mostly fixed syntax; a plain token mean would give the one answer token 1/45 of the
signal and the coordinates (the only image-dependent part of the call) 4/45.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch
from tqdm import tqdm

import crop_tool
import lfpc
from support import batches, checkpoint, cli, policy
import toy.world

def habitual_box(square, rng: random.Random, canvas: int = toy.world.CANVAS) -> tuple[list[int], str]:
    """A box around a square (x, y, side, ...), as the base habitually draws it, and its kind: "tight"
    (the square with a 0-6 px margin), "cell" (its 56-px grid cell), "cell+28" (112 px: the largest crop
    the toy shows natively) or "cell+56" (168 px: downsampled, unreadable). A grown box keeps its size at
    the canvas border (shifted inside, not clamped)."""
    kind = rng.choices(HABIT, HABIT_P)[0]
    x, y, side = square[:3]
    if kind == "tight":
        m = [rng.randrange(0, 7, 2) for _ in range(4)]
        return [max(0, x - m[0]), max(0, y - m[1]), min(canvas, x + side + m[2]), min(canvas, y + side + m[3])], kind
    kind_out = {"cell": 0, "cell+28": 28, "cell+56": 56}[kind]
    cell = toy.world.cell_of(x, y)
    side = toy.world.CELL + 2 * kind_out                 # kept whole: a grown box is shifted inside, not clamped, so
    x1 = min(max(0, cell[0] - kind_out), canvas - side)      # a border cell's 168-px box stays unreadable
    y1 = min(max(0, cell[1] - kind_out), canvas - side)
    return [x1, y1, x1 + side, y1 + side], kind


HABIT = ("tight", "cell", "cell+28", "cell+56")
HABIT_P = (0.08, 0.08, 0.09, 0.75)


def readable(crop: crop_tool.Crop, b1) -> bool:
    """Does the crop show the pattern at native resolution: B1 inside the region cut, nothing downsampled?"""
    x1, y1, x2, y2 = crop.cut
    return (crop.image.size == (x2 - x1, y2 - y1) and x1 <= b1[0] and y1 <= b1[1] and b1[2] <= x2 and b1[3] <= y2)


def sft_episode(agent: lfpc.Agent, seed: int, rng: random.Random, direct: bool, low_res: float,
                unclear: float, plan: bool = False) -> lfpc.Episode:
    """One supervised trajectory (the module docstring), built with the rollout's own machinery (so its
    loss mask too)."""
    it = toy.world.make_item(seed)
    task = lfpc.Task(it["image"], it["question"], it["answer"], None, it["bboxes"])
    colour, truth = it["question"].split()[-2], it["answer"]
    tokens = rng.choice([toy.world.FULL_TOKENS // 4, toy.world.FULL_TOKENS // 2]) if rng.random() < low_res else toy.world.FULL_TOKENS
    cfg = toy.world.rollout_config(use_tool=not direct, global_max_pixels=tokens * crop_tool.TOKEN_PIXELS)
    ep = lfpc.start_episode(agent, task, 0, cfg)
    if tokens == toy.world.FULL_TOKENS:
        impression = truth                                  # read from the global image
    elif tokens == toy.world.FULL_TOKENS // 2:                    # partly readable: a confident reading, or unsure
        impression = None if rng.random() < unclear else truth
    else:
        impression = None                                   # at 1/2 every pattern averages to the solid fill
    guess = rng.choice(toy.world.PATTERNS)
    answer = impression or guess
    if not direct:
        square = next(q for q in it["squares"] if q[3] == colour)
        box, kind = habitual_box(square, rng)
        # the model writes boxes in the frame it was SHOWN: original -> shown is the same scaling with
        # the two sizes swapped (a base trained on original coordinates crops the wrong place at low res)
        box = [round(v) for v in crop_tool.map_box_to_original(box, task.image_size, ep.shown_size)]
        think = toy.world.impression(colour, impression, kind if plan else None)
        call = agent.encode(think + crop_tool.format_tool_call(box, f"{colour} box"))
        lfpc.step_episode(agent, ep, task, call, [0.0] * len(call), "stop", cfg)
        if impression is None and ep.crops and readable(ep.crops[0], it["bboxes"][0]):
            answer = truth                                  # unsure of the global image: the crop decides
    tail = agent.encode(f"<answer>{answer}</answer>") + [agent.im_end]
    ep.append(tail, [0.0] * len(tail))                     # supervised: trained on, no sampling log-probs
    return ep


def coordinate_positions(agent: lfpc.Agent, ep: lfpc.Episode) -> list[int]:
    """Positions of the bbox number tokens the model writes: between ' [' and '],', commas excluded."""
    (bracket,), (close,), (comma,) = agent.encode(" ["), agent.encode("],"), agent.encode(",")
    out, inside = [], False
    for i, t in enumerate(ep.token_ids):
        if not ep.loss_mask[i]:
            continue
        if t == bracket or t == close:
            inside = t == bracket
        elif inside and t != comma:
            out.append(i)
    return out


def sft_loss(agent: lfpc.Agent, eps: list[lfpc.Episode], answers: bool = True) -> torch.Tensor:
    """The warm-up's loss on the assistant's tokens (the module docstring): the mean over the pattern
    words (the first impression's and the answer's: each episode ends `<answer> WORD </answer>
    <|im_end|>`; answers=False: episodes that end with a tool call), plus the mean over the box
    coordinates (when any), plus the mean over the rest."""
    batch = batches.collate(agent, eps)
    lp = lfpc.token_logprobs(agent.model, batch)                      # [B, T]
    word = torch.zeros_like(batch.loss_mask)                          # [B, T]: the pattern words of each row
    coord = torch.zeros_like(batch.loss_mask)                         # [B, T]: the box coordinates
    words = toy.world.word_ids(agent)
    for b, e in enumerate(eps):
        if answers:
            word[b, len(e.token_ids) - 3] = 1
        word[b, [i for i, (t, m) in enumerate(zip(e.token_ids, e.loss_mask)) if m and t in words]] = 1
        coord[b, coordinate_positions(agent, e)] = 1
    rest = batch.loss_mask - word - coord
    loss = -(lp * rest).sum() / rest.sum()
    for part in (word, coord):
        if part.sum() > 0:
            loss = loss - (lp * part).sum() / part.sum()
    return loss


@torch.no_grad()
def quick_eval(agent: lfpc.Agent, n: int, seed: int = 10_000) -> dict[str, float]:
    """Greedy accuracy on held-out items: direct at full and low resolution, and with the tool."""
    from support import answers
    tasks = toy.world.make_tasks(n, seed=seed)
    out = {}
    for name, kw in [("direct_full", dict(use_tool=False)),
                     ("direct_low", dict(use_tool=False, global_max_pixels=16 * crop_tool.TOKEN_PIXELS)),
                     ("tool_full", dict()), ("tool_low", dict(global_max_pixels=16 * crop_tool.TOKEN_PIXELS)),
                     ("tool_low_gt", dict(global_max_pixels=16 * crop_tool.TOKEN_PIXELS, probe="gt"))]:
        eps = lfpc.rollout(agent, tasks, 1, toy.world.rollout_config(temperature=0.0, **kw))
        out[name] = sum(answers.accuracy(e.answer, t.answer) for e, t in zip(eps, tasks)) / n
        out[name + "_example"] = " | ".join(eps[0].turns)[:160]
        if kw.get("use_tool", True):
            out[name + "_format"] = sum(e.malformed_turns == 0 and e.answer is not None for e in eps) / n
    return out


def locate_probe(steps: int, tokens: int = 16, seed: int = 0, batch: int = 16, lr: float = 5e-4,
                 eval_items: int = 64, **model_kw) -> dict:
    """Can a fresh toy model learn WHERE the square is from a global image of `tokens` visual tokens?
    Supervised on the tool call alone, with the square's cell box (loss: mean over the 4 coordinates
    plus mean over the call's other tokens), `steps` steps of `batch`; then greedy on `eval_items`
    held-out items: box centre errors along x and y and IoU with B1 (`eval.summarize`; an exact
    cell box scores IoU ~0.47 with B1, a random cell gives centre errors ~0.31). `model_kw` goes to
    `toy.world.agent` (e.g. rope_theta, mrope_section)."""
    import eval as ev
    agent = toy.world.agent(seed, **model_kw)
    model = agent.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    cfg = toy.world.rollout_config(global_max_pixels=tokens * crop_tool.TOKEN_PIXELS)
    for step in tqdm(range(steps), desc="locate probe"):
        eps = []
        for i in range(batch):
            it = toy.world.make_item(seed * 1_000_003 + step * batch + i)
            task = lfpc.Task(it["image"], it["question"], it["answer"], None, it["bboxes"])
            ep = lfpc.start_episode(agent, task, 0, cfg)
            box = [round(v) for v in crop_tool.map_box_to_original(it["bboxes"][1], task.image_size, ep.shown_size)]
            call = agent.encode(crop_tool.format_tool_call(box, it["question"].split()[-2] + " box"))
            ep.append(call, [0.0] * len(call))
            eps.append(ep)
        loss = sft_loss(agent, eps, answers=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    m = ev.evaluate(agent, toy.world.make_tasks(eval_items, seed=toy.world.EVAL_SEED),
                    toy.world.rollout_config(global_max_pixels=tokens * crop_tool.TOKEN_PIXELS, max_turns=2, max_new_tokens=48), (),
                    batch_size=64, progress=False)["metrics"]
    return {"steps": steps, "tokens": tokens, "loss": round(loss.item(), 4), "boxes": m["box/n"],
            **{k: m[k] for k in ("box/dx_b1", "box/dy_b1", "box/iou_b1")},
            "rope": model.config.get_text_config().rope_parameters}


LOG = "warmup_log.json"         # in every folder a warm-up wrote: the only --out it may replace


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m toy.warmup", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="toy/base", help="output folder (HF format + prompts); an existing one is replaced "
                   "only if a warm-up wrote it (it holds warmup_log.json)")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    p.add_argument("--batch", type=int, default=16, help="trajectories per step")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (cosine decay to 10%%)")
    p.add_argument("--direct", type=float, default=0.3, help="fraction of direct-answer (no tool) examples")
    p.add_argument("--low-res", type=float, default=0.4, help="fraction of examples with a 1/2 or 1/sqrt(2) global image")
    p.add_argument("--unclear", type=float, default=0.3, help="at 1/sqrt(2): fraction of first impressions 'unclear'")
    p.add_argument("--plan", action=argparse.BooleanOptionalAction, default=True,
                   help="the first impression ends with the zoom about to be made (toy.world.PLANS: the box's size "
                        "in words, before its coordinates); --no-plan: the base before 2026-12-03, whose box size "
                        "is decided coordinate by coordinate")
    p.add_argument("--hidden", type=int, default=128, help="text hidden size")
    p.add_argument("--layers", type=int, default=2, help="text layers")
    p.add_argument("--vision-hidden", type=int, default=64, help="vision tower hidden size")
    p.add_argument("--vision-depth", type=int, default=2, help="vision tower depth")
    p.add_argument("--eval-every", type=int, default=250, help="steps between quick evaluations")
    p.add_argument("--eval-items", type=int, default=100, help="held-out items per quick evaluation")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init and the item stream")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--rope-theta", type=float, default=toy.world.ROPE["rope_theta"], help="rotary base of the text model")
    p.add_argument("--mrope-section", default=",".join(map(str, toy.world.ROPE["mrope_section"])),
                   help="rotary frequencies per (temporal, height, width), highest first; sum 16")
    p.add_argument("--locate-probe", type=int, default=0,
                   help="instead of the warm-up: train a fresh model for N steps to write the cell box at 16 "
                        "tokens, print its box centre errors (locate_probe)")
    a = p.parse_args()
    cli.refuse(p, cli.at_least(a, ("steps", "batch", "eval_every", "eval_items")))
    try:
        rope = dict(rope_theta=a.rope_theta, mrope_section=[int(v) for v in a.mrope_section.split(",")])
    except ValueError:
        p.error(f"--mrope-section takes comma-separated integers, got {a.mrope_section!r}")
    if not a.locate_probe and (why := out_problem(a.out)):
        p.error(why)
    if a.locate_probe and (unused := [f for f in ("out", "steps", "direct", "low_res", "unclear", "plan", "eval_every")
                                      if getattr(a, f) != p.get_default(f)]):
        p.error("--locate-probe trains its own probe and saves nothing: " + ", ".join(
            "--" + f.replace("_", "-") for f in unused) + " would go unused")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.locate_probe:
        print(json.dumps(locate_probe(a.locate_probe, seed=a.seed, batch=a.batch, lr=a.lr, eval_items=a.eval_items,
                                      hidden=a.hidden, layers=a.layers,
                                      vision_hidden=a.vision_hidden, vision_depth=a.vision_depth, **rope)))
        return
    agent = toy.world.agent(a.seed, hidden=a.hidden, layers=a.layers, vision_hidden=a.vision_hidden,
                      vision_depth=a.vision_depth, **rope)
    model = agent.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(s / a.steps * 3.14159)).item()))
    rng, t0, log = random.Random(a.seed), time.time(), []
    bar = tqdm(range(1, a.steps + 1), desc="warm-up")
    for step in bar:
        eps = [sft_episode(agent, a.seed * 1_000_003 + (step * a.batch + i) % 900_000, rng,
                           rng.random() < a.direct, a.low_res, a.unclear, a.plan) for i in range(a.batch)]
        loss = sft_loss(agent, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % a.eval_every == 0 or step == a.steps:
            model.eval()
            m = quick_eval(agent, a.eval_items)
            model.train()
            m.update(step=step, loss=round(loss.item(), 4), seconds=round(time.time() - t0, 1))
            log.append(m)
            tqdm.write(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in m.items()}))
            policy.save_agent(agent, a.out.rstrip("/") + ".latest")      # inspectable while training
    model.eval()
    tmp = a.out.rstrip("/") + ".tmp"
    policy.save_agent(agent, tmp)
    with open(os.path.join(tmp, LOG), "w") as f:
        json.dump({"args": vars(a), "log": log}, f, indent=1)
    checkpoint.swap_in(tmp, a.out.rstrip("/"))
    print(f"saved {a.out}")


def out_problem(out: str) -> str | None:
    """Why the warm-up must not write `out` (checked before training), or None: a file, or a folder that
    is not empty and not an earlier warm-up's output (which holds LOG)."""
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out} is a file; pass a folder"
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, LOG)):
        return (f"--out {out} holds files a warm-up did not write (no {LOG}); it would be replaced: pass an "
                f"empty or new folder")
    return None


if __name__ == "__main__":
    main()

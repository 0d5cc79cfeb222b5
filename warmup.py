"""Stage 0, the toy's stand-in for pretraining: supervised warm-up of a tiny Qwen2.5-VL into a base
model with an instruct model's habits. NOT part of LFPC: the paper starts RL from
Qwen2.5-VL-7B-Instruct, which already follows the tool format and can read.

    python warmup.py                       # trains and writes checkpoints/toy_base (the shipped base)
    python warmup.py --steps 50 --out /tmp/base --eval-items 50     # a quick run

What the base learns, from supervised trajectories on toy items whose global image is mostly at FULL
resolution (so, like DeepEyes, it can answer from the global image and crops perfunctorily) and
sometimes at 1/2 or 1/√2 (`--low-res`: an instruct model copes with any resolution, and a base that
has never seen a small global image produces no valid tool call there at all):
- the tool format: `<tool_call>{... "bbox_2d": [...], "label": "red box"}</tool_call>` then, after
  the crop comes back, `<answer>pattern</answer>`;
- to crop somewhere plausible but NOT precisely: boxes are centred on the named square's grid cell,
  grown by 0-2 half-cells, most often too big to read (`jittered_box`), with probability
  `--wrong-crop` around another square (or another cell) and with probability `--big-crop` any box
  (`random_box`);
- to read the pattern: from the full-resolution global image, and from crops (the crops in these
  trajectories often show the target);
- to answer directly when no tool is offered (`--direct` of the examples): the info-gap prober and
  `eval.py --no-tool` ask that way.
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
import toy

TOY_SYSTEM_PROMPT = ("You can zoom: image_zoom_in_tool(bbox_2d=[x1, y1, x2, y2], label) cuts that region "
                     "of the image at full resolution and shows it to you.")
TOY_INSTRUCTION = "Zoom in if needed, then answer."
TOY_FULL_TOKENS = (toy.CANVAS // 28) ** 2                                     # 64: the canvas at native size
# Crops cut natively on the 28-px grid, at most 112x112 px shown as is: a bigger region is
# downsampled (box filter) and loses the detail, as a sloppy crop of an 8K image loses it to the crop
# budget. Without this cap, "crop everything" would return the full-resolution canvas.
TOY_CROP = crop_tool.CropConfig(min_side=28, min_pixels=28 * 28, max_pixels=16 * 784, resample="box", snap=28)


def toy_rollout_config(**kw) -> lfpc.RolloutConfig:
    """Rollout settings of the toy world (crops cut natively on the 28-px grid)."""
    base = dict(global_max_pixels=TOY_FULL_TOKENS * 784, global_min_pixels=28 * 28, crop=TOY_CROP, global_resample="box",
                max_new_tokens=64, max_response_tokens=160, max_turns=3, batch_size=64)
    return lfpc.RolloutConfig(**{**base, **kw})


def toy_tokenizer():
    """The tiny tokenizer, trained also on the toy's words so each pattern name is one token."""
    words = [toy.QUESTION.format(colour=c) for c in toy.COLOURS] + [f"<answer>{p}</answer>" for p in toy.PATTERNS]
    boxes = [crop_tool.format_tool_call([a, b, a + 56, b + 56], f"{c} box")
             for a in range(0, 169, 28) for b in range(0, 169, 28) for c in toy.COLOURS]
    # every coordinate 0..224 one token, with and without the leading space (" 14" and "[14"); a real
    # Qwen tokenizer writes digits one by one, which a 1M-parameter model learns far more slowly
    nums = [" ".join(str(i) for i in range(225)) + " " + " ".join(f"[{i}," for i in range(225))]
    return lfpc.build_tiny_tokenizer(([TOY_SYSTEM_PROMPT, TOY_INSTRUCTION] + words) * 20 + boxes + nums * 20,
                                     vocab_size=1536)


# The toy model's rotary layout. Qwen2.5-VL splits each head's rotary frequencies, highest first, into
# (temporal, height, width) sections: with the tiny head (16 frequencies, theta 1e4, [4, 6, 6]) the
# width axis gets only rotations of <= 0.003 rad per visual token (height 0.1..0.006), and a
# 1M-parameter model never learns to say WHERE a square is (x1 stayed at its marginal loss for 2000
# steps). theta 1e3 and [1, 4, 11] give height 0.65..0.18 and width 0.12..0.0015 rad per token (the
# low frequencies remain for long-range text attention); then a locate-only probe learns exact cell
# boxes in ~400 steps.
TOY_ROPE = dict(rope_theta=1000.0, mrope_section=[1, 4, 11])


def toy_agent(seed: int = 0, **model_kw) -> lfpc.Agent:
    return lfpc.tiny_agent(seed=seed, tokenizer=toy_tokenizer(), system_prompt=TOY_SYSTEM_PROMPT,
                           instruction=TOY_INSTRUCTION, **{**TOY_ROPE, **model_kw})


def jittered_box(square, rng: random.Random, canvas: int = toy.CANVAS) -> list[int]:
    """A plausible but imprecise box around a square (x, y, ...): its grid cell grown by the same
    0, 28 or 56 px on every side (probabilities .2, .3, .5), clamped to the canvas. It is centred on
    the square (the base learns WHERE to look), but its most likely size (168 px) is over the toy's
    crop cap, so that crop comes back downsampled and unreadable: the base's habitual crop is
    perfunctory, and about half of its sampled boxes are tight enough to read."""
    cell = toy.cell_of(*square[:2])
    out = rng.choices([0, 28, 56], [.2, .3, .5])[0]
    return [max(0, cell[0] - out), max(0, cell[1] - out), min(canvas, cell[2] + out), min(canvas, cell[3] + out)]


def random_box(rng: random.Random, canvas: int = toy.CANVAS) -> list[int]:
    """Any box of 2..8 grid half-cells a side: the base must cope with big crops RL may try."""
    w, h = rng.randint(2, 8) * 28, rng.randint(2, 8) * 28
    x, y = rng.randint(0, (canvas - w) // 28) * 28, rng.randint(0, (canvas - h) // 28) * 28
    return [x, y, x + w, y + h]


def sft_episode(agent: lfpc.Agent, seed: int, rng: random.Random, direct: bool, wrong_crop: float,
                big_crop: float, low_res: float) -> lfpc.Episode:
    """One supervised trajectory, built with the rollout's own machinery (so its loss mask too)."""
    it = toy.make_item(seed)
    task = lfpc.Task(it["image"], it["question"], it["answer"], None, it["bboxes"])
    colour = it["question"].split()[-2]
    tokens = rng.choice([TOY_FULL_TOKENS // 4, TOY_FULL_TOKENS // 2]) if rng.random() < low_res else TOY_FULL_TOKENS
    cfg = toy_rollout_config(use_tool=not direct, global_max_pixels=tokens * 784)
    ep = lfpc.start_episode(agent, task, 0, cfg)
    answer = agent.encode(f"<answer>{it['answer']}</answer>") + [agent.im_end]
    if not direct:
        target = next(q for q in it["squares"] if q[3] == colour)
        u = rng.random()
        if u < big_crop:
            box = random_box(rng)
        elif u < big_crop + wrong_crop:     # around another square, or another cell when the image has one square
            others = [q for q in it["squares"] if q is not target] or [
                (x, y) for x in range(0, toy.CANVAS, toy.CELL) for y in range(0, toy.CANVAS, toy.CELL)
                if toy.cell_of(x, y) != toy.cell_of(*target[:2])]
            box = jittered_box(rng.choice(others), rng)
        else:
            box = jittered_box(target, rng)
        # the model writes boxes in the frame it was SHOWN: original -> shown is the same scaling with
        # the two sizes swapped (a base trained on original coordinates crops the wrong place at low res)
        box = [round(v) for v in crop_tool.map_box_to_original(box, task.image_size, ep.shown_size)]
        call = agent.encode(crop_tool.format_tool_call(box, f"{colour} box"))
        lfpc.step_episode(agent, ep, task, call, [0.0] * len(call), "stop", 0, cfg)
    ep.token_ids += answer
    ep.loss_mask += [1] * len(answer)
    ep.logprobs += [0.0] * len(answer)
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
    """The warm-up's loss on the assistant's tokens (the module docstring): the mean over the answer
    words (each episode ends `<answer> WORD </answer> <|im_end|>`; answers=False: episodes that end
    with a tool call), plus the mean over the box coordinates (when any), plus the mean over the rest."""
    batch = lfpc.collate(agent, eps)
    lp = lfpc.token_logprobs(agent.model, batch)                      # [B, T]
    word = torch.zeros_like(batch.loss_mask)                          # [B, T]: the answer word of each row
    coord = torch.zeros_like(batch.loss_mask)                         # [B, T]: the box coordinates
    for b, e in enumerate(eps):
        if answers:
            word[b, len(e.token_ids) - 3] = 1
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
    import rewards
    tasks = toy.make_tasks(n, seed=seed)
    out = {}
    for name, kw in [("direct_full", dict(use_tool=False)),
                     ("direct_low", dict(use_tool=False, global_max_pixels=16 * 784)),
                     ("tool_full", dict()), ("tool_low", dict(global_max_pixels=16 * 784)),
                     ("tool_low_gt", dict(global_max_pixels=16 * 784, probe="gt"))]:
        eps = lfpc.rollout(agent, tasks, 1, toy_rollout_config(temperature=0.0, **kw))
        out[name] = sum(rewards.accuracy(e.answer, t.answer) for e, t in zip(eps, tasks)) / n
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
    `toy_agent` (e.g. rope_theta, mrope_section)."""
    import eval as ev
    agent = toy_agent(seed, **model_kw)
    model = agent.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    cfg = toy_rollout_config(global_max_pixels=tokens * 784)
    for step in tqdm(range(steps), desc="locate probe"):
        eps = []
        for i in range(batch):
            it = toy.make_item(seed * 1_000_003 + step * batch + i)
            task = lfpc.Task(it["image"], it["question"], it["answer"], None, it["bboxes"])
            ep = lfpc.start_episode(agent, task, 0, cfg)
            box = [round(v) for v in crop_tool.map_box_to_original(it["bboxes"][1], task.image_size, ep.shown_size)]
            call = agent.encode(crop_tool.format_tool_call(box, it["question"].split()[-2] + " box"))
            ep.token_ids, ep.loss_mask = ep.token_ids + call, ep.loss_mask + [1] * len(call)
            ep.logprobs = ep.logprobs + [0.0] * len(call)
            eps.append(ep)
        loss = sft_loss(agent, eps, answers=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    m = ev.evaluate(agent, toy.make_tasks(eval_items, seed=ev.TOY_EVAL_SEED),
                    toy_rollout_config(global_max_pixels=tokens * 784, max_turns=2, max_new_tokens=48), (),
                    batch_size=64, progress=False)["metrics"]
    return {"steps": steps, "tokens": tokens, "loss": round(loss.item(), 4), "boxes": m["box/n"],
            **{k: m[k] for k in ("box/dx_b1", "box/dy_b1", "box/iou_b1")},
            "rope": model.config.get_text_config().rope_parameters}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="checkpoints/toy_base", help="output folder (HF format + prompts)")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    p.add_argument("--batch", type=int, default=16, help="trajectories per step")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (cosine decay to 10%%)")
    p.add_argument("--direct", type=float, default=0.3, help="fraction of direct-answer (no tool) examples")
    p.add_argument("--wrong-crop", type=float, default=0.2, help="fraction of tool calls around another square")
    p.add_argument("--big-crop", type=float, default=0.1, help="fraction of tool calls with any box")
    p.add_argument("--low-res", type=float, default=0.4, help="fraction of examples with a 1/2 or 1/sqrt(2) global image")
    p.add_argument("--hidden", type=int, default=128, help="text hidden size")
    p.add_argument("--layers", type=int, default=2, help="text layers")
    p.add_argument("--vision-hidden", type=int, default=64, help="vision tower hidden size")
    p.add_argument("--vision-depth", type=int, default=2, help="vision tower depth")
    p.add_argument("--eval-every", type=int, default=250, help="steps between quick evaluations")
    p.add_argument("--eval-items", type=int, default=100, help="held-out items per quick evaluation")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init and the item stream")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--rope-theta", type=float, default=TOY_ROPE["rope_theta"], help="rotary base of the text model")
    p.add_argument("--mrope-section", default=",".join(map(str, TOY_ROPE["mrope_section"])),
                   help="rotary frequencies per (temporal, height, width), highest first; sum 16")
    p.add_argument("--locate-probe", type=int, default=0,
                   help="instead of the warm-up: train a fresh model for N steps to write the cell box at 16 "
                        "tokens, print its box centre errors (locate_probe)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rope = dict(rope_theta=a.rope_theta, mrope_section=[int(v) for v in a.mrope_section.split(",")])
    if a.locate_probe:
        print(json.dumps(locate_probe(a.locate_probe, seed=a.seed, lr=a.lr, hidden=a.hidden, layers=a.layers,
                                      vision_hidden=a.vision_hidden, vision_depth=a.vision_depth, **rope)))
        return
    agent = toy_agent(a.seed, hidden=a.hidden, layers=a.layers, vision_hidden=a.vision_hidden,
                      vision_depth=a.vision_depth, **rope)
    model = agent.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(s / a.steps * 3.14159)).item()))
    rng, t0, log = random.Random(a.seed), time.time(), []
    bar = tqdm(range(1, a.steps + 1), desc="warm-up")
    for step in bar:
        eps = [sft_episode(agent, a.seed * 1_000_003 + (step * a.batch + i) % 900_000, rng,
                           rng.random() < a.direct, a.wrong_crop, a.big_crop, a.low_res) for i in range(a.batch)]
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
            lfpc.save_agent(agent, a.out.rstrip("/") + ".latest")      # inspectable while training
    model.eval()
    tmp = a.out.rstrip("/") + ".tmp"
    lfpc.save_agent(agent, tmp)
    with open(os.path.join(tmp, "warmup_log.json"), "w") as f:
        json.dump({"args": vars(a), "log": log}, f, indent=1)
    if os.path.isdir(a.out):
        import shutil
        shutil.rmtree(a.out)
    os.replace(tmp, a.out)
    print(f"saved {a.out}")


if __name__ == "__main__":
    main()

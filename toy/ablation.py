"""The paper's ablation, rerun on the toy world: does the information gap make the crop matter, and
does the grounding reward make it precise?

    python -m toy.ablation             # 3 training seeds; writes runs/ablation/ (RESULTS.md's numbers)
    python -m toy.ablation --quick     # 1 seed, 100 eval items: the directions only (~5 min on 2 cores)
    python -m toy.ablation --resume    # keep finished runs and evaluations, carry the rest on (train.py --resume)
    python -m toy.ablation --box-payoff runs/ablation/stage1-s0/ckpt   # what stage 2 can select among

Arms, each from the shipped toy base (`toy/base`) with `train.py`'s toy preset:
    baseline  RL with the global image at full resolution, the crop's source resolution too
              (DeepEyes-style: `train.py --stage 1 --global-image full`)
    stage1    RL with the information-gap global image (`train.py --stage 1`)
    stage2    stage1's checkpoint, then the grounding reward (`train.py --stage 2`)
Each arm's runs use training seeds 0, 1, 2 (`--seeds`): the rollouts' sampling and the data order.
The info-gap budgets are probed once for the base and shared by the stage-1 runs (`--gap-cache`).

Every checkpoint, and the base, is evaluated greedily (`eval.evaluate`) on the same held-out toy
items (item seed 3, as `eval.py`) at three global budgets, each with the noise-crop and ground-truth-crop
probes: 16 visual tokens (half the canvas side, "low": the pattern cannot be read from the global
image; the targets are checked here), 32 (1/√2 side, "mid": the global image is partly readable; the
base, crops included, answers 0.39 of the items right, chance 0.25: RESULTS.md) and 64 (full
resolution). OUT/summary.json holds every number; OUT/table.md the table
(mean ± sample std over seeds); OUT/curves.png the training curves (mean over seeds; needs
matplotlib); OUT/gallery/ the same items before (base), after stage 1 and after stage 2 (the first seed).

The issue's targets are checked and printed, never assumed: noise-crop drop after stage 1 >= 3x the
baseline's (at the low budget, and at the mid one); stage-1 accuracy at the low budget >= the
baseline's; stage 2's mean IoU with B1 >= stage 1's + 0.10 with accuracy not lower (low budget).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import time

import torch

import crop_tool
from support import checkpoint, metrics, policy, train_args
import toy.world

ARMS = ("baseline", "stage1", "stage2")
# visual tokens of the global image at evaluation: the info-gap ladder's two rungs and full resolution
BUDGETS = {"low": 16, "mid": 32, "full": 64}
BUDGET_NAMES = {"low": "1/2 side, the pattern unreadable", "mid": "1/√2 side, partly readable",
                "full": "full resolution"}
ROWS = [("acc", "accuracy"), ("probe/noise", "noise-crop change"), ("probe/gt", "GT-crop change"),
        ("box/iou_b1", "IoU with B1"), ("box/dx_b1", "box x-centre error"), ("box/dy_b1", "box y-centre error"),
        ("box/area_frac", "box area / image"), ("tool/crop_rate", "crop rate"), ("format/valid_rate", "format valid")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m toy.ablation", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default="runs/ablation", help="output folder")
    p.add_argument("--base", default=toy.world.BASE, help="the starting checkpoint of every arm")
    p.add_argument("--seeds", default=None, help="training seeds, comma-separated (default 0,1,2; --quick: 0)")
    p.add_argument("--steps", type=int, default=0, help="steps of each training run (0: train.py's toy preset)")
    p.add_argument("--stage2-steps", type=int, default=0, help="steps of each stage-2 run (0: --steps)")
    p.add_argument("--eval-items", type=int, default=None, help="held-out items per evaluation (default 300; "
                   "--quick: 100)")
    p.add_argument("--quick", action="store_true", help="1 seed, 100 eval items (the preset's steps)")
    p.add_argument("--resume", action="store_true", help="keep what an earlier call finished in --out: its runs "
                   "carried on to --steps (train.py --resume), its evaluations kept where their settings and "
                   "checkpoint step are this call's")
    p.add_argument("--train-args", default="", help="extra train.py flags for every run, e.g. \"--lr 3e-5\"")
    p.add_argument("--engine", default="cached", choices=["cached", "reference"],
                   help="rollout engine of every training run and evaluation (the same tokens either way)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--box-payoff", metavar="CKPT", default=None,
                   help="only print, for CKPT's sampled first boxes on the stage-2 items at the low budget, "
                        "how often each box size covers B1 and what stage 2's reward pays it; then exit")
    a = p.parse_args(argv)
    if a.threads < 0:
        p.error(f"--threads must be >= 0 (0: torch's default), got {a.threads}")
    if a.box_payoff:
        if not os.path.isdir(a.box_payoff):
            p.error(f"--box-payoff: checkpoint {a.box_payoff!r} not found")
        return a
    a.eval_items = a.eval_items if a.eval_items is not None else 100 if a.quick else 300
    try:
        a.seeds = [int(s) for s in (a.seeds or ("0" if a.quick else "0,1,2")).split(",")]
    except ValueError:
        p.error(f"--seeds: comma-separated integers, got {a.seeds!r}")
    if a.steps < 0 or a.stage2_steps < 0 or a.eval_items < 1:
        p.error("--steps and --stage2-steps must be >= 0 (0: the preset's), --eval-items >= 1")
    a.stage2_steps = a.stage2_steps or a.steps
    if a.train_args:                                     # a bad flag now, not after the base's evaluation
        import train
        extra = shlex.split(a.train_args)
        try:
            train.parse_args(["--out", os.path.join(a.out, "check")] + extra)
        except SystemExit:
            p.error(f"--train-args {a.train_args!r}: train.py refuses it (above)")
        own = sorted(train_args.given_flags(extra, train.__doc__) & {"out", "seed", "model", "stage", "resume",
                                                                     "global_image", "gap_cache", "engine", "steps"})
        if own:
            p.error("--train-args sets what the ablation sets for each run: "
                    + ", ".join("--" + k.replace("_", "-") for k in own))
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        p.error(f"--out {a.out} is a file; pass a folder")
    if not os.path.isdir(a.base):
        p.error(f"base checkpoint {a.base!r} not found (python -m toy.warmup writes it)")
    if os.path.isdir(a.out) and os.listdir(a.out) and not a.resume:
        p.error(f"{a.out} is not empty: pass --resume to keep its finished parts, or another --out")
    return a


# ----------------------------------------------------------------------------- training

def run_dir(a, arm: str, seed: int) -> str:
    return os.path.join(a.out, f"{arm}-s{seed}")


def finished(path: str, steps: int) -> bool:
    """True when `path`/ckpt holds the final step of a run of `steps` steps."""
    f = os.path.join(path, "ckpt", "trainer.pt")
    return os.path.exists(f) and torch.load(f, weights_only=False)["step"] >= steps


def train_arm(a, arm: str, seed: int) -> str:
    """Train one arm for one seed (or resume / skip it); returns the run folder."""
    import train
    out = run_dir(a, arm, seed)
    argv = ["--out", out, "--seed", str(seed), "--gap-cache", os.path.join(a.out, "info_gap_cache.jsonl")]
    if arm == "baseline":
        argv += ["--stage", "1", "--model", a.base, "--global-image", "full"]
    elif arm == "stage1":
        argv += ["--stage", "1", "--model", a.base]
    else:
        argv += ["--stage", "2", "--model", os.path.join(run_dir(a, "stage1", seed), "ckpt")]
    argv += ["--engine", a.engine] + shlex.split(a.train_args)
    steps = a.stage2_steps if arm == "stage2" else a.steps
    if steps:
        argv += ["--steps", str(steps)]
    steps = steps or train.parse_args(argv).steps
    if finished(out, steps):
        return out
    if checkpoint.RunFolder(out).used():                    # stopped or killed, with or without a checkpoint:
        argv = ["--out", out, "--resume", "--steps", str(steps)]    # its own settings, to this call's steps
    print(f"== train {arm} seed {seed}: python train.py {' '.join(argv)}", flush=True)
    train.main(argv)
    return out


# ----------------------------------------------------------------------------- evaluation

def evaluate_model(a, model: str, name: str) -> dict:
    """Every budget in BUDGETS with both probes; cached as OUT/eval/<name>.json (written atomically)."""
    import eval as ev
    path = os.path.join(a.out, "eval", f"{name}.json")
    trainer = os.path.join(model, "trainer.pt")              # a run's checkpoint: which step was evaluated
    step = torch.load(trainer, weights_only=False)["step"] if os.path.exists(trainer) else None
    settings = {"eval_items": a.eval_items, "engine": a.engine, "budgets": BUDGETS, "step": step}
    if os.path.exists(path):
        kept = json.load(open(path))
        if kept.get("settings") == settings:
            return kept
        print(f"   eval {name}: the kept one had other settings ({kept.get('settings')}): evaluated again", flush=True)
    agent = policy.load_agent(model, "cpu", torch.float32)
    tasks = toy.world.eval_tasks(a.eval_items)
    res, galleries = {}, {}
    for label, tokens in BUDGETS.items():
        t0 = time.perf_counter()
        r = ev.evaluate(agent, tasks, toy.world.rollout_config(global_max_pixels=tokens * crop_tool.TOKEN_PIXELS, engine=a.engine), ("noise", "gt"),
                        batch_size=64, progress=False)
        galleries[label] = r.pop("episodes")["normal"]
        m = dict(r["metrics"])
        for probe, pm in r["probes"].items():
            m[f"probe/{probe}"] = pm.get("delta/acc")
        m["eval_seconds"] = round(time.perf_counter() - t0, 1)
        res[label] = m
        print(f"   eval {name} @{tokens} tokens: acc {m['acc']:.3f} noise {m['probe/noise']:+.3f} "
              f"gt {m['probe/gt']:+.3f} iou {m['box/iou_b1'] or 0:.3f} ({m['eval_seconds']} s)", flush=True)
    if name in ("base", f"stage1-s{a.seeds[0]}", f"stage2-s{a.seeds[0]}"):
        import rewards
        for e in galleries["low"]:                       # the stage-1 reward each episode would earn
            t = tasks[e.task_index]
            e.reward, e.reward_parts = rewards.outcome_reward(e.answer, t.answer, t.choices, e.malformed_turns,
                                                              len(e.crops))
        ev.write_gallery(galleries["low"], tasks, os.path.join(a.out, "gallery", name), 8, seed=0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    res["settings"] = settings
    checkpoint.write_whole(path, json.dumps(res, indent=1))
    return res


# ----------------------------------------------------------------------------- report

def mean_std(xs: list) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(a, evals: dict[str, dict], wall: dict[str, list[float]]) -> dict:
    """{row: {budget: {key: (mean, std)}}} for base and each arm, over seeds."""
    table = {}
    for row in ("base",) + ARMS:
        names = ["base"] if row == "base" else [f"{row}-s{s}" for s in a.seeds]
        table[row] = {b: {k: mean_std([evals[n][b].get(k) for n in names]) for k, _ in ROWS} for b in BUDGETS}
        table[row]["train_minutes"] = mean_std([w / 60 for w in wall.get(row, [])])
    return table


def check_targets(t: dict) -> list[tuple[str, bool, str]]:
    """The targets, from the means: the base still reads and keeps the format (low budget); the baseline
    answers from the global image (mid budget); stage 1 depends on its crop (noise-crop drop >= 3x the
    baseline's) without losing accuracy (low and mid); stage 2 boxes more precisely (low budget)."""
    at = lambda row, b, k: t[row][b][k][0]
    out = []
    if "probe/gt" in t["base"]["low"] and at("base", "low", "probe/gt") is not None:
        gt = at("base", "low", "acc") + at("base", "low", "probe/gt")
        fmt = at("base", "low", "format/valid_rate")
        out.append(("the base reads a ground-truth crop (>= 0.95) and keeps the format (>= 0.95), low budget",
                    gt >= 0.95 and fmt >= 0.95, f"GT-crop accuracy {gt:.3f}, format-valid {fmt:.3f}"))
    budgets = [b for b in ("low", "mid") if b in t["baseline"]]
    if "mid" in budgets:
        nb = at("baseline", "mid", "probe/noise")
        out.append(("the baseline answers from the global image: noise-crop change >= -0.10 (mid budget)", nb >= -0.10,
                    f"{nb:+.3f}"))
    for b in budgets:
        nb, n1 = -at("baseline", b, "probe/noise"), -at("stage1", b, "probe/noise")
        out.append((f"noise-crop drop after stage 1 >= 3x the baseline's ({b} budget)", n1 >= 3 * max(nb, 0) and n1 > 0,
                    f"stage 1 {n1:.3f} vs baseline {nb:.3f} "
                    + (f"({n1 / nb:.1f}x)" if nb > 0 else "(the baseline has no drop)")))
        a1, ab = at("stage1", b, "acc"), at("baseline", b, "acc")
        out.append((f"stage-1 accuracy >= baseline's ({b} budget)", a1 >= ab, f"{a1:.3f} vs {ab:.3f}"))
    low = lambda row, k: at(row, "low", k)
    i1, i2 = low("stage1", "box/iou_b1") or 0.0, low("stage2", "box/iou_b1") or 0.0
    ok = i2 >= i1 + 0.10 and low("stage2", "acc") >= low("stage1", "acc")
    out.append(("stage 2: IoU with B1 +0.10 over stage 1, accuracy not lower (low budget)", ok,
                f"IoU {i2:.3f} vs {i1:.3f}; acc {low('stage2', 'acc'):.3f} vs {low('stage1', 'acc'):.3f}"))
    return out


def _cell(ms, signed=False) -> str:
    m, s = ms
    if m is None:
        return "-"
    f = "{:+.3f}" if signed else "{:.3f}"
    return f.format(m) + (f" ± {s:.3f}" if s else "")


def format_table(t: dict, a) -> str:
    lines = []
    for b, tokens in BUDGETS.items():
        lines += [f"\nGlobal image at {tokens} visual tokens ({BUDGET_NAMES.get(b, b)}),"
                  f" {a.eval_items} held-out items, mean ± std over seeds {a.seeds}:\n",
                  "| run | " + " | ".join(name for _, name in ROWS) + " | train min |",
                  "|---" * (len(ROWS) + 2) + "|"]
        for row in ("base",) + ARMS:
            cells = [_cell(t[row][b][k], k.startswith("probe/")) for k, _ in ROWS]
            wall = "-" if row == "base" else _cell(t[row]["train_minutes"])
            lines.append(f"| {row} | " + " | ".join(cells) + f" | {wall} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.box_payoff:
        print(box_payoff(a.box_payoff, a.engine))
        return
    os.makedirs(a.out, exist_ok=True)
    t_start = time.time()
    evals, wall = {"base": evaluate_model(a, a.base, "base")}, {}
    for seed in a.seeds:
        for arm in ARMS:
            out = train_arm(a, arm, seed)
            rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
            wall.setdefault(arm, []).append(sum(r["time/step_s"] for r in rows))
            evals[f"{arm}-s{seed}"] = evaluate_model(a, os.path.join(out, "ckpt"), f"{arm}-s{seed}")
    table = summarize(a, evals, wall)
    targets = check_targets(table)
    report = {"args": vars(a), "machine": f"{platform.machine()} {platform.processor()}".strip(),
              "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"),
              "minutes_this_call": round((time.time() - t_start) / 60, 1),   # after --resume: only this call's part
              "table": table, "targets": [{"target": n, "met": ok, "measured": m} for n, ok, m in targets],
              "evals": evals}
    text = format_table(table, a) + "\n\nTargets:\n" + "\n".join(
        f"- [{'met' if ok else 'MISSED'}] {n}: {m}" for n, ok, m in targets)
    checkpoint.write_whole(os.path.join(a.out, "summary.json"), json.dumps(report, indent=1))
    checkpoint.write_whole(os.path.join(a.out, "table.md"), text + "\n")
    print(text)
    curves = metrics.plot_curves({arm: [os.path.join(run_dir(a, arm, s), "metrics.jsonl") for s in a.seeds] for arm in ARMS},
                                 ["acc", "tool/crop_rate", "box/iou_b1", "box/area_frac"], os.path.join(a.out, "curves.png"))
    print(f"curves: {curves}")
    print(f"{report['minutes_this_call']} min (this call); {os.path.join(a.out, 'summary.json')}")


# ----------------------------------------------------------------------------- a diagnostic

SIDES = (("<= 56 px (the cell or tighter)", 56), ("57-112 px", 112), ("> 112 px", 10 ** 9))


def box_payoff(model: str, engine: str = "cached", group: int = 8, seed: int = 0) -> str:
    """What stage 2 can select among: `model`'s first boxes, sampled as in stage-2 training
    (temperature 1, the annotated items, `group` rollouts each) with the global image at the low
    budget, grouped by their longest side in original pixels. For each size: its share, how often it
    covers B1 (the coverage gate), its accuracy, IoU with B1 and mean stage-2 reward (toy preset's
    weights), and a few of the small boxes that miss B1. A size whose boxes land off B1 pays less than a
    bigger, safer one, whatever its IoU."""
    import lfpc
    import rewards
    agent = policy.load_agent(model, "cpu", torch.float32)
    tasks = toy.world.training_tasks(2, 0)
    cfg = toy.world.rollout_config(global_max_pixels=BUDGETS["low"] * crop_tool.TOKEN_PIXELS, temperature=1.0,
                             batch_size=64, engine=engine)
    episodes = lfpc.rollout(agent, tasks, group, cfg, seed=seed)
    rows, missed = {name: [] for name, _ in SIDES}, []       # missed: small boxes off B1, as examples
    for k, e in enumerate(episodes):
        if not e.crops:
            continue
        t, box = tasks[k // group], e.crops[0].box_original
        total, parts = rewards.stage2_reward(e.answer, t.answer, t.choices, e.malformed_turns, len(e.crops),
                                             box, t.boxes, t.load_image().size)
        side = max(box[2] - box[0], box[3] - box[1])
        name = next(n for n, limit in SIDES if side <= limit)
        rows[name].append((parts["gate"], parts["acc"], rewards.box_iou(box, t.boxes[0]), total))
        if side <= SIDES[0][1] and parts["gate"] == 0.0 and len(missed) < 4:
            missed.append(f"{list(box)} for the cell {[round(v) for v in t.boxes[1]]}")
    lines = [f"{model}: {len(episodes)} episodes ({len(tasks)} stage-2 items x {group}), global image at "
             f"{BUDGETS['low']} visual tokens, temperature 1",
             "| first box side | share | covers B1 | accuracy | IoU with B1 | stage-2 reward |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if r:
            means = [sum(col) / len(r) for col in zip(*r)]
            lines.append(f"| {name} | {len(r) / len(episodes):.3f} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    lines.append(f"| no crop | {sum(not e.crops for e in episodes) / len(episodes):.3f} | | | | |")
    if missed:
        lines.append(f"{SIDES[0][0]} boxes that miss B1, e.g.: " + "; ".join(missed))
    return "\n".join(lines)


if __name__ == "__main__":
    main()

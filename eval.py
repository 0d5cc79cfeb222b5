"""Evaluate an LFPC checkpoint: accuracy, the crop-dependency diagnostic, box precision, the real
benchmarks (V*, HR-Bench) and a picture gallery.

    python eval.py                                                     # toy preset: latest toy checkpoint
    python eval.py --preset paper --model PATH --data items.jsonl      # the project's JSONL
    python eval.py --preset paper --model PATH --vstar vstar_bench/ --budget 1024
    python eval.py --preset paper --model PATH --hrbench hr_bench_8k.tsv --budget 1024 --probes noise,gt
    python eval.py --preset paper --model PATH --hrbench hr_bench_4k.tsv --no-tool   # the information gap itself

Prints a table and writes OUT/results.json (every number, the rollout config, model and data paths,
date, machine, one record per item and run) and OUT/gallery/index.html (default OUT: runs/eval/<time>).

`--preset` (support/presets.py; default toy) fills every flag left unset. The toy preset: --model is the
latest toy checkpoint (runs/stage2/ckpt, else runs/stage1/ckpt, else toy/base); without a
data flag, `--limit` (500) held-out toy items (item stream seed 3, disjoint from warm-up and
training), the toy's rollout settings (native crops, box downsampling) and --budget 16 (half the
canvas side). V* and HR-Bench need a real model and `--preset paper`.

Decoding: greedy (temperature 0), one rollout per task, `--batch-size` tasks at a time through
`lfpc.rollout`. The global image gets `--budget` visual tokens (max_pixels = budget*28*28; the CLI
drops any per-task `max_pixels`, so one budget holds for all); crops are always cut from the original.

Metrics of each run: the episode metrics of support/metrics.py (acc, acc/<cat>, hrbench/*, tool/*, format/*,
box/*, stop/*, len/*: one vocabulary with training) plus "n" (episodes) and time/sec_per_question
(wall-clock seconds of the run / questions; batched, so below one-at-a-time latency).

Crop-dependency diagnostic (the paper's answer-before-crop test): the same run again with
`RolloutConfig(probe=...)`:
    noise    every successful crop is replaced by noise of the same size
    gt       every parsed tool call is answered with the crop of the task's B1, whatever box was asked for
             (one the tool would refuse included: its episode gets a crop where it would get an error);
             needs boxes on EVERY task, otherwise skipped with a note (HR-Bench has none)
    no-tool  no tool offered (one turn, the global image alone): the model's own accuracy, so the gain
             of the tool is acc - no-tool acc (a peer practice)
For each probe: its accuracy keys (acc, acc/<cat>, hrbench/*), tool/call_rate, and
delta/<key> = probe - normal (the paper's "change in accuracy": a big drop under noise means the
answer depends on the crop). --no-tool: the whole evaluation with `use_tool=False`: no tool/ or box/
metrics, no probes. OUT/probes.png draws the accuracy keys of every run as bars.

Benchmark protocols (named in the "measured" record): V* in the release's shuffled option order
(test_questions.jsonl) when the folder holds it, else a seeded shuffle (data.vstar_protocol);
HR-Bench scored per cycle_category and averaged over cycles as VLMEvalKit does, its mean the
paper's (FSP + FCP) / 2 (metrics.hrbench_scores).

Categories: loaders put them in Task.id as "<category>/<name>"; `metrics.category(task)` is the part
before the first "/" (None without one; the project's JSONL ids usually have none).

Benchmark files: `data.load_vstar` (V*) and `data.load_hrbench` (HR-Bench); the project's JSONL:
`data.load_tasks`. Their formats and checks are in support/data.py's docstring.
"""
from __future__ import annotations

import argparse
import html
import json
import os
import platform
import random
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import crop_tool
import lfpc
from support import checkpoint, cli, data, metrics, policy, presets, prompts
from support.judge import RuleJudge, make_judge

PROBES = ("noise", "gt", "no-tool")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate an LFPC checkpoint (see the module docstring).")
    d = " (default: %(default)s)"
    pre = " (default: the preset's)"
    p.add_argument("--preset", default="toy", choices=sorted(presets.NAMES), help="named settings" + d)
    p.add_argument("--model", help="Qwen2.5-VL checkpoint: a folder (e.g. written by policy.save_agent) or hub name "
                   "(toy preset: the latest toy checkpoint)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="the project's JSONL of tasks (data.load_tasks)")
    src.add_argument("--vstar", help="V* folder holding direct_attributes/ and relative_position/")
    src.add_argument("--hrbench", help="HR-Bench TSV (hr_bench_4k.tsv or hr_bench_8k.tsv)")
    p.add_argument("--image-cache", help="folder for HR-Bench's decoded images (default: <tsv stem>_images/ beside it)")
    p.add_argument("--budget", type=int, help="global-image budget, visual tokens of 28x28 px" + pre)
    p.add_argument("--min-tokens", type=int, help="smallest global image, visual tokens" + pre)
    p.add_argument("--resample", choices=["bicubic", "box"], help="how the global image is downsampled" + pre)
    p.add_argument("--crop-max-tokens", type=int, help="crop budget, visual tokens" + pre)
    p.add_argument("--crop-min-tokens", type=int, help="smallest crop, visual tokens" + pre)
    p.add_argument("--crop-snap", type=int, help="grow each cut region to multiples of this many px, 0: off" + pre)
    p.add_argument("--crop-resample", choices=["bicubic", "box"], help="how a crop over budget is downsampled" + pre)
    p.add_argument("--no-tool", action="store_true", help="offer no tool: answer from the global image alone")
    p.add_argument("--prompt", choices=list(prompts.STYLES), help="how turns are written (support/prompts.py): qwen, or "
                   "deepeyes to evaluate a DeepEyes checkpoint as it was trained (default: the model's own, saved "
                   "beside it; else qwen)")
    p.add_argument("--judge", default="rule", choices=["rule", "llm"], help="who decides what is right: the rules "
                   "of support/answers.py, or a model behind an OpenAI-compatible endpoint (support/judge.py)" + d)
    p.add_argument("--judge-url", help="--judge llm: the endpoint, e.g. http://127.0.0.1:8000 (a vLLM server)")
    p.add_argument("--judge-model", help="--judge llm: the served model's name")
    p.add_argument("--judge-cache", help="--judge llm: JSONL cache of verdicts (default: OUT/judge_cache.jsonl)")
    p.add_argument("--judge-timeout", type=float, default=10.0, help="--judge llm: seconds a request may take (an API "
                   "key goes in the environment variable LFPC_JUDGE_API_KEY)" + d)
    p.add_argument("--engine", default="cached", choices=["cached", "reference"],
                   help="rollout engine: KV cache across turns, or re-prefill every turn (same tokens)" + d)
    p.add_argument("--probes", default="noise,gt,no-tool", help="probes, comma-separated (noise, gt, no-tool) or "
                   "none" + d)
    p.add_argument("--batch-size", type=int, help="tasks rolled out together" + pre)
    p.add_argument("--max-new-tokens", type=int, help="sampled tokens per turn" + pre)
    p.add_argument("--max-response-tokens", type=int, help="sampled tokens per episode, all turns" + pre)
    p.add_argument("--max-turns", type=int, help="assistant turns per episode" + pre)
    p.add_argument("--limit", type=int, help="evaluate only the first N tasks, in load order (default: all of "
                   "--data, --vstar or --hrbench; the toy preset's held-out items: 500)")
    p.add_argument("--gallery", type=int, default=16, help="items drawn in the gallery, 0: none" + d)
    p.add_argument("--out", default=None, help="output folder (default: runs/eval/<date-time>)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device" + d)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    a = p.parse_args(argv)
    world = presets.get(a.preset)
    if not (a.data or a.vstar or a.hrbench) and world["eval_tasks"] is None:
        p.error(f"--preset {a.preset}: pass the tasks (--data, --vstar or --hrbench)")
    if a.image_cache and not a.hrbench:
        p.error("--image-cache is where --hrbench's images are decoded: it goes with --hrbench")
    if (a.vstar or a.hrbench) and world["system_prompt"] is not None:
        p.error(f"V* and HR-Bench need a real model and its settings: pass --preset paper, not --preset {a.preset}")
    if not a.model:
        found = [m for m in world["checkpoints"] if os.path.isdir(m)]
        if not found:
            p.error("--model: no checkpoint of the preset found (" + ", ".join(world["checkpoints"]) + "); train one "
                    "or pass --model" if world["checkpoints"] else f"--preset {a.preset} needs --model (a checkpoint "
                    "folder or a hub name)")
        a.model = found[0]
    limit_given = a.limit is not None
    presets.fill(a, a.preset)
    if (a.data or a.vstar or a.hrbench) and not limit_given:
        a.limit = None                      # the preset's count is of its own held-out items: given data, all of it
    cli.refuse(p, cli.at_least(a, ("budget", "min_tokens", "crop_max_tokens", "crop_min_tokens", "batch_size",
                                    "max_new_tokens", "max_response_tokens", "max_turns", "limit")))
    if a.crop_snap < 0 or a.gallery < 0:
        p.error("--crop-snap and --gallery must be >= 0")
    if a.crop_min_tokens > a.crop_max_tokens:
        p.error(f"--crop-min-tokens ({a.crop_min_tokens}) must not exceed --crop-max-tokens ({a.crop_max_tokens})")
    if a.min_tokens > a.budget:
        p.error(f"--min-tokens ({a.min_tokens}) must not exceed --budget ({a.budget}): the global image would be "
                f"shown at the budget anyway")
    if (why := policy.device_problem(a.device)):
        p.error(why)
    cli.refuse(p, cli.judge_problems(a))
    if (why := policy.model_problem(a.model)):
        p.error(why)
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    a.probes = () if a.probes.strip() == "none" else tuple(s.strip() for s in a.probes.split(",") if s.strip())
    if set(a.probes) - set(PROBES):
        p.error(f"--probes: unknown {sorted(set(a.probes) - set(PROBES))}; use {','.join(PROBES)} or none")
    if (why := presets.check_model(a.preset, a.model)):
        p.error(why)
    return a


# ----------------------------------------------------------------------------- metrics

def summarize(episodes: list[lfpc.Episode], tasks: list[lfpc.Task], seconds: float | None = None, judge=None) -> dict:
    """The run's metrics (module docstring); episode e belongs to tasks[e.task_index]."""
    m = {"n": len(episodes), **metrics.episode_metrics(episodes, tasks, judge)}
    m["time/sec_per_question"] = seconds / len(episodes) if seconds is not None and episodes else None
    return m


def item_records(episodes: list[lfpc.Episode], tasks: list[lfpc.Task], judge=None) -> list[dict]:
    """One JSON-able record per episode: id, answer, prediction, correct (by `judge`, the one that gave `acc`;
    default the rules), boxes asked for (original frame)."""
    judge = judge or RuleJudge()
    records = []
    for e in episodes:
        t = tasks[e.task_index]
        records.append({"id": t.id, "answer": t.answer, "prediction": e.answer,
                        "correct": judge.correct(e.answer, t.answer, t.choices, t.question),
                        "stop_reason": e.stop_reason,
                        "boxes": [list(c.box_original) for c in e.crops], "tool_errors": len(e.tool_errors),
                        "sampled_tokens": e.num_generated})
    return records


# ----------------------------------------------------------------------------- evaluation

def _run(agent, tasks, cfg, batch_size, progress, desc, sample_fn):
    """Greedy episodes for `tasks` in chunks of `batch_size`; (episodes aligned with tasks, seconds)."""
    episodes, t0 = [], time.perf_counter()
    with tqdm(total=len(tasks), desc=desc, unit="q", disable=not progress) as bar:
        for k in range(0, len(tasks), batch_size):
            chunk = tasks[k:k + batch_size]
            for e in lfpc.rollout(agent, chunk, 1, cfg, sample_fn=sample_fn):
                e.task_index += k          # row of the chunk -> row of `tasks`
                episodes.append(e)
            bar.update(len(chunk))
    return episodes, time.perf_counter() - t0


def _accuracy_keys(m: dict) -> dict:
    return {k: v for k, v in m.items() if k == "acc" or k.startswith(("acc/", "hrbench/"))}


def evaluate(agent: lfpc.Agent, tasks: list[lfpc.Task], cfg: lfpc.RolloutConfig, probes=PROBES,
             batch_size: int = 16, progress: bool = True, sample_fn=None, judge=None) -> dict:
    """The normal run, then one run per probe. Returns {"config": the RolloutConfig used (greedy) as a
    dict, "metrics": summarize(...), "probes": {name: metrics or {"skipped": why}}, "episodes":
    {"normal" | probe: [Episode]}} ("episodes" is the one value that is not JSON).
    `sample_fn` replaces the model's sampler (tests script turns with it; see lfpc.rollout); `judge`
    (support/judge.py; default the rules) decides what is right."""
    if set(probes) - set(PROBES):
        raise ValueError(f"unknown probe(s) {sorted(set(probes) - set(PROBES))}; use {PROBES}")
    cfg = replace(cfg, temperature=0.0, batch_size=batch_size, probe="none")
    episodes, seconds = _run(agent, tasks, cfg, batch_size, progress, "eval", sample_fn)
    metrics = summarize(episodes, tasks, seconds, judge)
    if not cfg.use_tool:
        metrics = {k: v for k, v in metrics.items() if not k.startswith(("tool/", "box/"))}
    out = {"config": asdict(cfg), "metrics": metrics, "probes": {}, "episodes": {"normal": episodes}}
    lacking = sum(not t.boxes for t in tasks)
    for probe in probes:
        if not cfg.use_tool:
            out["probes"][probe] = {"skipped": "no tool is offered in --no-tool mode"}
            continue
        if probe == "gt" and lacking:
            out["probes"][probe] = {"skipped": f"{lacking} of {len(tasks)} tasks have no boxes (B1)"}
            continue
        probe_cfg = replace(cfg, use_tool=False) if probe == "no-tool" else replace(cfg, probe=probe)
        eps, secs = _run(agent, tasks, probe_cfg, batch_size, progress, f"probe {probe}", sample_fn)
        m = summarize(eps, tasks, secs, judge)
        pm = _accuracy_keys(m)
        pm.update({f"delta/{k}": v - metrics[k] for k, v in list(pm.items())
                   if v is not None and metrics[k] is not None})
        pm["tool/call_rate"] = m["tool/call_rate"]
        out["probes"][probe], out["episodes"][probe] = pm, eps
    return out


# ----------------------------------------------------------------------------- output

def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:+.3f}" if key.startswith("delta/") else f"{v:.3f}"
    return str(v)


def format_table(results: dict) -> str:
    """Plain aligned text: one row per metric, one column per run (normal, then each probe that ran)."""
    runs = [("normal", results["metrics"])] + [(p, m) for p, m in results["probes"].items() if "skipped" not in m]
    head = []
    if "measured" in results:
        head = ["measured: " + ", ".join(f"{k} {v}" for k, v in results["measured"].items())]
    keys = list(dict.fromkeys(k for _, m in runs for k in m))
    rows = [["metric"] + [name for name, _ in runs]]
    rows += [[k] + [_fmt(k, m[k]) if k in m else "" for _, m in runs] for k in keys]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    return "\n".join(head + lines + [f"probe {p}: skipped, {m['skipped']}" for p, m in results["probes"].items()
                                     if "skipped" in m])


def measured(a, agent: lfpc.Agent, cfg: lfpc.RolloutConfig, items: int, judge, tasks=()) -> dict:
    """How the numbers were measured: published numbers for one model differ by up to 7 points between
    papers over exactly these settings."""
    return {"model": a.model, "protocol": protocol(a, tasks), "prompt": agent.style, "judge": a.judge if a.judge == "rule" else
            f"llm {a.judge_model} at {a.judge_url} ({judge.stats})", "samples": 1, "decoding": "greedy",
            "global_max_pixels": cfg.global_max_pixels, "global_min_pixels": cfg.global_min_pixels,
            "crop_max_pixels": cfg.crop.max_pixels, "crop_min_pixels": cfg.crop.min_pixels,
            "max_turns": cfg.max_turns, "max_new_tokens": cfg.max_new_tokens, "seed": "none (greedy)",
            "items": items}


def protocol(a, tasks) -> str:
    """How the benchmark was scored, in words (the module docstring's protocols)."""
    if getattr(a, "vstar", None):
        if data.vstar_protocol(a.vstar) == "official":
            return "V*: the release's option order (test_questions.jsonl); acc over all questions"
        return "V*: options shuffled by random.Random('<category>/<stem>') (no test_questions.jsonl); acc over all questions"
    if getattr(a, "hrbench", None):
        cycles = len({t.cycle for t in tasks})
        how = (f"per cycle_category ({cycles} cycles), averaged over cycles (VLMEvalKit)"
               if any(t.cycle for t in tasks) else "plain means (no cycle_category column)")
        return f"HR-Bench: FSP and FCP {how}; mean = (FSP + FCP) / 2"
    return "the project's tasks: acc over all questions"


def run_info(agent: lfpc.Agent) -> dict:
    """Date and machine: platform, Python, torch and transformers versions, device."""
    import transformers
    dev = agent.device
    return {"date": datetime.now().astimezone().isoformat(timespec="seconds"), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": str(dev),
            "device_name": (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                            else platform.processor() or platform.machine())}


def plot_probes(results: dict, png: str, title: str = "") -> str:
    """A bar chart of the table's accuracy keys (acc, acc/<cat>, hrbench/*): one group per key, one bar per
    run (normal, then each probe that ran), the value written on each bar. Returns `png`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [("normal", results["metrics"])] + [(p, m) for p, m in results["probes"].items() if "skipped" not in m]
    keys = [k for k in _accuracy_keys(results["metrics"]) if results["metrics"][k] is not None]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(keys) * len(runs) + 1.5), 3.4))
    width = 0.8 / len(runs)
    for j, (name, m) in enumerate(runs):
        xs = [i + (j - (len(runs) - 1) / 2) * width for i in range(len(keys))]
        ys = [m.get(k) if m.get(k) is not None else 0.0 for k in keys]
        bars = ax.bar(xs, ys, width, label=name, color=f"C{j}")
        ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=7, padding=1)
    ax.set_xticks(range(len(keys)), keys, fontsize=9)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("accuracy", fontsize=9)
    ax.set_title(f"accuracy, normal and under each probe{': ' + title if title else ''}", fontsize=10)
    ax.legend(fontsize=8, ncol=len(runs), loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


PRED_COLOUR, TRUE_COLOUR, GAP = (230, 30, 30), (30, 200, 60), 8
GALLERY_HEIGHT = 448            # panels lower than this are upscaled (nearest neighbour) by a whole factor


def _panel(ep: lfpc.Episode, task: lfpc.Task) -> Image.Image:
    """The global image as shown, B1 (green) and each crop's box (red, numbered) drawn on it, crops beside."""
    shown = ep.images[0].convert("RGB")
    original = task.image_size
    # original frame -> shown frame: the crop tool's one mapping, with the two frames swapped
    to_shown = lambda b: crop_tool.map_box_to_original(b, original, shown.size)
    draw, lw = ImageDraw.Draw(shown), max(2, min(shown.size) // 150)
    for b in (task.boxes or [])[:1]:
        draw.rectangle(to_shown(b), outline=TRUE_COLOUR, width=lw)
    for k, c in enumerate(ep.crops, 1):
        x1, y1, x2, y2 = to_shown(c.box_original)
        draw.rectangle((x1, y1, x2, y2), outline=PRED_COLOUR, width=lw)
        draw.text((x1 + lw + 1, y1 + lw), str(k), fill=PRED_COLOUR)
    h = shown.height
    crops = [c.image.convert("RGB").resize((max(1, round(c.image.width * h / c.image.height)), h)) for c in ep.crops]
    canvas = Image.new("RGB", (shown.width + sum(im.width + GAP for im in crops), h), "white")
    x = 0
    for im in [shown] + crops:
        canvas.paste(im, (x, 0))
        x += im.width + GAP
    return canvas


def write_gallery(episodes: list[lfpc.Episode], tasks: list[lfpc.Task], out_dir: str, n: int, seed: int = 0,
                  judge=None) -> str:
    """PNGs of n sampled items (random.Random(seed)) and out_dir/index.html listing them, right or wrong by
    `judge` (the one that gave `acc`; default the rules); returns its path."""
    judge = judge or RuleJudge()
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):                   # an earlier gallery's pictures: not this one's
        if name.startswith("item_") and name.endswith(".png"):
            os.remove(os.path.join(out_dir, name))
    esc = html.escape
    pick = sorted(random.Random(seed).sample(range(len(episodes)), min(n, len(episodes))))
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>LFPC eval gallery</title><style>"
             "body{font-family:sans-serif;max-width:1400px;margin:auto} img{max-width:100%} .ok{color:#080}"
             ".bad{color:#c00} pre{white-space:pre-wrap;background:#f4f4f4;padding:4px}</style></head><body>",
             "<h1>LFPC eval gallery</h1><p>Left: the global image as shown. Red: the boxes the model asked for "
             "(numbered by crop); green: the true B1. Right: the crops as the model saw them.</p>"]
    for j, i in enumerate(pick):
        ep, task = episodes[i], tasks[episodes[i].task_index]
        name = f"item_{j:03d}.png"
        panel = _panel(ep, task)
        zoom = max(1, GALLERY_HEIGHT // panel.height)            # small images (the toy's) upscaled to be read
        panel.resize((panel.width * zoom, panel.height * zoom), Image.NEAREST).save(os.path.join(out_dir, name))
        ok = judge.correct(ep.answer, task.answer, task.choices, task.question) > 0
        choices = "".join(f"<br>({chr(65 + k)}) {esc(c)}" for k, c in enumerate(task.choices or []))
        reward = (f"<br>reward {ep.reward:.3f} {esc(json.dumps(ep.reward_parts))}" if ep.reward_parts else "")
        errors = "".join(f"<br>tool error: {esc(r)}" for r in ep.tool_errors)
        turns = "".join(f"<p>turn {k}:</p><pre>{esc(t)}</pre>" for k, t in enumerate(ep.turns, 1))
        think = ep.turns[0].split("<think>")[1].split("</think>")[0] if ep.turns and "<think>" in ep.turns[0] else None
        think = f"<br><b>first impression</b> {esc(think)}" if think else ""
        parts.append(f"<hr><h2>{esc(task.id or str(i))}: <span class='{'ok' if ok else 'bad'}'>"
                     f"{'correct' if ok else 'incorrect'}</span></h2><img src='{name}'>"
                     f"<p><b>question</b> {esc(task.question)}{choices}<br><b>answer</b> {esc(task.answer)}"
                     f"{think}<br><b>prediction</b> {esc(str(ep.answer))} (stop: {esc(ep.stop_reason)})"
                     f"{reward}{errors}</p>{turns}")
    path = os.path.join(out_dir, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts + ["</body></html>"]))
    return path


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    try:                                                   # every data problem: one message, before the model loads
        if a.data:
            tasks, source = data.load_tasks(a.data), os.path.abspath(a.data)
        elif a.vstar:
            tasks, source = data.load_vstar(a.vstar), os.path.abspath(a.vstar)
        elif a.hrbench:
            tasks, source = data.load_hrbench(a.hrbench, a.image_cache), os.path.abspath(a.hrbench)
        else:
            tasks, source = presets.get(a.preset)["eval_tasks"](a.limit), f"--preset {a.preset} held-out items"
    except (data.DataError, OSError) as e:
        raise SystemExit(f"eval.py: {e}") from None
    tasks = [replace(t, max_pixels=None) for t in tasks[:a.limit]]   # --budget holds for every task
    out = a.out or os.path.join("runs", "eval", datetime.now().strftime("%Y%m%d-%H%M%S"))
    try:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, ".write_probe"), "w") as f:
            f.write("x")
        os.remove(os.path.join(out, ".write_probe"))
    except OSError as e:
        raise SystemExit(f"eval.py: --out {out} cannot be written ({e.strerror or e})") from None
    judge = make_judge(a.judge, a.judge_url, a.judge_model, a.judge_cache or os.path.join(out, "judge_cache.jsonl"),
                       **({"timeout": a.judge_timeout} if a.judge == "llm" else {}))
    agent = policy.load_agent(a.model, a.device, getattr(torch, a.dtype))
    if a.prompt:
        agent = replace(agent, style=a.prompt)
    cfg = presets.rollout_config(a, a.budget, use_tool=not a.no_tool, engine=a.engine)
    if (why := lfpc.prompt_problem(agent, tasks, cfg)):
        raise SystemExit(f"eval.py: {why}")
    results = evaluate(agent, tasks, cfg, a.probes, a.batch_size, judge=judge)
    results["measured"] = measured(a, agent, cfg, len(tasks), judge, tasks)
    episodes = results.pop("episodes")
    record = {"model": a.model, "data": source, "args": vars(a), **run_info(agent), **results,
              "items": {run: item_records(eps, tasks, judge) for run, eps in episodes.items()}}
    path = os.path.join(out, "results.json")
    if os.path.exists(path):
        print(f"replacing the results of an earlier evaluation in {out}", file=sys.stderr)
    checkpoint.write_whole(path, json.dumps(record, indent=1))                # a kill leaves the old one whole
    print(format_table(results))
    print(f"results: {os.path.join(out, 'results.json')}")
    print(f"chart:   {plot_probes(results, os.path.join(out, 'probes.png'), a.model)}")
    if a.gallery > 0:
        print(f"gallery: {write_gallery(episodes['normal'], tasks, os.path.join(out, 'gallery'), a.gallery, judge=judge)}")


if __name__ == "__main__":
    main()

"""One metric vocabulary for training, evaluation, bench and the ablation: every name, its definition
and the episodes it is computed over.

Episode metrics (`episode_metrics`), the same names in train.py's metrics.jsonl and eval.py's
results.json; a mean over an empty population is None:
    acc                    mean of rewards.accuracy(answer, task.answer, task.choices)        all episodes
    acc/<cat>, n/<cat>     accuracy and count per category (task.id "<cat>/<name>")           per category
    hrbench/FSP, FCP, mean acc/single, acc/cross and their mean: HR-Bench's reported score
    tool/call_rate         fraction of episodes with at least one tool call (valid or not)   all episodes
    tool/crop_rate         fraction of episodes with at least one successful crop            all episodes
    tool/crop_success_rate successful crops / executed tool calls (crops + tool errors)      all tool calls
    format/valid_rate      fraction of episodes with no malformed turn                       all episodes
    box/n                  episodes with a successful crop whose task has boxes; over these, with b = the
    box/iou_b1, iou_bn       FIRST crop's box in the original frame: mean IoU(b, B1), IoU(b, Bn) (Bn the
    box/coverage_b1          largest), mean area(b ∩ B1) / area(B1), and mean |centre of b - centre of B1|
    box/dx_b1, dy_b1         along x / y over the image's width / height (where it looks, not how big)
    box/area_frac          mean area(b) / area(image)                                        episodes with a crop
    stop/<reason>          fraction of episodes that ended for this reason                   all episodes
    len/response           mean sampled tokens per episode, all turns                        all episodes
    len/turns              mean assistant turns per episode                                  all episodes
Training only (train.py): reward/mean and reward/<part> (means of the reward's unweighted parts),
adv/frac_zero_std (fraction of GRPO groups whose rewards are all equal: advantage 0), loss/* (see
train.py), work/* (what the rollout engine did, `engine.py`), time/step_s.
Evaluation only (eval.py): time/sec_per_question; per probe, delta/<key> = probe - normal.
"""
from __future__ import annotations

import rewards


def category(task) -> str | None:
    """The part of task.id before the first "/", or None."""
    return task.id.split("/", 1)[0] if "/" in task.id else None


def mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def episode_metrics(episodes, tasks, judge=None) -> dict:
    """The episode metrics of the module docstring; episode e belongs to tasks[e.task_index]; `judge`
    (judge.py; default the rules of rewards.accuracy) decides what is right."""
    task = lambda e: tasks[e.task_index]
    n = len(episodes)
    if judge is None:
        correct = [rewards.accuracy(e.answer, task(e).answer, task(e).choices) for e in episodes]
    else:
        correct = [judge.correct(e.answer, task(e).answer, task(e).choices, task(e).question) for e in episodes]
    m = {"acc": mean(correct)}
    by_cat = {}
    for e, c in zip(episodes, correct):
        by_cat.setdefault(category(task(e)), []).append(c)
    for cat in sorted(k for k in by_cat if k is not None):
        m[f"acc/{cat}"], m[f"n/{cat}"] = mean(by_cat[cat]), len(by_cat[cat])
    if "single" in by_cat and "cross" in by_cat:
        m["hrbench/FSP"], m["hrbench/FCP"] = m["acc/single"], m["acc/cross"]
        m["hrbench/mean"] = (m["hrbench/FSP"] + m["hrbench/FCP"]) / 2
    cropped = [e for e in episodes if e.crops]
    executed = sum(len(e.crops) + len(e.tool_errors) for e in episodes)
    m["tool/call_rate"] = mean(float(e.tool_calls > 0) for e in episodes)
    m["tool/crop_rate"] = len(cropped) / n if n else None
    m["tool/crop_success_rate"] = sum(len(e.crops) for e in episodes) / executed if executed else None
    m["format/valid_rate"] = mean(float(e.malformed_turns == 0) for e in episodes)
    boxed = [(e.crops[0].box_original, task(e).boxes, task(e).image_size) for e in cropped if task(e).boxes]
    m["box/n"] = len(boxed)
    m["box/iou_b1"] = mean(rewards.box_iou(b, gt[0]) for b, gt, _ in boxed)
    m["box/iou_bn"] = mean(rewards.box_iou(b, gt[-1]) for b, gt, _ in boxed)
    m["box/coverage_b1"] = mean(rewards.coverage(b, gt[0]) for b, gt, _ in boxed)
    for k, axis in (("box/dx_b1", 0), ("box/dy_b1", 1)):
        m[k] = mean(abs(b[axis] + b[axis + 2] - gt[0][axis] - gt[0][axis + 2]) / 2 / size[axis]
                    for b, gt, size in boxed)
    m["box/area_frac"] = mean(rewards.box_area(e.crops[0].box_original) / (task(e).image_size[0] * task(e).image_size[1])
                              for e in cropped)
    for reason in sorted({e.stop_reason for e in episodes}):
        m[f"stop/{reason}"] = sum(e.stop_reason == reason for e in episodes) / n
    m["len/response"] = mean(e.num_generated for e in episodes)
    m["len/turns"] = mean(len(e.turns) for e in episodes)
    return m


CURVES = ("reward/mean", "acc", "tool/crop_rate", "box/iou_b1", "box/area_frac", "len/response")


def plot_curves(runs: dict[str, list[str]], keys, png: str) -> None:
    """Training curves as a PNG, one panel per metric, one line per name of `runs` (the mean, step by step,
    of its metrics.jsonl files: seeds), when matplotlib is installed (an optional dependency)."""
    import json
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (optional: pip install matplotlib): no curves")
        return
    series = {name: [[json.loads(line) for line in open(path)] for path in paths] for name, paths in runs.items()}
    keys = [k for k in keys if any(row.get(k) is not None for rows in series.values() for r in rows for row in r)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for name, rows in series.items():
        n = min(len(r) for r in rows)
        for ax, k in zip(axes[0], keys):
            ys = [mean(r[i][k] for r in rows if r[i].get(k) is not None) for i in range(n)]
            ax.plot(range(1, n + 1), [float("nan") if y is None else y for y in ys], label=name)
            ax.set_title(k, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
    if len(series) > 1:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")

"""One metric vocabulary for training, evaluation, bench and the ablation: every name, its definition
and the episodes it is computed over.

Episode metrics (`episode_metrics`), the same names in train.py's metrics.jsonl and eval.py's
results.json; a mean over an empty population is None:
    acc                    mean of judge.correct(answer, task.answer, task.choices) (default: the rules of
                           answers.accuracy; --judge llm: support/judge.py)                           all episodes
    acc/<cat>, n/<cat>     accuracy and count per category (task.id "<cat>/<name>")           per category
    hrbench/FSP, FCP, mean HR-Bench's reported scores (`hrbench_scores`): single and cross accuracy per
                           cycle_category, averaged over cycles (VLMEvalKit), and (FSP + FCP) / 2
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
train.py), work/* (what the rollout engine did, `engine.Work`: image encodes, vision patches, prefill and
decode positions with padding_tokens among them, decode_steps, slot_steps, useful_tokens, slot_utilisation
= useful_tokens / slot_steps, host_syncs; and the training forward's train_image_encodes, 0 when LoRA
reuses the rollout's image features, train_padding_frac (positions of the forward holding no token) and
train_shared_frac (the episodes' tokens not computed because their group's prompt ran once: --pack shared)),
time/step_s, and with --judge llm judge/calls,
requests, cached, fallbacks, skipped (what the model judge did this step; support/judge.py).
Evaluation only (eval.py): time/sec_per_question; per probe, delta/<key> = probe - normal.
"""
from __future__ import annotations

import math

import rewards
from support import answers, dist


def category(task) -> str | None:
    """The part of task.id before the first "/", or None."""
    return task.id.split("/", 1)[0] if "/" in task.id else None


def mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def episode_metrics(episodes, tasks, judge=None) -> dict:
    """The episode metrics of the module docstring; episode e belongs to tasks[e.task_index]; `judge`
    (support/judge.py; default the rules of answers.accuracy) decides what is right."""
    task = lambda e: tasks[e.task_index]
    n = len(episodes)
    if judge is None:
        correct = [answers.accuracy(e.answer, task(e).answer, task(e).choices, task(e).question) for e in episodes]
    else:
        correct = [judge.correct(e.answer, task(e).answer, task(e).choices, task(e).question) for e in episodes]
    m = {"acc": mean(correct)}
    by_cat = {}
    for e, c in zip(episodes, correct):
        by_cat.setdefault(category(task(e)), []).append(c)
    for cat in sorted(k for k in by_cat if k is not None):
        m[f"acc/{cat}"], m[f"n/{cat}"] = mean(by_cat[cat]), len(by_cat[cat])
    if "single" in by_cat and "cross" in by_cat:
        m.update(hrbench_scores(episodes, tasks, correct))
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


def hrbench_scores(episodes, tasks, correct) -> dict:
    """HR-Bench's reported scores, as VLMEvalKit's hrbench scorer computes them: accuracy of single (FSP) and
    cross (FCP) questions within each cycle_category (a rotation of the options), averaged over the cycles;
    hrbench/mean = (FSP + FCP) / 2 (the paper's). Tasks without a cycle form one cycle (plain means)."""
    cells = {}
    for e, c in zip(episodes, correct):
        t = tasks[e.task_index]
        cells.setdefault((t.cycle, category(t)), []).append(c)
    cycles = sorted({cyc for cyc, _ in cells}, key=str)
    per = lambda cat: mean(mean(cells[(cyc, cat)]) for cyc in cycles if (cyc, cat) in cells)
    fsp, fcp = per("single"), per("cross")
    return {"hrbench/FSP": fsp, "hrbench/FCP": fcp, "hrbench/mean": (fsp + fcp) / 2}


CURVES = ("reward/mean", "acc", "tool/call_rate", "box/iou_b1", "box/area_frac", "len/response")
LABELS = {"reward/mean": "reward (mean)", "acc": "accuracy", "tool/call_rate": "tool-call rate",
          "tool/crop_rate": "crop rate", "box/iou_b1": "first box: IoU with B1",
          "box/area_frac": "first box: area / image", "len/response": "sampled tokens / episode"}
RATES = ("acc", "tool/call_rate", "tool/crop_rate", "format/valid_rate")       # drawn on [0, 1]


class UpdateTally:
    """What one update's micro-batches add up to, over every rank (train.update_policy): grpo.policy_loss's
    metrics weighted by their tokens, the summed loss (loss/policy), the sampler gap (mean |log p_train -
    log p_sample| over sampled tokens), a non-finite loss, and the training forward's work. A micro-batch
    repeated only to keep FSDP2's ranks in step (counted False) adds its work, not its loss."""

    LOSS = ("clip_frac", "ratio_mean", "approx_kl")

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.tokens = self.encodes = self.positions = self.padding = self.shared = 0
        self.policy = self.gap = 0.0
        self.skip = False

    def add(self, batch, loss, m: dict, logprobs, sampled, mask, counted: bool = True) -> None:
        """One micro-batch: its loss and metrics (`m`), its log-probs [b, T] against the sampler's [b, T]."""
        self.encodes += batch.image_encodes
        self.positions, self.padding = self.positions + batch.input_ids.numel(), self.padding + batch.padding
        self.shared += batch.shared
        self.skip = self.skip or not math.isfinite(float(loss.detach()))
        if counted:
            for key, v in m.items():
                self.sums[key] = self.sums.get(key, 0.0) + v * m["num_tokens"]
            self.policy += float(loss.detach())
            self.tokens += m["num_tokens"]
            self.gap += float((logprobs - sampled).abs()[mask.bool()].sum())

    def total(self, w, kl: bool = False, trained: int = 0) -> tuple[dict, bool, dict]:
        """(the loss/* metrics without their prefix, trained_episodes among them (`trained`: this rank's
        episodes forwarded), whether any rank's loss was non-finite, the work/* metrics of the training
        forward), summed over the ranks in one collective."""
        keys = list(self.LOSS) + (["kl_ref"] if kl else [])
        tot = dist.all_sum([self.sums.get(k, 0.0) for k in keys] + [self.tokens, self.policy, self.gap, float(self.skip),
                                                                     self.encodes, self.padding, self.positions, trained,
                                                                     self.shared], w)
        sums, (tokens, policy, gap, skip, encodes, padding, positions, trained, shared) = tot[:len(keys)], tot[len(keys):]
        lm = {"clip_frac": 0.0, "ratio_mean": 1.0, "approx_kl": 0.0}          # when no episode carried an advantage
        if tokens:
            lm.update({k: v / tokens for k, v in zip(keys, sums) if k in self.sums or w.distributed})
        lm.update(policy=policy, sampler_gap=gap / tokens if tokens else 0.0, trained_episodes=int(trained))
        work = {"work/train_image_encodes": int(encodes), "work/train_padding_frac": padding / max(1, positions),
                "work/train_shared_frac": shared / max(1, positions - padding + shared)}
        return lm, bool(skip), work


def plot_curves(runs: dict[str, list[str]], keys, png: str, budgets: list[int] | None = None) -> str:
    """Training curves as a PNG: one panel per metric of `keys` that has values, one line per name of `runs`
    (the mean, step by step, of its metrics.jsonl files: seeds), faint step by step with a moving average
    over a tenth of the run on top; `budgets` (stage 1: each task's information-gap budget, visual
    tokens) adds a histogram panel. Returns `png`."""
    import json

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = {name: [[json.loads(line) for line in open(path) if line.strip()] for path in paths]
              for name, paths in runs.items()}
    keys = [k for k in keys if any(row.get(k) is not None for rows in series.values() for r in rows for row in r)]
    panels = len(keys) + (budgets is not None)
    cols = min(4, max(1, panels))
    rows_n = -(-panels // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.6 * cols, 2.9 * rows_n), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for k_i, name in enumerate(series):
        rows = series[name]
        n = min(len(r) for r in rows)
        colour = f"C{k_i}"
        for ax, k in zip(flat, keys):
            ys = [mean(r[i][k] for r in rows if r[i].get(k) is not None) for i in range(n)]
            ys = [float("nan") if y is None else y for y in ys]
            steps = [rows[0][i].get("step", i + 1) for i in range(n)]
            ax.plot(steps, ys, color=colour, alpha=0.3, lw=0.8)
            ax.plot(steps, _moving_average(ys, max(1, n // 10)), color=colour, lw=1.8,
                    label=name if len(series) > 1 else None)
    for ax, k in zip(flat, keys):
        if k in RATES:
            ax.set_ylim(0, 1.05)
        elif k.startswith("box/"):
            ax.set_ylim(bottom=0)
        ax.set_title(LABELS.get(k, k), fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    if budgets is not None:
        ax = flat[len(keys)]
        values = sorted(set(budgets))
        ax.bar([str(v) for v in values], [budgets.count(v) for v in values], color="C7")
        ax.set_title("information-gap budget", fontsize=10)
        ax.set_xlabel("global image, visual tokens", fontsize=9)
        ax.set_ylabel("tasks", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.tick_params(axis="x", labelrotation=45 if len(values) > 6 else 0)
    for ax in flat[panels:]:
        ax.axis("off")
    if len(series) > 1 and keys:
        flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _moving_average(ys: list[float], window: int) -> list[float]:
    """The mean of the last `window` values (fewer at the start) at each step, NaNs left out."""
    out = []
    for i in range(len(ys)):
        w = [y for y in ys[max(0, i + 1 - window):i + 1] if y == y]
        out.append(sum(w) / len(w) if w else float("nan"))
    return out

"""Stage 1's information gap: for each training item, the global-image budget at which the model's own
answer stops agreeing with its full-resolution answer (the paper's "offline resolution selection").

    python info_gap.py --data items.jsonl --model Qwen/Qwen2.5-VL-7B-Instruct --out tasks_stage1.jsonl

writes the rows of --data again, in order, with "max_pixels" added and "image" made relative to the
folder of --out; `data.load_tasks` reads it and stage 1 trains on it (crops still come from the original).

Contract
--------
- Ladder: budgets in visual tokens (one token = 28x28 px, max_pixels = tokens * 784), descending
  geometric: round(full * ratio**i) while above the floor, then the floor; 1024 -> 16 at ratio 0.5 is
  1024, 512, 256, 128, 64, 32, 16 (L = 7). Level 0 is "full resolution": the full budget (1024 is the
  paper's 1K setting, 16384 its 16K one), i.e. the image's native size when that is smaller. Per item, a
  level that shows the same image size as the level kept above it (`smart_resize`) is skipped: a 224 px
  toy image is native at 1024..64 tokens, so its levels are 1024, 32, 16. Budgets are honoured down to
  one token (the answer function's min_pixels is 784); stage-1 training should not clamp them higher.
- Probe: k sampled DIRECT answers (no tool, one turn) at one budget. Vote key of an answer: None when
  there is none (or it is not a string), the option letter when it names an option
  (`rewards.choice_index`), else `rewards.normalize_answer(answer)`. Majority: the most common key, "no
  answer" (None) included; ties go to the key sampled first (deterministic for a given list).
- Agreement of a level with full: the level's majority is not None and
  `rewards.accuracy(level, full, choices) == 1`; where accuracy is undefined (the full answer names no
  option: ValueError) the normalised keys must be equal.
- Reference: the full-resolution majority must be a strict majority (> k/2) and not None, else the item
  is "unstable" and gets the floor: with no reliable reference answer, "disagreement" would measure
  sampling noise rather than lost detail, and the smallest global image is the safe default (the crop
  has to do the work).
- Search, assuming agreement is monotone in the budget (agrees at high budgets, disagrees from some
  level down): a binary search over levels 1..L-1 for the first (highest-budget) disagreeing level, at
  most ceil(log2 L) + 1 probes per item INCLUDING the full one (L = 7: 4 probes; the paper scans level
  by level, up to L). "gap": that level's budget; "no_gap": no probed level disagrees -> the floor. If
  agreement is NOT monotone the search still returns a disagreeing level whose upper neighbour agrees
  (level 0 always does), but not necessarily the highest disagreeing one; a no_gap may hide unprobed
  disagreements.
- Batching: up to batch_size items are in flight; each answer_fn call carries the next probe of every
  item in flight, each at its own budget (so all items at the same step share one call when they fit);
  a finished item is written and its place taken by the next. A tqdm bar counts finished items.
- Cache: JSONL, one line per FINISHED item, appended and flushed after every answer_fn call:
      {"id", "model", "ladder", "k", "budget_tokens", "max_pixels", "status", "probes",
       "answers": {"<budget tokens>": [k raw answers]}}
  A line is reused when its id and model key (and ladder and k) match, so an interrupted run resumes
  (items that were in flight start again) and a second run makes no answer call. A corrupt LAST line (a
  kill mid-write) is dropped with a warning; a corrupt line elsewhere is an error. The CLI's model key is
  --model plus the settings that change answers (temperature, max new tokens, resample); a checkpoint
  folder retrained in place keeps its name, so give it another --cache.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import warnings
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from tqdm import tqdm

import crop_tool
import data
import lfpc
import rewards
from lfpc import Task

TOKEN_PIXELS = crop_tool.TOKEN_PIXELS
MIN_PIXELS = TOKEN_PIXELS               # the prober shows every budget down to one token
STATUSES = ("gap", "no_gap", "unstable")
AnswerFn = Callable[[list[tuple[Task, int]], int], list[list[str | None]]]   # (task, budget tokens) pairs, k


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Per-item global-image budgets for LFPC stage 1 (information gap).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="training items, JSONL in the data.load_tasks schema")
    p.add_argument("--model", required=True, help="Qwen2.5-VL checkpoint that answers (hub name or folder)")
    p.add_argument("--out", required=True, help="output JSONL: the rows of --data with 'max_pixels' added")
    p.add_argument("--cache", default=None, help="probe cache JSONL (None: --out with .cache.jsonl)")
    p.add_argument("--full-tokens", type=int, default=1024,
                   help="full-resolution budget, visual tokens of 28x28 px (paper: 1024 or 16384)")
    p.add_argument("--floor-tokens", type=int, default=16, help="smallest budget of the ladder, visual tokens")
    p.add_argument("--ratio", type=float, default=0.5, help="ladder step: each budget is this fraction of the last")
    p.add_argument("--k", type=int, default=4, help="sampled answers per probe; full needs a strict majority "
                   "(3 of 4). With L=7: <= 4 probes x 4 = 16 one-turn episodes per item, one GRPO group's worth")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the answers")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens sampled per direct answer")
    p.add_argument("--resample", default="bicubic", choices=sorted(crop_tool.RESAMPLE),
                   help="how the global image is downsampled (the toy world uses box); match stage-1 training")
    p.add_argument("--batch-size", type=int, default=32, help="items in flight per answer call (k episodes each)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--seed", type=int, default=0, help="torch seed for sampling")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- ladder and votes

def ladder(full_tokens: int, floor_tokens: int, ratio: float = 0.5) -> list[int]:
    """Budgets in visual tokens, descending from full to floor inclusive: ladder(1024, 64) ==
    [1024, 512, 256, 128, 64]; ladder(1000, 100) == [1000, 500, 250, 125, 100]."""
    for name, v in (("full_tokens", full_tokens), ("floor_tokens", floor_tokens)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if floor_tokens >= full_tokens:
        raise ValueError(f"floor_tokens ({floor_tokens}) must be below full_tokens ({full_tokens})")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must lie strictly between 0 and 1, got {ratio!r}")
    out, i = [full_tokens], 1
    while (b := round(full_tokens * ratio**i)) > floor_tokens:
        if b < out[-1]:                     # a ratio near 1 can round two steps to one budget
            out.append(b)
        i += 1
    return out + [floor_tokens]


def item_levels(task: Task, budgets: list[int]) -> list[int]:
    """The item's own ladder: levels that show the same image size as the level kept above are dropped."""
    W, H = task.image_size
    size = lambda b: crop_tool.smart_resize(H, W, crop_tool.FACTOR, MIN_PIXELS, b * TOKEN_PIXELS)
    levels = [budgets[0]]
    for b in budgets[1:]:
        if size(b) != size(levels[-1]):
            levels.append(b)
    return levels


def vote_key(answer, choices: list[str] | None) -> str | None:
    """None (no answer), an option letter "A".., or the normalised text."""
    if not isinstance(answer, str) or not rewards.normalize_answer(answer):
        return None
    k = rewards.choice_index(answer, choices) if choices else None
    return chr(65 + k) if k is not None else rewards.normalize_answer(answer)


def majority(answers: list, choices: list[str] | None) -> tuple[str | None, int]:
    """(most common vote key, its count); Counter keeps first-seen order, so ties go to the first sampled."""
    return Counter(vote_key(a, choices) for a in answers).most_common(1)[0]


def agrees(level: str | None, full: str, choices: list[str] | None) -> bool:
    if level is None:
        return False
    try:
        return rewards.accuracy(level, full, choices) == 1.0
    except ValueError:                      # the full answer is no option: judge by exact match
        return rewards.normalize_answer(level) == rewards.normalize_answer(full)


# ----------------------------------------------------------------------------- the search

@dataclass
class Search:
    """One item's binary search. Levels are budgets in tokens, levels[0] = full. Invariant: every level
    below `lo` agrees with full; the first disagreeing level lies in [lo, hi], hi = L meaning none."""
    task: Task
    levels: list[int]
    k: int
    answers: dict[int, list[str | None]] = field(default_factory=dict)   # budget -> k raw answers
    reference: str | None = None            # the full-resolution majority (vote key)
    lo: int = 1
    hi: int = -1
    status: str = ""                        # "" while searching, then one of STATUSES

    def __post_init__(self):
        self.hi = len(self.levels)

    def next_budget(self) -> int:
        return self.levels[(self.lo + self.hi) // 2] if self.answers else self.levels[0]

    def record(self, budget: int, answers: list) -> None:
        self.answers[budget] = [a if isinstance(a, str) else None for a in answers]
        key, votes = majority(answers, self.task.choices)
        if budget == self.levels[0]:
            if key is None or 2 * votes <= self.k:
                self.status = "unstable"
                return
            self.reference = key
        elif agrees(key, self.reference, self.task.choices):
            self.lo = self.levels.index(budget) + 1
        else:
            self.hi = self.levels.index(budget)
        if self.lo >= self.hi:
            self.status = "gap" if self.hi < len(self.levels) else "no_gap"

    def result(self, model_key: str, budgets: list[int]) -> dict:
        budget = self.levels[self.hi] if self.status == "gap" else budgets[-1]
        return {"id": self.task.id, "model": model_key, "ladder": budgets, "k": self.k, "budget_tokens": budget,
                "max_pixels": budget * TOKEN_PIXELS, "status": self.status, "probes": len(self.answers),
                "answers": {str(b): a for b, a in self.answers.items()}}


def load_cache(path: str | None, model_key: str, budgets: list[int], k: int) -> dict[str, dict]:
    """Finished records for this model key, ladder and k, by item id. A corrupt last line is cut off."""
    if not path or not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        data = f.read()
    lines, found, start = data.split(b"\n"), {}, 0
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line) if line.strip() else None
            if rec is not None and not (isinstance(rec, dict) and {"id", "model", "ladder", "k"} <= rec.keys()):
                raise ValueError("not a cache record")
        except ValueError as e:             # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if any(rest.strip() for rest in lines[n:]):
                raise ValueError(f"{path}:{n}: corrupt cache line ({e}); only the last may be cut short") from None
            warnings.warn(f"{path}:{n}: dropping a corrupt last line (a write cut short by a kill?)")
            with open(path, "r+b") as f:
                f.truncate(start)
            return found
        if rec and rec["model"] == model_key and rec["ladder"] == budgets and rec["k"] == k:
            found[rec["id"]] = rec
        start += len(line) + 1
    if data and not data.endswith(b"\n"):  # a whole last record whose newline never made it to disk
        with open(path, "ab") as f:
            f.write(b"\n")
    return found


def select_budgets(tasks: list[Task], answer_fn: AnswerFn, model_key: str, cache_path: str | None = None,
                   full_tokens: int = 1024, floor_tokens: int = 16, ratio: float = 0.5, k: int = 4,
                   batch_size: int = 32, progress: bool = True) -> list[dict]:
    """One record per task (format: the cache's), in task order; see the module docstring."""
    budgets = ladder(full_tokens, floor_tokens, ratio)
    if k < 1 or batch_size < 1:
        raise ValueError(f"k and batch_size must be >= 1, got k={k}, batch_size={batch_size}")
    repeated = [i for i, n in Counter(t.id for t in tasks).items() if n > 1]
    if repeated:
        raise ValueError(f"task ids key the cache and must be unique; repeated: {repeated[:5]}")
    done = load_cache(cache_path, model_key, budgets, k)
    if cache_path:
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
    queue, flight = deque(t for t in tasks if t.id not in done), []
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(queue), desc="info gap", unit="item", disable=not progress)
    with open(cache_path, "a", encoding="utf-8") if cache_path else contextlib.nullcontext() as cache:
        while queue or flight:
            while queue and len(flight) < batch_size:
                task = queue.popleft()
                flight.append(Search(task, item_levels(task, budgets), k))
            pairs = [(s.task, s.next_budget()) for s in flight]
            answers = answer_fn(pairs, k)
            if len(answers) != len(pairs) or any(len(a) != k for a in answers):
                raise ValueError(f"answer_fn must return {k} answers for each of the {len(pairs)} pairs")
            for s, (_, budget), a in zip(flight, pairs, answers):
                s.record(budget, list(a))
            for s in (s for s in flight if s.status):
                done[s.task.id] = s.result(model_key, budgets)
                if cache:
                    cache.write(json.dumps(done[s.task.id]) + "\n")
                bar.update()
            if cache:
                cache.flush()
            flight = [s for s in flight if not s.status]
    bar.close()
    return [done[t.id] for t in tasks]


def summarize(records: list[dict]) -> dict:
    """Items, chosen budgets (tokens -> items, largest first), status counts, total and mean probes."""
    probes = sum(r["probes"] for r in records)
    status = Counter(r["status"] for r in records)
    return {"items": len(records),
            "budgets": dict(sorted(Counter(r["budget_tokens"] for r in records).items(), reverse=True)),
            "status": {s: status.get(s, 0) for s in STATUSES},
            "probes": probes, "mean_probes": probes / len(records) if records else 0.0}


# ----------------------------------------------------------------------------- the model and the CLI

@dataclass(frozen=True)
class ProberConfig:
    """How the prober asks the model: ONE settings object, built by train.py from its flags and by this
    file's command line from its own, so the two probe the same way."""
    full_tokens: int = 1024         # level 0, "full resolution" (paper: 1024 or 16384)
    floor_tokens: int = 16          # the ladder's last rung
    ratio: float = 0.5              # each rung is this fraction of the one above
    k: int = 4                      # sampled direct answers per probe
    temperature: float = 1.0
    max_new_tokens: int = 64        # per direct answer: room for a one-line answer of a real model
    resample: str = "bicubic"       # how the global image is downsampled (match training)

    def model_key(self, model: str) -> str:
        """The cache's model key: the model plus the settings that change its answers."""
        return f"{model} T={self.temperature} max_new_tokens={self.max_new_tokens} resample={self.resample}"


def probe(tasks: list[Task], agent: lfpc.Agent, cfg: ProberConfig, model: str, cache_path: str | None,
          batch_size: int = 32, progress: bool = True) -> list[dict]:
    """`select_budgets` with the model's own direct answers: one record per task, in order."""
    answer_fn = model_answer_fn(agent, cfg.temperature, cfg.max_new_tokens, batch_size * cfg.k, cfg.resample)
    return select_budgets(tasks, answer_fn, cfg.model_key(model), cache_path, cfg.full_tokens, cfg.floor_tokens,
                          cfg.ratio, cfg.k, batch_size, progress)


def model_answer_fn(agent: lfpc.Agent, temperature: float = 1.0, max_new_tokens: int = 64,
                    batch_size: int = 64, resample: str = "bicubic") -> AnswerFn:
    """The real answer function: k direct answers (no tool, one turn) per (task, budget) pair, the global
    image at max_pixels = budget * 784 (native size when smaller). batch_size: episodes per forward."""
    cfg = lfpc.RolloutConfig(use_tool=False, max_turns=1, temperature=temperature, max_new_tokens=max_new_tokens,
                             max_response_tokens=max_new_tokens, batch_size=batch_size,
                             global_min_pixels=MIN_PIXELS, global_resample=resample)

    def answer(pairs: list[tuple[Task, int]], k: int) -> list[list[str | None]]:
        tasks = [replace(task, max_pixels=budget * TOKEN_PIXELS) for task, budget in pairs]
        episodes = lfpc.rollout(agent, tasks, k, cfg)          # rows i*k .. i*k+k-1 belong to pair i
        return [[e.answer for e in episodes[i * k:(i + 1) * k]] for i in range(len(pairs))]
    return answer


def write_tasks(data_path: str, out_path: str, tasks: list[Task], records: list[dict]) -> None:
    """The rows of data_path again with "max_pixels" set and images relative to out_path's folder."""
    with open(data_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]   # the lines data.load_tasks read
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    with open(out_path + ".tmp", "w", encoding="utf-8") as f:
        for row, task, rec in zip(rows, tasks, records, strict=True):
            row = {**row, "image": os.path.relpath(task.image, out_dir), "max_pixels": rec["max_pixels"]}
            f.write(json.dumps(row) + "\n")
    os.replace(out_path + ".tmp", out_path)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    prober = ProberConfig(a.full_tokens, a.floor_tokens, a.ratio, a.k, a.temperature, a.max_new_tokens, a.resample)
    budgets = ladder(a.full_tokens, a.floor_tokens, a.ratio)    # fail on bad flags before loading a model
    torch.manual_seed(a.seed)
    tasks = data.load_tasks(a.data)
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    agent = lfpc.load_agent(a.model, a.device, dtype)
    cache = a.cache or os.path.splitext(a.out)[0] + ".cache.jsonl"
    records = probe(tasks, agent, prober, a.model, cache, a.batch_size)
    write_tasks(a.data, a.out, tasks, records)
    s = summarize(records)
    bound = (len(budgets) - 1).bit_length() + 1                  # ceil(log2 L) + 1
    print(f"{s['items']} items, {s['probes']} probes ({s['mean_probes']:.2f} per item, at most {bound})")
    print("status: " + ", ".join(f"{name} {n}" for name, n in s["status"].items()))
    print("budget (visual tokens): items\n" + "\n".join(f"{b:>8}: {n}" for b, n in s["budgets"].items()))
    print(f"wrote {a.out} (cache {cache})")


if __name__ == "__main__":
    main()

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
- Probe: k sampled DIRECT answers (no tool, one turn) at one budget. Votes are cast with the judge that
  scores the rewards (`judge.Judge.groups`; the rule judge groups by `answers.vote_key`: "yellow", "The
  umbrella is yellow." and "It is yellow" are one vote): answers the judge calls the same are one
  group, "no answer" (None) a group of its own. Majority: the largest group, represented by its first
  sampled answer; a TIE for the largest is no majority (None): at full resolution the item is then
  unstable, at a lower level the level disagrees (its answer is no longer reliable).
- Agreement of a level with full: the level's majority is not None and the judge calls it the same
  answer as the full-resolution majority (`judge.same`).
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
      {"item", "id", "model", "ladder", "k", "budget_tokens", "max_pixels", "status", "probes",
       "answers": {"<budget tokens>": [k raw answers]}}
  "item" is `item_key(task)`: a hash of the item's CONTENT (image bytes, question, answer, choices),
  so two datasets never share budgets by id or line number. A line is reused when its item, model key
  (`ProberConfig.model_key`: the model plus every setting that changes answers and votes), ladder and k
  match (the model key holds the prompt style, the direct-answer prompt, the precision and the judge too),
  so an interrupted run resumes and a second run makes no answer call. Each probe samples from
  streams seeded by the item's key and the budget (`probe_seed`), not by what else is in flight, so an
  item that was in flight when a run was killed is probed again to the same answers and budget. A corrupt LAST line (a kill mid-write) is dropped with a warning; a corrupt line
  elsewhere is an error. A checkpoint folder retrained in place keeps its name: give it another cache.
- One settings object, `ProberConfig`, is built by train.py from its flags and by this file's command
  line from its own, with the same defaults (`--preset`, support/presets.py). The command line also answers
  as train.py does: the preset's weights dtype and precision, items in flight and token caps; SIGTERM or
  SIGINT stops it after its batch, the cache kept (run it again to go on).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import warnings
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from tqdm import tqdm

import crop_tool
import lfpc
from lfpc import Task
from support import checkpoint, cli, data, policy, presets, prompts
from support.judge import Judge, RuleJudge, make_judge

TOKEN_PIXELS = crop_tool.TOKEN_PIXELS
MIN_PIXELS = TOKEN_PIXELS               # the prober shows every budget down to one token
STATUSES = ("gap", "no_gap", "unstable")
class CacheError(ValueError):
    """A cache file that cannot be trusted (a corrupt line that is not the last, a damaged value)."""


AnswerFn = Callable[[list[tuple[Task, int]], int], list[list[str | None]]]   # (task, budget tokens) pairs, k


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Per-item global-image budgets for LFPC stage 1 (information gap).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pre = " (default: the preset's, as train.py)"
    p.add_argument("--data", required=True, help="training items, JSONL in the data.load_tasks schema")
    p.add_argument("--model", required=True, help="Qwen2.5-VL checkpoint that answers (hub name or folder)")
    p.add_argument("--out", required=True, help="output JSONL: the rows of --data with 'max_pixels' added")
    p.add_argument("--preset", default="paper", choices=sorted(presets.NAMES),
                   help="fills the ladder, answer length and resampling exactly as train.py's --preset does")
    p.add_argument("--cache", default=None, help="probe cache JSONL (None: --out with .cache.jsonl)")
    p.add_argument("--full-tokens", type=int, help="full-resolution budget, visual tokens of 28x28 px" + pre)
    p.add_argument("--floor-tokens", type=int, help="smallest budget of the ladder, visual tokens" + pre)
    p.add_argument("--ratio", type=float, default=0.5, help="ladder step: each budget is this fraction of the last")
    p.add_argument("--k", type=int, default=4, help="sampled answers per probe; full needs a strict majority "
                   "(3 of 4). With L=7: <= 4 probes x 4 = 16 one-turn episodes per item, one GRPO group's worth")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the answers")
    p.add_argument("--max-new-tokens", type=int, help="tokens sampled per direct answer" + pre)
    p.add_argument("--resample", choices=sorted(crop_tool.RESAMPLE), help="how the global image is downsampled" + pre)
    p.add_argument("--judge", default="rule", choices=["rule", "llm"], help="who groups the votes (support/judge.py)")
    p.add_argument("--judge-url", help="--judge llm: OpenAI-compatible endpoint")
    p.add_argument("--judge-model", help="--judge llm: the served model's name")
    p.add_argument("--judge-timeout", type=float, default=10.0, help="--judge llm: seconds a request may take (an API "
                   "key goes in the environment variable LFPC_JUDGE_API_KEY)")
    p.add_argument("--batch-size", type=int, help="items in flight per answer call (k episodes each)" + pre)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--seed", type=int, default=0, help="torch seed for sampling")
    a = p.parse_args(argv)
    preset = presets.get(a.preset)
    a.full_tokens = a.full_tokens or preset["full_tokens"]
    a.floor_tokens = a.floor_tokens or preset["floor_tokens"]
    a.max_new_tokens = a.max_new_tokens or preset["probe_max_new_tokens"]
    a.resample = a.resample or preset["resample"]
    a.batch_size = a.batch_size or preset["rollout_batch"]
    a.lora, a.rollout_tokens, a.prefill_tokens = preset["lora"], preset["rollout_tokens"], preset["prefill_tokens"]
    cli.refuse(p, cli.at_least(a, ("full_tokens", "floor_tokens", "k", "max_new_tokens", "batch_size")))
    if a.floor_tokens >= a.full_tokens:
        p.error(f"--floor-tokens ({a.floor_tokens}) must be below --full-tokens ({a.full_tokens})")
    if not 0 < a.ratio < 1:
        p.error(f"--ratio must lie in (0, 1) (each rung a fraction of the one above), got {a.ratio}")
    if not 0 <= a.temperature <= 10:
        p.error(f"--temperature must lie in [0, 10], got {a.temperature}")
    same = lambda x, y: x and y and os.path.abspath(x) == os.path.abspath(y)
    if same(a.out, a.data) or same(a.cache, a.data) or same(a.cache, a.out):
        p.error("--out, --cache and --data must be three different files (--out is rewritten; --data is yours)")
    if a.cache and os.path.isdir(a.cache):
        p.error(f"--cache {a.cache} is a folder; pass a file (JSONL)")
    if os.path.isdir(a.out):
        p.error(f"--out {a.out} is a folder; pass the JSONL file to write")
    if (why := policy.device_problem(a.device)):
        p.error(why)
    cli.refuse(p, cli.judge_problems(a))
    if (why := policy.model_problem(a.model)):
        p.error(why)
    return a


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


def majority(answers: list, task: Task, judge: Judge) -> tuple[str | None, int]:
    """(the first answer of the largest group of answers the judge calls the same, the group's size);
    (None, size) when that group is "no answer" or when two groups tie for the largest."""
    groups = judge.groups(answers, task.choices, task.question)
    ranked = Counter(groups).most_common()
    (top, votes) = ranked[0]
    if top is None or (len(ranked) > 1 and ranked[1][1] == votes):
        return None, votes
    return answers[groups.index(top)], votes


def item_key(task: Task) -> str:
    """A hash of the item's content: its image's bytes (the file's, or the pixels of an in-memory image),
    question, answer and choices."""
    h = hashlib.sha1()
    if isinstance(task.image, str):
        with open(task.image, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    else:
        h.update(repr((task.image.size, task.image.mode)).encode())
        h.update(task.image.tobytes())
    h.update(json.dumps([task.question, task.answer, task.choices]).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- the search

@dataclass
class Search:
    """One item's binary search. Levels are budgets in tokens, levels[0] = full. Invariant: every PROBED
    level below `lo` agrees with full and `hi` (unless L, meaning none) disagrees; under monotone agreement
    that makes [lo, hi] hold the first disagreeing level (module docstring: otherwise, a disagreeing one)."""
    task: Task
    levels: list[int]
    k: int
    judge: Judge
    answers: dict[int, list[str | None]] = field(default_factory=dict)   # budget -> k raw answers
    reference: str | None = None            # the full-resolution majority (an answer of its group)
    lo: int = 1
    hi: int = -1
    status: str = ""                        # "" while searching, then one of STATUSES

    def __post_init__(self):
        self.hi = len(self.levels)

    def next_budget(self) -> int:
        return self.levels[(self.lo + self.hi) // 2] if self.answers else self.levels[0]

    def record(self, budget: int, answers: list) -> None:
        self.answers[budget] = [a if isinstance(a, str) else None for a in answers]
        answer, votes = majority(self.answers[budget], self.task, self.judge)
        if budget == self.levels[0]:
            if answer is None or 2 * votes <= self.k:
                self.status = "unstable"
                return
            self.reference = answer
        elif answer is not None and self.judge.same(answer, self.reference, self.task.choices, self.task.question):
            self.lo = self.levels.index(budget) + 1
        else:
            self.hi = self.levels.index(budget)
        if self.lo >= self.hi:
            self.status = "gap" if self.hi < len(self.levels) else "no_gap"

    def result(self, item: str, model_key: str, budgets: list[int]) -> dict:
        budget = self.levels[self.hi] if self.status == "gap" else budgets[-1]
        return {"item": item, "id": self.task.id, "model": model_key, "ladder": budgets, "k": self.k, "budget_tokens": budget,
                "max_pixels": budget * TOKEN_PIXELS, "status": self.status, "probes": len(self.answers),
                "answers": {str(b): a for b, a in self.answers.items()}}


def load_cache(path: str | None, model_key: str, budgets: list[int], k: int) -> dict[str, dict]:
    """Finished records for this model key, ladder and k, by item key. A corrupt last line is cut off."""
    if not path or not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        data = f.read()
    lines, found, start = data.split(b"\n"), {}, 0
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line) if line.strip() else None
            if rec is not None and not (isinstance(rec, dict) and {"item", "model", "ladder", "k"} <= rec.keys()):
                raise ValueError("not a cache record")
        except ValueError as e:             # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if any(rest.strip() for rest in lines[n:]):
                raise CacheError(f"{path}:{n}: corrupt cache line ({e}); only the last may be cut short") from None
            warnings.warn(f"{path}:{n}: dropping a corrupt last line (a write cut short by a kill?)")
            with open(path, "r+b") as f:
                f.truncate(start)
            return found
        if rec and rec["model"] == model_key and rec["ladder"] == budgets and rec["k"] == k:
            mp, bt = rec.get("max_pixels"), rec.get("budget_tokens")
            if not (isinstance(bt, int) and not isinstance(bt, bool) and bt in budgets and mp == bt * TOKEN_PIXELS):
                raise CacheError(f"{path}:{n}: damaged cache record (budget_tokens {bt!r}, max_pixels {mp!r}: a rung "
                                 f"of the ladder {budgets} and 784 x that); delete the line or the cache")
            found[rec["item"]] = rec
        start += len(line) + 1
    if data and not data.endswith(b"\n"):  # a whole last record whose newline never made it to disk
        with open(path, "ab") as f:
            f.write(b"\n")
    return found


def select_budgets(tasks: list[Task], answer_fn: AnswerFn, model_key: str, cache_path: str | None = None,
                   full_tokens: int = 1024, floor_tokens: int = 16, ratio: float = 0.5, k: int = 4,
                   batch_size: int = 32, progress: bool = True, judge: Judge | None = None,
                   write_path: str | None = None, stop: Callable[[], bool] | None = None) -> list[dict]:
    """One record per task (format: the cache's), in task order; see the module docstring. Items with the
    same content are probed once. New records go to `write_path` (default: the cache itself). `stop()`
    true after an answer call (a SIGTERM, checkpoint.StopSignal): the finished items are flushed to the
    cache and checkpoint.Preempted is raised (items in flight are probed again, with the same streams)."""
    budgets = ladder(full_tokens, floor_tokens, ratio)
    if k < 1 or batch_size < 1:
        raise ValueError(f"k and batch_size must be >= 1, got k={k}, batch_size={batch_size}")
    judge = judge or RuleJudge()
    keys = [item_key(t) for t in tasks]
    done = {**load_cache(cache_path, model_key, budgets, k), **load_cache(write_path, model_key, budgets, k)}
    write_path = write_path or cache_path
    if write_path:
        os.makedirs(os.path.dirname(os.path.abspath(write_path)), exist_ok=True)
    todo = {key: t for key, t in zip(keys, tasks) if key not in done}           # first of each content
    queue, flight = deque(todo.items()), []
    bar = tqdm(total=len(tasks), initial=len(tasks) - sum(key in todo for key in keys), desc="info gap", unit="item",
               disable=not progress)
    with open(write_path, "a", encoding="utf-8") if write_path else contextlib.nullcontext() as cache:
        while queue or flight:
            while queue and len(flight) < batch_size:
                key, task = queue.popleft()
                flight.append((key, Search(task, item_levels(task, budgets), k, judge)))
            pairs = [(s.task, s.next_budget()) for _, s in flight]
            answers = answer_fn(pairs, k)
            if len(answers) != len(pairs) or any(len(a) != k for a in answers):
                raise ValueError(f"answer_fn must return {k} answers for each of the {len(pairs)} pairs")
            for (_, s), (_, budget), a in zip(flight, pairs, answers):
                s.record(budget, list(a))
            for key, s in ((key, s) for key, s in flight if s.status):
                done[key] = s.result(key, model_key, budgets)
                if cache:
                    cache.write(json.dumps(done[key]) + "\n")
                bar.update(keys.count(key))
            if cache:
                cache.flush()
            flight = [(key, s) for key, s in flight if not s.status]
            if stop is not None and stop() and (queue or flight):
                bar.close()
                raise checkpoint.Preempted(f"the information-gap probe stopped: {len(set(keys) & done.keys())} of "
                                           f"{len(set(keys))} distinct items are in its cache")
    bar.close()
    return [{**done[key], "id": t.id} for key, t in zip(keys, tasks)]


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
    judge: str = "rule"             # how votes are grouped: the judge that scores the rewards (its description)

    def model_key(self, model: str, agent: lfpc.Agent | None = None) -> str:
        """The cache's model key: the model plus every setting that changes its answers and their votes:
        sampling, resampling, the judge, and with `agent` its prompt style, the direct-answer prompt's text
        (a hash of the system prompt and both instructions) and the precision its forward runs in."""
        key = (f"{model} T={self.temperature} max_new_tokens={self.max_new_tokens} resample={self.resample} "
               f"judge={self.judge}")
        if agent is None:
            return key
        texts = [prompts.NO_TOOL_SYSTEM_PROMPT, agent.direct_instruction or "", prompts.DIRECT_INSTRUCTION,
                 prompts.DIRECT_CHOICE_INSTRUCTION]
        prompt = hashlib.sha1(json.dumps(texts).encode()).hexdigest()[:12]
        dev = agent.device.type
        dtype = str(next(agent.model.parameters()).dtype).removeprefix("torch.")
        if torch.is_autocast_enabled(dev):
            dtype += "+autocast-" + str(torch.get_autocast_dtype(dev)).removeprefix("torch.")
        return f"{key} style={agent.style} direct={prompt} precision={dtype}"


def probe(tasks: list[Task], agent: lfpc.Agent, cfg: ProberConfig, model: str, cache_path: str | None,
          batch_size: int = 32, progress: bool = True, judge: Judge | None = None,
          write_path: str | None = None, batch_tokens: int | None = None,
          stop: Callable[[], bool] | None = None, prefill_tokens: int = lfpc.RolloutConfig.prefill_tokens) -> list[dict]:
    """`select_budgets` with the model's own direct answers: one record per task, in order. batch_size:
    tasks in flight; batch_tokens: at most this many KV-cache tokens a rollout chunk (None: no limit);
    prefill_tokens: at most this many tokens a prefill forward."""
    answer_fn = model_answer_fn(agent, cfg.temperature, cfg.max_new_tokens, batch_size * cfg.k, cfg.resample,
                                batch_tokens, prefill_tokens)
    return select_budgets(tasks, answer_fn, cfg.model_key(model, agent), cache_path, cfg.full_tokens, cfg.floor_tokens,
                          cfg.ratio, cfg.k, batch_size, progress, judge, write_path, stop)


def merge_parts(cache_path: str, parts: list[str]) -> None:
    """Append the finished records of cache parts (one per rank under torchrun) to the cache; drop the parts."""
    with open(cache_path, "a", encoding="utf-8") as out:
        for part in parts:
            if os.path.exists(part):
                for line in open(part, encoding="utf-8"):
                    if line.strip():
                        out.write(line if line.endswith("\n") else line + "\n")
                os.remove(part)


def model_answer_fn(agent: lfpc.Agent, temperature: float = 1.0, max_new_tokens: int = 64,
                    batch_size: int = 64, resample: str = "bicubic", batch_tokens: int | None = None,
                    prefill_tokens: int = lfpc.RolloutConfig.prefill_tokens) -> AnswerFn:
    """The real answer function: k direct answers (no tool, one turn) per (task, budget) pair, the global
    image at max_pixels = budget * 784 (native size when smaller). batch_size: episodes per forward, within
    batch_tokens KV-cache tokens (the first rungs' images are the largest: 16K tokens each at the top)."""
    cfg = lfpc.RolloutConfig(use_tool=False, max_turns=1, temperature=temperature, max_new_tokens=max_new_tokens,
                             max_response_tokens=max_new_tokens, batch_size=batch_size, batch_tokens=batch_tokens,
                             prefill_tokens=prefill_tokens,
                             global_min_pixels=MIN_PIXELS, global_resample=resample)

    keys = {}                                                  # id(task) -> (task, item_key): hashed once

    def answer(pairs: list[tuple[Task, int]], k: int) -> list[list[str | None]]:
        tasks = [replace(task, max_pixels=budget * TOKEN_PIXELS) for task, budget in pairs]
        for task, _ in pairs:
            keys.setdefault(id(task), (task, item_key(task)))
        # each (item, budget) probe samples from its own streams: a probe redone after a kill gives the same answers
        seeds = [probe_seed(keys[id(task)][1], budget) for task, budget in pairs]
        episodes = lfpc.rollout(agent, tasks, k, cfg, seed=seeds)          # rows i*k .. i*k+k-1 belong to pair i
        return [[e.answer for e in episodes[i * k:(i + 1) * k]] for i in range(len(pairs))]
    return answer


def probe_seed(item: str, budget: int) -> int:
    """The base seed of one probe's k answer streams: a function of the item's content key and the budget
    only, so it does not depend on what else is in flight, on the order of items or on a restart."""
    return int(hashlib.sha1(f"{item}:{budget}".encode()).hexdigest()[:15], 16)


def write_tasks(data_path: str, out_path: str, tasks: list[Task], records: list[dict]) -> None:
    """The rows of data_path again with "max_pixels" set and images relative to out_path's folder."""
    with open(data_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]   # the lines data.load_tasks read
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    with checkpoint.writing_whole(out_path) as f:
        for row, task, rec in zip(rows, tasks, records, strict=True):
            row = {**row, "image": os.path.relpath(task.image, out_dir), "max_pixels": rec["max_pixels"]}
            f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    prober = ProberConfig(a.full_tokens, a.floor_tokens, a.ratio, a.k, a.temperature, a.max_new_tokens, a.resample,
                          a.judge if a.judge == "rule" else f"llm:{a.judge_model}")
    budgets = ladder(a.full_tokens, a.floor_tokens, a.ratio)    # fail on bad flags before loading a model
    torch.manual_seed(a.seed)
    try:
        tasks = data.load_tasks(a.data)
    except data.DataError as e:
        raise SystemExit(f"--data: {e}") from None
    cache = a.cache or os.path.splitext(a.out)[0] + ".cache.jsonl"
    judge = make_judge(a.judge, a.judge_url, a.judge_model, os.path.splitext(a.out)[0] + ".judge.jsonl",
                       **({"timeout": a.judge_timeout} if a.judge == "llm" else {}))
    # as train.py probes: its weights' dtype (a bf16 base under LoRA, else fp32) under its precision (bf16
    # autocast on a GPU), within its KV-cache and prefill token caps (the preset's, parse_args)
    agent = policy.load_agent(a.model, a.device, policy.base_dtype(a))
    with checkpoint.StopSignal() as stop, policy.precision(agent):
        try:
            records = probe(tasks, agent, prober, a.model, cache, a.batch_size, judge=judge,
                            batch_tokens=a.rollout_tokens, prefill_tokens=a.prefill_tokens, stop=stop)
        except CacheError as e:
            raise SystemExit(f"--cache: {e}") from None
        except checkpoint.Preempted as e:
            print(f"{stop.requested}: {e}. Run the same command again to continue (the cache is kept, its items "
                  f"not probed again)", file=sys.stderr)
            raise SystemExit(stop.code) from None
    write_tasks(a.data, a.out, tasks, records)
    s = summarize(records)
    bound = (len(budgets) - 1).bit_length() + 1                  # ceil(log2 L) + 1
    print(f"{s['items']} items, {s['probes']} probes ({s['mean_probes']:.2f} per item, at most {bound})")
    print("status: " + ", ".join(f"{name} {n}" for name, n in s["status"].items()))
    print("budget (visual tokens): items\n" + "\n".join(f"{b:>8}: {n}" for b, n in s["budgets"].items()))
    print(f"wrote {a.out} (cache {cache})")


if __name__ == "__main__":
    main()

"""Tests for info_gap.py: the ladder, votes, the binary search's choices and probe bound, batching,
the resumable cache, the real answer function and the CLI."""
import itertools
import json
import math
import os
import subprocess
import sys
from collections import Counter

import pytest
from PIL import Image

import info_gap
import torch
from conftest import ROOT
import lfpc
from support import data as data_module
from support import policy
from support.judge import RuleJudge

BIG = Image.new("RGB", (896, 896), (90, 60, 110))     # 1024 tokens: every level of 1024 -> 16 is its own size
LEVELS = [1024, 512, 256, 128, 64, 32, 16]             # ladder(1024, 16), L = 7
BOUND = math.ceil(math.log2(len(LEVELS))) + 1           # 4 probes per item, full included


def task(i, image=BIG, choices=None, answer="right"):
    return lfpc.Task(image, f"What is it? ({i})", answer, choices, id=f"t{i}")      # distinct content per i


class Stub:
    """Answers "right" at budgets >= the task's threshold and "wrong" below; counts calls and pairs.
    After `fail_after` calls it raises, like a run killed mid-way."""

    def __init__(self, thresholds, fail_after=None):
        self.thresholds, self.fail_after = thresholds, fail_after
        self.calls, self.batches, self.per_item = 0, [], Counter()

    def __call__(self, pairs, k):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("killed")
        self.calls += 1
        self.batches.append([(t.id, b) for t, b in pairs])
        self.per_item.update(t.id for t, _ in pairs)
        return [["right" if b >= self.thresholds[t.id] else "wrong"] * k for t, b in pairs]


def run(tasks, fn, cache=None, model="m", **kw):
    return info_gap.select_budgets(tasks, fn, model, cache, **{"full_tokens": 1024, "floor_tokens": 16,
                                                               "k": 3, "progress": False, **kw})


# ----------------------------------------------------------------------------- ladder and votes

def test_ladder_values_by_hand():
    assert info_gap.ladder(1024, 64) == [1024, 512, 256, 128, 64]
    assert info_gap.ladder(1024, 16) == LEVELS
    assert info_gap.ladder(1000, 100) == [1000, 500, 250, 125, 100]   # floor reached off the geometric grid
    assert info_gap.ladder(16384, 1024, 0.25) == [16384, 4096, 1024]
    assert info_gap.ladder(10, 7, 0.9) == [10, 9, 8, 7]                 # rounding never repeats a budget
    assert info_gap.ladder(2, 1) == [2, 1]


@pytest.mark.parametrize("args", [(64, 64), (16, 64), (0, 1), (64, 0), (64.0, 16), (64, 16, 1.0), (64, 16, 0.0),
                                  (64, 16, -0.5), (64, 16, float("nan")), (True, 1)])
def test_ladder_rejects_bad_input(args):
    with pytest.raises(ValueError):
        info_gap.ladder(*args)


def test_votes_group_what_the_judge_calls_the_same_and_a_tie_is_no_majority():
    from support.judge import RuleJudge
    j = RuleJudge()
    mc = task(0, choices=["red", "blue"], answer="B")
    assert info_gap.majority(["B", "(B) blue", " Blue.", "purple"], mc, j) == ("B", 3)         # option forms: one vote
    free = task(1, answer="yellow")
    paraphrases = ["yellow", "Yellow.", "The umbrella is yellow.", "It is yellow", "blue"]
    assert info_gap.majority(paraphrases, free, j) == ("yellow", 4)
    assert info_gap.majority(["x", "y", "y", "x"], free, j) == (None, 2)                      # 2-2: no majority
    assert info_gap.majority(["y", "x", "x", "z"], free, j) == ("x", 2)
    assert info_gap.majority([None, None, "b"], free, j) == (None, 2)                          # "no answer" wins
    assert info_gap.majority(["", 7, None, "b"], free, j) == (None, 3)                         # junk is no answer


def test_free_form_paraphrases_are_a_stable_reference_not_unstable():
    """A scripted sampler answering "yellow" in four wordings at full resolution: one majority, so the
    item keeps its probe instead of falling to the floor as "unstable"."""
    words = ["yellow", "Yellow.", "The umbrella is yellow.", "It is yellow"]

    def answers(pairs, k):
        return [words[:k] if b >= 256 else ["blue"] * k for _, b in pairs]
    (rec,) = run([task(0, answer="yellow")], answers, k=4)
    assert rec["status"] == "gap" and rec["budget_tokens"] == 128


def test_the_cache_is_keyed_by_content_not_by_id(tmp_path):
    """Two datasets whose items share ids (or line numbers) but differ in content never share budgets;
    the same content under another id reuses them."""
    cache = str(tmp_path / "c.jsonl")
    a = Stub({"t0": 256})
    run([task(0)], a, cache=cache)
    other = lfpc.Task(Image.new("RGB", (896, 896), (1, 2, 3)), "What is it? (0)", "right", id="t0")   # same id
    b = Stub({"t0": 256})
    run([other], b, cache=cache)
    assert b.calls > 0                                       # another image: probed again
    c = Stub({"x": 256})
    run([lfpc.Task(BIG, "What is it? (0)", "right", id="x")], c, cache=cache)
    assert c.calls == 0                                      # the first item's content under a new id: cached


def test_item_levels_skip_budgets_that_show_the_same_image():
    assert info_gap.item_levels(task(0), LEVELS) == LEVELS
    small = task(0, Image.new("RGB", (224, 224)))               # the toy canvas: native at 1024 .. 64 tokens
    assert info_gap.item_levels(small, LEVELS) == [1024, 32, 16]


# ----------------------------------------------------------------------------- the search

def test_chosen_budget_for_a_threshold_at_every_position_of_the_ladder():
    # threshold LEVELS[j]: right at j and above, wrong below -> the first disagreeing level is j + 1
    thresholds = {f"t{j}": b for j, b in enumerate(LEVELS)} | {"t7": 4096}     # t7: wrong everywhere, agrees
    stub = Stub(thresholds)
    records = run([task(i) for i in range(8)], stub)
    for j, rec in enumerate(records[:6]):
        assert (rec["budget_tokens"], rec["status"]) == (LEVELS[j + 1], "gap"), rec
        assert rec["max_pixels"] == LEVELS[j + 1] * 784
    assert [(r["budget_tokens"], r["status"]) for r in records[6:]] == [(16, "no_gap"), (16, "no_gap")]
    assert max(stub.per_item.values()) <= BOUND and stub.calls <= BOUND
    assert all(r["probes"] == stub.per_item[r["id"]] == len(r["answers"]) for r in records)
    assert records[0]["answers"]["1024"] == ["right"] * 3


@pytest.mark.parametrize("L", range(1, 10))
def test_probe_bound_and_what_non_monotone_items_get(L):
    """Every agreement pattern of levels 1..L-1: at most ceil(log2 L) + 1 probes; a monotone pattern gives
    the first disagreeing level; any pattern gives a disagreeing level whose upper neighbour agrees."""
    levels = [2 ** (L - i) for i in range(L)]
    for pattern in itertools.product([True, False], repeat=L - 1):
        agree = (True,) + pattern
        s = info_gap.Search(task(0), levels, k=1, judge=RuleJudge())
        while not s.status:
            b = s.next_budget()
            s.record(b, ["right" if agree[levels.index(b)] else "wrong"])
        assert len(s.answers) <= math.ceil(math.log2(L)) + 1
        if s.status == "gap":
            assert not agree[s.hi] and agree[s.hi - 1]
        if all(agree[i] >= agree[i + 1] for i in range(L - 1)):       # monotone
            assert s.hi == (agree.index(False) if False in agree else L)


def test_probes_of_many_items_share_one_call_per_step():
    thresholds = {f"t{i}": LEVELS[i % 7] for i in range(20)}
    stub = Stub(thresholds)
    run([task(i) for i in range(20)], stub, batch_size=32)
    assert stub.calls <= BOUND and len(stub.batches[0]) == 20
    assert all(b == 1024 for _, b in stub.batches[0])                  # step 1: every item's full probe
    assert set(b for _, b in stub.batches[1]) == {64} and len(set(b for _, b in stub.batches[2])) > 1
    small = Stub(thresholds)
    run([task(i) for i in range(20)], small, batch_size=8)
    assert max(len(b) for b in small.batches) == 8 and small.calls < 20


def test_unstable_reference_falls_back_to_the_floor():
    answers = {"t0": ["a", "a", "b", "b"], "t1": [None, None, None, "a"], "t2": ["a", "a", "a", "b"]}
    calls = []

    def fn(pairs, k):
        calls.append(pairs)
        return [answers[t.id] if b == 1024 else ["z"] * k for t, b in pairs]

    records = run([task(i) for i in range(3)], fn, k=4)
    assert [(r["status"], r["budget_tokens"], r["probes"]) for r in records[:2]] == [("unstable", 16, 1)] * 2
    assert (records[2]["status"], records[2]["budget_tokens"]) == ("gap", 512)   # 3 of 4 is a strict majority
    assert records[1]["answers"]["1024"] == [None, None, None, "a"]


def test_junk_answers_never_crash():
    choices = ["red", "blue"]

    def fn(pairs, k):
        return [["B"] * k if b == 1024 else ["purple", None, 3, "Z"][:k] for t, b in pairs]

    rec, = run([task(0, choices=choices, answer="B")], fn, k=4)
    assert (rec["status"], rec["budget_tokens"]) == ("gap", 512)
    assert rec["answers"]["512"] == ["purple", None, None, "Z"]


def test_summary_counts_budgets_status_and_probes():
    thresholds = {"t0": 512, "t1": 512, "t2": 16}
    records = run([task(i) for i in range(3)], Stub(thresholds))
    s = info_gap.summarize(records)
    assert s["items"] == 3 and s["budgets"] == {256: 2, 16: 1}
    assert s["status"] == {"gap": 2, "no_gap": 1, "unstable": 0}
    assert s["probes"] == sum(r["probes"] for r in records) and s["mean_probes"] == s["probes"] / 3


# ----------------------------------------------------------------------------- the cache

def cache_lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_interrupted_run_resumes_and_a_third_run_makes_no_call(tmp_path):
    tasks = [task(i) for i in range(20)]
    thresholds = {t.id: LEVELS[i % 7] for i, t in enumerate(tasks)}
    cache = str(tmp_path / "cache.jsonl")
    with pytest.raises(RuntimeError):
        run(tasks, Stub(thresholds, fail_after=4), cache, batch_size=8)
    first = {r["id"] for r in cache_lines(cache)}
    assert 8 <= len(first) < 20
    resumed = Stub(thresholds)
    records = run(tasks, resumed, cache, batch_size=8)
    assert not first & set(resumed.per_item) and set(resumed.per_item) == {t.id for t in tasks} - first
    assert records == run(tasks, Stub(thresholds), batch_size=8)        # same as an uninterrupted run
    third = Stub(thresholds)
    assert run(tasks, third, cache, batch_size=8) == records and third.calls == 0
    assert len(cache_lines(cache)) == 20


def test_corrupt_last_line_is_dropped_with_a_warning(tmp_path):
    tasks = [task(i) for i in range(5)]
    thresholds = {t.id: 256 for t in tasks}
    cache = tmp_path / "cache.jsonl"
    run(tasks, Stub(thresholds), str(cache))
    lines = cache.read_text().splitlines(keepends=True)
    cache.write_text("".join(lines[:-1]) + lines[-1][:25])             # killed mid-write
    again = Stub(thresholds)
    with pytest.warns(UserWarning, match="corrupt last line"):
        run(tasks, again, str(cache))
    assert set(again.per_item) == {json.loads(lines[-1])["id"]}
    assert sorted(r["id"] for r in cache_lines(cache)) == [t.id for t in tasks]
    cache.write_text("".join(lines[:2]) + "{oops\n" + "".join(lines[2:]))
    with pytest.raises(ValueError, match=r"cache.jsonl:3"):
        run(tasks, Stub(thresholds), str(cache))


def test_another_model_key_or_ladder_does_not_reuse_the_cache(tmp_path):
    tasks = [task(i) for i in range(4)]
    thresholds = {t.id: 256 for t in tasks}
    cache = str(tmp_path / "cache.jsonl")
    run(tasks, Stub(thresholds), cache, model="m1")
    other, other_ladder, same = Stub(thresholds), Stub(thresholds), Stub(thresholds)
    run(tasks, other, cache, model="m2")
    run(tasks, other_ladder, cache, model="m1", floor_tokens=64)
    run(tasks, same, cache, model="m1")
    assert other.calls > 0 and other_ladder.calls > 0 and same.calls == 0


def test_items_with_the_same_content_are_probed_once_and_share_the_record():
    stub = Stub({"t0": 256})
    a, b = run([task(0), task(0)], stub)
    assert stub.per_item["t0"] == a["probes"] and a["budget_tokens"] == b["budget_tokens"] == 128


# ----------------------------------------------------------------------------- the model and the CLI

@pytest.fixture(scope="module")
def agent(tiny):
    return tiny


def test_model_answer_fn_returns_k_answers_per_pair_at_its_budget(agent, monkeypatch):
    seen = []
    real = lfpc.rollout

    def spy(agent, tasks, group_size, cfg, **kw):
        seen.append(([t.max_pixels for t in tasks], group_size, cfg.use_tool, cfg.temperature))
        return real(agent, tasks, group_size, cfg, **kw)

    monkeypatch.setattr(lfpc, "rollout", spy)
    fn = info_gap.model_answer_fn(agent, temperature=1.0, max_new_tokens=4, batch_size=8)
    pairs = [(task(0, Image.new("RGB", (112, 84))), 16), (task(1, Image.new("RGB", (56, 56))), 4)]
    out = fn(pairs, 3)
    assert len(out) == 2 and all(len(a) == 3 for a in out)
    assert all(a is None or isinstance(a, str) for a in sum(out, []))
    assert seen == [([16 * 784, 4 * 784], 3, False, 1.0)]


def test_the_prober_keeps_the_rollouts_kv_token_budget(agent, monkeypatch):
    """train.py hands its --rollout-tokens to the prober: at the top rung (16K-token images on a real
    model) a chunk of the prober's rollouts must stay within the KV budget as training's rollouts do."""
    seen = []
    real = lfpc.rollout

    def spy(agent, tasks, group_size, cfg, **kw):
        seen.append(cfg.batch_tokens)
        return real(agent, tasks, group_size, cfg, **kw)

    monkeypatch.setattr(lfpc, "rollout", spy)
    records = info_gap.probe([task(0, Image.new("RGB", (112, 84)))], agent, info_gap.ProberConfig(16, 4, 0.5, 2, 1.0, 4),
                             "m", None, batch_size=8, progress=False, batch_tokens=500)
    assert len(records) == 1 and seen and set(seen) == {500}


def _cli_inputs(agent, tmp_path):
    """A saved agent and two items on disk, for info_gap.py's command line."""
    data, model, out = tmp_path / "data", str(tmp_path / "agent"), tmp_path / "out" / "stage1.jsonl"
    (data / "images").mkdir(parents=True)
    policy.save_agent(agent, model)
    with open(data / "items.jsonl", "w") as f:
        for i, (w, h) in enumerate([(112, 112), (168, 112)]):
            Image.new("RGB", (w, h), (40 * i, 90, 200)).save(data / "images" / f"{i}.png")
            f.write(json.dumps({"id": f"x{i}", "image": f"images/{i}.png", "question": "Colour?", "answer": "A",
                                "choices": ["blue", "red"], "extra": i}) + "\n")
    return data, model, out


def test_cli_probes_as_train_py_does(agent, tmp_path, monkeypatch):
    """info_gap.py --preset X answers with train.py's settings for X: its weights' dtype (a bf16 base under
    LoRA), its items in flight, its KV-cache and prefill token caps."""
    from support import presets
    data, model, out = _cli_inputs(agent, tmp_path)
    seen = {}

    def spy(tasks, agent, cfg, model, cache_path, batch_size=32, **kw):
        seen.update(kw, batch_size=batch_size, dtype=agent.model.dtype)
        return [{"max_pixels": 4 * 784, "budget_tokens": 4, "status": "gap", "probes": 1, "answers": {}}] * len(tasks)
    monkeypatch.setattr(info_gap, "probe", spy)
    for name, dtype in (("one-gpu", torch.bfloat16), ("paper", torch.float32)):
        info_gap.main(["--data", str(data / "items.jsonl"), "--model", model, "--out", str(out), "--preset", name,
                       "--device", "cpu"])
        p = presets.get(name)
        assert seen["dtype"] == dtype and seen["batch_size"] == p["rollout_batch"]
        assert (seen["batch_tokens"], seen["prefill_tokens"]) == (p["rollout_tokens"], p["prefill_tokens"])
        assert callable(seen["stop"])


def test_cli_writes_tasks_that_load_tasks_reads_back(agent, tmp_path):
    data, model, out = _cli_inputs(agent, tmp_path)
    cmd = [sys.executable, "info_gap.py", "--data", str(data / "items.jsonl"), "--model", model, "--out", str(out),
           "--full-tokens", "16", "--floor-tokens", "4", "--k", "2", "--max-new-tokens", "4", "--device", "cpu"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 items" in res.stdout and "budget (visual tokens)" in res.stdout
    rows = [json.loads(line) for line in open(out)]
    assert [r["image"] for r in rows] == [os.path.join("..", "data", "images", f"{i}.png") for i in range(2)]
    assert [r["extra"] for r in rows] == [0, 1]
    tasks = data_module.load_tasks(str(out))
    assert [t.id for t in tasks] == ["x0", "x1"] and all(t.max_pixels in (16 * 784, 8 * 784, 4 * 784) for t in tasks)
    assert len(open(str(out).replace(".jsonl", ".cache.jsonl")).readlines()) == 2


# ----------------------------------------------------------------------------- stopped and resumed

def test_a_probe_stopped_mid_way_resumes_to_the_same_budgets_and_answers(tmp_path):
    """A stop between batches (SIGTERM: checkpoint.StopSignal) leaves the finished items in the cache and
    raises Preempted; the items that were in flight are probed again from the same streams
    (probe_seed), so every budget and answer equals an uninterrupted probe's."""
    from support import checkpoint
    import toy.world
    agent = policy.load_agent(os.path.join(ROOT, "toy", "base"), dtype=torch.float32)
    tasks = toy.world.make_tasks(12, seed=5)
    cfg = info_gap.ProberConfig(full_tokens=64, floor_tokens=16, k=4, max_new_tokens=16, resample="box")
    go = lambda cache, **kw: info_gap.probe(tasks, agent, cfg, "toy", str(cache), batch_size=3, progress=False, **kw)
    straight = go(tmp_path / "straight.jsonl")
    calls = []
    with pytest.raises(checkpoint.Preempted, match="distinct items are in its cache"):
        go(tmp_path / "stopped.jsonl", stop=lambda: calls.append(1) or len(calls) >= 2)
    kept = [json.loads(line) for line in open(tmp_path / "stopped.jsonl")]
    assert 0 < len(kept) < len(tasks)
    resumed = go(tmp_path / "stopped.jsonl")
    assert [(r["budget_tokens"], r["answers"]) for r in resumed] == [(r["budget_tokens"], r["answers"]) for r in straight]
    assert len({r["budget_tokens"] for r in straight}) > 1 or len({r["status"] for r in straight}) > 1, "a probe that decides"


def test_every_setting_that_changes_an_answer_is_in_the_cache_key(agent, tmp_path, monkeypatch):
    """Prompt style, the direct-answer prompt's text, the precision and the judge: changing any of them
    probes again; the same settings reuse the cache (no answer call)."""
    from dataclasses import replace
    import copy
    calls = []
    real = lfpc.rollout
    monkeypatch.setattr(lfpc, "rollout", lambda *a, **k: calls.append(1) or real(*a, **k))
    tasks = [task(0, Image.new("RGB", (112, 84))), task(1, Image.new("RGB", (84, 112)))]
    cfg = info_gap.ProberConfig(16, 4, 0.5, 2, 1.0, 4)
    cache = str(tmp_path / "c.jsonl")
    go = lambda ag, c=cfg: info_gap.probe(tasks, ag, c, "m", cache, batch_size=8, progress=False)
    go(agent)
    assert calls
    for changed, why in ((agent, "same settings"), (replace(agent, style="deepeyes"), "style"),
                         (replace(agent, direct_instruction="Reply in <answer></answer>."), "direct prompt"),
                         (replace(agent, model=copy.deepcopy(agent.model).to(torch.bfloat16)), "precision"),
                         (agent, "judge")):
        calls.clear()
        go(changed, replace(cfg, judge="llm:other") if why == "judge" else cfg)
        assert bool(calls) == (why != "same settings"), why

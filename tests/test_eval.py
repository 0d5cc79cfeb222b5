"""Tests for eval.py: benchmark loaders on generated fixtures in the official formats, metrics by hand,
the 8K frame mapping, evaluate end to end, the gallery and the command line."""
import json
import re
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import crop_tool
import eval as ev
import lfpc
from support import policy
import rewards
from conftest import noise_image, scripted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def agent(tiny):
    return tiny


SMALL = lfpc.RolloutConfig(global_max_pixels=8 * 8 * 28 * 28, max_new_tokens=8, max_turns=3,
                           crop=crop_tool.CropConfig(min_pixels=4 * 28 * 28, max_pixels=4 * 4 * 28 * 28))


# ----------------------------------------------------------------------------- metrics by hand

def _episode(task_index, answer, crops=(), errors=(), malformed=0, stop="answer", sampled=10, turns=1):
    e = lfpc.Episode(task_index, shown_size=(56, 56))
    e.append(list(range(5)))
    e.append(list(range(5, 5 + sampled)), [0.0] * sampled)
    e.crops = [crop_tool.Crop(noise_image(28, 28), b, b, b) for b in crops]
    e.tool_errors, e.malformed_turns, e.answer, e.stop_reason = list(errors), malformed, answer, stop
    e.tool_calls, e.turns = len(crops) + len(errors), ["..."] * turns
    return e


def test_summarize_by_hand():
    img = Image.new("RGB", (100, 100))
    T = lambda id, ans, boxes=None: lfpc.Task(img, "q?", ans, ["x", "y"], boxes, None, id)
    tasks = [T("single/0", "A", [[20, 20, 40, 40], [0, 0, 60, 60]]), T("single/1", "B"), T("cross/2", "A"),
             T("cross/3", "B", [[60, 60, 80, 80]]), T("cross/4", "A")]
    eps = [_episode(0, "A", crops=[(10, 10, 50, 50)]),                                    # right, IoU 1/4
           _episode(1, "A", errors=["bad box"], sampled=20),                              # wrong, a failed call
           _episode(2, "x", crops=[(0, 0, 100, 50)]),                                     # right (by text), no boxes
           _episode(3, None, crops=[(70, 70, 100, 100), (60, 60, 80, 80)], malformed=1, stop="max_turns"),
           _episode(4, "(A)")]
    m = ev.summarize(eps, tasks, seconds=2.0)
    assert m["n"] == 5 and m["acc"] == pytest.approx(3 / 5)
    assert (m["acc/single"], m["n/single"], m["acc/cross"], m["n/cross"]) == (0.5, 2, pytest.approx(2 / 3), 3)
    assert m["hrbench/FSP"] == 0.5 and m["hrbench/FCP"] == pytest.approx(2 / 3)
    assert m["hrbench/mean"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["tool/call_rate"] == pytest.approx(4 / 5)                                  # episodes 0-3 called
    assert m["tool/crop_rate"] == pytest.approx(3 / 5)                                  # episodes 0, 2, 3 cropped
    assert m["tool/crop_success_rate"] == pytest.approx(4 / 5)                          # 4 crops of 5 attempts
    assert m["format/valid_rate"] == pytest.approx(4 / 5)
    assert m["box/n"] == 2                                                              # episodes 0 and 3
    assert m["box/iou_b1"] == pytest.approx((400 / 1600 + 100 / 1200) / 2)              # FIRST crop of episode 3
    assert m["box/iou_bn"] == pytest.approx((1600 / 3600 + 100 / 1200) / 2)
    assert m["box/coverage_b1"] == pytest.approx((1.0 + 100 / 400) / 2)
    # centres: (30, 30) vs B1's (30, 30); (85, 85) vs (70, 70): |dx| = 0 and 15 of a 100-px image
    assert m["box/dx_b1"] == pytest.approx(15 / 100 / 2) and m["box/dy_b1"] == pytest.approx(15 / 100 / 2)
    assert m["box/area_frac"] == pytest.approx((1600 + 5000 + 900) / 10000 / 3)
    assert (m["stop/answer"], m["stop/max_turns"]) == (4 / 5, 1 / 5)
    assert m["len/response"] == pytest.approx(60 / 5) and m["len/turns"] == 1
    assert m["time/sec_per_question"] == pytest.approx(0.4)


def test_hrbench_is_averaged_over_cycle_categories_as_vlmevalkit_scores_it(tmp_path):
    """A hand-built HR-Bench TSV: 3 questions asked in 2 option rotations (cycle_category 0, 1), with a
    skewed number of rows per cell so that the cycle average differs from the plain mean."""
    from support import data
    from test_data import write_hrbench
    rows = [  # index, question, answer, A-D, category, size  (cycle = 0 for indices < 10, else 1)
        ("0", "q0", "A", "red", "blue", "gold", "grey", "single", (64, 64)),
        ("1", "q1", "B", "red", "blue", "gold", "grey", "single", (64, 64)),
        ("2", "q2", "C", "red", "blue", "gold", "grey", "cross", (64, 64)),
        ("10", "q0", "B", "blue", "red", "gold", "grey", "single", (64, 64)),
        ("12", "q2", "D", "blue", "gold", "grey", "red", "cross", (64, 64)),
        ("13", "q3", "A", "red", "blue", "gold", "grey", "cross", (64, 64))]
    cols = data.HRBENCH_COLUMNS + ("cycle_category",)
    path = tmp_path / "hr.tsv"
    write_hrbench(path, rows=rows)
    lines = path.read_text().splitlines()
    lines = [lines[0] + "\tcycle_category"] + [ln + "\t" + ("0" if int(ln.split("\t")[0]) < 10 else "1") for ln in lines[1:]]
    path.write_text("\n".join(lines) + "\n")
    tasks = data.load_hrbench(str(path))
    assert [t.cycle for t in tasks] == ["0", "0", "0", "1", "1", "1"] and cols[-1] == "cycle_category"
    preds = ["A", "C", "C", "B", "A", "B"]          # right: 0, 2, 10; wrong: 1, 12, 13
    m = ev.summarize([_episode(i, p) for i, p in enumerate(preds)], tasks)
    # by hand: cycle 0: single 1/2, cross 1/1; cycle 1: single 1/1, cross 0/2
    # FSP = (1/2 + 1) / 2 = 0.75; FCP = (1 + 0) / 2 = 0.5; mean = 0.625 (plain means: single 2/3, cross 1/3)
    assert m["hrbench/FSP"] == pytest.approx(0.75) and m["hrbench/FCP"] == pytest.approx(0.5)
    assert m["hrbench/mean"] == pytest.approx(0.625)
    assert m["acc/single"] == pytest.approx(2 / 3) and m["acc"] == pytest.approx(0.5)


def test_protocol_names_how_each_benchmark_was_scored(tmp_path):
    import argparse
    no_cycle = [lfpc.Task("x.png", "q", "A", ["a", "b"], None, None, "single/0")]
    cycled = [lfpc.Task("x.png", "q", "A", ["a", "b"], None, None, f"single/{k}", str(k % 4)) for k in range(8)]
    ns = lambda **kw: argparse.Namespace(**{"vstar": None, "hrbench": None, **kw})
    assert "plain means" in ev.protocol(ns(hrbench="hr.tsv"), no_cycle)
    assert "per cycle_category (4 cycles)" in ev.protocol(ns(hrbench="hr.tsv"), cycled)
    (tmp_path / "direct_attributes").mkdir()
    assert "random.Random" in ev.protocol(ns(vstar=str(tmp_path)), [])
    (tmp_path / "test_questions.jsonl").write_text("")
    assert "test_questions.jsonl" in ev.protocol(ns(vstar=str(tmp_path)), [])


def test_summarize_without_crops_or_categories_gives_none_not_errors():
    tasks = [lfpc.Task(Image.new("RGB", (50, 50)), "q", "red", None, None, None, "toy-1")]
    m = ev.summarize([_episode(0, "red")], tasks)
    assert m["acc"] == 1.0 and m["tool/call_rate"] == 0.0
    assert m["tool/crop_success_rate"] is None and m["box/iou_b1"] is None and m["box/n"] == 0
    assert not any(k.startswith(("acc/", "hrbench/")) for k in m) and m["time/sec_per_question"] is None


def test_8k_style_iou_uses_the_box_mapped_to_the_original(agent):
    """Original 3000x2000 shown at 252x168 (factor 11.90..., not an integer): the model's box is in the
    shown frame; the IoU with B1 must use the box mapped (and floored/ceiled) into the original."""
    original = Image.new("RGB", (3000, 2000), (90, 90, 90))
    t = lfpc.Task(original, "What is written on the sign?", "exit", None, [[700, 400, 1300, 1000]], None, "8k/0")
    cfg = lfpc.RolloutConfig(**{**SMALL.__dict__, "global_max_pixels": 64 * 28 * 28})
    call = crop_tool.format_tool_call([56, 28, 112, 84])
    turns = {0: [(call, "stop"), ("<answer>exit</answer>", "eos")]}
    (e,) = lfpc.rollout(agent, [t], 1, cfg, sample_fn=scripted(agent, turns))
    assert e.shown_size == (252, 168) and 3000 / 252 != 3000 // 252
    # by hand: 56*3000/252 = 666.7 -> 666; 28*2000/168 = 333.3 -> 333; 112*3000/252 = 1333.3 -> 1334; 84*2000/168 = 1000
    assert e.crops[0].box_original == (666, 333, 1334, 1000)
    m = ev.summarize([e], [t])
    assert m["box/iou_b1"] == pytest.approx(600 * 600 / (668 * 667))                    # B1 lies inside the box
    assert m["box/coverage_b1"] == 1.0 and m["acc"] == 1.0
    assert rewards.box_iou((56, 28, 112, 84), t.boxes[0]) == 0.0, "the unmapped box (DeepEyes' bug) misses B1"
    # the gallery maps the box back into the shown frame: its left edge is drawn at x ~ 56
    panel = ev._panel(e, t)
    row = np.asarray(panel)[56, 53:60]
    assert any(tuple(px) == ev.PRED_COLOUR for px in row)


# ----------------------------------------------------------------------------- evaluate, gallery, CLI

def _tasks(n=3, boxes=True):
    return [lfpc.Task(noise_image(200 + 40 * i, 160, i), "<b>What</b> colour is the box?", "red",
                      None, [[20, 20, 120, 120], [0, 0, 160, 160]] if boxes else None, None, f"toy-{i}")
            for i in range(n)]


def test_evaluate_end_to_end_on_the_tiny_model_runs_both_probes(agent):
    tasks = _tasks(2)
    r = ev.evaluate(agent, tasks, SMALL, probes=("noise", "gt"), batch_size=2, progress=False)
    assert set(r) == {"config", "metrics", "probes", "episodes"}
    assert r["config"]["temperature"] == 0.0 and r["config"]["batch_size"] == 2
    m = r["metrics"]
    for key in ("n", "acc", "tool/call_rate", "tool/crop_success_rate", "format/valid_rate", "box/iou_b1", "box/dx_b1",
                "box/iou_bn", "box/coverage_b1", "box/area_frac", "len/response", "time/sec_per_question"):
        assert key in m, key
    assert m["n"] == 2 and 0.0 <= m["acc"] <= 1.0
    assert sum(v for k, v in m.items() if k.startswith("stop/")) == pytest.approx(1.0)
    for probe in ("noise", "gt"):
        p = r["probes"][probe]
        assert len(r["episodes"][probe]) == 2
        assert p["delta/acc"] == pytest.approx(p["acc"] - m["acc"])
    json.dumps({k: v for k, v in r.items() if k != "episodes"})   # everything else is JSON
    lines = ev.format_table(r).splitlines()
    assert lines[0].split() == ["metric", "normal", "noise", "gt"]
    acc = next(line for line in lines if line.split()[0] == "acc")
    assert len(acc) == len(lines[0])                  # columns right-aligned under their headers
    assert acc.split()[1:] == [f"{x:.3f}" for x in (m["acc"], r["probes"]["noise"]["acc"], r["probes"]["gt"]["acc"])]


def test_evaluate_scripted_probes_swap_the_crop_and_skip_without_boxes(agent):
    tasks = _tasks()
    call = crop_tool.format_tool_call([0, 0, 100, 100], "box")
    turns = {i: [(call, "stop"), ("<answer>red</answer>", "eos")] for i in range(3)}
    r = ev.evaluate(agent, tasks, SMALL, batch_size=2, progress=False, sample_fn=scripted(agent, turns))
    assert r["metrics"]["acc"] == 1.0 and r["metrics"]["tool/call_rate"] == 1.0
    assert [e.task_index for e in r["episodes"]["normal"]] == [0, 1, 2]     # chunks of 2 re-indexed
    assert r["probes"]["noise"]["delta/acc"] == 0.0          # a scripted model ignores the image
    normal, noise, gt = (r["episodes"][k] for k in ("normal", "noise", "gt"))
    assert all(e.crops[0].box_original == (20, 20, 120, 120) for e in gt)            # B1, not the asked box
    assert normal[0].crops[0].box_original == noise[0].crops[0].box_original
    assert not np.array_equal(np.asarray(normal[0].crops[0].image), np.asarray(noise[0].crops[0].image))
    r2 = ev.evaluate(agent, _tasks(boxes=False), SMALL, batch_size=8, progress=False, sample_fn=scripted(agent, turns))
    assert "no boxes" in r2["probes"]["gt"]["skipped"] and "acc" in r2["probes"]["noise"]
    assert "probe gt: skipped" in ev.format_table(r2)


def test_probe_deltas_and_table_from_a_model_that_needs_its_crop(agent):
    """A scripted model that answers right only when the tool gives back the crop it asked for (normal),
    wrong under the noise probe and the gt probe: acc 1, 0, 0 and delta/acc -1, -1 exactly; half right
    under gt instead (task 0 only): 0.5 and -0.5; the no-tool probe is the model without the tool."""
    call = crop_tool.format_tool_call([0, 0, 100, 100], "box")
    tasks = _tasks(2)

    def needs_crop(right_under_gt):
        def sample_fn(a, episodes, budget, cfg):
            out = []
            for ep in episodes:
                if cfg.use_tool and not ep.crops and not ep.tool_errors:
                    text, finish = call, "stop"
                else:
                    right = cfg.use_tool and (cfg.probe == "none" or (cfg.probe == "gt" and ep.task_index in right_under_gt))
                    text, finish = f"<answer>{'red' if right else 'blue'}</answer>", "eos"
                toks = agent.encode(text) + ([agent.im_end] if finish == "eos" else [])
                out.append((toks, [-0.5] * len(toks), finish))
            return out
        return sample_fn
    r = ev.evaluate(agent, tasks, SMALL, progress=False, sample_fn=needs_crop(()))
    assert r["metrics"]["acc"] == 1.0
    assert {p: (r["probes"][p]["acc"], r["probes"][p]["delta/acc"]) for p in ev.PROBES} == \
        {"noise": (0.0, -1.0), "gt": (0.0, -1.0), "no-tool": (0.0, -1.0)}
    r = ev.evaluate(agent, tasks, SMALL, probes=("gt",), progress=False, sample_fn=needs_crop((0,)))
    assert (r["probes"]["gt"]["acc"], r["probes"]["gt"]["delta/acc"]) == (0.5, -0.5)
    row = next(line.split() for line in ev.format_table(r).splitlines() if line.split()[:1] == ["acc"])
    assert row[1:] == ["1.000", "0.500"]


def test_no_tool_mode_reports_accuracy_only(agent):
    turns = {i: [("<answer>red</answer>", "eos")] for i in range(2)}
    cfg = lfpc.RolloutConfig(**{**SMALL.__dict__, "use_tool": False})
    r = ev.evaluate(agent, _tasks(2), cfg, progress=False, sample_fn=scripted(agent, turns))
    assert r["metrics"]["acc"] == 1.0 and not any(k.startswith(("tool/", "box/")) for k in r["metrics"])
    assert all("skipped" in p for p in r["probes"].values())


def test_gallery_writes_pngs_and_an_html_page_that_references_them(agent, tmp_path):
    tasks = _tasks()
    call = crop_tool.format_tool_call([0, 0, 100, 100], "box")
    turns = {i: [(call, "stop"), ("<answer>blue</answer>", "eos")] for i in range(3)}
    r = ev.evaluate(agent, tasks, SMALL, probes=(), progress=False, sample_fn=scripted(agent, turns))
    eps = r["episodes"]["normal"]
    eps[0].reward, eps[0].reward_parts = 0.25, {"acc": 0.0}
    path = ev.write_gallery(eps, tasks, str(tmp_path / "g"), n=2)
    page = open(path, encoding="utf-8").read()
    pngs = sorted(f for f in os.listdir(tmp_path / "g") if f.endswith(".png"))
    assert pngs == ["item_000.png", "item_001.png"]
    assert all(f"src='{p}'" in page for p in pngs)
    assert "&lt;b&gt;What&lt;/b&gt;" in page and "<b>What</b>" not in page   # question escaped
    assert "incorrect" in page and "&lt;tool_call&gt;" in page
    panel = Image.open(tmp_path / "g" / pngs[0])
    zoom = max(1, ev.GALLERY_HEIGHT // eps[0].images[0].height)               # small panels upscaled
    assert panel.height == zoom * eps[0].images[0].height and panel.width > zoom * eps[0].images[0].width   # crop beside
    ev.write_gallery(eps, tasks, str(tmp_path / "g"), n=1)                  # again, smaller: no stale picture
    assert sorted(f for f in os.listdir(tmp_path / "g") if f.endswith(".png")) == ["item_000.png"]


def test_cli_runs_on_a_saved_tiny_agent_and_writes_the_json(agent, tmp_path):
    policy.save_agent(agent, str(tmp_path / "model"))
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i in range(2):
        noise_image(120, 90, i).save(data / f"{i}.png")
        rows.append({"id": f"item-{i}", "image": f"{i}.png", "question": "What colour?", "answer": "red",
                     "bboxes": [[10, 10, 60, 60]]})
    (data / "items.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--preset", "paper", "--model", str(tmp_path / "model"),
           "--data", str(data / "items.jsonl"), "--budget", "16", "--crop-max-tokens", "16", "--max-new-tokens", "6",
           "--max-turns", "2", "--batch-size", "2", "--gallery", "1", "--probes", "noise,gt", "--out", str(out),
           "--device", "cpu", "--dtype", "float32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.load(open(out / "results.json"))
    for key in ("model", "data", "date", "platform", "torch", "transformers", "device", "config", "metrics",
                "probes", "items"):
        assert key in res, key
    assert res["config"]["global_max_pixels"] == 16 * 28 * 28 and res["metrics"]["n"] == 2
    assert set(res["probes"]) == {"noise", "gt"} and len(res["items"]["normal"]) == 2
    assert (out / "gallery" / "index.html").is_file() and "metric" in proc.stdout


def test_cli_without_model_finds_no_toy_checkpoint_and_says_so(tmp_path):
    """Run from an empty folder: no runs/ or checkpoints/ there, so the default model cannot be found."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--data", "x.jsonl"], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2 and "no checkpoint of the preset found" in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["--preset", "toy", "--hrbench", "x.tsv", "--model", "m"], "need a real model"),
    (["--preset", "paper"], "pass the tasks"),
])
def test_cli_refuses_contradictory_presets(argv, message, capsys):
    with pytest.raises(SystemExit):
        ev.parse_args(argv)
    assert message in capsys.readouterr().err


def test_the_toy_presets_500_items_are_its_own_not_a_cap_on_given_data():
    """Without a data flag the toy preset evaluates 500 of its held-out items; a --data file is evaluated
    whole (it had been cut to its first 500 without a word), unless --limit says otherwise."""
    base = ["--model", os.path.join(ROOT, "toy", "base")]
    assert ev.parse_args(base).limit == 500
    assert ev.parse_args(base + ["--data", "items.jsonl"]).limit is None
    assert ev.parse_args(base + ["--data", "items.jsonl", "--limit", "7"]).limit == 7
    with pytest.raises(SystemExit):                                     # a floor above the budget: never met
        ev.parse_args(base + ["--min-tokens", "64", "--budget", "16"])


def test_toy_preset_refuses_a_model_not_built_for_the_toy(agent, tmp_path, capsys):
    """A real checkpoint under --preset toy would run with toy crop settings: refused, with the way out."""
    policy.save_agent(agent, str(tmp_path / "m"))
    with pytest.raises(SystemExit):
        ev.parse_args(["--model", str(tmp_path / "m")])
    assert "--preset paper" in capsys.readouterr().err


def test_box_centre_errors_are_per_axis_and_in_the_original_frame():
    """A box shifted 30 px right of B1 (and not down) in a 200 x 100 image: dx = 30/200, dy = 0."""
    tasks = [lfpc.Task(Image.new("RGB", (200, 100)), "q", "a", None, [[20, 20, 60, 60]], None, "t")]
    m = ev.summarize([_episode(0, "a", crops=[(50, 20, 90, 60)])], tasks)
    assert m["box/dx_b1"] == pytest.approx(30 / 200) and m["box/dy_b1"] == 0.0


def test_a_model_writing_invalid_boxes_is_evaluated_under_every_probe(agent, tmp_path):
    """Inverted, too small, outside: every probe runs (the noise probe used to crash here) and the
    results are written; noise leaves the errors, gt answers every call with B1 (lfpc.py's contract)."""
    bad = [crop_tool.format_tool_call(b) for b in ([50, 50, 10, 10], [0, 0, 3, 3], [900, 900, 990, 990])]
    turns = {i: [(bad[i], "stop"), ("<answer>red</answer>", "eos")] for i in range(3)}
    r = ev.evaluate(agent, _tasks(), SMALL, probes=("noise", "gt"), progress=False, sample_fn=scripted(agent, turns))
    assert r["metrics"]["tool/crop_success_rate"] == 0.0 and r["metrics"]["tool/call_rate"] == 1.0
    assert "acc" in r["probes"]["noise"] and "acc" in r["probes"]["gt"]
    assert all(e.tool_errors and not e.crops for e in r["episodes"]["noise"])
    assert all(not e.tool_errors and e.crops[0].box_original == (20, 20, 120, 120) for e in r["episodes"]["gt"])
    json.dumps({k: v for k, v in r.items() if k != "episodes"})


@pytest.mark.parametrize("script, argv, message", [
    ("eval", ["--crop-min-tokens", "100", "--crop-max-tokens", "4"], "must not exceed --crop-max-tokens"),
    ("eval", ["--device", "tpu"], "not a torch device|only cpu and cuda"),
    ("eval", ["--judge-url", "http://h:1/v1?key=SECRET", "--judge", "llm", "--judge-model", "m"], "no credentials"),
    ("info_gap", ["--ratio", "0"], "--ratio must lie in"),
    ("info_gap", ["--ratio", "1.5"], "--ratio must lie in"),
    ("info_gap", ["--out", "SAME", "--data", "SAME"], "three different files"),
    ("bench", ["--repeat", "0"], "--repeat must be at least 1"),
    ("bench", ["--world", "0"], "--world must be at least 1"),
    ("ablation", ["--threads", "-1"], "--threads must be >= 0"),
])
def test_other_scripts_refuse_bad_flags_in_one_line(script, argv, message, capsys, tmp_path):
    import importlib
    mod = importlib.import_module({"bench": "support.bench", "ablation": "toy.ablation"}.get(script, script))
    model = os.path.join(ROOT, "toy", "base")
    base = {"eval": ["--model", model], "info_gap": ["--model", model, "--data", str(tmp_path / "d.jsonl"),
                                                     "--out", str(tmp_path / "o.jsonl")]}.get(script, [])
    argv = [str(tmp_path / "x.jsonl") if a == "SAME" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        mod.parse_args(base + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and re.search(message, err) and "Traceback" not in err, err


def test_eval_data_errors_are_one_line_before_the_model_loads(tmp_path, monkeypatch):
    (tmp_path / "t.jsonl").write_text('{"image": "missing.png", "question": "q", "answer": "a"}\n')
    monkeypatch.setattr(policy, "load_agent", lambda *a, **k: pytest.fail("the model must not load"))
    for argv, message in ((["--preset", "toy", "--data", str(tmp_path / "t.jsonl")], r"(?s)eval.py: .*t.jsonl:1: image file not found"),
                          (["--preset", "paper", "--hrbench", str(tmp_path / "none.tsv")], "eval.py: .*none.tsv"),
                          (["--preset", "paper", "--vstar", str(tmp_path)], "eval.py: .*V\\* folder direct_attributes/ not found")):
        with pytest.raises(SystemExit, match=message):
            ev.main(["--model", os.path.join(ROOT, "toy", "base"), *argv, "--out", str(tmp_path / "o")])

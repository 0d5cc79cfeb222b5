"""Tests for toy/ablation.py: the whole pipeline on a random tiny base (seconds), resume, the target checks."""
import json
import os

import pytest

import train
from toy import ablation
import toy.world

FAST = ("--n-train 8 --prompts 2 --group 2 --micro-batch 2 --max-new-tokens 8 --max-response-tokens 16 "
        "--max-turns 2 --probe-k 2")


@pytest.fixture(scope="module")
def base(toy_base):
    return toy_base


def test_runs_every_arm_evaluates_and_resumes_without_retraining(base, tmp_path, monkeypatch):
    monkeypatch.setattr(ablation, "BUDGETS", {"low": 16, "full": 32})      # smaller global images: faster
    out = str(tmp_path / "abl")
    argv = ["--base", base, "--out", out, "--seeds", "0", "--steps", "1", "--eval-items", "2", "--train-args", FAST]
    ablation.main(argv)
    for arm in ablation.ARMS:
        rows = [json.loads(l) for l in open(os.path.join(out, f"{arm}-s0", "metrics.jsonl"))]
        assert [r["step"] for r in rows] == [1]
        assert os.path.isfile(os.path.join(out, "eval", f"{arm}-s0.json"))
    # the baseline sees the full image, stage 1 the info-gap budgets (probed once, in the shared cache)
    assert train.Args(**_saved_args(out, "baseline")).global_image == "full"
    assert train.Args(**_saved_args(out, "stage1")).global_image == "info-gap"
    assert _saved_args(out, "stage2")["model"].endswith(os.path.join("stage1-s0", "ckpt"))
    assert os.path.isfile(os.path.join(out, "info_gap_cache.jsonl"))
    s = json.load(open(os.path.join(out, "summary.json")))
    assert set(s["table"]) == {"base", *ablation.ARMS}
    for row in s["table"].values():
        for b in ablation.BUDGETS:
            m, _ = row[b]["acc"]
            assert 0.0 <= m <= 1.0
    assert len(s["targets"]) == 4 and all(isinstance(t["met"], bool) for t in s["targets"])   # no mid budget here
    assert "| stage2 |" in open(os.path.join(out, "table.md")).read()

    # a second call with --resume finds every run finished and every evaluation cached
    real_train, real_eval = train.main, ablation.evaluate_model
    monkeypatch.setattr(train, "main", lambda *a, **k: pytest.fail("retrained a finished run"))
    monkeypatch.setattr(ablation, "evaluate_model", _cached_only(ablation.evaluate_model))
    ablation.main(argv + ["--resume"])
    # --resume with more steps carries every run on to them (and evaluates the new checkpoints); a run that
    # died before its first checkpoint (run.json only) starts over with its own settings
    monkeypatch.setattr(train, "main", real_train)
    monkeypatch.setattr(ablation, "evaluate_model", real_eval)
    import shutil
    shutil.rmtree(os.path.join(out, "stage2-s0", "ckpt"))
    os.remove(os.path.join(out, "stage2-s0", "metrics.jsonl"))
    ablation.main([*argv[:argv.index("--steps")], "--steps", "2", *argv[argv.index("--steps") + 2:], "--resume"])
    for arm in ablation.ARMS:
        assert [json.loads(l)["step"] for l in open(os.path.join(out, f"{arm}-s0", "metrics.jsonl"))] == [1, 2]
        assert json.load(open(os.path.join(out, "eval", f"{arm}-s0.json")))["settings"]["step"] == 2


def _saved_args(out, arm):
    import torch
    return torch.load(os.path.join(out, f"{arm}-s0", "ckpt", "trainer.pt"), weights_only=False)["args"]


def _cached_only(real):
    def wrapper(a, model, name):
        assert os.path.exists(os.path.join(a.out, "eval", f"{name}.json")), f"re-evaluated {name}"
        return real(a, model, name)
    return wrapper


def test_refuses_a_non_empty_out_without_resume(base, tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(SystemExit):
        ablation.parse_args(["--base", base, "--out", str(tmp_path)])


def test_target_checks_by_hand():
    def row(acc, noise, iou, mid_noise=None, mid_acc=0.5, gt=None, fmt=1.0):
        r = {"low": {"acc": (acc, 0.0), "probe/noise": (noise, 0.0), "box/iou_b1": (iou, 0.0),
                     "probe/gt": (gt, 0.0), "format/valid_rate": (fmt, 0.0)}}
        if mid_noise is not None:
            r["mid"] = {"acc": (mid_acc, 0.0), "probe/noise": (mid_noise, 0.0), "box/iou_b1": (0.0, 0.0)}
        return r
    t = {"base": row(0.2, 0.0, 0.05, gt=0.78), "baseline": row(0.40, -0.05, 0.10), "stage1": row(0.60, -0.30, 0.15),
         "stage2": row(0.60, -0.30, 0.26)}
    names = [n for n, _, _ in ablation.check_targets(t)]
    assert [ok for _, ok, _ in ablation.check_targets(t)] == [True, True, True, True]
    assert names[0].startswith("the base reads")
    t["base"] = row(0.2, 0.0, 0.05, gt=0.70)                          # reads only 0.90 with the GT crop
    t["stage1"] = row(0.35, -0.14, 0.15)            # drop 0.14 < 3 x 0.05; accuracy below the baseline's
    t["stage2"] = row(0.34, -0.30, 0.40)            # IoU up by 0.25 but accuracy lower
    assert [ok for _, ok, _ in ablation.check_targets(t)] == [False, False, False, False]
    # with the mid budget: the baseline's own target, and a ratio and an accuracy check there too
    t = {"base": row(0.2, 0.0, 0.05, gt=0.78), "baseline": row(0.40, -0.05, 0.10, mid_noise=-0.08, mid_acc=0.5),
         "stage1": row(0.35, -0.14, 0.15, mid_noise=-0.31, mid_acc=0.55), "stage2": row(0.60, -0.30, 0.26)}
    checks = ablation.check_targets(t)
    assert [ok for _, ok, _ in checks] == [True, True, False, False, True, True, True]
    assert "(mid budget)" in checks[1][0] and "3.9x" in checks[4][2]
    t["baseline"] = row(0.40, +0.02, 0.10)                         # a crop of noise helps the baseline: no drop
    assert ablation.check_targets(t)[1][2].endswith("(the baseline has no drop)")


def test_mean_std_skips_missing_values():
    assert ablation.mean_std([None, None]) == (None, None)
    assert ablation.mean_std([0.5]) == (0.5, 0.0)
    m, s = ablation.mean_std([0.2, 0.4, None])
    assert m == pytest.approx(0.3) and s == pytest.approx(0.1414213, abs=1e-6)


def test_quick_honours_seeds(base):
    assert ablation.parse_args(["--base", base, "--out", "/nonexistent/a", "--quick"]).seeds == [0]
    assert ablation.parse_args(["--base", base, "--out", "/nonexistent/a", "--quick", "--seeds", "1,2"]).seeds == [1, 2]
    assert ablation.parse_args(["--base", base, "--out", "/nonexistent/a"]).seeds == [0, 1, 2]


def test_box_payoff_groups_the_shipped_bases_boxes_by_size():
    """The shipped base's habit, as RESULTS.md reads it: most first boxes are > 112 px and cover B1;
    the shares of the sizes and of 'no crop' add up to one."""
    text = ablation.box_payoff(toy.world.BASE, group=1)
    rows = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")[1:]
            for line in text.splitlines()[3:] if line.startswith("|")}
    assert abs(sum(float(r[0]) for r in rows.values()) - 1.0) < 0.01
    big = [float(x) for x in rows["> 112 px"]]
    assert big[0] > 0.5 and big[1] > 0.8               # share, covers B1


def test_box_payoff_refuses_a_missing_checkpoint(capsys):
    with pytest.raises(SystemExit):
        ablation.parse_args(["--box-payoff", "/nonexistent/ckpt"])
    assert "not found" in capsys.readouterr().err

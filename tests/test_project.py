"""Repository-wide invariants: the import graph of the engine (no circles, the toy and the warm-up
outside it), and one metric vocabulary in training and evaluation."""
import ast
import json
import os
import subprocess
import sys

from conftest import ROOT

ENGINE = ("lfpc", "crop_tool", "rewards", "grpo", "info_gap", "train", "eval", "engine", "metrics")


def _imports(name):
    tree = ast.parse(open(os.path.join(ROOT, name + ".py"), encoding="utf-8").read())
    local = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    out = set()
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and getattr(node.test, "id", "") ==
                   "TYPE_CHECKING" for n in ast.walk(node)}                    # annotations only, never run
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module.split(".")[0])
    return out & local - {name}


def test_no_import_circle_and_no_engine_file_imports_the_warmup_or_the_toy():
    local = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))
    graph = {m: _imports(m) for m in local}
    for m in ENGINE:
        assert "warmup" not in graph[m] and "toy" not in graph[m], m
    state = {}

    def visit(m, path):
        if state.get(m) == "open":
            raise AssertionError("import circle: " + " -> ".join(path + [m]))
        if state.get(m) == "done":
            return
        state[m] = "open"
        for n in graph[m]:
            visit(n, path + [m])
        state[m] = "done"
    for m in local:
        visit(m, [])


def test_train_and_eval_report_the_episode_metrics_under_the_same_names(toy_base, tmp_path):
    """A train.py metrics line and an eval.py results file hold every episode metric (metrics.py)."""
    import lfpc
    import metrics
    import toy
    cmd = [sys.executable, "train.py", "--model", toy_base, "--out", str(tmp_path / "run"), "--steps", "1",
           "--n-train", "4", "--prompts", "2", "--group", "2", "--max-new-tokens", "8", "--max-turns", "2",
           "--global-image", "full"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    cmd = [sys.executable, "eval.py", "--model", toy_base, "--limit", "2", "--max-new-tokens", "8", "--gallery", "0",
           "--probes", "none", "--out", str(tmp_path / "eval")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.load(open(tmp_path / "eval" / "results.json"))["metrics"]
    eps = [lfpc.Episode(0)]
    eps[0].stop_reason = "answer"
    names = set(metrics.episode_metrics(eps, toy.eval_tasks(1))) - {"stop/answer"}
    assert names <= set(row) and names <= set(res), (names - set(row), names - set(res))

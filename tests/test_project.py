"""Repository-wide invariants: the layout (the method files at the top level, support/ and toy/ beside),
the import rules (no circles; support/ never imports toy/ and uses only the method files' records; the
real presets never load the toy), and one metric vocabulary in training and evaluation."""
import ast
import json
import os
import subprocess
import sys

from conftest import ROOT

METHOD = ("lfpc", "crop_tool", "rewards", "grpo", "info_gap", "train", "eval")   # the design card's files

# Where support/ still calls a method file's FUNCTIONS (records and constants are always allowed): each
# with its reason. A new edge fails the test until it is justified here or removed.
SUPPORT_USES = {
    ("support.bench", "lfpc"): "bench measures the method: it runs rollouts and the training forward",
    ("support.bench", "train"): "bench times train.py's own collect and update functions",
    ("support.bench", "grpo"): "bench times the loss",
    ("support.bench", "crop_tool"): "bench scripts tool calls (format_tool_call)",
    ("support.profile_step", "lfpc"): "profile_step profiles bench's step: rollouts and the training forward",
    ("support.profile_step", "grpo"): "profile_step profiles the loss's backward",
    ("support.profile_step", "train"): "profile_step lays out micro-batches as train.py does (pack_mode)",
    ("support.memory", "lfpc"): "the estimate tracks the training forward's own log-prob head",
    ("support.models", "crop_tool"): "the tiny models' tokenizer learns the tool call's format",
    ("support.metrics", "rewards"): "box metrics are the reward's own geometry (box_iou, coverage, box_area)",
    ("support.data", "crop_tool"): "images are opened and checked as the crop tool opens them",
    ("support.train_args", "lfpc"): "train.py's flags are checked against the method's own names and bounds "
                                    "(ENGINES, episode_bound)",
}


def _modules():
    """Every project module by dotted name: the top level's, support.*, toy.*."""
    out = {f[:-3]: f for f in os.listdir(ROOT) if f.endswith(".py")}
    for pkg in ("support", "toy"):
        out |= {f"{pkg}.{f[:-3]}": os.path.join(pkg, f) for f in os.listdir(os.path.join(ROOT, pkg))
                if f.endswith(".py") and f != "__init__.py"}
    return out


def _imports(path, names):
    """The project modules `path` imports anywhere (functions included; TYPE_CHECKING blocks left out), as
    {module: set of the names it uses from it}."""
    tree = ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and getattr(node.test, "id", "") ==
                   "TYPE_CHECKING" for n in ast.walk(node)}                    # annotations only, never run
    out, alias = {}, {}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in names or a.name.split(".")[0] in ("toy", "support"):
                    out.setdefault(a.name, set())
                    alias[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in names:                                  # from support import engine
                    out.setdefault(full, set())
                    alias[a.asname or a.name] = full
                elif node.module in names or node.module.split(".")[0] in ("toy", "support"):
                    out.setdefault(node.module, set()).add(a.name)    # from lfpc import Task
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in alias:
            out[alias[node.value.id]].add(node.attr)
    return out


def test_the_top_level_holds_the_method_files_and_no_other_python():
    assert sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")) == sorted(METHOD)


def test_no_import_circle_and_support_never_imports_the_toy():
    mods = _modules()
    graph = {m: _imports(p, mods) for m, p in mods.items()}
    for m in graph:
        if m.startswith("support.") or m in METHOD:
            assert not [n for n in graph[m] if n == "toy" or n.startswith("toy.")], m
    state = {}

    def visit(m, path):
        if state.get(m) == "open":
            raise AssertionError("import circle: " + " -> ".join(path + [m]))
        if state.get(m) == "done":
            return
        state[m] = "open"
        for n in graph[m]:
            if n in graph:
                visit(n, path + [m])
        state[m] = "done"
    for m in graph:
        visit(m, [])


def test_support_uses_only_the_records_of_the_method_files():
    """Classes and UPPER_CASE constants of lfpc, crop_tool, rewards ... are shared records; a support module
    calling a method file's function is a dependency in the wrong direction unless SUPPORT_USES says why."""
    import importlib
    mods = _modules()
    seen = set()
    for m, p in mods.items():
        if not m.startswith("support."):
            continue
        for target, used in _imports(p, mods).items():
            if target not in METHOD:
                continue
            module = importlib.import_module(target)
            calls = sorted(n for n in used if not (isinstance(getattr(module, n, None), type) or n.isupper()))
            if calls:
                seen.add((m, target))
                assert (m, target) in SUPPORT_USES, f"{m} calls {target}.{', '.join(calls)}"
    assert seen == set(SUPPORT_USES), set(SUPPORT_USES) - seen        # no stale excuse


def test_the_real_presets_never_load_the_toy(tmp_path):
    """--preset paper and one-gpu parse, fill and check their settings without importing toy/ (the toy
    preset is imported by name, only when chosen)."""
    code = ("import sys, train, eval\n"
            "for p in ('paper', 'one-gpu'):\n"
            f"    train.parse_args(['--preset', p, '--data', {str(tmp_path / 'd.jsonl')!r}])\n"
            "    eval.parse_args(['--preset', p, '--model', 'org/model', '--data', 'd.jsonl'])\n"
            "loaded = [m for m in sys.modules if m == 'toy' or m.startswith('toy.')]\n"
            "assert not loaded, loaded\n"
            "train.parse_args(['--data', 'd.jsonl', '--model', 'toy/base'])\n"
            "assert 'toy.world' in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_train_and_eval_report_the_episode_metrics_under_the_same_names(toy_base, tmp_path):
    """A train.py metrics line and an eval.py results file hold every episode metric (support/metrics.py)."""
    import lfpc
    from support import metrics
    import toy.world
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
    names = set(metrics.episode_metrics(eps, toy.world.eval_tasks(1))) - {"stop/answer"}
    assert names <= set(row) and names <= set(res), (names - set(row), names - set(res))


def test_the_readmes_reading_order_names_true_line_ranges_and_counts_them():
    """README "Read in this order": every `name` a-b is that definition's span in its file (decorators,
    docstring and body), each item's (N) is the sum of its ranges, and the header's total their sum."""
    import re
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme.split("## Read in this order\n", 1)[1].split("\n## ", 1)[0]
    total = int(re.search(r"method files alone: ([\d,]+) lines", section)[1].replace(",", ""))
    items = re.findall(r"^\d\. `(\w+\.py)` \((\d+)[^)]*\):(.*?)(?=^\d\. |\Z)", section, flags=re.M | re.S)
    assert [f for f, _, _ in items] == ["train.py", "lfpc.py", "crop_tool.py", "rewards.py", "grpo.py", "info_gap.py"]
    seen = 0
    for path, count, text in items:
        tree = ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())
        spans = {n.name: (min([d.lineno for d in n.decorator_list] + [n.lineno]), n.end_lineno) for n in tree.body
                 if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        for name, a, b in re.findall(r"`(\w+)`\s+(\d+)-(\d+)", text):
            assert spans[name] == (int(a), int(b)), (path, name, spans[name])
        lines = sum(int(b) - int(a) + 1 for a, b in re.findall(r"(\d+)-(\d+)", text))
        assert lines == int(count), (path, lines)
        seen += lines
    assert seen == total

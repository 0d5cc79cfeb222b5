"""The command-line checks the scripts share (train.py, eval.py, info_gap.py, support/bench.py), each a
list of one-line refusals (empty: fine) that `refuse` hands to argparse before any work starts. A
script's own rules stay in its parse_args.
"""
from __future__ import annotations


def at_least(a, names, low: int = 1) -> list[str]:
    """One line for each flag in `names` set below `low` (None: unset, left to a preset)."""
    out = []
    for name in names:
        v = getattr(a, name)
        if v is not None and v < low:
            bound = "at least 1" if low == 1 else f">= {low}"
            out.append(f"--{name.replace('_', '-')} must be {bound}, got {v}")
    return out


def judge_problems(a) -> list[str]:
    """--judge, --judge-url, --judge-model, --judge-timeout (support/judge.py) as every script takes them."""
    from support.judge import cache_problem, url_problem
    out = []
    if a.judge not in ("rule", "llm"):
        out.append(f"--judge is rule or llm, got {a.judge!r}")
    if a.judge == "llm" and not (a.judge_url and a.judge_model):
        out.append("--judge llm needs --judge-url and --judge-model")
    if a.judge_url and (why := url_problem(a.judge_url)):
        out.append(why)
    if not 0 < a.judge_timeout <= 600:
        out.append(f"--judge-timeout lies in (0, 600] seconds, got {a.judge_timeout}")
    if a.judge == "llm" and getattr(a, "judge_cache", None) and (why := cache_problem(a.judge_cache)):
        out.append(why)
    if a.judge == "rule" and (given := [f for f in ("judge_url", "judge_model") if getattr(a, f, None)]):
        out.append(", ".join("--" + f.replace("_", "-") for f in given) + " would go unused: they are --judge llm's")
    return out


def refuse(p, problems: list[str]) -> None:
    """argparse's one-line error (exit 2) for the first problem, if any."""
    if problems:
        p.error(problems[0])

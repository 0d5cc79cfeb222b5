"""Answer judges behind one interface: the rules of rewards.py, or a large instruct model behind an
OpenAI-compatible chat-completions endpoint (DeepEyes judges its rewards with Qwen2.5-72B-Instruct served
by vLLM; see notes/deepeyes_prompts.md).

    judge = make_judge("llm", url="http://127.0.0.1:8000", model="judge", cache="judge_cache.jsonl")
    judge.correct(pred, answer, choices, question)   -> 1.0 or 0.0
    judge.same(a, b, choices, question)              -> bool (two predictions give the same answer)
    judge.groups(preds, choices, question)           -> a vote group id per prediction (None: no answer)
    judge.stats                                      -> {"calls", "requests", "cached", "fallbacks", "rule"}

Contract (stdlib only: urllib.request + json; one judge per process, not thread-safe)
--------
- RuleJudge: correct = rewards.accuracy; same = rewards.same_answer. Every judgement counts in
  stats["rule"].
- LLMJudge(url, model, cache_path=None, timeout=30, retries=2, backoff=0.5, rule_first=True):
  * what is asked. correct(): a None or empty prediction is 0.0, and (rule_first) a prediction the rules
    judge right is 1.0, both without a request (stats["rule"]); the model judges the rest. same(): a
    None or empty prediction -> False, rules' same_answer -> True, and with choices two predictions
    naming different options -> False, all without a request; otherwise the model judges b against a
    as if a were the standard answer.
  * endpoint: POST {url}/v1/chat/completions; "/v1" is not added twice and a full
    ".../chat/completions" url is used as given. Body: {"model", "messages": [system, user],
    "temperature": 0, "max_tokens": 5}.
  * prompt (JUDGE_SYSTEM, JUDGE_TEMPLATE, ours): DeepEyes' idea (verl/utils/reward_score/vl_agent.py):
    the question, the standard answer and the model's answer, "consistent whenever they are essentially
    the same, e.g. 'pink' and 'it is pink'", a few worked examples, one-token verdict. DeepEyes asks for
    "Judgement: 1/0" at temperature 0.3; we ask for "yes"/"no" at temperature 0. With choices the
    question lists the options ("A. red") and the standard answer is "B. blue".
  * verdict, parsed strictly (parse_verdict): the reply, stripped of whitespace, case and one final
    '.', must be "yes" or "no", optionally after "consistent:"; anything else is a failed attempt.
  * failures: an HTTP error status (500, ...), a timeout (`timeout` seconds per attempt), a refused
    connection, a body that is not the protocol's JSON, or a reply that is not a verdict. Up to
    1 + retries attempts, sleeping backoff * 2**i seconds before retry i+1; when all fail the rules
    decide, stats["fallbacks"] += 1 and a warning goes to the "lfpc.judge" logger. A fallback is never
    cached, so the next call asks again.
  * cache (cache_path, JSONL): one line per verdict the model gave, {"key", "verdict", "kind", "model"}
    with key = sha256 of [PROMPT_VERSION, kind, model, question, standard answer as shown, pred,
    choices] (kind: "correct" | "same"); read when the judge is made (a corrupt line is skipped with a warning),
    appended and flushed after each new verdict. A cached judgement makes no request.
  * stats: calls (judgements sent to the model), requests (HTTP attempts, retries included), cached
    (judgements answered from the cache), fallbacks, rule (judgements the rules made without asking).
- groups(preds): greedy in order; a prediction joins the first group whose first member it is `same`
  as, else opens a new group; None or empty predictions get None. For RuleJudge this equals grouping
  by rewards.vote_key.
- make_judge(kind="rule" | "llm", url=None, model=None, cache=None, **kwargs): "llm" needs url and
  model (ValueError naming what is missing); any other kind is a ValueError.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request

import rewards

logger = logging.getLogger("lfpc.judge")

PROMPT_VERSION = "lfpc-judge-1"   # part of every cache key: change it when the prompt changes
JUDGE_SYSTEM = "You are a helpful assistant."
JUDGE_TEMPLATE = """Below are two answers to a question: [Standard Answer] is the correct answer and \
[Model Answer] is the answer extracted from a model's output. Decide whether the model answer is consistent \
with the standard answer. They are consistent whenever they are essentially the same answer, however it is \
worded: 'pink' and 'it is pink' are consistent, and so are an option's letter and its text. An answer that \
hedges between several candidates, or contradicts the standard answer, is not consistent.
Reply with one word: yes if they are consistent, no if they are not.

[Question]: What color is the umbrella the woman is holding?
[Standard Answer]: The umbrella is yellow.
[Model Answer]: yellow
Consistent: yes

[Question]: Is the cup to the left or to the right of the laptop?
[Standard Answer]: left
[Model Answer]: The cup is on the right side of the laptop.
Consistent: no

[Question]: How many birds are on the wire?
Options:
A. 2
B. 3
[Standard Answer]: B. 3
[Model Answer]: There are three birds.
Consistent: yes

[Question]: Is there a dog in the picture?
[Standard Answer]: No
[Model Answer]: Yes, there is a small dog.
Consistent: no

[Question]: What is written on the sign?
[Standard Answer]: STOP
[Model Answer]: either stop or slow
Consistent: no

[Question]: {question}
[Standard Answer]: {answer}
[Model Answer]: {pred}
Consistent:"""

_VERDICT = re.compile(r"(?:consistent\s*:\s*)?(yes|no)\.?")
# What a failed attempt raises: transport (URLError covers HTTPError; OSError covers refused connections
# and timeouts), protocol (HTTPException) and reply shape (ValueError covers JSON errors and bad verdicts).
_FAILURES = (urllib.error.URLError, OSError, http.client.HTTPException, ValueError, KeyError, IndexError,
             TypeError)


def chat_url(url: str) -> str:
    """The chat-completions address of a server: "http://h:8000", "http://h:8000/" and "http://h:8000/v1"
    -> "http://h:8000/v1/chat/completions"; a url already ending in "/chat/completions" is kept."""
    u = url.rstrip("/")
    if u.endswith("/chat/completions"):
        return u
    return (u if u.endswith("/v1") else u + "/v1") + "/chat/completions"


def parse_verdict(reply: str) -> bool:
    """True for "yes", False for "no" (whitespace, case, one final '.' and a "Consistent:" prefix are
    ignored); anything else -> ValueError."""
    m = _VERDICT.fullmatch(reply.strip().lower()) if isinstance(reply, str) else None
    if m is None:
        raise ValueError(f"not a yes/no verdict: {reply!r}")
    return m.group(1) == "yes"


def with_options(question: str, choices: list[str] | None) -> str:
    """The question as the judge reads it: with choices, followed by "Options:" and "A. ..." lines."""
    if not choices:
        return question
    return question + "\nOptions:\n" + "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices))


class Judge:
    """The interface every judge has; `groups` is shared."""

    def __init__(self):
        self.stats = {"calls": 0, "requests": 0, "cached": 0, "fallbacks": 0, "rule": 0}

    def correct(self, pred: str | None, answer: str, choices: list[str] | None = None,
                question: str = "") -> float:
        raise NotImplementedError

    def same(self, a: str | None, b: str | None, choices: list[str] | None = None, question: str = "") -> bool:
        raise NotImplementedError

    def groups(self, preds: list, choices: list[str] | None = None, question: str = "") -> list[int | None]:
        """A vote group id per prediction (module docstring): greedy, first members as representatives."""
        firsts, out = [], []
        for i, p in enumerate(preds):
            if not isinstance(p, str) or not rewards.normalize_answer(p):
                out.append(None)
                continue
            for g, r in enumerate(firsts):
                if self.same(preds[r], p, choices, question):
                    out.append(g)
                    break
            else:
                firsts.append(i)
                out.append(len(firsts) - 1)
        return out


class RuleJudge(Judge):
    """The rules of rewards.py (accuracy, same_answer); never makes a request."""

    def correct(self, pred, answer, choices=None, question=""):
        self.stats["rule"] += 1
        return rewards.accuracy(pred, answer, choices)

    def same(self, a, b, choices=None, question=""):
        self.stats["rule"] += 1
        return rewards.same_answer(a, b, choices)


class LLMJudge(Judge):
    """A model behind an OpenAI-compatible chat-completions endpoint (module docstring)."""

    def __init__(self, url: str, model: str, cache_path: str | None = None, timeout: float = 30,
                 retries: int = 2, backoff: float = 0.5, rule_first: bool = True):
        super().__init__()
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError(f"need timeout > 0, retries >= 0, backoff >= 0; got {timeout}, {retries}, {backoff}")
        self.url, self.model, self.cache_path = chat_url(url), model, cache_path
        self.timeout, self.retries, self.backoff, self.rule_first = timeout, retries, backoff, rule_first
        self.rules = RuleJudge()
        self._cache: dict[str, bool] = self._read_cache(cache_path) if cache_path else {}

    # ------------------------------------------------------------------------- the interface

    def correct(self, pred, answer, choices=None, question=""):
        if pred is None or not rewards.normalize_answer(pred):
            self.stats["rule"] += 1
            return 0.0
        if self.rule_first and rewards.accuracy(pred, answer, choices) == 1.0:
            self.stats["rule"] += 1
            return 1.0
        reference = answer
        if choices:
            k = rewards.answer_index(answer, choices)
            reference = f"{chr(65 + k)}. {choices[k]}"
        verdict = self._ask("correct", question, reference, pred, choices)
        if verdict is None:
            return rewards.accuracy(pred, answer, choices)
        return float(verdict)

    def same(self, a, b, choices=None, question=""):
        if not isinstance(a, str) or not isinstance(b, str) or not rewards.normalize_answer(a) \
                or not rewards.normalize_answer(b):
            self.stats["rule"] += 1
            return False
        if rewards.same_answer(a, b, choices):
            self.stats["rule"] += 1
            return True
        if choices:
            ka, kb = rewards.choice_index(a, choices), rewards.choice_index(b, choices)
            if ka is not None and kb is not None:      # two different options: letters are exact
                self.stats["rule"] += 1
                return False
        verdict = self._ask("same", question, a, b, choices)
        if verdict is None:
            return rewards.same_answer(a, b, choices)
        return verdict

    # ------------------------------------------------------------------------- asking the model

    def messages(self, question: str, reference: str, pred: str, choices: list[str] | None) -> list[dict]:
        """The chat the model is sent."""
        user = JUDGE_TEMPLATE.format(question=with_options(question, choices), answer=reference, pred=pred)
        return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]

    def _key(self, kind, question, reference, pred, choices) -> str:
        fields = [PROMPT_VERSION, kind, self.model, question, reference, pred, choices]
        return hashlib.sha256(json.dumps(fields, ensure_ascii=False).encode("utf-8")).hexdigest()

    def _ask(self, kind: str, question: str, reference: str, pred: str, choices) -> bool | None:
        """The model's verdict (cached, or asked with retries); None after 1 + retries failed attempts."""
        key = self._key(kind, question, reference, pred, choices)
        if key in self._cache:
            self.stats["cached"] += 1
            return self._cache[key]
        self.stats["calls"] += 1
        body = {"model": self.model, "messages": self.messages(question, reference, pred, choices),
                "temperature": 0, "max_tokens": 5}
        errors = []
        for attempt in range(1 + self.retries):
            if attempt and self.backoff:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            self.stats["requests"] += 1
            try:
                verdict = parse_verdict(self._post(body))
            except _FAILURES as e:
                errors.append(f"{type(e).__name__}: {e}")
                continue
            self._remember(key, verdict, kind)
            return verdict
        self.stats["fallbacks"] += 1
        logger.warning("judge %s at %s failed %d times (last: %s); the rule judge decides",
                       self.model, self.url, len(errors), errors[-1])
        return None

    def _post(self, body: dict) -> str:
        """One request; the reply's message content. Raises one of _FAILURES on any failure."""
        request = urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            reply = json.loads(response.read().decode("utf-8"))
        return reply["choices"][0]["message"]["content"]

    # ------------------------------------------------------------------------- the cache

    @staticmethod
    def _read_cache(path: str) -> dict[str, bool]:
        cache = {}
        if not os.path.exists(path):
            return cache
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    cache[row["key"]] = bool(row["verdict"])
                except (ValueError, KeyError, TypeError):
                    logger.warning("judge cache %s: line %d is corrupt, skipped", path, n)
        return cache

    def _remember(self, key: str, verdict: bool, kind: str) -> None:
        self._cache[key] = verdict
        if self.cache_path:
            with open(self.cache_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "verdict": verdict, "kind": kind, "model": self.model}) + "\n")
                f.flush()


KINDS = ("rule", "llm")


def make_judge(kind: str = "rule", url: str | None = None, model: str | None = None, cache: str | None = None,
               **kwargs) -> Judge:
    """A judge by name: "rule" (RuleJudge) or "llm" (LLMJudge(url, model, cache_path=cache, **kwargs))."""
    if kind == "rule":
        return RuleJudge()
    if kind == "llm":
        missing = [name for name, value in (("url", url), ("model", model)) if not value]
        if missing:
            raise ValueError(f"the llm judge needs {' and '.join(missing)} (an OpenAI-compatible server, e.g. "
                             "vLLM, and the model name it serves)")
        return LLMJudge(url, model, cache_path=cache, **kwargs)
    raise ValueError(f"judge kind must be one of {KINDS}, got {kind!r}")

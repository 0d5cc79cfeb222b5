"""Tests for train.py: both stages end to end, exact resume, non-finite losses, fp32 master weights."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import lfpc
import toy
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--n-train", "8", "--prompts", "2", "--group", "2", "--micro-batch", "2", "--max-new-tokens", "8",
        "--max-response-tokens", "16", "--max-turns", "2", "--probe-k", "2"]


@pytest.fixture(scope="module")
def base(toy_base):
    """A randomly initialised toy model saved as a checkpoint folder."""
    return toy_base


def test_both_stages_run_end_to_end_in_a_subprocess(base, tmp_path):
    s1, s2 = str(tmp_path / "s1"), str(tmp_path / "s2")
    for args in (["--stage", "1", "--model", base, "--out", s1], ["--stage", "2", "--model", s1 + "/ckpt", "--out", s2]):
        r = subprocess.run([sys.executable, "train.py", *args, "--steps", "2", *FAST], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(s2, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward/mean", "reward/acc", "acc", "tool/call_rate", "tool/crop_success_rate", "len/response",
                "loss/clip_frac", "loss/policy", "adv/frac_zero_std"):
        assert key in rows[0], key
    assert os.path.isfile(os.path.join(s2, "ckpt", "trainer.pt"))
    assert lfpc.load_agent(os.path.join(s2, "ckpt"), dtype=torch.float32).system_prompt == toy.SYSTEM_PROMPT


def test_help_lists_every_argument():
    r = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for f in train.fields(train.Args):
        assert "--" + f.name.replace("_", "-") in r.stdout


def _weights(path):
    """The checkpoint's weights: the full model, or the LoRA adapters of a --lora run."""
    name = "adapter_model.safetensors" if os.path.isfile(os.path.join(path, "adapter_model.safetensors")) else "model.safetensors"
    return load_file(os.path.join(path, name))


@pytest.mark.parametrize("extra", [[], ["--lora", "4"]], ids=["full", "lora"])
def test_resume_after_a_crash_continues_exactly(base, tmp_path, monkeypatch, extra):
    if extra:
        pytest.importorskip("peft")
    common = ["--stage", "1", "--model", base, "--steps", "3", "--save-every", "1", *FAST, *extra]
    train.main(common + ["--out", str(tmp_path / "straight")])

    real_step, calls = train.train_step, []

    def crash_after_two(*args, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        calls.append(1)
        return real_step(*args, **kw)
    monkeypatch.setattr(train, "train_step", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        train.main(common + ["--out", str(tmp_path / "crashed")])
    monkeypatch.setattr(train, "train_step", real_step)
    assert torch.load(str(tmp_path / "crashed/ckpt/trainer.pt"), weights_only=False)["step"] == 2
    train.main(["--resume", "--out", str(tmp_path / "crashed")])

    a, b = _weights(str(tmp_path / "straight/ckpt")), _weights(str(tmp_path / "crashed/ckpt"))
    assert a.keys() == b.keys() and all(("lora_" in k) == bool(extra) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    rows = [json.loads(line) for line in open(tmp_path / "crashed/metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    ref = [json.loads(line) for line in open(tmp_path / "straight/metrics.jsonl")]
    assert rows[2]["reward/mean"] == ref[2]["reward/mean"] and rows[2]["len/response"] == ref[2]["len/response"]


def test_an_existing_run_is_not_overwritten_without_resume(base, tmp_path):
    out = str(tmp_path / "run")
    train.main(["--stage", "1", "--model", base, "--out", out, "--steps", "1", *FAST])
    with pytest.raises(SystemExit, match="--resume"):
        train.main(["--stage", "1", "--model", base, "--out", out, "--steps", "1", *FAST])


def _one_step(base, monkeypatch, lr, **patch):
    a = train.parse_args(["--stage", "1", "--model", base, "--lr", str(lr), "--global-image", "full", *FAST])
    agent = train.load_model(a)
    cfg = toy.rollout_config(max_new_tokens=8, max_response_tokens=16, max_turns=2)
    tasks = train.load_data(a, agent)[:2]
    for name, fn in patch.items():
        monkeypatch.setattr(train, name, fn)
    # rewards that differ inside each group, so every episode carries an advantage
    monkeypatch.setattr(train, "score", lambda a, eps, tasks: [setattr(e, "reward", float(i % 2)) for i, e in enumerate(eps)])
    before = {k: v.detach().clone() for k, v in agent.model.named_parameters()}
    opt = torch.optim.AdamW(agent.model.parameters(), lr=a.lr, weight_decay=0.0)
    m = train.train_step(a, agent, opt, tasks, cfg, step=0)
    return m, before, dict(agent.model.named_parameters())


def test_one_step_at_lr_1e6_changes_the_fp32_master_weights(base, monkeypatch):
    """Pure-bf16 AdamW at lr 1e-6 drops most updates (w + 1e-6 rounds back to w); fp32 masters keep them."""
    m, before, after = _one_step(base, monkeypatch, 1e-6)
    assert m["loss/trained_episodes"] > 0
    assert m["loss/sampler_gap"] < 1e-5                                   # fp32: sampler and trainer agree
    changed = [(after[k] != before[k]).float().mean().item() for k in before if after[k].requires_grad]
    assert changed and sum(changed) / len(changed) > 0.5
    w = torch.ones(1000, dtype=torch.bfloat16)
    assert (w + 1e-6 == w).all()          # the trap this guards against: in bf16 the update vanishes


def test_one_lora_step_at_lr_1e6_changes_the_adapters_and_nothing_else(base, monkeypatch):
    """--lora: only the adapters train (B starts at 0, so any update shows), the base stays frozen."""
    pytest.importorskip("peft")
    real = train.load_model
    monkeypatch.setattr(train, "load_model", lambda a, ckpt="": real(train.Args(**{**a.__dict__, "lora": 4})))
    m, before, after = _one_step(base, monkeypatch, 1e-6)
    assert m["loss/trained_episodes"] > 0
    lora_b = [k for k in before if "lora_B" in k]
    assert lora_b and all(after[k].requires_grad for k in lora_b)
    assert all((after[k] != before[k]).any() for k in lora_b)
    for k in before:
        if "lora_" not in k:
            assert not after[k].requires_grad and torch.equal(before[k], after[k].detach()), k
            assert after[k].dtype == torch.bfloat16, k                     # the frozen base in bf16
        else:
            assert after[k].dtype == torch.float32, k                      # the adapters in fp32
    # sampled with the bf16 base and trained with it: the update's old log-probs are its own (ratio 1)
    assert m["loss/ratio_mean"] == 1.0 and m["loss/clip_frac"] == 0.0
    assert 0.0 <= m["loss/sampler_gap"] < 0.05


def test_stage2_continues_the_adapters_of_a_lora_stage1_or_merges_them(base, tmp_path):
    """Stage 2 from a --lora stage-1 checkpoint (a folder of adapters): with --lora it trains the SAME
    adapters (no second layer of them); without, it merges them and fine-tunes the full model."""
    pytest.importorskip("peft")
    s1 = str(tmp_path / "s1")
    train.main(["--stage", "1", "--model", base, "--out", s1, "--steps", "1", "--lora", "4", *FAST])
    a = train.parse_args(["--stage", "2", "--model", s1 + "/ckpt", "--lora", "4", *FAST])
    agent = train.load_model(a)
    saved = _weights(s1 + "/ckpt")
    # (apply_lora's aliases model.model / model.lm_head list each tensor twice: keep peft's own names)
    live = {k: v for k, v in agent.model.state_dict().items() if "lora_" in k and k.startswith("base_model.")}
    assert len(live) == len(saved) and all(".lora_A.default." in k or ".lora_B.default." in k for k in live)
    for k, v in saved.items():                          # peft drops the adapter name when saving
        torch.testing.assert_close(live[k.replace(".weight", ".default.weight")], v, rtol=0, atol=0)
    assert agent.system_prompt == toy.SYSTEM_PROMPT
    s2 = str(tmp_path / "s2")
    train.main(["--stage", "2", "--model", s1 + "/ckpt", "--out", s2, "--steps", "1", *FAST])
    assert os.path.isfile(os.path.join(s2, "ckpt", "model.safetensors"))            # merged: a full model
    assert not any("lora_" in k for k in _weights(s2 + "/ckpt"))


def test_a_nonfinite_loss_skips_the_step_and_leaves_weights_untouched(base, monkeypatch):
    real = lfpc.token_logprobs
    nan_logprobs = lambda model, batch, t=1.0: real(model, batch, t) * float("nan")
    monkeypatch.setattr(lfpc, "token_logprobs", nan_logprobs)
    m, before, after = _one_step(base, monkeypatch, 1e-3)
    assert m["loss/skipped_nonfinite"] == 1.0
    for k in before:
        assert torch.equal(before[k], after[k].detach()), k


def test_stage2_refuses_tasks_without_boxes(base, tmp_path):
    from PIL import Image
    Image.new("RGB", (56, 56)).save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "a.png", "question": "q", "answer": "a"}) + "\n")
    with pytest.raises(SystemExit, match="bboxes"):
        train.main(["--stage", "2", "--model", base, "--data", str(tmp_path / "d.jsonl"), "--out",
                    str(tmp_path / "o"), "--steps", "1", "--global-image", "full", *FAST])


def test_micro_batches_by_token_budget_give_the_one_batch_gradient(base):
    """The same episodes trained in one micro-batch, or one episode per micro-batch (a tiny --train-tokens):
    the same update (whole-step token counts), every episode trained exactly once."""
    import copy
    a = train.parse_args(["--model", base, "--global-image", "full", *FAST])
    agent = train.load_model(a)
    cfg = toy.rollout_config(max_new_tokens=8, max_response_tokens=16, max_turns=2)
    tasks = train.load_data(a, agent)[:2]
    episodes, _ = train.collect_episodes(a, agent, tasks, cfg, step=0)
    for i, e in enumerate(episodes):
        e.reward = float(i % 2)
    results = []
    for tokens in (1 << 20, 1):
        clone = copy.deepcopy(agent)
        opt = torch.optim.SGD(clone.model.parameters(), lr=1.0)        # the update IS the gradient
        args = train.Args(**{**a.__dict__, "train_tokens": tokens, "micro_batch": 64})
        m = train.update_policy(args, clone, opt, episodes, tasks)
        results.append((m, dict(clone.model.named_parameters())))
    (m1, p1), (m2, p2) = results
    assert m1["loss/trained_episodes"] == m2["loss/trained_episodes"] == len(episodes)
    assert m1["loss/grad_norm"] == pytest.approx(m2["loss/grad_norm"], rel=1e-5)
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k], rtol=1e-4, atol=1e-6)

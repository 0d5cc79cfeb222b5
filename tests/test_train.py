"""Tests for train.py: both stages end to end, exact resume, non-finite losses, fp32 master weights."""
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import lfpc
import train
import grpo
from support import batches, policy
import toy.world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--n-train", "8", "--prompts", "2", "--group", "2", "--micro-batch", "2", "--max-new-tokens", "8",
        "--max-response-tokens", "16", "--max-turns", "2", "--probe-k", "2"]


@pytest.fixture(scope="module")
def base(toy_base):
    """A randomly initialised toy model saved as a checkpoint folder."""
    return toy_base


def test_both_stages_run_end_to_end_in_a_subprocess(base, tmp_path):
    s1, s2 = str(tmp_path / "s1"), str(tmp_path / "s2")
    said = []
    for args in (["--stage", "1", "--model", base, "--out", s1], ["--stage", "2", "--model", s1 + "/ckpt", "--out", s2]):
        r = subprocess.run([sys.executable, "train.py", *args, "--steps", "2", *FAST], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        said.append(r.stdout)
    # the console: one short line a step, then what happened, where it is and what to run next
    steps = [ln for ln in said[0].splitlines() if ln.startswith("step ")]
    assert [ln.split()[1] for ln in steps] == ["1/2", "2/2"] and all(len(ln) <= 80 for ln in steps)
    assert re.fullmatch(r"step 1/2  acc \d\.\d\d  reward -?\d+\.\d\d  tool \d\.\d\d( {2}iou \d\.\d\d)?  \d+\.\d s/step",
                        steps[0]), steps[0]
    for text, stage in zip(said, (1, 2)):
        assert f"stage {stage}: 2 steps in" in text and "accuracy" in text and "->" in text
        assert f"curves:     {os.path.join(s1 if stage == 1 else s2, 'curves.png')}" in text
    assert f"next:       python train.py --stage 2 --model {s1}/ckpt" in said[0]
    assert f"evaluate:   python eval.py --preset toy --model {s2}/ckpt" in said[1]
    for out in (s1, s2):
        with open(os.path.join(out, "curves.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in open(os.path.join(s2, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward/mean", "reward/acc", "acc", "tool/call_rate", "tool/crop_success_rate", "len/response",
                "loss/clip_frac", "loss/policy", "adv/frac_zero_std"):
        assert key in rows[0], key
    assert os.path.isfile(os.path.join(s2, "ckpt", "trainer.pt"))
    assert policy.load_agent(os.path.join(s2, "ckpt"), dtype=torch.float32).system_prompt == toy.world.SYSTEM_PROMPT


def test_help_lists_every_argument():
    r = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for f in dataclasses.fields(train.Args):
        assert "--" + f.name.replace("_", "-") in r.stdout


def _weights(path):
    """The checkpoint's weights: the full model, or the LoRA adapters of a --lora run."""
    name = "adapter_model.safetensors" if os.path.isfile(os.path.join(path, "adapter_model.safetensors")) else "model.safetensors"
    return load_file(os.path.join(path, name))


@pytest.mark.parametrize("extra", [[], ["--lora", "4"]], ids=["full", "lora"])
def test_resume_after_a_crash_continues_exactly(base, tmp_path, monkeypatch, extra):
    if extra:
        import peft  # noqa: F401  (requirements.txt)
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
    agent = policy.load_model(a)
    cfg = toy.world.rollout_config(max_new_tokens=8, max_response_tokens=16, max_turns=2)
    tasks = train.load_data(a, agent)[:2]
    for name, fn in patch.items():
        monkeypatch.setattr(train, name, fn)
    # rewards that differ inside each group, so every episode carries an advantage
    monkeypatch.setattr(train, "score", lambda a, eps, tasks, judge: [setattr(e, "reward", float(i % 2)) for i, e in enumerate(eps)])
    before = {k: v.detach().clone() for k, v in agent.model.named_parameters()}
    opt = torch.optim.AdamW(agent.model.parameters(), lr=a.lr, weight_decay=0.0)
    m = train.train_step(a, agent, opt, tasks, cfg, step=0)
    return m, before, dict(agent.model.named_parameters())


def test_one_step_at_lr_1e6_changes_the_fp32_master_weights(base, monkeypatch):
    """Pure-bf16 AdamW at lr 1e-6 drops most updates (w + 1e-6 rounds back to w); fp32 masters keep them.
    Side by side: the same step with the weights loaded in bf16 (the trap) changes far fewer of them."""
    m, before, after = _one_step(base, monkeypatch, 1e-6)
    assert m["loss/trained_episodes"] > 0
    assert m["loss/sampler_gap"] < 1e-5                                   # fp32: sampler and trainer agree
    changed = [(after[k] != before[k]).float().mean().item() for k in before if after[k].requires_grad]
    assert changed and sum(changed) / len(changed) > 0.5
    monkeypatch.setattr(policy, "base_dtype", lambda a: torch.bfloat16)    # the trap: bf16 weights, bf16 AdamW
    _, before16, after16 = _one_step(base, monkeypatch, 1e-6)
    assert all(after16[k].dtype == torch.bfloat16 for k in before16)
    changed16 = [(after16[k] != before16[k]).float().mean().item() for k in before16 if after16[k].requires_grad]
    assert sum(changed16) / len(changed16) < 0.5 * sum(changed) / len(changed)    # 0.32 vs 0.98 measured


def test_one_lora_step_at_lr_1e6_changes_the_adapters_and_nothing_else(base, monkeypatch):
    """--lora: only the adapters train (B starts at 0, so any update shows), the base stays frozen."""
    import peft  # noqa: F401  (requirements.txt)
    real = policy.load_model
    monkeypatch.setattr(policy, "load_model", lambda a, ckpt="": real(train.Args(**{**a.__dict__, "lora": 4})))
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
    assert 0.0 <= m["loss/sampler_gap"] < 1e-3                          # 3.5e-4 measured (the bf16 base both ways)


def test_sampler_and_trainer_run_in_the_precision_the_gpu_uses_and_agree_there(base, monkeypatch):
    """The GPU presets' precision, bf16 autocast over fp32 weights, here on the CPU (policy.precision made
    CPU autocast): the rollout's forwards and the training forward both run under it (a side left out
    would sample one policy and train another), and their log-probs differ by bf16 rounding only."""
    monkeypatch.setattr(policy, "precision", lambda agent: torch.autocast("cpu", dtype=torch.bfloat16))
    seen = {"rollout": [], "train": []}
    rollout, logprobs = lfpc.rollout, lfpc.token_logprobs
    monkeypatch.setattr(lfpc, "rollout", lambda *x, **k: seen["rollout"].append(torch.is_autocast_enabled("cpu"))
                        or rollout(*x, **k))
    monkeypatch.setattr(lfpc, "token_logprobs", lambda *x, **k: seen["train"].append(torch.is_autocast_enabled("cpu"))
                        or logprobs(*x, **k))
    m, _, _ = _one_step(base, monkeypatch, 1e-6)
    assert seen["rollout"] == [True] and seen["train"] and all(seen["train"])
    assert m["loss/trained_episodes"] > 0 and m["loss/ratio_mean"] == 1.0
    assert 1e-5 < m["loss/sampler_gap"] < 2e-3, m["loss/sampler_gap"]    # 3.5e-4 measured; fp32 agrees to < 1e-5


def test_stage2_continues_the_adapters_of_a_lora_stage1_or_merges_them(base, tmp_path):
    """Stage 2 from a --lora stage-1 checkpoint (a folder of adapters): with --lora it trains the SAME
    adapters (no second layer of them); without, it merges them and fine-tunes the full model."""
    import peft  # noqa: F401  (requirements.txt)
    s1 = str(tmp_path / "s1")
    train.main(["--stage", "1", "--model", base, "--out", s1, "--steps", "1", "--lora", "4", *FAST])
    a = train.parse_args(["--stage", "2", "--model", s1 + "/ckpt", "--lora", "4", *FAST])
    agent = policy.load_model(a)
    saved = _weights(s1 + "/ckpt")
    # (apply_lora's aliases model.model / model.lm_head list each tensor twice: keep peft's own names)
    live = {k: v for k, v in agent.model.state_dict().items() if "lora_" in k and k.startswith("base_model.")}
    assert len(live) == len(saved) and all(".lora_A.default." in k or ".lora_B.default." in k for k in live)
    for k, v in saved.items():                          # peft drops the adapter name when saving
        torch.testing.assert_close(live[k.replace(".weight", ".default.weight")], v, rtol=0, atol=0)
    assert agent.system_prompt == toy.world.SYSTEM_PROMPT
    s2 = str(tmp_path / "s2")
    train.main(["--stage", "2", "--model", s1 + "/ckpt", "--out", s2, "--steps", "1", *FAST])
    assert os.path.isfile(os.path.join(s2, "ckpt", "model.safetensors"))            # merged: a full model
    assert not any("lora_" in k for k in _weights(s2 + "/ckpt"))


def test_a_nonfinite_loss_skips_the_step_and_leaves_weights_untouched(base, monkeypatch):
    real = lfpc.token_logprobs
    nan_logprobs = lambda model, batch, t=1.0: real(model, batch, t) * float("nan")
    monkeypatch.setattr(lfpc, "token_logprobs", nan_logprobs)
    m, before, after = _one_step(base, monkeypatch, 1e-3)
    assert m["loss/skipped"] == 1.0
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
    agent = policy.load_model(a)
    cfg = toy.world.rollout_config(max_new_tokens=8, max_response_tokens=16, max_turns=2)
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


def test_a_zero_variance_group_is_not_forwarded_but_its_tokens_still_count(base):
    """Group 0 all right (advantage exactly 0: skipped), group 1 mixed: the update equals one plain padded
    forward over EVERY episode with the loss divided by all of their tokens, by hand (a token total over
    the trained episodes alone would scale the loss and the gradient's norm)."""
    import copy
    a = train.parse_args(["--model", base, "--global-image", "full", *FAST])
    agent = policy.load_model(a)
    cfg = toy.world.rollout_config(max_new_tokens=8, max_response_tokens=16, max_turns=2)
    tasks = train.load_data(a, agent)[:2]
    episodes, _ = train.collect_episodes(a, agent, tasks, cfg, step=0)
    for e, r in zip(episodes, (1.0, 1.0, 0.0, 1.0)):                          # group = 2
        e.reward = r
    assert all(e.num_generated > 0 for e in episodes[:2])
    clone = copy.deepcopy(agent)
    m = train.update_policy(a, clone, torch.optim.SGD(clone.model.parameters(), lr=1.0), episodes, tasks)
    assert m["loss/trained_episodes"] == 2
    ref = copy.deepcopy(agent)                                          # the plain path, written out here
    batch = batches.collate(ref, episodes)                              # padded, every episode
    lp = lfpc.token_logprobs(ref.model.train(), batch, a.temperature)   # [4, T]
    adv, _ = grpo.group_advantages(torch.tensor([e.reward for e in episodes]), 2)
    assert adv[:2].eq(0).all() and adv[2:].ne(0).all()
    loss, _ = grpo.policy_loss(lp, lp.detach(), adv, batch.loss_mask, clip_low=a.clip, clip_high=a.clip,
                               num_tokens=sum(e.num_generated for e in episodes))
    loss.backward()
    norm = float(torch.nn.utils.clip_grad_norm_(list(ref.model.parameters()), 1.0))
    torch.optim.SGD(ref.model.parameters(), lr=1.0).step()
    assert m["loss/policy"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-8)
    assert m["loss/grad_norm"] == pytest.approx(norm, rel=1e-5)
    for (k, p1), p2 in zip(clone.model.named_parameters(), ref.model.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-6, msg=k)


# ----------------------------------------------------------------------------- bad input, crashes, resume

def _no_model(monkeypatch):
    monkeypatch.setattr(policy, "load_model", lambda *a, **k: pytest.fail("the model loaded before the error"))


@pytest.mark.parametrize("row, message", [
    ('{"image": "a.png", "question": "q"}', r"d\.jsonl:2: missing or empty string field 'answer'"),
    ('{"image": "cut.png", "question": "q", "answer": "a"}', r"d\.jsonl:2: cannot read image"),
    ('{"image": "a.png", "question": "q", "answer": "a", "max_pixels": "big"}', r"d\.jsonl:2: 'max_pixels'"),
    ('{"image": "a.png", "question": "q", "answer": "c", "choices": ["a", "b"]}', r"d\.jsonl:2: answer 'c'"),
])
def test_bad_data_stops_before_the_model_loads_naming_file_and_line(base, tmp_path, monkeypatch, row, message):
    from PIL import Image
    Image.new("RGB", (56, 56)).save(tmp_path / "a.png")
    (tmp_path / "cut.png").write_bytes(open(tmp_path / "a.png", "rb").read()[:60])
    good = json.dumps({"image": "a.png", "question": "q", "answer": "a"})
    (tmp_path / "d.jsonl").write_text(good + "\n" + row + "\n")
    _no_model(monkeypatch)
    with pytest.raises(SystemExit, match=message):
        train.main(["--model", base, "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o"), *FAST])


@pytest.mark.parametrize("flags, message", [
    (["--save-every", "0"], "--save-every must be at least 1"), (["--prompts", "-2"], "--prompts must be at least 1"),
    (["--n-train", "-5"], "--n-train must be at least 1"), (["--crop-max-tokens", "0"], "--crop-max-tokens must be"),
    (["--steps", "-3"], "--steps must be at least 1"), (["--group", "1"], "--group must be at least 2"),
    (["--max-turns", "-1"], "--max-turns must be at least 1"), (["--temperature", "-1"], "--temperature must be > 0"),
    (["--lr", "1e3"], r"--lr must lie in \(0, 0.01\]"), (["--micro-batch", "0"], "--micro-batch must be at least 1"),
    (["--floor-tokens", "64", "--full-tokens", "64"], "--floor-tokens \\(64\\) must be below"),
    (["--model", "runs/nothing/here"], "not found"), (["--model", "/no/such/model"], "not found"),
])
def test_flags_out_of_range_are_refused_at_parse_time(base, capsys, flags, message):
    argv = ["--model", base] + flags if "--model" not in flags else flags
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert re.search(message, capsys.readouterr().err)


def _run(base, out, *extra):
    return ["--stage", "1", "--model", base, "--out", str(out), "--save-every", "1", *FAST, *extra]


def test_resume_rules_copied_folder_changed_flags_and_refusals(base, tmp_path):
    out = tmp_path / "a"
    train.main(_run(base, out, "--steps", "2"))
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    train.main(["--resume", "--out", str(copy), "--steps", "3", "--lr", "5e-4"])      # --steps, --lr may change
    rows = [json.loads(l) for l in open(copy / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]                                  # into the copy, not the original
    assert [json.loads(l)["step"] for l in open(out / "metrics.jsonl")] == [1, 2]
    state = torch.load(copy / "ckpt" / "trainer.pt", weights_only=False)
    assert state["args"]["lr"] == 5e-4 and state["args"]["out"] == str(copy)
    assert state["optimizer"]["param_groups"][0]["lr"] == 5e-4
    with pytest.raises(SystemExit, match="--temperature is 1.0 in the run") as refused:
        train.main(["--resume", "--out", str(copy), "--steps", "4", "--temperature", "0.5"])
    assert "Only --steps, --lr, --save-every, --device, --judge-timeout, --ckpt-fraction, --prefill-tokens may" \
        in str(refused.value)                                 # every flag that may change, named
    with pytest.raises(SystemExit, match="already did 3 of 3 steps"):
        train.main(["--resume", "--out", str(copy)])
    with pytest.raises(SystemExit, match="already holds a run"):
        train.main(_run(base, copy, "--steps", "2"))


def test_a_kill_between_the_two_renames_is_recovered_and_nothing_good_is_deleted(base, tmp_path, monkeypatch):
    """The swap killed after ckpt -> ckpt.old: only ckpt.old (step 1) and a complete ckpt.tmp (step 2) remain.
    A fresh run refuses the folder (and deletes nothing); --resume takes the newest complete one."""
    out = tmp_path / "run"
    real = os.replace
    calls = []

    def killed_in_the_swap(src, dst):
        calls.append(dst)
        if str(dst).endswith("ckpt") and len([c for c in calls if str(c).endswith("ckpt")]) == 2:
            raise KeyboardInterrupt("killed between the two renames")
        return real(src, dst)
    monkeypatch.setattr(os, "replace", killed_in_the_swap)
    with pytest.raises(KeyboardInterrupt):
        train.main(_run(base, out, "--steps", "3"))
    monkeypatch.setattr(os, "replace", real)
    assert sorted(n for n in os.listdir(out) if n.startswith("ckpt")) == ["ckpt.old", "ckpt.tmp"]
    with pytest.raises(SystemExit, match="already holds a run"):
        train.main(_run(base, out, "--steps", "3"))
    assert sorted(n for n in os.listdir(out) if n.startswith("ckpt")) == ["ckpt.old", "ckpt.tmp"]
    train.main(["--resume", "--out", str(out)])
    assert torch.load(out / "ckpt" / "trainer.pt", weights_only=False)["step"] == 3
    assert [json.loads(l)["step"] for l in open(out / "metrics.jsonl")] == [1, 2, 3]


def test_a_second_run_into_a_live_runs_folder_refuses_with_its_pid(base, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "lock").write_text(str(sleeper.pid))
        with pytest.raises(SystemExit, match=f"in use by a running training \\(PID {sleeper.pid}\\)"):
            train.main(_run(base, out, "--steps", "1"))
    finally:
        sleeper.kill()
    sleeper.wait()
    train.main(_run(base, out, "--steps", "1"))                       # its process is gone: the lock is taken over
    assert not (out / "lock").exists()


def test_an_update_that_blows_the_weights_up_stops_before_saving(base, tmp_path, monkeypatch):
    real_step = torch.optim.AdamW.step

    def wreck(self, *a, **k):
        out = real_step(self, *a, **k)
        with torch.no_grad():
            for g in self.param_groups:
                for p in g["params"]:
                    p.mul_(1e6)
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", wreck)
    with pytest.raises(SystemExit, match="blew the weights up"):
        train.main(_run(base, tmp_path / "r", "--steps", "2"))
    assert not any(n.startswith("ckpt") for n in os.listdir(tmp_path / "r"))


def test_exploding_gradients_skip_the_step_and_three_in_a_row_stop_the_run(base, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "SKIP_GRAD_NORM", -1.0)                # every gradient norm "explodes"
    with pytest.raises(SystemExit, match="3 steps in a row skipped"):
        train.main(_run(base, tmp_path / "r", "--steps", "5"))
    rows = [json.loads(l) for l in open(tmp_path / "r" / "metrics.jsonl")]
    assert [r.get("loss/skipped") for r in rows] == [1.0, 1.0, 1.0]


def test_with_a_kl_term_every_episode_is_trained(base, monkeypatch):
    """beta > 0: an all-equal group still has a gradient (the KL term), so no episode is skipped."""
    a = train.parse_args(["--stage", "1", "--model", base, "--global-image", "full", "--beta", "0.1", *FAST])
    agent = policy.load_model(a)
    tasks = train.load_data(a, agent)[:2]
    cfg = toy.world.rollout_config(max_new_tokens=8, max_response_tokens=16, max_turns=2)
    episodes, _ = train.collect_episodes(a, agent, tasks, cfg, step=0)
    for e in episodes:
        e.reward = 1.0                                                  # every group all-equal: advantages 0
    ref = policy.load_agent(base, dtype=torch.float32).model.eval().requires_grad_(False)
    opt = torch.optim.AdamW(agent.model.parameters(), lr=1e-4)
    m = train.update_policy(a, agent, opt, episodes, tasks, ref)
    assert m["loss/trained_episodes"] == len(episodes) and m["adv/frac_zero_std"] == 1.0


def _final(out):
    rows = [{k: v for k, v in json.loads(l).items() if not k.startswith("time/")} for l in open(out / "metrics.jsonl")]
    return _weights(str(out / "ckpt")), rows


def test_kill_9_anywhere_then_resume_equals_an_uninterrupted_run(base, tmp_path):
    """SIGKILL inside the checkpoint swap (widened by LFPC_SWAP_DELAY) and at a random moment, each time
    followed by --resume: the final weights and the metrics file equal an uninterrupted run's."""
    import random
    import signal
    import time
    steps = ["--steps", "5"]
    straight = tmp_path / "straight"
    train.main(_run(base, straight, *steps))
    out, mark = tmp_path / "killed", tmp_path / "mark"
    mark.mkdir()
    env = {**os.environ, "LFPC_SWAP_DELAY": "30", "LFPC_SWAP_MARK": str(mark)}
    first = subprocess.Popen([sys.executable, "train.py", *_run(base, out, *steps)], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):                                      # wait until it sits between the two renames
        if (mark / "in_swap").exists() or first.poll() is not None:
            break
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (mark / "in_swap").exists() and not (out / "ckpt").exists() and (out / "ckpt.tmp").exists()
    second = subprocess.Popen([sys.executable, "train.py", "--resume", "--out", str(out)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.Random(0).uniform(4.0, 8.0))           # somewhere in loading, the steps or a save
    second.send_signal(signal.SIGKILL)
    second.wait()
    from support import checkpoint
    found = checkpoint.RunFolder(str(out)).recover()
    if found is None or found[1]["step"] < 5:
        train.main(["--resume", "--out", str(out)])
    (w1, m1), (w2, m2) = _final(straight), _final(out)
    assert m1 == m2 and w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=0, msg=k)


def test_rewards_use_the_runs_judge():
    """The judge decides the accuracy part of the reward (an LLM judge in --judge llm); the rules by default."""
    class Lenient:
        def correct(self, pred, answer, choices=None, question=""):
            return 1.0 if pred else 0.0
    a = train.Args(stage=1)
    t = lfpc.Task(None, "What colour is the umbrella?", "yellow")
    e = lfpc.Episode(0)
    e.answer = "a kind of amber"
    train.score(a, [e], [t], Lenient())
    assert e.reward_parts["acc"] == 1.0 and e.reward == pytest.approx(0.8)
    from support.judge import RuleJudge
    train.score(a, [e], [t], RuleJudge())
    assert e.reward_parts["acc"] == 0.0


def test_full_fine_tuning_that_cannot_fit_a_gpu_is_refused_before_any_work():
    """16 bytes a parameter: 7B (8.29B parameters) is 124 GiB of training state, over one 80 GB GPU;
    sharded over 8 it fits, and LoRA is not concerned."""
    n, gpu = 8_292_166_656, 80 * 10**9
    msg = policy.training_state_problem(n, lora=0, ranks=1, device_bytes=gpu)
    assert msg and "124 GiB" in msg and "--lora" in msg and "torchrun" in msg
    assert policy.training_state_problem(n, lora=0, ranks=8, device_bytes=gpu) is None
    assert policy.training_state_problem(n, lora=64, ranks=1, device_bytes=gpu) is None
    assert policy.training_state_problem(3_754_622_976, lora=0, ranks=1, device_bytes=gpu) is None   # 3B: 56 GiB


def test_the_summary_compares_the_first_and_last_tenth_of_the_run(tmp_path):
    rows = [{"step": i + 1, "acc": i / 10, "reward/mean": 1.0, "tool/call_rate": 0.5, "box/iou_b1": None}
            for i in range(20)]
    a = train.parse_args(["--stage", "1", "--out", str(tmp_path / "r")])
    text = train.run_summary(a, rows, os.path.join("runs", "stage1", "ckpt"), "c.png")
    # a tenth of 20 steps is 2: acc (0.0 + 0.1) / 2 = 0.050 -> (1.8 + 1.9) / 2 = 1.850; no IoU ever: no line
    assert "first 2 vs last 2" in text and "accuracy               0.050 -> 1.850" in text
    assert "tool-call rate         0.500 -> 0.500" in text and "IoU" not in text
    assert "next:       python train.py --stage 2\n" in text              # the default folder: no --model needed


def test_curves_draw_every_metric_and_the_budget_histogram(tmp_path):
    from support import metrics
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": i, "acc": 0.1 * i, "reward/mean": i, "tool/call_rate": 1.0,
                                       "box/iou_b1": None, "len/response": 50}) + "\n" for i in range(1, 6)))
    png = metrics.plot_curves({"run": [str(log)]}, metrics.CURVES, str(tmp_path / "c.png"), budgets=[16, 32, 32])
    from PIL import Image
    w, h = Image.open(png).size
    assert w > 2 * h, "4 metrics with values + the histogram: one row of panels"


def test_sigterm_mid_run_stops_with_a_checkpoint_and_resume_equals_an_uninterrupted_run(base, tmp_path):
    """A preempted job: SIGTERM while the run trains. It finishes its step, writes a checkpoint, releases
    the lock and exits 143 saying how to continue; --resume then ends exactly where an uninterrupted run
    does (weights and metrics)."""
    import signal
    import time
    steps = ["--steps", "6", "--save-every", "100"]
    straight = tmp_path / "straight"
    train.main(_run(base, straight, *steps))
    out = tmp_path / "stopped"
    p = subprocess.Popen([sys.executable, "train.py", *_run(base, out, *steps)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(1200):                                    # wait for the first step's line
        if (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 143, err[-2000:]
    assert f"python train.py --resume --out {out}" in err and not (out / "lock").exists()
    from support import checkpoint
    step = checkpoint.RunFolder(str(out)).latest()[1]["step"]
    assert 1 <= step < 6 and len((out / "metrics.jsonl").read_text().splitlines()) == step
    train.main(["--resume", "--out", str(out)])
    (w1, m1), (w2, m2) = _final(straight), _final(out)
    assert m1 == m2 and w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=0, msg=k)


def test_sigterm_while_probing_says_resume_and_resume_keeps_the_probed_items(base, tmp_path):
    """SIGTERM during stage 1's information-gap probe (before any step): the run stops after the prober's
    batch with 143 and says to --resume (a plain rerun is refused: the folder holds run.json); --resume
    keeps every record the stopped run probed and trains."""
    import signal
    import time
    out = tmp_path / "probing"
    cache = out / "info_gap_cache.jsonl"
    p = subprocess.Popen([sys.executable, "train.py", *_run(base, out, "--steps", "1", "--n-train", "48",
                                                            "--rollout-batch", "2")],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(2400):                                    # wait for the prober's first records
        if cache.exists() and cache.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 143, err[-2000:]
    assert "the information-gap probe stopped" in err and f"python train.py --resume --out {out}" in err, err[-2000:]
    probed = cache.read_text().splitlines()
    assert 2 <= len(probed) < 48 and not (out / "ckpt").exists() and not (out / "lock").exists()
    with pytest.raises(SystemExit, match="pass --resume"):
        train.main(_run(base, out, "--steps", "1", "--n-train", "48", "--rollout-batch", "2"))
    train.main(["--resume", "--out", str(out)])
    after = cache.read_text().splitlines()
    assert after[:len(probed)] == probed and len(after) > len(probed)
    assert [json.loads(l)["step"] for l in open(out / "metrics.jsonl")] == [1]


def test_a_second_signal_stops_at_once(capsys):
    import os
    import signal
    from support import checkpoint
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with checkpoint.StopSignal() as stop:
        assert all(signal.getsignal(s) != h for s, h in before.items())   # its own handlers, while it lives
        assert not stop()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop() and stop.requested == "SIGINT" and stop.code == 130
        with pytest.raises(SystemExit) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
    assert stopped.value.code == 128 + signal.SIGTERM                   # 143, as the shell reports a kill
    assert "SIGTERM again: stopping at once" in capsys.readouterr().err
    assert {s: signal.getsignal(s) for s in before} == before                # the handlers it found, given back


def test_an_out_that_cannot_be_written_stops_before_any_work(base, tmp_path, monkeypatch):
    import errno
    from support import checkpoint
    (tmp_path / "afile").write_text("x")
    for out, message in ((tmp_path / "afile", "is a file"), (tmp_path / "afile" / "run", "cannot be written")):
        with pytest.raises(SystemExit, match=message):
            train.main(_run(base, out, "--steps", "1"))

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint.os, "fsync", full)
    with pytest.raises(SystemExit, match="cannot be written .No space left on device"):
        train.main(_run(base, tmp_path / "full", "--steps", "1"))
    assert os.listdir(tmp_path / "full") == [], "not even a probe file is left"


def test_a_file_written_whole_holds_all_of_the_new_text_or_all_of_the_old(tmp_path):
    from support import checkpoint
    path = str(tmp_path / "f.jsonl")
    checkpoint.write_whole(path, "old\n")
    with pytest.raises(KeyboardInterrupt):
        with checkpoint.writing_whole(path) as f:
            f.write("half of the new")
            raise KeyboardInterrupt                  # a stop in the middle of streaming
    assert open(path).read() == "old\n" and os.listdir(tmp_path) == ["f.jsonl"]
    with checkpoint.writing_whole(path, binary=True) as f:
        f.write(b"new\n")
    assert open(path).read() == "new\n" and os.listdir(tmp_path) == ["f.jsonl"]


def test_too_little_free_space_for_a_checkpoint_stops_after_the_model_loads(base, tmp_path, monkeypatch):
    import collections
    from support import checkpoint
    Usage = collections.namedtuple("Usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(SystemExit, match="GiB free, a checkpoint needs"):
        train.main(_run(base, tmp_path / "r", "--steps", "1"))
    assert not (tmp_path / "r" / "info_gap_cache.jsonl").exists(), "stopped before the probe"


def test_a_failed_checkpoint_write_keeps_the_previous_one_newest(base, tmp_path, monkeypatch):
    """Disk full in the middle of the second checkpoint (torch's own error): a one-line stop, no partial
    ckpt.tmp, the step-1 checkpoint is the newest complete one, and --resume continues from it."""
    from support import checkpoint
    real, calls = checkpoint.torch.save, []

    def failing(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"half a checkpoint")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file")
        return real(obj, path, *a, **k)
    monkeypatch.setattr(checkpoint.torch, "save", failing)
    out = tmp_path / "r"
    with pytest.raises(SystemExit, match=r"step 2 failed \(\[enforce fail.*the checkpoint of step 1 is kept"):
        train.main(_run(base, out, "--steps", "3"))
    assert not (out / "ckpt.tmp").exists() and not (out / "lock").exists()
    assert checkpoint.RunFolder(str(out)).latest()[1]["step"] == 1
    monkeypatch.setattr(checkpoint.torch, "save", real)
    train.main(["--resume", "--out", str(out)])
    assert checkpoint.RunFolder(str(out)).latest()[1]["step"] == 3


def test_rows_that_carry_a_budget_keep_it_and_only_the_rest_are_probed(base, tmp_path, monkeypatch):
    import info_gap
    a = train.parse_args(_run(base, tmp_path / "r"))
    tasks = toy.world.make_tasks(4, seed=1)
    tasks[0].max_pixels, tasks[2].max_pixels = 40 * 784, 20 * 784
    probed = []

    def fake_probe(mine, agent, cfg, model, cache, **kw):
        probed.extend(mine)
        return [{"max_pixels": 16 * 784, "budget_tokens": 16, "status": "gap", "probes": 1} for _ in mine]
    monkeypatch.setattr(info_gap, "probe", fake_probe)
    train.set_budgets(a, policy.load_agent(base, dtype=torch.float32), tasks)
    assert probed == [tasks[1], tasks[3]]
    assert [t.max_pixels // 784 for t in tasks] == [40, 16, 20, 16]


def test_a_lock_whose_pid_was_reused_or_of_another_host(base, tmp_path):
    """The lock holds host, PID and the process's start time: a live PID that started at another time (a
    container's PID 1 after a restart) is stale and taken over; an old bare-PID lock written before its
    PID's process started too; another host's lock is refused, saying how to remove it."""
    import socket
    out = tmp_path / "r"
    out.mkdir()
    (out / "lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 1, "start": "1"}))
    train.main(_run(base, out, "--steps", "1"))
    assert not (out / "lock").exists()
    out2 = tmp_path / "r2"
    out2.mkdir()
    (out2 / "lock").write_text("1")
    os.utime(out2 / "lock", (0, 0))                                  # written in 1970: before PID 1 started
    train.main(_run(base, out2, "--steps", "1"))
    out3 = tmp_path / "r3"
    out3.mkdir()
    (out3 / "lock").write_text(json.dumps({"host": "elsewhere", "pid": 4242, "start": "7"}))
    with pytest.raises(SystemExit, match=r"PID 4242 on host elsewhere.*delete .*lock"):
        train.main(_run(base, out3, "--steps", "1"))


def test_metrics_lines_are_strict_json():
    from support import checkpoint
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        run = checkpoint.RunFolder(d)
        run.log({"step": 1, "loss/grad_norm": float("nan"), "x": float("inf"), "acc": 0.5})
        line = open(os.path.join(d, "metrics.jsonl")).read()
        row = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
        assert row == {"step": 1, "loss/grad_norm": None, "x": None, "acc": 0.5}


def test_a_kill_during_the_first_checkpoint_write_resumes_from_step_0(base, tmp_path, monkeypatch):
    """Killed while its FIRST checkpoint was being written: no complete checkpoint, a partial ckpt.tmp,
    metrics of steps no checkpoint holds. A fresh run refuses the folder (it holds a run); --resume starts
    that run over from step 0 with its own settings (run.json), keeping the information-gap cache, and
    ends where an uninterrupted run does."""
    straight = tmp_path / "straight"
    train.main(_run(base, straight, "--steps", "2"))
    out = tmp_path / "r"
    real = policy.save_agent

    def killed(agent, folder, state=None):
        real(agent, folder, state)
        raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr(policy, "save_agent", killed)
    with pytest.raises(KeyboardInterrupt):
        train.main(_run(base, out, "--steps", "2"))
    monkeypatch.setattr(policy, "save_agent", real)
    assert (out / "ckpt.tmp").exists() and not (out / "ckpt").exists() and (out / "info_gap_cache.jsonl").exists()
    cache = (out / "info_gap_cache.jsonl").read_text()
    with pytest.raises(SystemExit, match="already holds a run"):
        train.main(_run(base, out, "--steps", "2"))
    train.main(["--resume", "--out", str(out)])
    assert (out / "info_gap_cache.jsonl").read_text() == cache, "the cache was kept, not probed again"
    (w1, m1), (w2, m2) = _final(straight), _final(out)
    assert m1 == m2
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=0, msg=k)


def test_a_learning_rate_that_destroys_the_policy_stops_the_run_unsaved(tmp_path):
    """--lr 1e-2 (the accepted maximum) on the shipped base: the policy stops writing valid turns after one
    update while the weight norm barely moves; the run stops with the reason instead of saving it."""
    out = tmp_path / "r"
    r = subprocess.run([sys.executable, "train.py", "--stage", "1", "--out", str(out), "--steps", "4", "--lr", "1e-2",
                        "--n-train", "16"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "format-valid rate fell from" in r.stderr and "Traceback" not in r.stderr
    assert not (out / "ckpt").exists()


# ----------------------------------------------------------------------------- flags and inputs that never pass silently

@pytest.mark.parametrize("flags, message", [
    (["--out", ""], "--out is empty"),
    (["--temperature", "1e6"], "--temperature must be at most"),
    (["--beta", "inf"], "--beta must lie in"),
    (["--judge-url", "not a url"], "not an http"),
    (["--judge-model", "m"], "--judge-model would go unused: they are --judge llm's"),
    (["--seed", str(2**40)], "--seed must lie in"),
    (["--device", "tpu:0"], "is not a torch device|only cpu and cuda"),
    (["--device", "cuda:3"], "no CUDA device|CUDA device\\(s\\)"),
    (["--rollout-tokens", "500"], "--rollout-tokens 500 cannot hold one episode: up to ~1,040 tokens.*at least 1,040"),
    (["--sync-every", "0"], "--sync-every lies in"),
])
def test_bad_flags_are_one_line_errors_at_parse_time(base, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--model", base, *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err


def test_a_gap_cache_that_is_a_folder_or_damaged_is_refused(base, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--model", base, "--gap-cache", str(tmp_path)])
    assert "is a folder" in capsys.readouterr().err
    out = tmp_path / "r"
    train.main(_run(base, out, "--steps", "1"))
    cache = out / "info_gap_cache.jsonl"
    lines = cache.read_text().splitlines()
    for bad in ("huge", -100, 1):
        rec = json.loads(lines[0])
        rec["max_pixels"] = bad
        (tmp_path / "c.jsonl").write_text("\n".join([json.dumps(rec)] + lines[1:]) + "\n")
        with pytest.raises(SystemExit, match=r"--gap-cache: .*c.jsonl:1: damaged cache record"):
            train.main(_run(base, tmp_path / f"r{bad}", "--steps", "1", "--gap-cache", str(tmp_path / "c.jsonl")))


def test_a_question_too_long_for_the_models_positions_stops_before_the_probe(base, tmp_path):
    """Under the data's 20,000-character limit but over the toy model's 8,192 positions once tokenised."""
    from conftest import noise_image
    noise_image(64, 64).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "question": "What is it?", "answer": "x"},
            {"id": "long", "image": "a.png", "question": "zq " * 6000 + "?", "answer": "x"}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match=r"task 'long': its prompt is .* over the model's 8,192 positions"):
        train.main(_run(base, tmp_path / "r", "--steps", "1", "--data", str(tmp_path / "t.jsonl")))
    assert not (tmp_path / "r" / "info_gap_cache.jsonl").exists()


def test_lora_rollouts_sample_from_merged_weights_with_the_plain_models_ops():
    """Under LoRA the rollout samples from a copy with the adapters merged: a decode step is the plain
    model's ops (peft unmerged adds ~35 a layer), and its sampling log-probs equal the training forward's
    (unmerged adapters) within 1e-4 in fp32."""
    from support import batches, models
    from conftest import noise_image
    plain = models.tiny_agent(seed=0)
    agent = policy.apply_lora(models.tiny_agent(seed=0), 4)
    for name, p in agent.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)                     # adapters that change the policy
    with policy.sampler(agent) as sampler:
        assert policy.count_ops(sampler.model) == policy.count_ops(plain.model) < policy.count_ops(agent.model)
        tasks = [lfpc.Task(noise_image(120, 90, k), "What colour?", "red") for k in range(2)]
        cfg = lfpc.RolloutConfig(global_max_pixels=16 * 784, max_new_tokens=10, max_turns=1, use_tool=False)
        eps = lfpc.rollout(sampler, tasks, 2, cfg, seed=3)
    batch = batches.collate(agent, eps)
    with torch.no_grad():
        lp = lfpc.token_logprobs(agent.model, batch)
    mask = batch.loss_mask.bool()
    torch.testing.assert_close(lp[mask], batch.sampling_logprobs[mask], rtol=0, atol=1e-4)
    assert any("lora_A" in n for n, _ in agent.model.named_parameters()), "the trained model keeps its adapters"


def test_lora_training_reuses_the_rollouts_image_features_with_the_same_gradients(base):
    """The vision tower is frozen under LoRA: the rollout keeps each distinct image's features
    (engine.FeatureStore) and the training forward takes them (work/train_image_encodes 0) instead of
    encoding every image again; the adapters' gradients equal those of the forward that encodes."""
    from support import batches, engine
    a = train.parse_args(["--stage", "1", "--model", base, "--lora", "4", "--global-image", "full", *FAST])
    agent = policy.load_model(a)
    for name, p in agent.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    assert policy.vision_frozen(agent)
    cfg = toy.world.rollout_config(max_new_tokens=8, max_response_tokens=16, max_turns=2)
    tasks = train.load_data(a, agent)[:2]
    store = engine.FeatureStore()
    episodes, _ = train.collect_episodes(a, agent, tasks, cfg, 0, store=store)
    assert store.features
    for i, e in enumerate(episodes):
        e.reward = float(i % 2)
    grads, encodes = [], []
    for s in (None, store):
        opt = torch.optim.SGD([p for p in agent.model.parameters() if p.requires_grad], lr=0.0)
        m = train.update_policy(a, agent, opt, episodes, tasks, store=s)
        encodes.append(m["work/train_image_encodes"])
        batch = batches.collate(agent, episodes, store=s)
        agent.model.zero_grad(set_to_none=True)
        lfpc.token_logprobs(agent.model, batch).sum().backward()
        grads.append({n: p.grad.clone() for n, p in agent.model.named_parameters() if p.requires_grad})
    assert encodes[0] > 0 and encodes[1] == 0
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["toy", "real-shape"])
def test_packed_micro_batches_give_the_padded_gradient_without_padding(base, name):
    """Training micro-batches packed into one padding-free row (text positions restart at each episode;
    transformers builds the block-diagonal mask), and shared (each group's prompt once), give the padded
    path's gradients, with work/train_padding_frac 0 (the padded path's is what its padding was) and
    work/train_shared_frac > 0 only when shared."""
    from support import models
    from conftest import QWEN_TOKENIZER, noise_image
    if name == "toy":                                                   # the shipped base: ragged episodes
        a = train.parse_args(["--stage", "1", "--model", os.path.join(ROOT, "toy", "base"),
                              "--global-image", "full", "--n-train", "8", "--prompts", "4", "--group", "2"])
        agent = policy.load_model(a)
        tasks = train.load_data(a, agent)[:4]
        episodes, _ = train.collect_episodes(a, agent, tasks, toy.world.rollout_config(temperature=1.5), 0)
    else:
        agent = models.real_shape_agent(QWEN_TOKENIZER)
        tasks = [lfpc.Task(noise_image(300 + 120 * k, 200, k), "What colour is the sign?", "red") for k in range(3)]
        cfg = lfpc.RolloutConfig(global_max_pixels=64 * 784, max_new_tokens=6, max_turns=1, use_tool=False)
        episodes = lfpc.rollout(agent, tasks, 2, cfg, seed=1)
        a = train.parse_args(["--stage", "1", "--model", base, "--global-image", "full", "--group", "2",
                              "--micro-batch", "6"])
    assert len({len(e.token_ids) for e in episodes}) > 1, "ragged"
    for i, e in enumerate(episodes):
        e.reward = float(i % 2)
    out = {}
    for mode in ("off", "on", "shared"):
        a.pack = mode
        agent.model.zero_grad(set_to_none=True)
        opt = torch.optim.SGD([p for p in agent.model.parameters() if p.requires_grad], lr=0.0)
        real = opt.zero_grad
        opt.zero_grad = lambda set_to_none=True: None                      # keep the gradients to compare
        m = train.update_policy(a, agent, opt, episodes, tasks)
        opt.zero_grad = real
        out[mode] = (m["work/train_padding_frac"], m["work/train_shared_frac"],
                     {n: p.grad.clone() for n, p in agent.model.named_parameters() if p.grad is not None})
    assert out["on"][0] == out["shared"][0] == 0.0 < out["off"][0]
    assert out["off"][1] == out["on"][1] == 0.0 < out["shared"][1]        # the groups' prompts, computed once
    for mode in ("on", "shared"):
        for n, g in out["off"][2].items():
            torch.testing.assert_close(out[mode][2][n], g, rtol=1e-4, atol=1e-6, msg=f"{mode}: {n}")

"""Tests for support/dist.py: train.py under torchrun, two processes on CPU (gloo): the same update as one process,
and a 3-step run that checkpoints and resumes exactly."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

FAST = ["--n-train", "8", "--prompts", "2", "--group", "2", "--micro-batch", "2", "--max-new-tokens", "8",
        "--max-response-tokens", "16", "--max-turns", "2", "--probe-k", "2"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _run(cmd, timeout=300):            # a desynchronised collective hangs: fail instead
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_two_ranks_each_with_half_the_episodes_give_the_one_process_update(tmp_path, mode):
    """LoRA (gradients averaged across ranks, DDP's way) and full fine-tuning (FSDP2 shards): each rank
    rolls out one of the two tasks; the updated weights equal one process's with both (rel. 1e-5). The
    worker's log-prob head takes 3 tokens a chunk, so the ranks call the lm_head different numbers of
    times: a sharded lm_head (each call a collective) hung here."""
    if mode == "lora":
        import peft  # noqa: F401  (requirements.txt)
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    _run([sys.executable, "tests/dist_worker.py", mode, one])
    _run(TORCHRUN + ["tests/dist_worker.py", mode, two])
    a, b = torch.load(one), torch.load(two)
    # rewards 0 1 2 0 | 1 2 0 1: the two 1s of the second group sit at its mean (advantage 0): 6 trained
    assert sum(a["tokens"], []) and a["metrics"]["loss/trained_episodes"] == b["metrics"]["loss/trained_episodes"] == 6
    assert a["metrics"]["loss/grad_norm"] == pytest.approx(b["metrics"]["loss/grad_norm"], rel=1e-5)
    assert a["metrics"]["loss/grad_norm"] > 1e-6                       # a real update, not two zero ones
    assert a["weights"].keys() == b["weights"].keys()
    for k in a["weights"]:
        x, y = a["weights"][k], b["weights"][k]
        assert (x - y).abs().max() <= 1e-5 * max(x.abs().max(), 1e-6), k


BASE = os.path.join(ROOT, "toy", "base")


def test_torchrun_trains_3_steps_checkpoints_once_and_resumes_exactly(tmp_path):
    """The shipped base (it learns: rewards differ within groups) fully fine-tuned under FSDP2 on 2 ranks:
    3 steps with one checkpoint, or 2 steps then --resume to 3: the same weights and metrics."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["train.py", "--stage", "1", "--model", BASE, "--n-train", "16", "--prompts", "2", "--group", "4",
              "--probe-k", "2", "--global-image", "full", "--full-tokens", "16"]
    _run(TORCHRUN + common + ["--out", str(straight), "--steps", "3", "--save-every", "3"])
    assert sorted(n for n in os.listdir(straight) if n.startswith("ckpt")) == ["ckpt"]
    assert torch.load(straight / "ckpt" / "trainer.pt", weights_only=False)["world_size"] == 2
    _run(TORCHRUN + common + ["--out", str(split), "--steps", "2", "--save-every", "2"])
    _run(TORCHRUN + ["train.py", "--resume", "--out", str(split), "--steps", "3"])
    from safetensors.torch import load_file
    wa, wb = load_file(straight / "ckpt" / "model.safetensors"), load_file(split / "ckpt" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)
    rows = lambda p: [{k: v for k, v in json.loads(l).items() if not k.startswith("time/")} for l in open(p / "metrics.jsonl")]
    assert rows(straight) == rows(split) and [r["step"] for r in rows(split)] == [1, 2, 3]
    assert sum(r["loss/trained_episodes"] for r in rows(split)) > 0               # it did learn something
    r = subprocess.run([sys.executable, "train.py", "--resume", "--out", str(split), "--steps", "4"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "trained on 2 rank(s), this launch has 1" in r.stderr
    shutil.rmtree(split)

"""Tests for bench.py: the FLOP count against torch's counter, a config-mode run."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
import engine
import lfpc
import models


@pytest.mark.parametrize("visual_tokens", [16, 64])       # 64: 16x16 patches, four 8x8 attention windows
def test_model_flops_equal_torchs_flop_counter_on_the_tiny_model(visual_tokens):
    """Eager attention computes QK^T and AV as matmuls, so torch's counter sees every FLOP; the formula
    (decoder, attention squares, lm_head on the response only, vision tower with its windows) must
    give the same number exactly."""
    agent = models.tiny_agent(seed=0)
    agent.model.set_attn_implementation("eager")

    class A:
        batch, prompt_tokens = 2, visual_tokens + 40
    A.visual_tokens = visual_tokens
    eps = bench.synthetic_episodes(agent, A)
    for e in eps:                                    # 10 response tokens each, equal lengths (no padding)
        e.append(list(range(100, 110)), [0.0] * 10)
    batch = engine.collate(agent, eps)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        lfpc.token_logprobs(agent.model, batch)
    grids = [eps[0].grids[0]]                        # the episodes share one image: the vision tower runs once
    mine = bench.model_flops(agent.model.config, [len(e.token_ids) for e in eps], 20, grids, backward=False)
    # exact under transformers 5.24; 5.17 computes the rotary angles as a small matmul (an outer
    # product) that torch counts too: +0.01 %
    assert mine == pytest.approx(counter.get_total_flops(), rel=1e-3)
    assert bench.model_flops(agent.model.config, [len(e.token_ids) for e in eps], 20, grids) == 3 * mine


def test_config_mode_reports_a_consistent_step_on_cpu():
    r = bench.main(["--config", "tiny", "--batch", "4", "--micro-batch", "2", "--visual-tokens", "16",
                    "--prompt-tokens", "40", "--response-tokens", "6", "--repeat", "1", "--device", "cpu"])
    assert r["mode"] == "config" and r["parameters"] == r["trainable"] > 0 and r["prompt_tokens"] == 40
    assert sum(r["share"].values()) == pytest.approx(1.0, abs=0.01)
    assert math.isfinite(r["decode_ms_per_step"])                   # a difference of two timings: may be noisy
    assert r["rollout_tokens_per_s"] > 0 and r["train_tflops"] > 0 and r["step_s"] > 0
    assert r["peak_memory_gb"] is None                               # CPU: no CUDA allocator stats


def test_config_mode_rejects_a_non_square_image_and_real_sizes_on_cpu(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--config", "tiny", "--visual-tokens", "20"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--config", "7b", "--device", "cpu"])
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_toy_mode_times_the_two_calls_and_counts_the_work(toy_base):
    r = bench.main(["--model", toy_base, "--prompts", "2", "--group", "2", "--repeat", "1"])
    assert r["mode"] == "toy" and r["step_s"] > 0 and sum(r["share"].values()) == pytest.approx(1.0, abs=0.01)
    w = r["work_per_step"]
    assert w["work/image_encodes"] == w["distinct_images"]          # each image through the vision tower once
    assert w["work/prefill_ratio"] <= 1.1

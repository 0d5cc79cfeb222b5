"""Tests for support/bench.py (the FLOP count against torch's counter, the modes) and the GPU sessions' tools
(support/profile_step.py, .ci/gpu_train), on the CPU."""
import math
import os
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import lfpc
from support import batches, bench, engine, models


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
    batch = batches.collate(agent, eps)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        lfpc.token_logprobs(agent.model, batch)
    grids = [eps[0].grids[0]]                        # the episodes share one image: the vision tower runs once
    mine = bench.model_flops(agent.model.config, [len(e.token_ids) for e in eps], 20, grids, backward=False)
    # exact under transformers 5.24; 5.17 computes the rotary angles as a small matmul (an outer
    # product) that torch counts too: +0.01 %
    assert mine == pytest.approx(counter.get_total_flops(), rel=1e-3)
    assert bench.model_flops(agent.model.config, [len(e.token_ids) for e in eps], 20, grids) == 3 * mine


def test_model_flops_of_a_shared_row_are_the_work_it_does():
    """A shared row (one prompt, three suffixes of 5, 8, 11 tokens): the decoder's matmuls on the row's tokens
    only and the vision tower once, as torch's counter sees them (the vision tower eager); the text attention,
    which SDPA computes outside the counter's view on CPU, as the suffixes' q x (prompt + q) rectangles."""
    agent = models.tiny_agent(seed=0)
    agent.model.set_attn_implementation({"vision_config": "eager", "text_config": "sdpa"})

    class A:
        batch, prompt_tokens, visual_tokens = 3, 56, 16
    eps = bench.synthetic_episodes(agent, A)
    for k, e in enumerate(eps):
        e.append(list(range(100, 105 + 3 * k)), [0.0] * (5 + 3 * k))
    batch = batches.collate(agent, eps, packed=True, share_prompt=True)
    (_, n, suffixes), = batch.layout.groups
    assert n == len(eps[0].token_ids) - 5 and [m for _, m in suffixes] == [5, 8, 11]
    assert batch.layout.attention_spans() == [(n, n), (5, n + 5), (8, n + 8), (11, n + 11)]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        lfpc.token_logprobs(agent.model, batch)
    c = agent.model.config.get_text_config()
    attention = 4 * c.hidden_size * c.num_hidden_layers * (n * n + sum(m * (n + m) for _, m in suffixes))
    spans = [n] + [(m, n + m) for _, m in suffixes]
    # exact under transformers 5.24; 5.17 counts its rotary angles' outer product too (+0.01 %)
    assert bench.model_flops(agent.model.config, spans, 24, [eps[0].grids[0]], backward=False) == \
        pytest.approx(counter.get_total_flops() + attention, rel=1e-3)


def test_config_mode_reports_a_consistent_step_on_cpu():
    r = bench.main(["--config", "tiny", "--batch", "4", "--micro-batch", "2", "--visual-tokens", "16",
                    "--prompt-tokens", "40", "--response-tokens", "6", "--repeat", "1", "--device", "cpu"])
    assert r["mode"] == "config" and r["parameters"] == r["trainable"] > 0 and r["prompt_tokens"] >= 40
    assert r["slot_utilisation"] == 1.0 and r["decode_ms_bandwidth_bound"] > 0   # fixed-length turns fill every slot
    ops = r["aten_ops_per_decode_step_per_layer"]
    assert ops["rollout"] == ops["trained model"] > 0                # no adapters: the same model
    assert sum(r["share"].values()) == pytest.approx(1.0, abs=0.01)
    assert math.isfinite(r["decode_ms_per_step"])                   # a difference of two timings: may be noisy
    assert r["rollout_tokens_per_s"] > 0 and r["train_tflops"] > 0 and r["step_s"] > 0
    assert r["peak_memory_gb"] is None                               # CPU: no CUDA allocator stats
    assert r["train_image_encodes"] == 2 and r["args"]["micro_batch"] == 2  # vision trained: the image in each of 2


def test_config_mode_trains_as_train_py_does_under_lora():
    """The micro-batch of the preset train.py runs (one-gpu: 8 episodes under LoRA) and no image encode in
    training: the rollout's features are taken (engine.FeatureStore), as train.py takes them."""
    r = bench.main(["--config", "tiny", "--batch", "2", "--visual-tokens", "16", "--lora", "4",
                    "--prompt-tokens", "40", "--response-tokens", "4", "--repeat", "1", "--device", "cpu"])
    assert r["args"]["micro_batch"] == 8 and r["train_image_encodes"] == 0


def test_config_mode_rejects_a_non_square_image_and_real_sizes_on_cpu(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--config", "tiny", "--visual-tokens", "20"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--config", "7b", "--device", "cpu"])
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("argv, said", [
    (["--estimate-memory", "--estimate-time", "--config", "7b"], "one mode a call"),
    (["--schedule-bench", "--config", "tiny"], "--schedule-bench runs the tiny model"),
    (["--device", "cuda"], "run on the CPU"),
    (["--hbm-gbs", "0", "--config", "tiny"], "--hbm-gbs must be > 0"),
    (["--sync-every", "0"], "--sync-every must be at least 1"),
    (["--config", "7b", "--estimate-time", "--host-threads", "0"], "--host-threads must be at least 1"),
    (["--model", "/nonexistent"], "not found"),
    (["--model", "toy/base", "--config", "tiny"], "--model is the toy mode's checkpoint"),
])
def test_flags_a_mode_would_ignore_or_fail_on_late_are_refused_at_once(argv, said, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert said in capsys.readouterr().err


def test_toy_mode_times_the_two_calls_and_counts_the_work(toy_base):
    r = bench.main(["--model", toy_base, "--prompts", "2", "--group", "2", "--repeat", "1"])
    assert r["mode"] == "toy" and r["step_s"] > 0 and sum(r["share"].values()) == pytest.approx(1.0, abs=0.01)
    w = r["work_per_step"]
    assert w["work/image_encodes"] == w["distinct_images"]          # each image through the vision tower once
    assert w["work/prefill_ratio"] <= 1.1


def test_schedule_mode_compares_continuous_batching_with_the_barrier_and_generate():
    r = bench.main(["--schedule-bench", "--prompts", "1", "--group", "4", "--batch", "2", "--repeat", "1",
                    "--lengths", "3", "12", "--turns", "1", "3", "--visual-tokens", "16"])
    c, t = r["continuous"], r["turns"]
    assert r["mode"] == "schedule" and c["sampled_tokens"] == t["sampled_tokens"] > 0
    assert c["work/decode_steps"] <= t["work/decode_steps"]
    assert c["work/slot_utilisation"] >= t["work/slot_utilisation"]
    assert r["generate"]["tokens_per_s_median"] > 0 and r["ratio_tokens_per_s_continuous_over_turns"] > 0


def test_config_mode_with_lora_rolls_out_with_the_plain_models_ops():
    r = bench.main(["--config", "tiny", "--batch", "2", "--micro-batch", "2", "--visual-tokens", "16", "--lora", "4",
                    "--prompt-tokens", "40", "--response-tokens", "4", "--repeat", "1", "--device", "cpu"])
    ops = r["aten_ops_per_decode_step_per_layer"]
    from support import policy
    plain = models.random_agent("tiny", "cpu", torch.bfloat16)       # the same base (bf16 under LoRA), no adapters
    layers = plain.model.config.get_text_config().num_hidden_layers
    assert ops["rollout"] == policy.count_ops(plain.model) / layers < ops["trained model"]


@pytest.mark.parametrize("plan, slots", [([[4, 6, 3], [2, 8], [5], [7, 1, 2], [3, 3], [9, 2, 5]], 4),
                                         ([[1, 1]], 1), ([[9, 4], [4, 4], [5, 1], [9, 2], [5], [1, 1, 1]], 3)])
def test_the_schedule_simulation_counts_the_engines_decode_steps(plan, slots):
    """simulate_schedule (what --estimate-time counts) against the slot engine itself: the tiny model's
    episodes steered through `plan` (filler tokens, then a crop call or the answer) in `slots` slots, one
    task each; the same decode steps and sampled tokens, the pass a cropped slot waits out included."""
    import crop_tool
    from conftest import noise_image
    agent = models.tiny_agent(seed=0)
    call = len(agent.encode(crop_tool.format_tool_call([0, 0, 56, 56])))
    answer = len(agent.encode("<answer>red</answer>")) + 1                      # + <|im_end|>
    cfg = lfpc.RolloutConfig(global_max_pixels=64 * 784, max_new_tokens=80, max_response_tokens=400, max_turns=4,
                             temperature=1.0, batch_size=slots,
                             crop=crop_tool.CropConfig(min_pixels=4 * 784, max_pixels=16 * 784))
    tasks = [lfpc.Task(image=noise_image(300, 200, k), question="What colour?", answer="red") for k in range(len(plan))]
    work = engine.Work()
    eps = lfpc.rollout(agent, tasks, 1, cfg, seed=5, work=work, force=bench.plan_policy(agent, plan, seed=5))
    assert [len(e.crops) for e in eps] == [len(p) - 1 for p in plan]
    turns = [[n + (call if j + 1 < len(p) else answer) for j, n in enumerate(p)] for p in plan]   # tokens a turn
    assert bench.simulate_schedule(turns, slots, barrier=False) == (work.decode_steps, work.useful_tokens)


def test_the_schedule_simulation_by_hand():
    # two episodes: one turn of 3 tokens; two turns of 1 token each
    plan = [[3], [1, 1]]
    # 2 slots, continuous: step 1 both (ep1's first turn ends), step 2 ep0 (ep1 idle: its crop is cut),
    # step 3 both (both end)
    assert bench.simulate_schedule(plan, 2, barrier=False) == (3, 5)
    # 2 slots, barrier: turn 1 waits for the longest (3 steps, 4 tokens), turn 2 is ep1 alone (1 step)
    assert bench.simulate_schedule(plan, 2, barrier=True) == (4, 5)
    # 1 slot: one episode after the other, either way; ep1's crop costs no step (no other slot decodes,
    # so no pass runs while it is cut)
    assert bench.simulate_schedule(plan, 1, barrier=True) == bench.simulate_schedule(plan, 1, False, crop_lag=0) == (5, 5)
    assert bench.simulate_schedule(plan, 1, barrier=False) == (5, 5)
    # 2 slots, ep1 = two turns after ep0's single long one: 3 steps of ep0 (ep1's 1 + idle 1 + 1 beside it)
    assert bench.simulate_schedule([[3], [1, 2]], 2, barrier=False) == (4, 6)
    # 2 slots: ep1's idle step hides under ep0's second: still 3 steps
    assert bench.simulate_schedule(plan, 2, barrier=False, crop_lag=0) == (3, 5)


def test_estimate_mode_prints_every_term_and_assumption(capsys):
    r = bench.main(["--config", "7b", "--lora", "64", "--estimate-time", "--lengths", "20", "512", "--batch", "32"])
    assert r["mode"] == "estimate-time" and len(r["settings"]) == 2
    for s in r["settings"]:
        ours, barrier = s["schedules"]["ours (slots)"], s["schedules"]["per-turn barrier"]
        assert ours["decode_steps"] < barrier["decode_steps"] and ours["slot_utilisation"] > barrier["slot_utilisation"]
        assert s["step_s"]["roofline"] <= s["step_s"]["vLLM-like"] <= s["step_s"]["per-turn barrier"]
        assert s["largest_term"] in ("decode", "prefill", "training", "host images")
    out = capsys.readouterr().out
    assert "| paper scale (256 x 16) |" in out and "- decode:" in out and "- roofline:" in out


def test_estimate_counts_decode_and_prefill_by_hand():
    """Two turns of 100 tokens an episode, a 1,280-token crop between them, decode steps replayed as CUDA
    graphs (no host term) with no floor of small kernels' time (--gpu-step-ms 0: the bytes decide). A decode step reads the bf16 decoder and lm_head (7B: 28
    layers of q, k, v, o with biases, the MLP, two norms; the final norm; the lm_head) and the KV cache of
    every busy slot at the mean context (the 1,224-token prompt, half the sampled tokens, half the crop's)
    at 0.8 x 3.35 TB/s. Prefill: each task's prompt once, each crop's 1,310-token turn after the 1,324
    tokens before it, and the vision tower on every image, at 0.4 x 989 TFLOP/s."""
    from support import models
    r = bench.main(["--config", "7b", "--lora", "64", "--estimate-time", "--lengths", "100", "100",
                    "--turns", "2", "2", "--batch", "32", "--cuda-graphs", "--gpu-step-ms", "0", "--mfu", "0.4"])
    h, f, L, kv, V, P, obs = 3584, 18944, 28, 512, 152064, 1224, 1280 + 30
    read = L * (2 * h * h + 2 * h * kv + h + 2 * kv + 3 * h * f + 2 * h) + h + h * V       # 7.07e9 parameters
    kv_token = L * 2 * kv * 2                                        # keys and values of 4 heads x 128, bf16
    linear = L * 2 * (h * (h + 2 * kv) + h * h + 3 * h * f)
    attend = lambda n, before=0: 2 * L * h * ((before + n) ** 2 - before ** 2)
    vc = models.real_config("7b", models.build_tiny_tokenizer()).vision_config
    for s, prompts in zip(r["settings"], (256, 32)):
        episodes = prompts * 16
        ours = s["schedules"]["ours (slots)"]
        busy = 200 * episodes / ours["decode_steps"]                 # useful tokens a step
        step_s = (2 * read + busy * (P + 100 + 1280 / 2) * kv_token) / (0.8 * 3.35e12)
        assert ours["ms_per_step"] == pytest.approx(1000 * step_s, abs=0.006)
        assert ours["decode_s"] == pytest.approx(ours["decode_steps"] * step_s, rel=1e-9)
        flops = prompts * (P * linear + attend(P)) + episodes * (obs * linear + attend(obs, P + 100))
        flops += prompts * bench.vision_flops(vc, (1, 64, 64)) + episodes * bench.vision_flops(vc, (1, 70, 70))
        assert s["crops_per_gpu"] == episodes
        assert s["prefill_s"] == pytest.approx(flops / (0.4 * 989e12), abs=0.06)


def test_estimate_counts_training_flops_by_hand():
    """One turn of 100 tokens an episode, no crops: an episode is n = 1,024 + 200 + 100 tokens; training
    FLOPs (7B: 28 layers of matmuls, causal attention, the lm_head on the 100 sampled tokens) x 2.75
    forwards (LoRA: the forward, the recompute of the one-gpu preset's 3/4 of the layers, the backward) at
    0.4 x 989 TFLOP/s; shared, a group's 16 episodes train in 2
    micro-batches of 8 (the one-gpu preset's bound), each running the 1,224-token prompt once."""
    r = bench.main(["--config", "7b", "--lora", "64", "--estimate-time", "--lengths", "100", "100",
                    "--turns", "1", "1", "--batch", "32", "--mfu", "0.4"])
    h, f, L, kv, V = 3584, 18944, 28, 512, 152064
    linear = L * 2 * (h * (h + 2 * kv) + h * h + 3 * h * f)          # a token's decoder matmuls
    attend = lambda n, before=0: 2 * L * h * ((before + n) ** 2 - before ** 2)
    P, n = 1224, 1324
    for s, prompts in zip(r["settings"], (256, 32)):
        episodes = prompts * 16
        unshared = episodes * (n * linear + attend(n) + 100 * 2 * h * V)
        shared = unshared - prompts * 14 * (P * linear + attend(P))
        assert s["train_prompt_runs_per_group"] == 2
        assert s["crops_per_gpu"] == 0 and s["sampled_tokens_per_gpu"] == 100 * episodes
        assert s["train_s_prompt_per_episode"] == pytest.approx(2.75 * unshared / (0.4 * 989e12), abs=0.06)
        assert s["train_s"] == pytest.approx(2.75 * shared / (0.4 * 989e12), abs=0.06)


def test_estimate_decode_step_is_the_slowest_of_bytes_launches_and_kernels():
    """A decode step takes the longest of: its bytes at the bandwidth, launching its counted ops eagerly
    (--op-us each; none under --cuda-graphs), and its kernels' GPU time (--gpu-step-ms, graphs or not)."""
    base = ["--config", "7b", "--lora", "64", "--estimate-time", "--lengths", "100", "100", "--turns", "1", "1",
            "--batch", "32"]
    ops_layer, ops_step = bench.decode_step_ops()
    ops = ops_layer * 28 + ops_step
    ms = lambda extra: bench.main(base + extra)["settings"][0]["schedules"]["ours (slots)"]["ms_per_step"]
    bytes_only = ms(["--cuda-graphs", "--gpu-step-ms", "0"])
    assert 4 < bytes_only < 7                                      # ~15 GB of weights and cache at 0.8 x 3.35 TB/s
    assert ms(["--op-us", "50", "--gpu-step-ms", "0"]) == pytest.approx(ops * 50e-3, abs=0.006)
    assert ms(["--cuda-graphs", "--op-us", "50", "--gpu-step-ms", "0"]) == bytes_only
    assert ms(["--cuda-graphs", "--gpu-step-ms", "20"]) == 20
    assert ms(["--op-us", "30", "--gpu-step-ms", "20"]) == pytest.approx(ops * 30e-3, abs=0.006)


def test_profile_step_reports_where_the_time_goes_on_cpu(capsys):
    """support/profile_step.py (.ci/gpu_profile's) on the tiny model: a decode figure for each row count, the
    profiled kernels ranked, a shared micro-batch computing its prompt once, a sweep entry per size."""
    from support import profile_step
    r = profile_step.main(["--config", "tiny", "--lora", "4", "--rows", "4", "--visual-tokens", "16",
                           "--prompt-tokens", "40", "--response-tokens", "6", "--decode-tokens", "4",
                           "--decode-rows", "2", "4", "--sweep", "2", "4", "--top", "3", "--device", "cpu"])
    d = r["decode"]
    assert {"wall_ms_per_step_2_rows", "wall_ms_per_step_4_rows"} <= set(d) and d["kernel_launches_per_step"] > 0
    ms = [t[1] for t in d["top_kernels"]]
    assert len(ms) == 3 and ms == sorted(ms, reverse=True)
    t = r["training_micro_batch"]
    assert t["mode"] == "shared" and t["episodes"] == 2 and t["computed_tokens"] < t["episode_tokens"]
    assert t["image_encodes"] == 0                                  # LoRA: the rollout's features, as train.py
    assert set(r["micro_batch_sweep"]) == {2, 4} and r["launch_us_per_op"] > 0
    with pytest.raises(SystemExit):
        profile_step.parse_args(["--config", "7b", "--device", "cpu"])
    with pytest.raises(SystemExit):
        profile_step.parse_args(["--rows", "4", "--sweep", "8"])
    assert "needs a GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        profile_step.parse_args(["--decode-tokens", "1"])                # a step is the difference of two runs
    assert "--decode-tokens must be >= 2" in capsys.readouterr().err


def test_the_gpu_sessions_end_to_end_script_runs_on_the_real_shape_model(tmp_path):
    """.ci/gpu_train (train.py and eval.py end to end on a 7B checkpoint, for a session lent a GPU) on the
    two-layer real-shape model on this CPU, so that the script still works when a GPU comes: its steps
    assert that training took the rollout's features and that a step with varying rewards moved every
    LoRA B matrix."""
    import subprocess
    env = {**os.environ, "CONFIG": "shape", "WORK": str(tmp_path / "work"), "OUT": str(tmp_path / "out"),
           "PY": sys.executable}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(["bash", os.path.join(root, ".ci", "gpu_train")], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "train.py: 3 steps, no image encoded in training" in r.stdout
    assert "trained tensors moved" in r.stdout and "delta/acc" in r.stdout

"""Time one stage-1 GRPO step, phase by phase, and print JSON.

    python -m support.bench                               # toy: the shipped base, 8 prompts x 8 rollouts, CPU
    python -m support.bench --model PATH --prompts 8 --group 8 --repeat 3
    python -m support.bench --config 7b --batch 64 --lora 64           # one GPU: random-weight Qwen2.5-VL-7B
    python -m support.bench --config 3b --batch 64                     # 3B, full fine-tuning, fp32 master weights
    python -m support.bench --config tiny --batch 4 --visual-tokens 16 --prompt-tokens 40 --response-tokens 8
    python -m support.bench --config 7b --estimate-memory --lora 64 --response-tokens 2048 --group 16   # CPU, no GPU
    python -m support.bench --schedule-bench --prompts 8 --group 8 --batch 16 --repeat 3   # slots vs the turn barrier

Memory mode (--estimate-memory) prints the peak memory of one stage-1 step of the real config by kind,
estimated on a CPU without allocating the weights (support/memory.py: fake tensors and torch's MemTracker).

Toy mode (no --config) times what train.py does: rollouts (multi-turn sampling with crops), rewards
and advantages, the log-prob recompute with backward in micro-batches, the optimizer step.

Config mode (--config tiny|3b|7b) builds the model from the published config numbers with random
weights (`CONFIGS`; nothing is downloaded) and times a SYNTHETIC stage-1 step: `--batch` episodes,
each a prompt of `--prompt-tokens` tokens of which `--visual-tokens` are one random image, sampled
for exactly `--response-tokens` tokens (a random model never stops or calls the tool, so the turn
length is fixed: the crop turns' images are not in it), then the log-prob recompute (in train.py's
micro-batches: `--pack`, by default the one prompt once in each), backward and AdamW step of train.py (`policy.load_model`'s settings: fp32 master weights with bf16 autocast on GPU;
`--lora R`: a bf16 base with fp32 adapters via peft; gradient checkpointing of the preset's share of the
layers, --ckpt-fraction; fused AdamW on GPU). Reported:
- decode_ms_per_step = (time of N tokens - time of 1 token) / (N - 1), from two timed rollouts of the
  slot engine (train.py's), beside decode_ms_bandwidth_bound (weights and KV cache read once a step
  over --hbm-gbs) and the rollout's slot_utilisation;
- rollout_tokens_per_s = batch x N / (time of N tokens), prefill included;
- train_tflops and mfu: model FLOPs of the log-prob forward + backward (`model_flops`: 3 x the
  forward's matmul and attention FLOPs of the work done, a shared prompt once, the recompute of
  checkpointing not counted) over the measured time, against --peak-tflops;
- aten_ops_per_decode_step_per_layer of the trained model and of the rollout's (policy.sampler: under
  LoRA the adapters merged, so the rollout's equals the plain model's);
- peak_memory_gb (GPU: torch.cuda.max_memory_allocated, in GiB), train_image_encodes (0 under LoRA: the
  rollout's features, as train.py takes them), the phase shares, the versions.
Estimate mode (--estimate-time --config 7b|3b) prints the wall time of one paper-scale (256 x 16) and
one one-gpu preset (32 x 16) stage-1 step on ONE --gpu, from COUNTED work: decode steps and slot
utilisation simulated over a length plan (--lengths, --turns) for both schedules, aten ops a decode
step (`decode_step_ops`: the slot engine's decode step as it runs, counted; each costing --op-us of host
time, a step at least --gpu-step-ms of GPU time, both measured on an H200), weights and KV bytes read a step, prefill, vision and
training FLOPs, the host's ms an image measured here (`host_ms`: opening, resizing, cropping, cutting
patches; a crop is cut by the rollout's threads during the engine's next pass, so it counts only for
what outlasts a decode step); every assumption is printed beside
the figures, with a vLLM-like and a roofline figure. An estimate, not a measurement.

Schedule mode (--schedule-bench) runs one workload with a realistic spread of lengths (--lengths MIN
MAX tokens a turn, log-uniform; --turns MIN MAX turns an episode) on the real-shape two-layer
Qwen2.5-VL: the cached engine with continuous batching, the same engine with today's per-turn barrier
(RolloutConfig.schedule "turns"), and transformers' model.generate on the same prompts; a planned
policy (`plan_policy`) chooses the emitted tokens while the model computes every step. Reports sampled
tokens/s (best and median of --repeat), work/slot_utilisation and the decode steps of each.
Numbers measured with it live in README.md with the machine, command and date.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import replace

import torch

import crop_tool
import grpo
import lfpc
from support import batches, cli, engine, memory, models, policy, presets


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m support.bench", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", default="", choices=["", "tiny", "3b", "7b"],
                   help="random-weight model of this size (synthetic step); empty: the toy step on --model")
    p.add_argument("--model", default="", help="toy mode: checkpoint folder (default: the toy preset's, toy/base)")
    p.add_argument("--prompts", type=int, default=8, help="toy mode: tasks per step")
    p.add_argument("--group", type=int, default=8, help="toy mode: rollouts per task")
    p.add_argument("--budget", type=int, default=16, help="toy mode: global-image budget, visual tokens")
    p.add_argument("--micro-batch", type=int, default=0, help="episodes per forward/backward (0: toy 16; config: the preset's, 8 with --lora, else 4)")
    p.add_argument("--repeat", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--batch", type=int, default=64, help="config mode: episodes per step")
    p.add_argument("--prompt-tokens", type=int, default=1127, help="config mode: prompt length, visual tokens included")
    p.add_argument("--visual-tokens", type=int, default=1024, help="config mode: visual tokens of the image (a square)")
    p.add_argument("--response-tokens", type=int, default=512, help="config mode: sampled tokens per episode")
    p.add_argument("--decode", default="dynamic", choices=["dynamic", "static"], help="KV cache while sampling")
    p.add_argument("--pack", default="auto", choices=["auto", "shared", "on", "off"],
                   help="toy and config modes: train.py --pack (shared: each group's prompt once in the training forward)")
    p.add_argument("--engine", default="cached", choices=list(lfpc.ENGINES),
                   help="toy mode: rollout engine (cached: KV cache across turns; reference: re-prefill each turn)")
    p.add_argument("--lora", type=int, default=0, help="config mode: LoRA rank (needs peft); 0: full fine-tuning")
    p.add_argument("--estimate-memory", action="store_true",
                   help="config mode, CPU, no weights allocated: peak memory of one stage-1 step by kind (support/memory.py)")
    p.add_argument("--rollout-rows", type=int, default=16, help="estimate: episodes sharing one rollout chunk's KV cache")
    p.add_argument("--prefill-tokens", type=int, default=lfpc.RolloutConfig.prefill_tokens, help="config and estimate-memory modes: "
                   "tokens one prefill forward of the rollout computes, at most (RolloutConfig.prefill_tokens)")
    p.add_argument("--train-tokens", type=int, default=16384, help="estimate and config modes: tokens per training micro-batch, at most")
    p.add_argument("--crops", type=int, default=4, help="estimate: crops an episode may hold (max_turns - 1)")
    p.add_argument("--crop-tokens", type=int, default=1280, help="estimate: visual tokens of a crop")
    p.add_argument("--logprob-chunk", type=int, default=1024, help="estimate: lm_head rows at a time")
    p.add_argument("--ckpt-fraction", type=float, default=None, help="config and estimate modes: fraction of the "
                   "decoder layers under gradient checkpointing (train.py --ckpt-fraction; 1: all; default: the "
                   "preset's, one-gpu's 0.75 with --lora, paper's 0.5 with --world > 1, else 1)")
    p.add_argument("--ckpt-sweep", action="store_true", help="estimate mode (with --estimate-memory): the training "
                   "phase's peak and the recomputed forwards for each --ckpt-fraction in 1, 3/4, 1/2, 1/4, 0")
    p.add_argument("--world", type=int, default=1, help="estimate: ranks under torchrun (full fine-tuning shards)")
    p.add_argument("--hbm-gbs", type=float, default=3350.0, help="config mode: GPU memory bandwidth, GB/s, for the "
                   "decode bound (H100 SXM: 3350)")
    p.add_argument("--sync-every", type=int, default=1, help="config mode: decode steps between host syncs")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the GPU's dense bf16 peak for MFU (H100 SXM datasheet: 989)")
    p.add_argument("--device", default="", help='config mode: "" = cuda if available else cpu (the toy and schedule '
                   'modes run on the CPU)')
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--schedule-bench", action="store_true", help="schedule mode: continuous batching vs the per-turn "
                   "barrier vs model.generate on the real-shape two-layer model (--prompts x --group episodes in "
                   "--batch slots, --visual-tokens, --lengths, --turns, --repeat)")
    p.add_argument("--estimate-time", action="store_true", help="estimate mode (with --config 7b|3b): the wall time "
                   "of a paper-scale and a one-gpu step on --gpu from counted work (decode steps simulated over "
                   "--lengths/--turns in --batch slots, ops a decode step, bytes read, FLOPs, host ms an image)")
    p.add_argument("--gpu", default="h100-sxm", choices=sorted(GPUS), help="estimate mode: the GPU (published peaks)")
    p.add_argument("--mfu", type=float, default=0.31, help="estimate mode: the fraction of peak FLOP/s that prefill, "
                   "vision and training reach (measured: train.py's training phase on an H200, README)")
    p.add_argument("--bandwidth-eff", type=float, default=0.8, help="estimate mode: the fraction of HBM bandwidth a "
                   "decode step reaches")
    p.add_argument("--op-us", type=float, default=21.5, help="estimate mode: host microseconds a counted aten op of "
                   "the decode step costs eagerly, Python included (measured on an H200's host, README)")
    p.add_argument("--gpu-step-ms", type=float, default=9.4, help="estimate mode: the GPU time of a decode step, "
                   "its small kernels included: the floor under CUDA graphs (measured on an H200 at 16 rows, README)")
    p.add_argument("--cuda-graphs", action="store_true", help="estimate mode: decode steps replayed as CUDA graphs "
                   "(no host launch cost)")
    p.add_argument("--original", type=int, nargs=2, default=[2250, 1500], metavar=("W", "H"),
                   help="estimate mode: a task's original image, pixels (default: SA-1B's released size, the source "
                        "of V*'s and DeepEyes' fine-grained training images)")
    p.add_argument("--host-threads", type=int, default=8, help="estimate mode: threads that open and resize the "
                   "originals (lfpc.IMAGE_THREADS on a host of >= 8 cores)")
    p.add_argument("--lengths", type=int, nargs=2, default=[20, 1024], metavar=("MIN", "MAX"),
                   help="schedule mode: each turn's free text, tokens, log-uniform between MIN and MAX")
    p.add_argument("--turns", type=int, nargs=2, default=[1, 4], metavar=("MIN", "MAX"),
                   help="schedule mode: turns an episode takes, uniform between MIN and MAX")
    a = p.parse_args(argv)
    cli.refuse(p, cli.at_least(a, ("prompts", "group", "budget", "repeat", "batch", "prompt_tokens", "visual_tokens",
                                    "response_tokens", "rollout_rows", "train_tokens", "crop_tokens", "logprob_chunk",
                                    "world", "sync_every", "prefill_tokens", "host_threads"))
               + cli.at_least(a, ("micro_batch", "lora", "crops", "threads"), low=0))
    modes = [m for m in ("estimate_memory", "estimate_time", "schedule_bench") if getattr(a, m)]
    if len(modes) > 1:
        p.error("one mode a call: " + " and ".join("--" + m.replace("_", "-") for m in modes) + " were both given")
    if a.schedule_bench and (a.config or a.lora):
        p.error("--schedule-bench runs the tiny model of its own; --config and --lora are config mode's")
    if not (a.hbm_gbs > 0 and min(a.original) >= 1):
        p.error(f"--hbm-gbs must be > 0 and --original W H at least 1 each, got {a.hbm_gbs} and {a.original}")
    if not (1 <= a.lengths[0] <= a.lengths[1] and 1 <= a.turns[0] <= a.turns[1]):
        p.error(f"--lengths and --turns are MIN MAX with 1 <= MIN <= MAX, got {a.lengths} and {a.turns}")
    if a.ckpt_fraction is None:             # the preset's: one-gpu's with --lora, the paper's for one rank of several
        a.ckpt_fraction = presets.ONE_GPU["ckpt_fraction"] if a.lora else \
            presets.PAPER["ckpt_fraction"] if a.world > 1 else 1.0
    if not 0 < a.ckpt_fraction <= 1:
        p.error(f"--ckpt-fraction lies in (0, 1], got {a.ckpt_fraction}")
    if a.ckpt_sweep and not a.estimate_memory:
        p.error("--ckpt-sweep is a mode of --estimate-memory: add --estimate-memory --config 7b")
    if not a.peak_tflops > 0:
        p.error(f"--peak-tflops must be > 0, got {a.peak_tflops}")
    # the preset train.py would run: one-gpu (8 episodes, LoRA) or paper (4, full fine-tuning); the toy's 16
    a.micro_batch = a.micro_batch or (16 if not a.config else presets.ONE_GPU["micro_batch"] if a.lora
                                      else presets.PAPER["micro_batch"])
    if a.model and (a.config or a.schedule_bench):
        p.error("--model is the toy mode's checkpoint; --config and --schedule-bench build their own model")
    if a.model and (why := policy.model_problem(a.model)):
        p.error(f"--model: {why}")
    if a.model and presets.check_model("toy", a.model):
        p.error(f"--model {a.model} is not a toy checkpoint (toy mode runs toy/base or a train.py --preset toy "
                f"run's ckpt; a real config's step: --config 7b or 3b)")
    if a.device not in ("", "cpu") and not a.config:
        p.error(f"--device {a.device}: the toy and schedule modes run on the CPU; --device is config mode's")
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not a.estimate_memory and (why := policy.device_problem(a.device)):
        p.error(why)
    if a.estimate_time and a.config not in ("3b", "7b"):
        p.error("--estimate-time needs --config 7b or 3b")
    if not (0 < a.mfu <= 1 and 0 < a.bandwidth_eff <= 1 and a.op_us >= 0 and a.gpu_step_ms >= 0):
        p.error("--mfu and --bandwidth-eff lie in (0, 1], --op-us and --gpu-step-ms >= 0")
    if a.estimate_memory and not a.config:
        p.error("--estimate-memory needs --config 7b, 3b or tiny")
    if a.config in ("3b", "7b") and not a.device.startswith("cuda") and not (a.estimate_memory or a.estimate_time):
        p.error(f"--config {a.config} needs a CUDA GPU (its fp32 weights alone are "
                f"{ {'3b': 15, '7b': 33}[a.config] } GB); --config tiny runs the same path on CPU")
    side = math.isqrt(a.visual_tokens)
    if a.config and not a.estimate_memory and (side * side != a.visual_tokens or a.prompt_tokens < a.visual_tokens + 16 or a.response_tokens < 2):
        p.error("--visual-tokens must be a square number, --prompt-tokens >= visual + 16, --response-tokens >= 2")
    return a


# ----------------------------------------------------------------------------- FLOPs

def _linear_flops_per_token(c) -> int:
    """Forward FLOPs of one decoder layer's matmuls for one token (2 x multiply-adds)."""
    hd = c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    return 2 * (c.hidden_size * (q + 2 * kv) + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size)


def vision_flops(vc, grid: tuple[int, int, int]) -> int:
    """Forward FLOPs of the vision tower on one image of `grid` (t, h, w) patches: patch embedding,
    blocks (windowed attention except `fullatt_block_indexes`), merger."""
    t, h, w = grid
    n, d, m = t * h * w, vc.hidden_size, vc.spatial_merge_size
    patch_in = getattr(vc, "in_channels", 3) * vc.temporal_patch_size * vc.patch_size ** 2
    flops = 2 * n * patch_in * d
    block = 2 * n * (d * 3 * d + d * d + 3 * d * vc.intermediate_size)
    win = vc.window_size // vc.patch_size                    # window side in patches (8 for 112 px)
    win_sizes = [min(win, h - i) * min(win, w - j) * t for i in range(0, h, win) for j in range(0, w, win)]
    for b in range(vc.depth):
        sizes = [n] if b in vc.fullatt_block_indexes else win_sizes
        flops += block + sum(4 * s * s * d for s in sizes)  # QK^T and AV, full squares
    merged = n // m ** 2
    flops += 2 * merged * ((d * m * m) ** 2 + d * m * m * vc.out_hidden_size)
    return flops


def model_flops(config, seq_lens: list, response_tokens: int, grids: list[tuple[int, int, int]],
                backward: bool = True) -> int:
    """Model FLOPs of `token_logprobs` on sequences of `seq_lens` tokens (no padding counted; an entry (q, k):
    q tokens that attend to k keys, a shared row's suffix) with `response_tokens` lm_head positions in all,
    and images of `grids`: the decoder's matmuls, its attention as full q x k rectangles (what SDPA computes
    under a mask), the lm_head only where the loss needs it, the vision tower on `grids` (the DISTINCT
    images: shared ones run once). backward=True: x 3 (backward = 2 x forward), recompute not counted."""
    c = config.get_text_config()
    hd = c.hidden_size // c.num_attention_heads
    spans = [s if isinstance(s, tuple) else (s, s) for s in seq_lens]
    f = sum(q * c.num_hidden_layers * _linear_flops_per_token(c) for q, _ in spans)
    f += sum(4 * q * k * c.num_attention_heads * hd * c.num_hidden_layers for q, k in spans)
    f += 2 * response_tokens * c.hidden_size * c.vocab_size
    f += sum(vision_flops(config.vision_config, g) for g in grids)
    return 3 * f if backward else f


# ----------------------------------------------------------------------------- config mode

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def synthetic_episodes(agent: lfpc.Agent, a) -> list[lfpc.Episode]:
    """`a.batch` copies of one prompt: a random image of `a.visual_tokens` tokens, text up to `a.prompt_tokens`."""
    from PIL import Image
    import numpy as np
    side = math.isqrt(a.visual_tokens) * 28
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8))
    grid = agent.image_grid(img)
    head = [agent.im_start] + agent.encode("user\n") + agent.image_block(grid)
    tail = [agent.im_end] + agent.encode("\n") + [agent.im_start] + agent.encode("assistant\n")
    filler = agent.encode(" zoom in on the small text")
    body = (filler * (a.prompt_tokens // max(1, len(filler)) + 1))[:max(0, a.prompt_tokens - len(head) - len(tail))]
    ids = head + body + tail
    episodes = [lfpc.Episode(0) for _ in range(a.batch)]
    for e in episodes:
        e.append(ids, images=[(img, grid)])
    return episodes


def synthetic_tasks(agent: lfpc.Agent, a) -> list[lfpc.Task]:
    """One task whose prompt is `a.prompt_tokens` long: a random square image of `a.visual_tokens` tokens
    and a question padded with filler words (config mode rolls it out `a.batch` times)."""
    from PIL import Image
    import numpy as np
    side = math.isqrt(a.visual_tokens) * 28
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8))
    plain = lfpc.Task(img, "Zoom", "x")
    cfg = lfpc.RolloutConfig(global_max_pixels=a.visual_tokens * crop_tool.TOKEN_PIXELS, use_tool=False)
    words = max(0, a.prompt_tokens - len(lfpc.start_episode(agent, plain, 0, cfg).token_ids))
    return [lfpc.Task(img, "Zoom" + " in" * words, "x")]


def config_agent(a) -> lfpc.Agent:
    """Config mode's policy, held as train.py holds it: random weights of `a.config` (a bf16 base under
    LoRA, with `a.lora` adapters), `a.ckpt_fraction` of the layers checkpointed; no stop token, so every
    turn runs to its length (support/profile_step.py takes the same)."""
    agent = models.random_agent(a.config, a.device, policy.base_dtype(a))
    if a.lora:
        agent = policy.apply_lora(agent, a.lora)
    if a.config != "tiny":
        policy.enable_grad_ckpt(agent.model, a.ckpt_fraction)
    agent.stop_ids, agent.stop_strings = set(), ()               # fixed-length turns
    return agent


def config_step(a) -> dict:
    dev = a.device
    agent = config_agent(a)
    params = [q for q in agent.model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, fused=dev.startswith("cuda"))
    N = a.response_tokens
    tasks = synthetic_tasks(agent, a)
    cfg = lambda n: lfpc.RolloutConfig(global_max_pixels=a.visual_tokens * crop_tool.TOKEN_PIXELS, use_tool=False,
                                       temperature=1.0, decode=a.decode, batch_size=a.batch, max_turns=1,
                                       max_new_tokens=n, max_response_tokens=n, sync_every=a.sync_every,
                                       prefill_tokens=a.prefill_tokens)
    autocast = policy.precision(agent)                             # train.py's precision, rollouts included
    import train
    mode = train.pack_mode(a, agent.model)                         # train.py's micro-batch layout
    steps = []
    for i in range(a.repeat + 1):
        if dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        agent.model.eval()
        work = engine.Work()
        with autocast:                                             # the slot engine, as train.py's rollouts
            _sync(dev); t0 = time.perf_counter()
            with policy.sampler(agent) as sampler:                 # under LoRA: merged (built in the timing)
                lfpc.rollout(sampler, tasks, a.batch, cfg(1), seed=i)
            _sync(dev); t1 = time.perf_counter()
            store = engine.FeatureStore() if policy.vision_frozen(agent) else None   # train.py's: LoRA reuses
            with policy.sampler(agent) as sampler:                                      # the rollout's features
                eps = lfpc.rollout(sampler, tasks, a.batch, cfg(N), seed=i, work=work, store=store)
            _sync(dev); t2 = time.perf_counter()
        agent.model.train()
        opt.zero_grad(set_to_none=True)
        n_tok = sum(e.num_generated for e in eps)
        t_fwd, spans, encodes = 0.0, [], 0
        micro = batches.training_batches(agent, eps, mode, a.micro_batch, a.train_tokens)
        _sync(dev); t3 = time.perf_counter()
        for idx in micro:                                  # train.py's micro-batches (--pack, as train.py's)
            batch = batches.collate(agent, [eps[j] for j in idx], store=store, packed=mode != "off",
                                    share_prompt=mode == "shared")
            encodes += batch.image_encodes
            spans += [len(eps[j].token_ids) for j in idx] if batch.layout is None else batch.layout.attention_spans()
            _sync(dev); tf = time.perf_counter()
            with autocast:
                lp = batch.unpacked(lfpc.token_logprobs(agent.model, batch))         # [b, T]
            _sync(dev); t_fwd += time.perf_counter() - tf
            adv = torch.randn(lp.shape[0], device=lp.device)                           # [b]: any advantages
            loss, _ = grpo.policy_loss(lp, batch.unpacked(batch.sampling_logprobs), adv, batch.unpacked(batch.loss_mask),
                                       num_tokens=n_tok, num_seqs=len(eps))
            loss.backward()
        opt.step()
        _sync(dev); t4 = time.perf_counter()
        if i == 0:
            continue                                             # warm-up: allocator, kernels, caches
        grids = list({id(im): g for e in eps for im, g in zip(e.images, e.grids)}.values())   # distinct images
        flops = model_flops(agent.model.config, spans, n_tok, grids if store is None else [])  # the work done: a shared
        #                                                           prompt once, no vision tower where features are reused
        total = (t2 - t1) + (t4 - t3)                       # the 1-token run only times the prefill
        steps.append({"total_s": total, "rollout_s": t2 - t1, "logprob_forward_s": t_fwd,
                      "backward_and_optimizer_s": (t4 - t3) - t_fwd,
                      "decode_ms_per_step": 1000 * ((t2 - t1) - (t1 - t0)) / max(1, N - 1),
                      "rollout_tokens_per_s": len(eps) * N / (t2 - t1), "train_tflops": flops / (t4 - t3) / 1e12,
                      "slot_utilisation": work.metrics()["work/slot_utilisation"], "train_image_encodes": encodes,
                      "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if dev.startswith("cuda") else None})
    mean = {k: (sum(s[k] for s in steps) / len(steps) if steps[0][k] is not None else None) for k in steps[0]}
    n_params = sum(q.numel() for q in agent.model.parameters())
    prompt = len(eps[0].token_ids) - N
    bound_ms = decode_bound_ms(agent.model, a.batch, prompt + N // 2, a.hbm_gbs)
    layers = agent.model.config.get_text_config().num_hidden_layers
    with autocast, policy.sampler(agent) as sampler:      # the trained model's forwards run under precision's autocast
        ops = {"trained model": policy.count_ops(agent.model) / layers, "rollout": policy.count_ops(sampler.model) / layers}
    return {"mode": "config", "args": vars(a), "parameters": n_params, "prompt_tokens": prompt,
            "aten_ops_per_decode_step_per_layer": {k: round(v, 1) for k, v in ops.items()},
            "trainable": sum(q.numel() for q in params),
            "decode_ms_per_step": round(mean["decode_ms_per_step"], 3),
            "decode_ms_bandwidth_bound": round(bound_ms, 3),
            "slot_utilisation": round(mean["slot_utilisation"], 4),
            "train_image_encodes": steps[-1]["train_image_encodes"],
            "rollout_tokens_per_s": round(mean["rollout_tokens_per_s"], 1),
            "train_tflops": round(mean["train_tflops"], 4),
            "mfu": round(mean["train_tflops"] / a.peak_tflops, 4),
            "peak_memory_gb": None if mean["peak_memory_gb"] is None else round(mean["peak_memory_gb"], 2),
            "step_s": round(mean["total_s"], 3),
            "share": {k: round(mean[k + "_s"] / mean["total_s"], 3)
                      for k in ("rollout", "logprob_forward", "backward_and_optimizer")},
            "steps": steps, **_versions(dev)}


def decode_bound_ms(model, rows: int, context: int, hbm_gbs: float) -> float:
    """The fastest a decode step can be on a GPU whose memory moves `hbm_gbs` GB/s: every weight read once
    (at its stored size; a bf16 rollout copy halves fp32 masters) plus the KV cache of `rows` rows of
    `context` tokens (bf16 keys and values of every layer)."""
    c = model.config.get_text_config()
    weights = sum(p.numel() * min(p.element_size(), 2) for p in model.parameters())
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = rows * context * c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * 2
    return 1000 * (weights + kv) / (hbm_gbs * 1e9)


def _versions(dev: str) -> dict:
    import transformers
    return {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "device": torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu",
            "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d")}


# ----------------------------------------------------------------------------- toy mode

def toy_step(a) -> dict:
    """train.py's step, timed as its two calls: `collect_episodes` + `score` (rollout, rewards) and
    `update_policy` (log-prob forwards, backward, optimizer; it times its forwards itself)."""
    import train
    from support.judge import RuleJudge
    args = train.parse_args(["--preset", "toy", "--model", a.model or presets.get("toy")["model"], "--prompts", str(a.prompts), "--group", str(a.group),
                             "--micro-batch", str(a.micro_batch), "--global-image", "full",
                             "--full-tokens", str(a.budget), "--device", "cpu", "--pack", a.pack,
                             "--decode", a.decode, "--engine", a.engine])
    agent = policy.load_model(args)
    cfg = train.rollout_config(args)
    tasks = train.load_data(args, agent)
    opt = torch.optim.AdamW([q for q in agent.model.parameters() if q.requires_grad], lr=args.lr)
    steps = []
    for i in range(a.repeat + 1):
        batch = tasks[i * a.prompts:(i + 1) * a.prompts]
        t0 = time.perf_counter()
        episodes, work = train.collect_episodes(args, agent, batch, cfg, step=i)
        train.score(args, episodes, batch, RuleJudge())
        t1 = time.perf_counter()
        m = train.update_policy(args, agent, opt, episodes, batch)
        t2 = time.perf_counter()
        if i:                                            # the first step warms caches up
            distinct = len({engine._content_key(im) for e in episodes for im in e.images})
            host = memory.episode_bytes(episodes)
            steps.append({"total_s": t2 - t0, "rollout": t1 - t0, "logprob_forward": m["time/forward_s"],
                          "sampled_tokens": sum(e.num_generated for e in episodes), "distinct_images": distinct,
                          "host_bytes": host["images"] + host["token_lists"],
                          "host_bytes_fp32_pixels_per_episode": host["fp32_pixels_per_episode_before"],
                          **work.metrics(), **{k: v for k, v in m.items() if k.startswith("work/train")}})
    mean = {k: sum(s[k] for s in steps) / len(steps) for k in steps[0]}
    mean["backward_and_optimizer"] = mean["total_s"] - mean["rollout"] - mean["logprob_forward"]
    return {"mode": "toy", "args": vars(a), "step_s": round(mean["total_s"], 3),
            "share": {k: round(mean[k] / mean["total_s"], 3) for k in ("rollout", "logprob_forward", "backward_and_optimizer")},
            "rollout_tokens_per_s": round(mean["sampled_tokens"] / mean["rollout"], 1),
            "work_per_step": {k: round(v, 3) for k, v in mean.items() if k.startswith("work/") or k == "distinct_images"},
            "host_bytes_per_step": {"episodes (PIL images shared, token lists)": round(mean["host_bytes"]),
                                    "fp32 pixels kept per episode (the design before)":
                                        round(mean["host_bytes_fp32_pixels_per_episode"])},
            "steps": steps, **_versions("cpu")}


# ----------------------------------------------------------------------------- schedule mode

def length_plan(n_episodes: int, lengths: tuple[int, int], turns: tuple[int, int], seed: int = 0) -> list[list[int]]:
    """Per episode, the length of each turn's free text: 1-4 turns (`turns`), each drawn log-uniform in
    `lengths` (real responses run from ~20 to ~2,048 tokens; the spread is what scheduling is about)."""
    import random
    rng = random.Random(seed)
    lo, hi = lengths
    return [[round(math.exp(rng.uniform(math.log(lo), math.log(hi)))) for _ in range(rng.randint(*turns))]
            for _ in range(n_episodes)]


def plan_policy(agent: lfpc.Agent, plan: list[list[int]], seed: int):
    """A `force` for lfpc.rollout that makes episode k follow plan[k]: each turn writes its planned number
    of filler tokens, then a tool call (every turn but the last) or an answer that closes the turn. The
    model still computes every step; only the token it emits is chosen."""
    call = agent.encode(crop_tool.format_tool_call([0, 0, 56, 56]))
    answer = agent.encode("<answer>red</answer>") + [agent.im_end]
    filler = agent.encode(" x")[0]

    def force(ep: lfpc.Episode, toks: list[int]) -> int | None:
        turns = plan[ep.seed - seed]
        n, text = turns[len(ep.turns)], call if len(ep.turns) + 1 < len(turns) else answer
        if len(toks) < n:
            return filler
        return text[len(toks) - n] if len(toks) < n + len(text) else None
    return force


def schedule_bench(a) -> dict:
    """The schedules side by side on one workload (--lengths, --turns) on the real-shape two-layer
    Qwen2.5-VL (the real vocabulary and image processor, models.real_shape_agent): the cached engine
    with continuous batching, the same engine with today's per-turn barrier, and transformers'
    `model.generate` on the same first prompts for as many tokens a row as the plan's mean turn. Each
    `--repeat` times; reports sampled tokens/s (min and median), slot utilisation and decode steps."""
    import os
    import statistics
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))          # support/.. : the repository
    agent = models.real_shape_agent(os.path.join(root, "tests", "fixtures", "qwen2-tokenizer"))
    from PIL import Image
    import numpy as np
    side = math.isqrt(a.visual_tokens) * 28
    tasks = [lfpc.Task(Image.fromarray(np.random.default_rng(k).integers(0, 255, (side, side, 3), dtype=np.uint8)),
                       "What is written on the small sign?", "red") for k in range(a.prompts)]
    n = a.prompts * a.group
    seed = 1000
    plan = length_plan(n, tuple(a.lengths), tuple(a.turns))
    longest = max(max(p) for p in plan)
    cfg = lfpc.RolloutConfig(global_max_pixels=a.visual_tokens * crop_tool.TOKEN_PIXELS, batch_size=a.batch,
                             max_turns=max(len(p) for p in plan), max_new_tokens=longest + 64,
                             max_response_tokens=max(sum(p) + 64 * len(p) for p in plan), temperature=1.0)
    out = {}
    for schedule in ("continuous", "turns"):
        times, work = [], None
        for _ in range(a.repeat):
            work = engine.Work()
            t0 = time.perf_counter()
            eps = lfpc.rollout(agent, tasks, a.group, replace(cfg, schedule=schedule), seed=seed, work=work,
                               force=plan_policy(agent, plan, seed))
            times.append(time.perf_counter() - t0)
        tokens = sum(e.num_generated for e in eps)
        out[schedule] = {"sampled_tokens": tokens, "seconds_min": round(min(times), 3),
                         "seconds_median": round(statistics.median(times), 3),
                         "tokens_per_s_max": round(tokens / min(times), 1),
                         "tokens_per_s_median": round(tokens / statistics.median(times), 1),
                         **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in work.metrics().items()}}
    mean_turn = round(sum(map(sum, plan)) / sum(map(len, plan)))
    times = []
    prompts = [lfpc.start_episode(agent, t, i, cfg) for i, t in enumerate(tasks)][:max(1, a.batch // a.group)]
    batch = batches.collate(agent, prompts, left_pad=True)
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        agent.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                             max_new_tokens=mean_turn, min_new_tokens=mean_turn, do_sample=True,
                             num_return_sequences=a.group, pad_token_id=agent.pad_id)
        times.append(time.perf_counter() - t0)
    rows = len(prompts) * a.group
    out["generate"] = {"rows": rows, "new_tokens_a_row": mean_turn, "seconds_min": round(min(times), 3),
                       "tokens_per_s_max": round(rows * mean_turn / min(times), 1),
                       "tokens_per_s_median": round(rows * mean_turn / statistics.median(times), 1)}
    c, t = out["continuous"], out["turns"]
    return {"mode": "schedule", "args": vars(a), "episodes": n, "slots": a.batch,
            "turn_lengths": {"min": min(min(p) for p in plan), "median": statistics.median(x for p in plan for x in p),
                             "max": longest, "turns_per_episode": round(sum(map(len, plan)) / n, 2)},
            **out, "ratio_tokens_per_s_continuous_over_turns": round(c["tokens_per_s_median"] / t["tokens_per_s_median"], 2),
            "ratio_tokens_per_s_continuous_over_generate": round(c["tokens_per_s_median"] /
                                                                  out["generate"]["tokens_per_s_median"], 2),
            **_versions("cpu")}


# ----------------------------------------------------------------------------- estimate mode

GPUS = {"h100-sxm": (989e12, 3.35e12), "h100-pcie": (756e12, 2.0e12), "h200": (989e12, 4.8e12),
        "a100-80gb": (312e12, 2.0e12)}            # bf16 dense FLOP/s, HBM bytes/s (published)


def simulate_schedule(plan: list[list[int]], slots: int, barrier: bool, crop_lag: int = 1) -> tuple[int, int]:
    """(decode steps, useful tokens) of the slot engine on `plan` (each episode's turn lengths), counted
    without a model: continuous batching refills a slot as soon as its episode ends and lets each turn
    end on its own, a turn after a crop starting `crop_lag` steps late (lfpc.rollout: the slot sits out
    the pass in which its crop is cut, unless no slot decodes: then no pass runs); the barrier waits for
    the longest turn of its chunk and starts a chunk when the last one is done. A decode step samples one
    token for every busy slot."""
    steps = useful = 0
    if barrier:
        for c in range(0, len(plan), slots):
            chunk = [list(p) for p in plan[c:c + slots]]
            while any(chunk):
                n = max(p[0] for p in chunk if p)
                steps, useful = steps + n, useful + sum(p[0] for p in chunk if p)
                chunk = [p[1:] for p in chunk]
        return steps, useful
    queue = [list(p) for p in plan][::-1]
    live = []                                  # [steps idle first, tokens left in this turn, turns after it]
    while queue or live:
        while queue and len(live) < slots:
            p = queue.pop()
            live.append([0, p[0], p[1:]])
        wait = min(idle for idle, _, _ in live)           # every slot awaiting its crop: no pass runs, they rejoin
        live = [[idle - wait, left, rest] for idle, left, rest in live]
        n = min(idle + left for idle, left, _ in live)   # every live slot steps until the next turn ends
        steps += n
        nxt = []
        for idle, left, rest in live:
            work = max(0, n - idle)                      # the steps it decodes, after its idle ones
            useful += work
            if left > work:
                nxt.append([max(0, idle - n), left - work, rest])
            elif rest:
                nxt.append([crop_lag, rest[0], rest[1:]])
        live = nxt
    return steps, useful


def estimate_time(a) -> dict:
    """The wall time of one stage-1 step on a GPU, from counted work (module docstring of this mode). Prints
    every assumption; returns the table."""
    import statistics
    peak, hbm = GPUS[a.gpu]
    agent = models.random_agent("tiny", "cpu", torch.bfloat16)
    ops_layer, ops_step = decode_step_ops()
    host = host_ms(agent, a.original, a.visual_tokens, a.crop_tokens)
    config = models.real_config(a.config, models.build_tiny_tokenizer())
    c = config.get_text_config()
    from transformers import Qwen2_5_VLForConditionalGeneration
    with torch.device("meta"):
        named = list(Qwen2_5_VLForConditionalGeneration(config).named_parameters())
    n_params = sum(p.numel() for _, p in named)
    read_params = sum(p.numel() for n, p in named if "visual" not in n and "embed_tokens" not in n)   # a decode step's
    head_dim = c.hidden_size // c.num_attention_heads
    kv_token = c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * 2             # bf16 bytes a token
    # forward FLOPs: the decoder's matmuls a token, the lm_head where a token is predicted, causal attention
    linear = c.num_hidden_layers * _linear_flops_per_token(c)
    head = 2 * c.hidden_size * c.vocab_size
    attend = lambda n, before=0: 2 * c.num_hidden_layers * c.hidden_size * ((before + n) ** 2 - before ** 2)  # n after `before`
    # a training token: forward 1, the checkpoint recompute (--ckpt-fraction of the layers), backward 2 (1 under
    # LoRA: the frozen weights get no weight gradients, only the activations' gradients flow)
    train_forwards = 1 + a.ckpt_fraction + (1 if a.lora else 2)
    observation = a.crop_tokens + 30                                     # a crop's user turn
    chunk_rows, chunk_tokens = presets.ONE_GPU["micro_batch"], presets.ONE_GPU["train_tokens"]   # LoRA on one GPU
    prompt = a.visual_tokens + 200
    rows = []
    for name, prompts, group, slots in (("paper scale (256 x 16)", 256, 16, a.batch),
                                        ("one-gpu preset (32 x 16)", 32, 16, a.batch)):
        plan = length_plan(prompts * group, tuple(a.lengths), tuple(a.turns))      # one GPU, as the goal states it
        tokens = sum(map(sum, plan))
        crops = sum(len(p) - 1 for p in plan)
        episode = [prompt + sum(p) + observation * (len(p) - 1) for p in plan]       # each episode's tokens
        context = prompt + statistics.mean(sum(p) for p in plan) / 2 + a.crop_tokens * crops / len(plan) / 2
        out = {}
        for sched, barrier in (("ours (slots)", False), ("per-turn barrier", True)):
            steps, useful = simulate_schedule(plan, slots, barrier)
            busy = useful / steps                                       # live rows a step, on average
            read = 2 * read_params + busy * context * kv_token          # bytes a step: bf16 weights + KV
            t_bw = read / (hbm * a.bandwidth_eff)
            ops = ops_layer * c.num_hidden_layers + ops_step
            t_host = 0.0 if a.cuda_graphs else ops * a.op_us * 1e-6             # launching them, eagerly
            t_step = max(t_bw, t_host, a.gpu_step_ms * 1e-3)                   # or running them, small ones too
            out[sched] = {"decode_steps": steps, "slot_utilisation": round(useful / (steps * slots), 3),
                          "ms_per_step": round(1000 * t_step, 2), "decode_s": steps * t_step}
        # prefill: a task's prompt once; each crop's turn after the context before it
        f_prefill = prompts * (prompt * linear + attend(prompt))
        for p in plan:
            at = prompt
            for turn in p[:-1]:
                at += turn
                f_prefill += observation * linear + attend(observation, at)
                at += observation
        vision = prompts * vision_flops(config.vision_config, (1, 2 * math.isqrt(a.visual_tokens),
                                                               2 * math.isqrt(a.visual_tokens)))
        vision += crops * vision_flops(config.vision_config, (1, 2 * math.isqrt(a.crop_tokens), 2 * math.isqrt(a.crop_tokens)))
        # training: every episode's tokens and attention, the lm_head on its sampled tokens; shared
        # (--pack shared, the default): a group's prompt once in each of its micro-batch chunks
        f_unshared = sum(n * linear + attend(n) for n in episode) + tokens * head
        runs = sum(len(batches.group_chunks([n - prompt for n in episode[g:g + group]], prompt, chunk_rows, chunk_tokens))
                   for g in range(0, len(episode), group))                  # prompt computations in training
        f_train = f_unshared - (len(episode) - runs) * (prompt * linear + attend(prompt))
        t_prefill = (f_prefill + vision) / (peak * a.mfu)
        t_train = train_forwards * f_train / (peak * a.mfu)
        # host: a task's original opened, resized, its patches cut and its content hashed by the rollout's
        # threads before the engine starts; a crop cut, resized, its patches cut and hashed by a thread during
        # the engine's next pass, waited for where it takes longer than that pass (or where the threads' total
        # exceeds the decode's). The main thread, which runs the engine, does none of it (engine.prepare_image)
        crop_ms = host["crop"] + host["patches_crop"] + host["key_crop"]            # a crop's thread work
        t_crops = crops * crop_ms / a.host_threads / 1000
        step_ms = out["ours (slots)"]["ms_per_step"]
        t_crop_wait = max(crops * max(0.0, crop_ms - step_ms) / 1000, t_crops - out["ours (slots)"]["decode_s"])
        t_host_img = prompts * (host["open"] + host["resize"] + host["patches_global"] + host["key_global"]) / (
            a.host_threads * 1000) + max(0.0, t_crop_wait)
        t_host_before = (prompts * (host["open"] + host["resize"] + host["processor_global"] + host["key_global"])
                         + crops * (host["crop"] + host["processor_crop"] + host["key_crop"])) / 1000
        ours = out["ours (slots)"]["decode_s"] + t_prefill + t_train + t_host_img
        barrier = out["per-turn barrier"]["decode_s"] + t_prefill + t_train + t_host_img
        roofline = (tokens / slots) * (2 * read_params + slots * context * kv_token) / hbm + (
            f_prefill + vision + train_forwards * f_train) / peak
        vllm = (tokens / (slots * 0.95)) * (2 * read_params + slots * context * kv_token) / (hbm * 0.7) + t_prefill + t_train
        rows.append({"setting": name, "sampled_tokens_per_gpu": tokens, "crops_per_gpu": crops,
                     "schedules": out, "prefill_s": round(t_prefill, 1), "train_s": round(t_train, 1),
                     "train_s_prompt_per_episode": round(train_forwards * f_unshared / (peak * a.mfu), 1),
                     "train_prompt_runs_per_group": round(runs / prompts, 2),
                     "host_images_s": round(t_host_img, 1), "host_images_s_before": round(t_host_before, 1),
                     "host_crops_threads_s": round(t_crops, 1),
                     "step_s": {"ours": round(ours), "per-turn barrier":
                                                                        round(barrier), "vLLM-like": round(vllm),
                                                                        "roofline": round(roofline)},
                     "80_steps_h": {"ours": round(80 * ours / 3600, 1), "per-turn barrier": round(80 * barrier / 3600, 1),
                                    "vLLM-like": round(80 * vllm / 3600, 1), "roofline": round(80 * roofline / 3600, 1)},
                     "largest_term": max((("decode", out["ours (slots)"]["decode_s"]), ("prefill", t_prefill),
                                          ("training", t_train), ("host images", t_host_img)), key=lambda x: x[1])[0]})
    assumptions = {"gpu": f"{a.gpu}: {peak / 1e12:g} TFLOP/s bf16, {hbm / 1e12:g} TB/s",
                   "model": f"Qwen2.5-VL-{a.config.upper()} ({n_params / 1e9:.2f}B; a decode step reads the "
                            f"{read_params / 1e9:.2f}B of the decoder and lm_head), LoRA merged for rollouts (bf16)",
                   "lengths": f"turns {a.turns[0]}-{a.turns[1]}, free text {a.lengths[0]}-{a.lengths[1]} tokens a turn "
                              f"(log-uniform), a crop of {a.crop_tokens} tokens after every turn but the last",
                   "global image": f"{a.visual_tokens} tokens + 200 of text, prefilled once a task",
                   "decode": f"max(bytes read / ({a.bandwidth_eff:g} x HBM), host dispatch of the slot engine's decode step, "
                             f"counted: {ops_layer:.0f} aten ops a layer x {c.num_hidden_layers} + {ops_step:.0f} outside "
                             f"the layers, x {a.op_us:g} us{' (CUDA graphs: 0)' if a.cuda_graphs else ''}, their GPU "
                             f"time {a.gpu_step_ms:g} ms); {a.batch} slots",
                   "prefill, vision, training": f"counted FLOPs (the decoder's matmuls, causal attention, the lm_head "
                                                f"on sampled tokens) at {a.mfu:g} MFU; training {train_forwards:g} "
                                                f"forwards a token (1, checkpoint recompute {a.ckpt_fraction:g}, "
                                                f"backward {1 if a.lora else 2}{' under LoRA' if a.lora else ''}), "
                                                f"a group's prompt once in each of its micro-batches (--pack shared: "
                                                f"at most {chunk_rows} episodes and {chunk_tokens} tokens each, "
                                                f"the one-gpu preset's)",
                   "host": (f"measured here (ms an image): a {a.original[0]}x{a.original[1]} JPEG original opened "
                            f"{host['open']:.1f}, resized to the global budget {host['resize']:.1f}, its patches "
                            f"cut {host['patches_global']:.1f} and its pixels hashed {host['key_global']:.1f} (by "
                            f"{a.host_threads} threads, before the engine starts); a crop of half its sides cut and "
                            f"resized {host['crop']:.1f}, its patches cut {host['patches_crop']:.1f} and hashed "
                            f"{host['key_crop']:.1f} (by a thread during the engine's next pass: hidden, but for what "
                            f"outlasts a decode step); patches normalised on the GPU (support/pixels.py; the image "
                            f"processor took {host['processor_global']:.1f} and {host['processor_crop']:.1f}, all "
                            f"serial: host_images_s_before)"),
                   "vLLM-like": "utilisation 0.95, decode at 0.7 of HBM bandwidth, no host overhead",
                   "roofline": "every byte and FLOP at the GPU's peak"}
    return {"mode": "estimate-time", "assumptions": assumptions, "settings": rows, **_versions("cpu")}


def format_estimate(report: dict) -> str:
    """The estimate as a table: hours for 80 steps per setting and schedule, the largest term, assumptions."""
    lines = ["| setting | ours (slots) | per-turn barrier | vLLM-like | roofline | slot utilisation (ours / barrier) | "
             "largest term |", "|---|---|---|---|---|---|---|"]
    for r in report["settings"]:
        h, s = r["80_steps_h"], r["schedules"]
        lines.append(f"| {r['setting']} | {h['ours']} h | {h['per-turn barrier']} h | {h['vLLM-like']} h | "
                     f"{h['roofline']} h | {s['ours (slots)']['slot_utilisation']} / {s['per-turn barrier']['slot_utilisation']}"
                     f" | {r['largest_term']} |")
    return "\n".join(lines + [f"- {k}: {v}" for k, v in report["assumptions"].items()])


def decode_step_ops() -> tuple[float, float]:
    """(aten ops a decoder layer, aten ops outside the layers) of one decode step of the slot engine as it
    runs (the model, the cache's writes, the attention mask, top-p sampling; merged LoRA is the plain
    model), counted (`policy.counting_ops`) over the steps of one rollout on the real-shape model with 1
    and with 2 layers (the real vocabulary from tests/fixtures/qwen2-tokenizer). On a GPU without CUDA graphs
    each is a launch (or a dispatch) by the host."""
    import os
    from PIL import Image
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))          # support/.. : the repository
    count = [0, 0]
    real = engine.SlotSession.decode

    def counted(self):
        with policy.counting_ops() as seen:
            ended = real(self)
        count[0], count[1] = count[0] + sum(seen.values()), count[1] + 1
        return ended
    per_step = []
    for layers in (1, 2):
        agent = models.real_shape_agent(os.path.join(root, "tests", "fixtures", "qwen2-tokenizer"), layers=layers)
        tasks = [lfpc.Task(Image.new("RGB", (112, 112), (k, 0, 0)), "What colour?", "red") for k in range(2)]
        cfg = lfpc.RolloutConfig(max_new_tokens=8, max_response_tokens=8, max_turns=1, global_max_pixels=112 * 112,
                                 temperature=1.0, top_p=0.9)
        count[:] = [0, 0]
        engine.SlotSession.decode = counted
        try:
            with torch.no_grad():
                lfpc.rollout(agent, tasks, 2, cfg, seed=0)
        finally:
            engine.SlotSession.decode = real
        per_step.append(count[0] / (count[1] * cfg.sync_every))                # a decode call is sync_every steps
    return per_step[1] - per_step[0], 2 * per_step[0] - per_step[1]


def host_ms(agent, original: tuple[int, int], visual_tokens: int, crop_tokens: int) -> dict[str, float]:
    """Milliseconds of the host's image work, measured here (the median of 9: this shared CPU's runs
    vary): opening an `original` (a JPEG of a smooth random image, w x h) and resizing it to `visual_tokens`; cutting a crop of half its
    sides and resizing it to `crop_tokens`; cutting the shown images into patches (support/pixels.py) and
    hashing their pixels (the engine's content key); and the image processor that did the patches before."""
    import io
    import numpy as np
    from PIL import Image
    from support import pixels
    w, h = original
    small = np.random.default_rng(0).integers(0, 255, (max(1, h // 10), max(1, w // 10), 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((w, h), Image.BICUBIC).save(buf, format="JPEG", quality=90)
    image = crop_tool.open_image(io.BytesIO(buf.getvalue()))
    shown = crop_tool.resize_to_budget(image, 3136, visual_tokens * crop_tool.TOKEN_PIXELS)
    cfg = crop_tool.CropConfig(max_pixels=crop_tokens * crop_tool.TOKEN_PIXELS)
    box = (shown.width / 4, shown.height / 4, 3 * shown.width / 4, 3 * shown.height / 4)
    crop = crop_tool.crop(image, box, shown.size, cfg).image
    ip = agent.image_processor
    work = {"open": lambda: crop_tool.open_image(io.BytesIO(buf.getvalue())),
            "resize": lambda: crop_tool.resize_to_budget(image, 3136, visual_tokens * crop_tool.TOKEN_PIXELS),
            "crop": lambda: crop_tool.crop(image, box, shown.size, cfg),
            "patches_global": lambda: pixels.patches(shown, ip.patch_size, ip.merge_size),
            "patches_crop": lambda: pixels.patches(crop, ip.patch_size, ip.merge_size),
            "key_global": lambda: engine._digest(shown),
            "key_crop": lambda: engine._digest(crop),
            "processor_global": lambda: agent.encode_image(shown),
            "processor_crop": lambda: agent.encode_image(crop)}
    out = {}
    for name, fn in work.items():
        fn()
        times = []
        for _ in range(9):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = sorted(times)[len(times) // 2] * 1000           # the median
    return out


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.estimate_memory:
        from support import memory
        shape = memory.StepShape(config=a.config, lora=a.lora, visual_tokens=a.visual_tokens,
                                 response_tokens=a.response_tokens, crops=a.crops, crop_tokens=a.crop_tokens,
                                 rollout_rows=a.rollout_rows, group=a.group, train_tokens=a.train_tokens,
                                 prefill_tokens=a.prefill_tokens,
                                 logprob_chunk=a.logprob_chunk, world=a.world, ckpt_fraction=a.ckpt_fraction)
        if a.ckpt_sweep:
            report = memory.ckpt_sweep(shape)
            print(json.dumps(report, indent=1))
            print(memory.format_sweep(report))
            return report
        t0 = time.perf_counter()
        report = {"mode": "estimate-memory", **memory.estimate(shape), "seconds": round(time.perf_counter() - t0, 1),
                  **_versions("cpu")}
        print(json.dumps(report, indent=1))
        print(memory.format_report(report))
        return report
    if a.estimate_time:
        report = estimate_time(a)
        print(json.dumps(report, indent=1))
        print(format_estimate(report))
        return report
    report = schedule_bench(a) if a.schedule_bench else config_step(a) if a.config else toy_step(a)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()

"""Time one stage-1 GRPO step, phase by phase, and print JSON.

    python bench.py                               # toy: the shipped base, 8 prompts x 8 rollouts, CPU
    python bench.py --model PATH --prompts 8 --group 8 --repeat 3
    python bench.py --config 7b --batch 64 --lora 64           # one GPU: random-weight Qwen2.5-VL-7B
    python bench.py --config 3b --batch 64                     # 3B, full fine-tuning, fp32 master weights
    python bench.py --config tiny --batch 4 --visual-tokens 16 --prompt-tokens 40 --response-tokens 8
    python bench.py --config 7b --estimate-memory --lora 64 --response-tokens 2048 --group 16   # CPU, no GPU

Memory mode (--estimate-memory) prints the peak memory of one stage-1 step of the real config by kind,
estimated on a CPU without allocating the weights (memory.py: fake tensors and torch's MemTracker).

Toy mode (no --config) times what train.py does: rollouts (multi-turn sampling with crops), rewards
and advantages, the log-prob recompute with backward in micro-batches, the optimizer step.

Config mode (--config tiny|3b|7b) builds the model from the published config numbers with random
weights (`CONFIGS`; nothing is downloaded) and times a SYNTHETIC stage-1 step: `--batch` episodes,
each a prompt of `--prompt-tokens` tokens of which `--visual-tokens` are one random image, sampled
for exactly `--response-tokens` tokens (a random model never stops or calls the tool, so the turn
length is fixed: the crop turns' images are not in it), then the log-prob recompute, backward and
AdamW step of train.py (`policy.load_model`'s settings: fp32 master weights with bf16 autocast on GPU;
`--lora R`: a bf16 base with fp32 adapters via peft; gradient checkpointing on; fused AdamW on GPU). Reported:
- decode_ms_per_step = (time of N tokens - time of 1 token) / (N - 1), from two timed sampling runs;
- rollout_tokens_per_s = batch x N / (time of N tokens), prefill included;
- train_tflops and mfu: model FLOPs of the log-prob forward + backward (`model_flops`: 3 x the
  forward's matmul and attention FLOPs, the recompute of checkpointing not counted) over the
  measured time, against --peak-tflops;
- peak_memory_gb (GPU: torch.cuda.max_memory_allocated), the phase shares, the versions.
Numbers measured with it live in README.md with the machine, command and date.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch

import engine
import grpo
import lfpc
import memory
import models
import policy
import presets


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", default="", choices=["", "tiny", "3b", "7b"],
                   help="random-weight model of this size (synthetic step); empty: the toy step on --model")
    p.add_argument("--model", default=presets.TOY["model"], help="toy mode: checkpoint folder")
    p.add_argument("--prompts", type=int, default=8, help="toy mode: tasks per step")
    p.add_argument("--group", type=int, default=8, help="toy mode: rollouts per task")
    p.add_argument("--budget", type=int, default=16, help="toy mode: global-image budget, visual tokens")
    p.add_argument("--micro-batch", type=int, default=0, help="episodes per forward/backward (0: toy 16, config 4)")
    p.add_argument("--repeat", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--batch", type=int, default=64, help="config mode: episodes per step")
    p.add_argument("--prompt-tokens", type=int, default=1127, help="config mode: prompt length, visual tokens included")
    p.add_argument("--visual-tokens", type=int, default=1024, help="config mode: visual tokens of the image (a square)")
    p.add_argument("--response-tokens", type=int, default=512, help="config mode: sampled tokens per episode")
    p.add_argument("--decode", default="dynamic", choices=["dynamic", "static"], help="KV cache while sampling")
    p.add_argument("--engine", default="cached", choices=list(lfpc.ENGINES),
                   help="toy mode: rollout engine (cached: KV cache across turns; reference: re-prefill each turn)")
    p.add_argument("--lora", type=int, default=0, help="config mode: LoRA rank (needs peft); 0: full fine-tuning")
    p.add_argument("--estimate-memory", action="store_true",
                   help="config mode, CPU, no weights allocated: peak memory of one stage-1 step by kind (memory.py)")
    p.add_argument("--rollout-rows", type=int, default=16, help="estimate: episodes sharing one rollout chunk's KV cache")
    p.add_argument("--train-tokens", type=int, default=16384, help="estimate: padded tokens per training micro-batch")
    p.add_argument("--crops", type=int, default=4, help="estimate: crops an episode may hold (max_turns - 1)")
    p.add_argument("--crop-tokens", type=int, default=1280, help="estimate: visual tokens of a crop")
    p.add_argument("--logprob-chunk", type=int, default=1024, help="estimate: lm_head rows at a time")
    p.add_argument("--world", type=int, default=1, help="estimate: ranks under torchrun (full fine-tuning shards)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the GPU's dense bf16 peak for MFU (H100 SXM datasheet: 989)")
    p.add_argument("--device", default="", help='"" = cuda if available else cpu')
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = p.parse_args(argv)
    for name in ("prompts", "group", "budget", "repeat", "batch", "prompt_tokens", "visual_tokens", "response_tokens",
                 "rollout_rows", "train_tokens", "crop_tokens", "logprob_chunk", "world"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    for name in ("micro_batch", "lora", "crops", "threads"):
        if getattr(a, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(a, name)}")
    if not a.peak_tflops > 0:
        p.error(f"--peak-tflops must be > 0, got {a.peak_tflops}")
    a.micro_batch = a.micro_batch or (4 if a.config else 16)
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not a.estimate_memory and (why := policy.device_problem(a.device)):
        p.error(why)
    if a.estimate_memory and not a.config:
        p.error("--estimate-memory needs --config 7b, 3b or tiny")
    if a.config in ("3b", "7b") and not a.device.startswith("cuda") and not a.estimate_memory:
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


def model_flops(config, seq_lens: list[int], response_tokens: int, grids: list[tuple[int, int, int]],
                backward: bool = True) -> int:
    """Model FLOPs of `token_logprobs` on sequences of `seq_lens` tokens (no padding counted) with
    `response_tokens` lm_head positions in all, and images of `grids`: the decoder's matmuls, its
    attention as full T x T squares (what SDPA computes under a mask), the lm_head only where the loss
    needs it, the vision tower on `grids` (the DISTINCT images: shared ones run once). backward=True:
    x 3 (backward = 2 x forward), recompute not counted."""
    c = config.get_text_config()
    hd = c.hidden_size // c.num_attention_heads
    f = sum(T * c.num_hidden_layers * _linear_flops_per_token(c) for T in seq_lens)
    f += sum(4 * T * T * c.num_attention_heads * hd * c.num_hidden_layers for T in seq_lens)
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


def config_step(a) -> dict:
    dev = a.device
    agent = models.random_agent(a.config, dev, policy.base_dtype(a))   # train.py's: a bf16 base under LoRA
    if a.lora:
        agent = policy.apply_lora(agent, a.lora)
    if a.config != "tiny":
        policy.enable_grad_ckpt(agent)
    agent.stop_ids, agent.stop_strings = set(), ()               # fixed-length turns
    params = [q for q in agent.model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, fused=dev.startswith("cuda"))
    cfg = lfpc.RolloutConfig(temperature=1.0, decode=a.decode, batch_size=a.batch)
    autocast = policy.precision(agent)                             # train.py's precision, rollouts included
    N = a.response_tokens
    steps = []
    for i in range(a.repeat + 1):
        if dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        eps = synthetic_episodes(agent, a)
        agent.model.eval()
        with autocast:
            _sync(dev); t0 = time.perf_counter()
            engine.sample_turn(agent, eps, [1] * len(eps), cfg)
            _sync(dev); t1 = time.perf_counter()
            turns = engine.sample_turn(agent, eps, [N] * len(eps), cfg)
            _sync(dev); t2 = time.perf_counter()
        for e, (toks, lps, _) in zip(eps, turns):
            e.append(toks, lps)
        agent.model.train()
        opt.zero_grad(set_to_none=True)
        n_tok = sum(e.num_generated for e in eps)
        t_fwd = 0.0
        _sync(dev); t3 = time.perf_counter()
        for k in range(0, len(eps), a.micro_batch):
            batch = engine.collate(agent, eps[k:k + a.micro_batch])
            _sync(dev); tf = time.perf_counter()
            with autocast:
                lp = lfpc.token_logprobs(agent.model, batch)                           # [b, T]
            _sync(dev); t_fwd += time.perf_counter() - tf
            adv = torch.randn(lp.shape[0], device=lp.device)                           # [b]: any advantages
            loss, _ = grpo.policy_loss(lp, batch.old_logprobs, adv, batch.loss_mask, num_tokens=n_tok,
                                       num_seqs=len(eps))
            loss.backward()
        opt.step()
        _sync(dev); t4 = time.perf_counter()
        if i == 0:
            continue                                             # warm-up: allocator, kernels, caches
        grids = list({id(im): g for e in eps for im, g in zip(e.images, e.grids)}.values())   # distinct images
        flops = model_flops(agent.model.config, [len(e.token_ids) for e in eps], n_tok, grids)
        total = (t2 - t1) + (t4 - t3)                       # the 1-token run only times the prefill
        steps.append({"total_s": total, "rollout_s": t2 - t1, "logprob_forward_s": t_fwd,
                      "backward_and_optimizer_s": (t4 - t3) - t_fwd,
                      "decode_ms_per_step": 1000 * ((t2 - t1) - (t1 - t0)) / (N - 1),
                      "rollout_tokens_per_s": len(eps) * N / (t2 - t1), "train_tflops": flops / (t4 - t3) / 1e12,
                      "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if dev.startswith("cuda") else None})
    mean = {k: (sum(s[k] for s in steps) / len(steps) if steps[0][k] is not None else None) for k in steps[0]}
    n_params = sum(q.numel() for q in agent.model.parameters())
    return {"mode": "config", "args": vars(a), "parameters": n_params, "prompt_tokens": len(eps[0].token_ids) - N,
            "trainable": sum(q.numel() for q in params),
            "decode_ms_per_step": round(mean["decode_ms_per_step"], 3),
            "rollout_tokens_per_s": round(mean["rollout_tokens_per_s"], 1),
            "train_tflops": round(mean["train_tflops"], 4),
            "mfu": round(mean["train_tflops"] / a.peak_tflops, 4),
            "peak_memory_gb": None if mean["peak_memory_gb"] is None else round(mean["peak_memory_gb"], 2),
            "step_s": round(mean["total_s"], 3),
            "share": {k: round(mean[k + "_s"] / mean["total_s"], 3)
                      for k in ("rollout", "logprob_forward", "backward_and_optimizer")},
            "steps": steps, **_versions(dev)}


def _versions(dev: str) -> dict:
    import transformers
    return {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "device": torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu",
            "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d")}


# ----------------------------------------------------------------------------- toy mode

def toy_step(a) -> dict:
    """train.py's step, timed as its two calls: `collect_episodes` (rollout + rewards) and
    `update_policy` (log-prob forwards, backward, optimizer; it times its forwards itself)."""
    import train
    args = train.parse_args(["--preset", "toy", "--model", a.model, "--prompts", str(a.prompts), "--group", str(a.group),
                             "--micro-batch", str(a.micro_batch), "--global-image", "full",
                             "--full-tokens", str(a.budget), "--device", "cpu"])
    agent = policy.load_model(args)
    cfg = presets.rollout_config(args, a.budget, decode=a.decode, batch_size=args.rollout_batch,
                                 batch_tokens=args.rollout_tokens, engine=a.engine)
    tasks = train.load_data(args, agent)
    opt = torch.optim.AdamW([q for q in agent.model.parameters() if q.requires_grad], lr=args.lr)
    steps = []
    for i in range(a.repeat + 1):
        batch = tasks[i * a.prompts:(i + 1) * a.prompts]
        t0 = time.perf_counter()
        episodes, work = train.collect_episodes(args, agent, batch, cfg, step=i)
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
                          **work.metrics()})
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


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.estimate_memory:
        import memory
        shape = memory.StepShape(config=a.config, lora=a.lora, visual_tokens=a.visual_tokens,
                                 response_tokens=a.response_tokens, crops=a.crops, crop_tokens=a.crop_tokens,
                                 rollout_rows=a.rollout_rows, group=a.group, train_tokens=a.train_tokens,
                                 logprob_chunk=a.logprob_chunk, world=a.world)
        t0 = time.perf_counter()
        report = {"mode": "estimate-memory", **memory.estimate(shape), "seconds": round(time.perf_counter() - t0, 1),
                  **_versions("cpu")}
        print(json.dumps(report, indent=1))
        print(memory.format_report(report))
        return report
    report = config_step(a) if a.config else toy_step(a)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()

"""Where a config-mode step's time goes: the decode step's host time against its kernels' time, the
training micro-batch's kernels, and the training throughput at several micro-batch sizes. Prints JSON.

    python -m support.profile_step --config 7b --lora 64          # a GPU: random-weight Qwen2.5-VL-7B
    python -m support.profile_step --config tiny --lora 4 --response-tokens 16 --rows 4   # CPU: the same path

support/bench.py measures a step's phases; this says why they take what they take, for the GPU runs
of .ci/gpu_profile (never CI: CI has no GPU):
- decode: wall ms a decode step (one rollout of N tokens minus one of 1 token) for each of --decode-rows,
  and for `--rows` rows under torch.profiler, with from that run the kernels' (device) time a step and the kernel
  launches a step. Kernel time far under wall time: the step is bound by the host's dispatch, not the GPU.
- launch: the host's microseconds to launch one small kernel eagerly (a lower bound of bench.py's --op-us,
  which is a decode step's host time over its counted ops);
- training: one micro-batch's forward + backward under torch.profiler: device time against wall time
  and the kernels that take most of it (which attention kernel runs, how much is elementwise work);
- micro-batch sweep: training tokens/s of forward + backward for episodes per micro-batch in --sweep
  (the one-gpu preset's 8, bench.py's under --lora, among them by default).
The model, adapters, checkpointing, precision, micro-batch layout and (under LoRA) the rollout's image
features taken by the training forward are bench.py's config mode, which are train.py's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import crop_tool
import grpo
import lfpc
from support import batches, bench, cli, engine, policy, presets


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m support.profile_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", choices=["tiny", "3b", "7b"], help="random-weight model of this size")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--rows", type=int, default=16, help="episodes rolled out (decode rows; the training sweep's pool)")
    p.add_argument("--prompt-tokens", type=int, default=1127, help="prompt length, visual tokens included")
    p.add_argument("--visual-tokens", type=int, default=1024, help="visual tokens of the prompt's image (a square)")
    p.add_argument("--response-tokens", type=int, default=512, help="sampled tokens an episode")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens of the timed decode runs")
    p.add_argument("--decode-rows", type=int, nargs="+", default=[4, 16, 64], help="rows of the timed decode runs")
    p.add_argument("--sweep", type=int, nargs="+", default=[4, 8, 16], help="episodes per training micro-batch")
    p.add_argument("--top", type=int, default=15, help="kernels listed")
    p.add_argument("--device", default="", help='"" = cuda if available else cpu')
    a = p.parse_args(argv)
    cli.refuse(p, cli.at_least(a, ("rows", "prompt_tokens", "visual_tokens", "response_tokens", "top"))
               + cli.at_least(a, ("decode_tokens",), low=2) + cli.at_least(a, ("lora",), low=0)
               + [f"--decode-rows and --sweep take counts of at least 1, got {a.decode_rows} and {a.sweep}"]
               * (min(a.decode_rows + a.sweep) < 1))
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.config != "tiny" and not a.device.startswith("cuda"):
        p.error(f"--config {a.config} needs a GPU; --config tiny runs the same path on a CPU")
    if max(a.sweep) > a.rows:
        p.error(f"--sweep {max(a.sweep)} is more episodes than --rows {a.rows} rolls out")
    # bench.py's config-mode settings this path reads
    a.batch, a.decode, a.sync_every, a.prefill_tokens, a.pack = a.rows, "dynamic", 1, lfpc.RolloutConfig.prefill_tokens, "auto"
    a.ckpt_fraction = presets.ONE_GPU["ckpt_fraction"] if a.lora else 1.0         # bench.py's default, one rank
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    dev, cuda = a.device, a.device.startswith("cuda")
    agent = bench.config_agent(a)
    tasks = bench.synthetic_tasks(agent, a)
    autocast = policy.precision(agent)
    cfg = lambda n, rows: lfpc.RolloutConfig(global_max_pixels=a.visual_tokens * crop_tool.TOKEN_PIXELS,
                                             use_tool=False, temperature=1.0,
                                             batch_size=rows, max_turns=1, max_new_tokens=n, max_response_tokens=n)
    report = {"args": vars(a), **bench._versions(dev)}

    def timed(fn):
        bench._sync(dev); t = time.perf_counter(); out = fn(); bench._sync(dev)
        return time.perf_counter() - t, out

    # ---- decode: wall ms a step, then the same under the profiler with its kernels' time
    agent.model.eval()
    with autocast, policy.sampler(agent) as sampler:
        run = lambda n, rows, seed=0: lfpc.rollout(sampler, tasks, rows, cfg(n, rows), seed=seed)
        run(2, a.rows)                                              # warm-up
        decode = {}
        for rows in a.decode_rows:
            t1, _ = timed(lambda: run(1, rows))
            tn, _ = timed(lambda: run(a.decode_tokens, rows))
            decode[f"wall_ms_per_step_{rows}_rows"] = round(1000 * (tn - t1) / (a.decode_tokens - 1), 2)
        t1, _ = timed(lambda: run(1, a.rows))
        with _profiler(cuda) as prof:
            tn, _ = timed(lambda: run(a.decode_tokens, a.rows))
        decode["profiled_wall_ms_per_step"] = round(1000 * (tn - t1) / (a.decode_tokens - 1), 2)
        k = _kernels(prof, cuda, a.top)
        decode["device_ms_per_step"] = round(k["device_ms"] / a.decode_tokens, 3)      # prefill of 1 token included
        decode["kernel_launches_per_step"] = round(k["launches"] / a.decode_tokens, 1)
        decode["top_kernels"] = k["top"]
        report["decode"] = decode
        print(json.dumps({"decode": {x: y for x, y in decode.items() if x != "top_kernels"}}), file=sys.stderr, flush=True)
        store = engine.FeatureStore() if policy.vision_frozen(agent) else None      # train.py's: LoRA reuses
        _, eps = timed(lambda: lfpc.rollout(sampler, tasks, a.rows, cfg(a.response_tokens, a.rows), seed=1,
                                            store=store))                             # the rollout's features

    report["launch_us_per_op"] = _launch_us(dev)

    # ---- training: one micro-batch profiled, then the sweep
    agent.model.train()
    import train
    mode = train.pack_mode(a, agent.model)
    n_tok = sum(e.num_generated for e in eps)

    def fwd_bwd(idx):
        batch = batches.collate(agent, [eps[j] for j in idx], store=store, packed=mode != "off",
                                share_prompt=mode == "shared")
        with autocast:
            lp = batch.unpacked(lfpc.token_logprobs(agent.model, batch))              # [b, T]
        adv = torch.randn(lp.shape[0], device=lp.device)                               # [b]
        loss, _ = grpo.policy_loss(lp, batch.unpacked(batch.sampling_logprobs), adv, batch.unpacked(batch.loss_mask),
                                   num_tokens=n_tok, num_seqs=len(eps))
        loss.backward()
        return sum(len(eps[j].token_ids) for j in idx), batch.input_ids.numel(), batch.image_encodes

    first = list(range(min(a.sweep)))
    fwd_bwd(first)                                                  # warm-up
    with _profiler(cuda) as prof:
        wall, (tokens, computed, encodes) = timed(lambda: fwd_bwd(first))
    k = _kernels(prof, cuda, a.top)
    report["training_micro_batch"] = {"episodes": len(first), "mode": mode, "episode_tokens": tokens,
                                      "computed_tokens": computed, "image_encodes": encodes,
                                      "profiled_wall_s": round(wall, 3),
                                      "device_s": round(k["device_ms"] / 1000, 3), "kernel_launches": k["launches"],
                                      "top_kernels": k["top"]}
    print(json.dumps({"training_micro_batch": {x: y for x, y in report["training_micro_batch"].items()
                                                if x != "top_kernels"}}), file=sys.stderr, flush=True)
    sweep = {}
    for m in a.sweep:
        wall, (tokens, computed, _) = timed(lambda: fwd_bwd(list(range(m))))
        sweep[m] = {"wall_s": round(wall, 3), "episode_tokens_per_s": round(tokens / wall), "computed_tokens": computed}
        print(json.dumps({"sweep": {m: sweep[m]}}), file=sys.stderr, flush=True)
    report["micro_batch_sweep"] = sweep
    agent.model.zero_grad(set_to_none=True)
    report["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
    return report


def _launch_us(dev: str, n: int = 20000) -> float:
    """Host microseconds an eager aten op takes to dispatch and launch: n adds of a tiny tensor, timed to the
    last one's end (the GPU finishes each long before the host issues the next)."""
    x = torch.zeros(8, device=dev)
    for _ in range(100):
        x.add_(1)
    bench._sync(dev)
    t = time.perf_counter()
    for _ in range(n):
        x.add_(1)
    bench._sync(dev)
    return round(1e6 * (time.perf_counter() - t) / n, 2)


def _profiler(cuda: bool):
    from torch.profiler import ProfilerActivity, profile
    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))


def _kernels(prof, cuda: bool, top: int) -> dict:
    """Device time and launches of the profiled region (on a CPU: the aten ops' own CPU time) and the
    `top` entries by it, each as [name, ms, calls]."""
    if cuda:
        from torch.autograd import DeviceType
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    else:
        kernels = [e for e in prof.events() if e.name.startswith("aten::")]
    own = lambda e: (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1000       # ms
    by_name: dict[str, list] = {}
    for e in kernels:
        s = by_name.setdefault(e.name[:90], [0.0, 0])
        s[0] += own(e); s[1] += 1
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {"device_ms": sum(own(e) for e in kernels), "launches": len(kernels),
            "top": [[n, round(ms, 2), c] for n, (ms, c) in ranked]}


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))

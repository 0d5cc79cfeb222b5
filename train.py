"""LFPC training: stage 1 (information gap) and stage 2 (grounding), hand-written GRPO.

    python train.py --stage 1            # toy preset: the shipped base on the toy world, CPU, minutes
    python train.py --stage 2            # toy: continues from runs/stage1/ckpt with the grounding reward
    python train.py --stage 1 --preset one-gpu --data train.jsonl        # 7B, LoRA r64, one 80 GB GPU
    python train.py --stage 1 --preset paper --data train.jsonl          # the paper's set-up (needs 8 x A100)
    python train.py --stage 1 --resume   # continue the run in --out exactly where it stopped

Each step: sample `prompts` tasks, roll out `group` episodes each (multi-turn, crop tool),
reward them, group-normalise the advantages, and take ONE optimizer step on the clipped token
loss, in micro-batches whose losses are divided by the token count of the whole step.
`--preset` (support/presets.py) fills every flag left unset; flags always win.

Stage 1 shows each task's global image at its information-gap budget (`info_gap.py`: the highest
budget at which the model's direct answer stops agreeing with its full-resolution answer; probed
once and cached); crops always come from the original. `--global-image full` shows the full image
instead: the DeepEyes-style baseline. Stage 2 adds LFPC's grounding reward on tasks with nested
boxes, paid on the FIRST successful crop's box (`rewards.stage2_reward`, `--stage2-mode`).

Metrics (one line a step in <out>/metrics.jsonl; names and populations in support/metrics.py): the
episode metrics (acc, tool/*, box/*, format/*, stop/*, len/*), reward/mean and reward/<part>,
adv/frac_zero_std, loss/policy (the summed clipped loss: ~0 by construction, watch the reward),
loss/clip_frac, loss/ratio_mean, loss/approx_kl, loss/grad_norm, loss/trained_episodes, loss/sampler_gap; work/* (the
rollout engine's image encodes, vision patches, prefill and decode tokens, distinct context tokens,
prefill ratio) and time/* (rollout, log-prob forwards, update, step, in seconds).

Departures from the paper, on purpose:
- One GRPO update per batch (the paper's mini-batch count is unpublished), so the "old" policy is the
  current one: old log-probs are the training forward's own, detached (the ratio is exactly 1 and
  clipping never fires). The rollout's log-probs (KV cache, another batch shape, bf16 sampling) never
  enter the update; their distance to the training forward's is logged as loss/sampler_gap (mean
  |log p_train - log p_sample| over sampled tokens), a check that sampler and trainer see one policy.
- Token-mean aggregation over the whole step (DeepEyes); no KL (beta 0, no reference model
  loaded) and no entropy term, as the paper. Advantages (r - mean) / (sample std + 1e-6) (verl).
- Episodes whose advantage is 0 (all-equal groups) are not forwarded: their gradient is exactly 0,
  but their tokens still count in the step's token total, so the gradient is unchanged.
- Binary search over a resolution ladder instead of the paper's level-by-level scan.
- Toy preset: lr 1e-4 (2e-5 left the toy flat over 60 steps), 8 prompts x 8 rollouts, 60 steps,
  fp32 on CPU. Paper preset: lr 1e-6, 256 x 16 (paper), gradient checkpointing, bf16 autocast over
  fp32 master weights. One-gpu preset: LoRA r64 (alpha 128) on the language model's projections, the
  frozen base in bf16, the adapters and their AdamW state in fp32.
- Precision: rollouts, the info-gap prober and the training forward all run under the same
  `precision` (bf16 autocast on a GPU), so the policy that samples is the policy that is trained.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace

import torch

import crop_tool
import grpo
import info_gap
import lfpc
import rewards
from support import checkpoint, data, dist, engine, metrics, policy, presets, prompts
from support import judge as judge_lib
from support.judge import Judge, RuleJudge, make_judge


def arg(default, help: str):
    """A dataclass field whose help text becomes the --flag's help."""
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    stage: int = arg(1, '1: information gap; 2: + grounding reward')
    preset: str = arg("toy", 'named settings for every flag left unset: ' + " | ".join(presets.NAMES))
    model: str | None = arg(None, 'checkpoint to start from (preset; stage 2: runs/stage1/ckpt)')
    data: str | None = arg(None, 'JSONL tasks (data.load_tasks); the toy preset generates its own without it')
    out: str | None = arg(None, 'run folder (default runs/stage<N>)')
    resume: bool = arg(False, 'continue the run in --out (model, optimizer, step, data position)')
    global_image: str = arg("info-gap", '"info-gap": per-task budget from info_gap.py; "full": --full-tokens for all')
    full_tokens: int | None = arg(None, 'full global budget, visual tokens (preset: toy 64, paper 16384)')
    floor_tokens: int | None = arg(None, 'lowest rung of the info-gap ladder, visual tokens (preset: toy 16, paper 256)')
    probe_k: int = arg(4, 'info-gap: sampled answers per probe')
    probe_max_new_tokens: int | None = arg(None, 'info-gap: tokens sampled per direct answer (preset)')
    gap_cache: str | None = arg(None, 'info-gap cache JSONL (default <out>/info_gap_cache.jsonl)')
    steps: int | None = arg(None, 'optimizer steps (preset)')
    prompts: int | None = arg(None, 'tasks per step (preset)')
    group: int | None = arg(None, 'rollouts per task, the GRPO group (preset)')
    lr: float | None = arg(None, 'AdamW learning rate (preset: toy 1e-4, paper 1e-6)')
    micro_batch: int | None = arg(None, 'episodes per forward/backward, at most (preset)')
    train_tokens: int | None = arg(None, 'padded tokens per forward/backward, at most (preset; one-gpu from support/memory.py)')
    rollout_batch: int | None = arg(None, 'episodes sampled together, at most (preset)')
    rollout_tokens: int | None = arg(None, 'KV-cache tokens of one rollout chunk, at most: episodes x the bound '
                                            'of their length (preset; one-gpu from support/memory.py)')
    temperature: float = arg(1.0, 'sampling temperature of the rollouts')
    prompt: str | None = arg(None, 'how turns are written (support/prompts.py): qwen or deepeyes (default: the model\'s own)')
    judge: str = arg("rule", 'who decides a right answer (rewards, votes, metrics): rule or llm (support/judge.py)')
    judge_url: str | None = arg(None, '--judge llm: OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000')
    judge_model: str | None = arg(None, '--judge llm: the served model\'s name')
    judge_cache: str | None = arg(None, '--judge llm: JSONL cache of verdicts (default <out>/judge_cache.jsonl)')
    judge_timeout: float = arg(10.0, '--judge llm: seconds a request may take before it counts as failed (an API key '
                                     'goes in the environment variable LFPC_JUDGE_API_KEY, never in a flag)')
    engine: str = arg("cached", 'rollout engine: "cached" (slots of one KV cache, continuous batching) or "reference" '
                                '(re-prefill each turn)')
    sync_every: int = arg(1, 'cached engine: decode steps between two host syncs (a GPU may gain from 4-8; a turn '
                             'that ends inside the window costs its remaining steps)')
    max_turns: int | None = arg(None, 'assistant turns per episode (preset; 5 as DeepEyes)')
    max_new_tokens: int | None = arg(None, 'sampled tokens per turn (preset)')
    max_response_tokens: int | None = arg(None, 'sampled tokens per episode (preset; paper 2048)')
    min_tokens: int | None = arg(None, 'smallest global image, visual tokens (preset)')
    resample: str | None = arg(None, 'how the global image is downsampled: bicubic (Qwen) or box (preset)')
    crop_max_tokens: int | None = arg(None, 'crop budget, visual tokens: bigger regions are downsampled (preset)')
    crop_min_tokens: int | None = arg(None, 'smallest crop, visual tokens (preset)')
    crop_snap: int | None = arg(None, 'grow each cut region to multiples of this many px, 0: off (preset; toy 28)')
    crop_resample: str | None = arg(None, 'how a crop over budget is downsampled: bicubic or box (preset)')
    clip: float = arg(0.2, 'PPO clip range (inert with one update per batch: the ratio is exactly 1; kept for forks '
                           'that take several updates)')
    top_p: float = arg(1.0, 'nucleus sampling of the rollouts, 1: off (the log-probs stay untruncated, as verl)')
    decode: str = arg("dynamic", 'attention while decoding: "dynamic" (the used length) or "static" (the whole '
                                 'capacity: the same shapes every step, for CUDA graphs or torch.compile)')
    agg: str = arg("token-mean", '"token-mean" (DeepEyes) or "seq-mean" (original GRPO)')
    beta: float = arg(0.0, 'k3 KL weight; 0 loads no reference model (paper: no KL)')
    w_acc: float = arg(0.8, 'reward weight of accuracy (DeepEyes 0.8)')
    w_format: float = arg(0.2, 'reward weight of format, -1 on a malformed turn (DeepEyes 0.2)')
    w_tool: float = arg(1.2, 'reward weight of the tool bonus: right answer and >= 1 crop (DeepEyes 1.2)')
    w_geo: float = arg(1.0, 'reward weight of r_geo (stage 2)')
    stage2_mode: str = arg("add", 'stage 2: "add" (outcome + geo) or "geo_only"')
    tau: float = arg(0.9, 'stage 2 coverage gate on B1')
    omega: float = arg(0.5, 'stage 2: weight of IoU vs L1 (unpublished)')
    n_train: int | None = arg(None, 'generated training tasks, presets without --data (toy: 1024)')
    lora: int | None = arg(None, 'LoRA rank, 0: full fine-tuning (preset; one-gpu 64; peft)')
    grad_ckpt: bool | None = arg(None, 'gradient checkpointing (preset; paper: on)')
    ckpt_fraction: float | None = arg(None, 'with --grad-ckpt: the fraction of decoder layers checkpointed, evenly '
                                            'spread (1: all, the least memory; a layer left out keeps its '
                                            'activations and saves its recompute). Preset: measured by `support/bench.py '
                                            '--estimate-memory --ckpt-sweep` (README)')
    pack: str = arg("auto", 'training micro-batches: "on" packs each into one padding-free row (engine.collate('
                            'packed=True)), "off" right-pads them, "auto" packs when the attention has a varlen path '
                            '(flash_attention_2; SDPA builds a block mask of the whole row: 2.4x slower on the toy)')
    device: str | None = arg(None, 'torch device (default: cuda if available, else cpu)')
    save_every: int = arg(20, 'steps between checkpoints (and at the end)')
    seed: int = arg(0, 'data order, sampling, init')


def parse_args(argv=None) -> Args:
    p = _parser()
    a = Args(**vars(p.parse_args(argv)))
    if a.preset not in presets.NAMES:
        p.error(f"--preset must be one of {', '.join(presets.NAMES)}, got {a.preset!r}")
    if a.stage == 2 and a.model is None:
        a.model = "runs/stage1/ckpt"                      # stage 2 continues stage 1's run
    ckpt_fraction_given = a.ckpt_fraction is not None
    presets.fill(a, a.preset)
    if ckpt_fraction_given and not a.grad_ckpt:
        p.error(f"--ckpt-fraction needs gradient checkpointing, which is off (preset {a.preset}"
                f"{' or --no-grad-ckpt' if a.preset != 'toy' else ''}): add --grad-ckpt")
    if a.out is not None and not a.out.strip():
        p.error("--out is empty: pass a folder (default runs/stage<N>)")
    a.out = a.out or f"runs/stage{a.stage}"
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for why in check_ranges(a):
        p.error(why)
    if a.resume:
        return a                                         # the run's own settings come from its checkpoint
    if not a.data and presets.get(a.preset)["tasks"] is None:
        p.error(f"--preset {a.preset} trains on your data: pass --data (JSONL, data.load_tasks)")
    if (why := lfpc.model_problem(a.model)):
        p.error(why + (" (run `python train.py --stage 1` first)" if a.stage == 2 else ""))
    if (why := presets.check_model(a.preset, a.model)):
        p.error(why)
    return a


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    for f in fields(Args):
        flag, help_text = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type == "bool":
            p.add_argument(flag, action="store_true", help=help_text)
        elif f.type == "bool | None":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type.split(" |")[0]]
            p.add_argument(flag, type=kind, default=f.default, help=help_text)
    return p


def given_flags(argv) -> set[str]:
    """The Args fields the command line set explicitly."""
    p = _parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def check_ranges(a: Args) -> list[str]:
    """One line per flag out of its range (checked before any work)."""
    bad = []

    def need(ok: bool, why: str):
        if not ok:
            bad.append(why)
    need(a.stage in (1, 2), f"--stage is 1 or 2, got {a.stage}")
    need(a.global_image in ("info-gap", "full"), f"--global-image is info-gap or full, got {a.global_image!r}")
    need(a.agg in grpo.AGGREGATIONS, f"--agg is one of {', '.join(grpo.AGGREGATIONS)}, got {a.agg!r}")
    need(a.engine in lfpc.ENGINES, f"--engine is one of {', '.join(lfpc.ENGINES)}, got {a.engine!r}")
    need(a.prompt is None or a.prompt in prompts.STYLES, f"--prompt is one of {', '.join(prompts.STYLES)}")
    need(a.judge in ("rule", "llm"), f"--judge is rule or llm, got {a.judge!r}")
    need(a.judge != "llm" or bool(a.judge_url and a.judge_model), "--judge llm needs --judge-url and --judge-model")
    need(a.judge_url is None or judge_lib.url_problem(a.judge_url) is None, str(judge_lib.url_problem(a.judge_url or "")))
    need(0 < a.judge_timeout <= 600, f"--judge-timeout lies in (0, 600] seconds, got {a.judge_timeout}")
    need(a.stage2_mode in rewards.MODES, f"--stage2-mode is one of {', '.join(rewards.MODES)}, got {a.stage2_mode!r}")
    for name in ("resample", "crop_resample"):
        need(getattr(a, name) in crop_tool.RESAMPLE, f"--{name.replace('_', '-')} is bicubic or box")
    for name in ("steps", "prompts", "micro_batch", "train_tokens", "rollout_batch", "rollout_tokens", "max_turns",
                 "max_new_tokens", "max_response_tokens", "full_tokens", "floor_tokens", "probe_k",
                 "probe_max_new_tokens", "min_tokens", "crop_max_tokens", "crop_min_tokens", "save_every"):
        v = getattr(a, name)
        need(v is None or v >= 1, f"--{name.replace('_', '-')} must be at least 1, got {v}")
    need(a.group is None or a.group >= 2, f"--group must be at least 2 (GRPO learns from differences within a "
                                          f"group; one rollout has none), got {a.group}")
    need(a.n_train is None or a.n_train >= 1, f"--n-train must be at least 1, got {a.n_train}")
    need(a.lora is None or a.lora >= 0, f"--lora is a rank >= 0 (0: full fine-tuning), got {a.lora}")
    need(a.crop_snap is None or a.crop_snap >= 0, f"--crop-snap must be >= 0 (0: off), got {a.crop_snap}")
    need(a.lr is None or 0 < a.lr <= MAX_LR, f"--lr must lie in (0, {MAX_LR:g}] (paper 1e-6, toy 1e-4), got {a.lr:g}")
    need(a.temperature > 0, f"--temperature must be > 0 for RL rollouts (0 makes every rollout of a group equal), "
                            f"got {a.temperature}")
    need(0 < a.clip < 1, f"--clip must lie in (0, 1), got {a.clip}")
    need(a.ckpt_fraction is None or 0 < a.ckpt_fraction <= 1, f"--ckpt-fraction lies in (0, 1] (--no-grad-ckpt: "
                                                              f"none), got {a.ckpt_fraction}")
    need(0 < a.top_p <= 1, f"--top-p must lie in (0, 1], got {a.top_p}")
    need(a.decode in ("dynamic", "static"), f"--decode is dynamic or static, got {a.decode!r}")
    need(a.pack in ("auto", "on", "off"), f"--pack is auto, on or off, got {a.pack!r}")
    need(0 <= a.beta <= MAX_BETA, f"--beta must lie in [0, {MAX_BETA:g}] (paper: 0), got {a.beta}")
    need(a.temperature <= MAX_TEMPERATURE, f"--temperature must be at most {MAX_TEMPERATURE:g} (1.0 samples the "
                                           f"policy as it is), got {a.temperature}")
    need(0 <= a.seed < 2**32, f"--seed must lie in [0, 2**32), got {a.seed}")
    need(a.gap_cache is None or not os.path.isdir(a.gap_cache), f"--gap-cache {a.gap_cache} is a folder; pass a file "
                                                                f"(JSONL)")
    need(a.device is None or policy.device_problem(a.device) is None, str(policy.device_problem(a.device or "cpu")))
    need(0 <= a.tau <= 1 and 0 <= a.omega <= 1, f"--tau and --omega lie in [0, 1], got {a.tau}, {a.omega}")
    need(all(map(math.isfinite, (a.w_acc, a.w_format, a.w_tool, a.w_geo))), "reward weights must be finite")
    if None not in (a.floor_tokens, a.full_tokens) and a.global_image == "info-gap":
        need(a.floor_tokens < a.full_tokens, f"--floor-tokens ({a.floor_tokens}) must be below --full-tokens "
                                             f"({a.full_tokens})")
    if None not in (a.crop_min_tokens, a.crop_max_tokens):
        need(a.crop_min_tokens <= a.crop_max_tokens, "--crop-min-tokens must not exceed --crop-max-tokens")
    need(1 <= a.sync_every <= 64, f"--sync-every lies in [1, 64], got {a.sync_every}")
    if None not in (a.rollout_tokens, a.full_tokens, a.max_response_tokens, a.max_turns, a.crop_max_tokens):
        episode = episode_tokens(a)
        need(a.rollout_tokens >= episode, f"--rollout-tokens {a.rollout_tokens:,} cannot hold one episode: up to "
                                          f"~{episode:,} tokens (the global image, its text, the sampled tokens and "
                                          f"every tool response); pass at least {episode:,} (each slot of the "
                                          f"rollout's KV cache holds one episode)")
    return bad


def episode_tokens(a: Args) -> int:
    """The most tokens one episode can reach, estimated before any data is read: the full global image, 256
    tokens of text (lfpc.episode_bound counts the real prompt later), the response and the tool responses."""
    px = crop_tool.TOKEN_PIXELS
    cfg = lfpc.RolloutConfig(max_turns=a.max_turns, max_response_tokens=a.max_response_tokens,
                             crop=crop_tool.CropConfig(max_pixels=a.crop_max_tokens * px, min_pixels=px))
    return lfpc.episode_bound(a.full_tokens + 256, cfg)


# ----------------------------------------------------------------------------- main

MAX_BETA = 10.0          # a KL weight beyond this freezes the policy at the reference
MAX_TEMPERATURE = 10.0   # beyond this the samples are noise: nothing to learn from
MAX_LR = 1e-2            # a higher learning rate destroys a pretrained policy in a step or two
SKIP_GRAD_NORM = 1e3     # a step whose gradient norm (before clipping) exceeds this is skipped, not taken
MAX_NORM_GROWTH = 10.0   # an update that multiplies the weights' norm by more stops the run, before any save
MAX_BAD_STEPS = 3        # skipped steps in a row that stop the run
COLLAPSE_DROP = 0.5      # a format-valid rate this far below the run's best, and below it, stops the run: the
                         # weights look sane (the norm guard passes) but the policy no longer writes turns
RESUMABLE = ("steps", "lr", "save_every", "out", "device", "resume", "judge_timeout", "ckpt_fraction")   # what --resume may change


def main(argv=None) -> None:
    w = dist.setup()                                   # a world of one unless launched by torchrun
    a = parse_args(argv)
    a.device = dist.device(w, a.device)
    if a.prompts % w.size:
        raise SystemExit(f"--prompts {a.prompts} must divide by the {w.size} ranks (whole GRPO groups per rank)")
    run = checkpoint.RunFolder(a.out)
    if w.main:
        run.check_writable()                           # a read-only, full or misnamed --out: before any work
    saved = None
    if a.resume:
        a, saved = resume_args(a, run, given_flags(argv), w)
    elif run.used():
        raise SystemExit(f"{a.out} already holds a run ({', '.join(run.used())}): pass --resume to continue it, "
                         f"or another --out for a new run")
    if w.main:
        run.lock()
        if not a.resume:
            run.write_run({"args": asdict(a), "world_size": w.size})
    dist.barrier(w)
    try:
        with checkpoint.StopSignal() as stop:          # SIGTERM / SIGINT: stop cleanly at the next safe point
            try:
                train(a, run, saved, w, stop)
            except checkpoint.Preempted as e:
                print(f"{stop.requested}: {e}; run the same command again to continue (no --resume: no step was "
                      f"taken)", file=sys.stderr)
                raise SystemExit(stop.code) from None
            except checkpoint.CheckpointError as e:
                raise SystemExit(str(e)) from None
    finally:
        if w.main:
            run.unlock()


def train(a: Args, run: checkpoint.RunFolder, saved: dict | None, w: dist.World = dist.World(),
          stop: checkpoint.StopSignal | None = None) -> None:
    """The run: data, model, information gap, then the steps, a checkpoint every --save-every. After `stop`
    is requested (SIGTERM, SIGINT) the run ends after its current step with a checkpoint (in the prober:
    checkpoint.Preempted after its current batch, the cache kept)."""
    stop = stop or checkpoint.StopSignal()
    tasks = read_tasks(a)                               # every data problem, before the model loads
    random.seed(a.seed)
    torch.manual_seed(a.seed)
    agent = policy.load_model(a, os.path.join(a.out, "ckpt") if saved else "")
    if a.prompt:
        agent = replace(agent, style=a.prompt)
    if agent.device.type == "cuda":                    # before hours of probing and rollouts, not at the first step
        problem = policy.training_state_problem(sum(p.numel() for p in agent.model.parameters()), a.lora, w.size,
                                                torch.cuda.get_device_properties(agent.device).total_memory)
        if problem:
            raise SystemExit(problem)
    if w.main:                                         # the weights and AdamW's two moments of what trains
        trained = sum(p.numel() * (p.element_size() + 8) for p in agent.model.parameters() if p.requires_grad)
        frozen = sum(p.numel() * p.element_size() for p in agent.model.parameters() if not p.requires_grad)
        run.check_space(trained + (0 if a.lora else frozen))          # a LoRA run saves its adapters only
    if w.distributed and not a.lora:
        dist.shard(agent.model, w)                     # FSDP2: full fine-tuning needs the training state sharded
    a.judge_cache = a.judge_cache or os.path.join(a.out, "judge_cache.jsonl")
    judge = make_judge(a.judge, a.judge_url, a.judge_model, a.judge_cache,
                       **({"timeout": a.judge_timeout} if a.judge == "llm" else {}))
    cfg = presets.rollout_config(a, a.full_tokens, temperature=a.temperature, batch_size=a.rollout_batch,
                                 batch_tokens=a.rollout_tokens, engine=a.engine, sync_every=a.sync_every,
                                 top_p=a.top_p, decode=a.decode)
    if (why := lfpc.prompt_problem(agent, tasks, cfg)):             # before hours of probing
        raise SystemExit(f"--data: {why}")
    set_budgets(a, agent, tasks, judge, w, stop)
    ref_model = None
    if a.beta > 0:                     # a frozen copy of the starting policy (doubles the weights in memory)
        ref_model = lfpc.load_agent(a.model, device=a.device, dtype=policy.base_dtype(a)).model.eval().requires_grad_(False)
    params = [p for p in agent.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(dist.param_groups(params), lr=a.lr, betas=(0.9, 0.999), weight_decay=0.0,
                            fused=agent.device.type == "cuda")           # fused: no full-size temporaries
    start = 0
    if saved:
        dist.load_optimizer(agent.model, opt, saved["optimizer"])
        for group in opt.param_groups:
            group["lr"] = a.lr                                           # --resume --lr applies
        start = saved["step"]
        random.setstate(saved["rng"]["python"])
        torch.set_rng_state(saved["rng"]["torch"])
        if w.main:
            run.truncate_metrics(start)
    order = random.Random(a.seed).sample(range(len(tasks)), len(tasks))   # data order, epoch after epoch
    budgets = ([t.max_pixels // crop_tool.TOKEN_PIXELS for t in tasks] if a.global_image == "info-gap" else None)
    curves = os.path.join(a.out, "curves.png")
    bad, best_valid = 0, 0.0
    for step in range(start, a.steps):
        t0 = time.time()
        pos = step * a.prompts
        batch_tasks = [tasks[order[(pos + i) % len(tasks)]] for i in range(a.prompts)]
        m = train_step(a, agent, opt, batch_tasks, cfg, step, ref_model, judge, w)
        m.update({"step": step + 1, "time/step_s": round(time.time() - t0, 2)})
        if w.main:
            run.log(m)
            print(console_line(m, a.steps), flush=True)        # the full record: metrics.jsonl
        valid = m.get("format/valid_rate")
        if valid is not None and best_valid - valid >= COLLAPSE_DROP and valid < COLLAPSE_DROP:
            raise SystemExit(f"format-valid rate fell from {best_valid:.2f} to {valid:.2f} at step {step + 1}: the "
                             f"update of step {step} destroyed the policy (--lr {a.lr:g} too high?); nothing was saved "
                             f"from this step and a checkpoint of step {step} (if --save-every wrote one) holds the "
                             f"damage: continue from an earlier checkpoint with a lower --lr")
        best_valid = max(best_valid, valid or 0.0)
        bad = bad + 1 if "loss/skipped" in m else 0
        if bad >= MAX_BAD_STEPS:
            raise SystemExit(f"{bad} steps in a row skipped (non-finite or exploding gradients): stopping; the last "
                             f"good checkpoint is in {a.out} (lower --lr?)")
        stopping = dist.all_sum(float(stop()), w) > 0               # every rank stops after the same step
        if (step + 1) % a.save_every == 0 or step + 1 == a.steps or stopping:
            model_state, opt_state = dist.full_state(agent.model, opt, w)     # every rank: a collective
            if w.main:
                run.save(lambda folder: lfpc.save_agent(agent, folder, model_state),
                         {"optimizer": opt_state, "step": step + 1, "args": asdict(a), "world_size": w.size,
                          "rng": {"python": random.getstate(), "torch": torch.get_rng_state()}})
                metrics.plot_curves({"run": [run.metrics]}, metrics.CURVES, curves, budgets)
            dist.barrier(w)
        if stopping and step + 1 < a.steps:
            if w.main:
                print(f"{stop.requested or 'a signal on another rank'}: stopped after step {step + 1} of {a.steps}; "
                      f"checkpoint {os.path.join(a.out, 'ckpt')}. Continue exactly where it stopped with:\n"
                      f"  python train.py --resume --out {a.out}", file=sys.stderr, flush=True)
            raise SystemExit(stop.code or 143)
    if w.main:
        print(run_summary(a, run.read_metrics(), os.path.join(a.out, "ckpt"), curves))


# ----------------------------------------------------------------------------- what the console says

CONSOLE = (("acc", "acc", "{:.2f}"), ("reward/mean", "reward", "{:.2f}"), ("tool/call_rate", "tool", "{:.2f}"),
           ("box/iou_b1", "iou", "{:.2f}"))
SUMMARY = (("acc", "accuracy"), ("reward/mean", "reward"), ("tool/call_rate", "tool-call rate"),
           ("box/iou_b1", "first box IoU with B1"))


def console_line(m: dict, steps: int) -> str:
    """One short line a step: step, accuracy, reward, tool-call rate, box IoU (when boxes), seconds a step."""
    parts = [f"step {m['step']}/{steps}"]
    parts += [f"{short} {fmt.format(m[k])}" for k, short, fmt in CONSOLE if m.get(k) is not None]
    parts.append(f"{m['time/step_s']:.1f} s/step" + (" SKIPPED (bad gradient)" if "loss/skipped" in m else ""))
    return "  ".join(parts)


def run_summary(a: Args, rows: list[dict], ckpt: str, curves: str) -> str:
    """What happened (the first and the last tenth of the run), where it is, and what to run next."""
    n = len(rows)
    k = max(1, n // 10)
    head, tail = rows[:k], rows[-k:]
    lines = [f"\nstage {a.stage}: {n} steps in {a.out} (first {k} vs last {k} step(s))"]
    for key, name in SUMMARY:
        first, last = metrics.mean(r[key] for r in head if r.get(key) is not None), \
            metrics.mean(r[key] for r in tail if r.get(key) is not None)
        if first is not None and last is not None:
            lines.append(f"  {name:<22} {first:.3f} -> {last:.3f}")
    lines += [f"checkpoint: {ckpt}", f"curves:     {curves}", f"metrics:    {os.path.join(a.out, 'metrics.jsonl')}"]
    data = "" if a.preset == "toy" else " --data YOUR_EVAL.jsonl"
    if a.stage == 1:
        stage2 = "python train.py --stage 2" + ("" if ckpt == os.path.join("runs", "stage1", "ckpt") else f" --model {ckpt}")
        stage2 += "" if a.preset == "toy" else f" --preset {a.preset} --data YOUR_BOXED.jsonl"
        lines.append(f"next:       {stage2}")
    lines.append(f"evaluate:   python eval.py --preset {a.preset} --model {ckpt}{data}")
    return "\n".join(lines)


def resume_args(a: Args, run: checkpoint.RunFolder, given: set[str], w: dist.World = dist.World()) -> tuple[Args, dict]:
    """The run's own arguments from its newest complete checkpoint (recovered if a kill hit the swap),
    with the flags that may change (RESUMABLE) taken from the command line; any other flag given with a
    value the run does not have is refused. The folder's own path wins over the one the run was saved in."""
    found = run.recover() if w.main else run.latest()
    dist.barrier(w)
    found = found if w.main else run.latest()
    if found is None:
        begun = run.read_run()
        if begun is None:
            raise SystemExit(f"--resume: no run in {a.out} (no checkpoint and no run.json): start one without --resume")
        if w.main:                             # killed before its first checkpoint: from step 0, caches kept
            run.start_over()
            print(f"--resume: no complete checkpoint in {a.out}: starting over from step 0 with the run's own "
                  f"settings (its information-gap cache is kept)", file=sys.stderr)
        dist.barrier(w)
        state = {**begun, "step": 0}
    else:
        _, state = found
    if state.get("world_size", 1) != w.size:
        raise SystemExit(f"--resume: the run in {a.out} trained on {state.get('world_size', 1)} rank(s), this launch has "
                         f"{w.size}: resume with the same world size (data and sampling are split by it)")
    saved = Args(**state["args"])
    clash = sorted(k for k in given - set(RESUMABLE) if getattr(a, k) != getattr(saved, k))
    if clash:
        raise SystemExit("--resume continues a run with its own settings; " + "; ".join(
            f"--{k.replace('_', '-')} is {getattr(saved, k)!r} in the run, not {getattr(a, k)!r}" for k in clash)
            + f". Only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE[:3])} may change; start another --out "
            f"for the rest")
    changes = {k: getattr(a, k) for k in given & set(RESUMABLE)}
    resumed = Args(**{**state["args"], **changes, "out": a.out, "resume": True})
    if found is None:
        return resumed, None
    if resumed.steps <= state["step"]:
        raise SystemExit(f"--resume: the run in {a.out} already did {state['step']} of {resumed.steps} steps; "
                         f"pass --steps N (N > {state['step']}) to go on")
    return resumed, state


# ----------------------------------------------------------------------------- one step

def train_step(a: Args, agent: lfpc.Agent, opt, tasks: list[lfpc.Task], cfg: lfpc.RolloutConfig,
               step: int, ref_model=None, judge: Judge | None = None, w: dist.World = dist.World()) -> dict[str, float]:
    """One GRPO step, two calls: roll out and reward, then one optimizer step. Returns the step's metrics
    (over every rank's episodes). Under torchrun each rank takes its share of `tasks`."""
    t0 = time.perf_counter()
    asked = dict(judge.stats) if judge is not None else {}
    mine, offset = dist.share(tasks, w)
    store = engine.FeatureStore() if policy.vision_frozen(agent) else None    # LoRA: training reuses the features
    episodes, work = collect_episodes(a, agent, mine, cfg, step, judge, offset * a.group, store)
    t_rollout = time.perf_counter() - t0
    m = update_policy(a, agent, opt, episodes, mine, ref_model, judge, w, store)
    work = engine.Work(**{k: int(dist.all_sum(v, w)) for k, v in work.__dict__.items()})
    if a.judge == "llm":        # what the model judge did this step (a fallback: the rules decided)
        m.update({f"judge/{k}": int(dist.all_sum(judge.stats[k] - asked.get(k, 0), w))
                  for k in ("calls", "requests", "cached", "fallbacks", "skipped")})
    return {**m, **work.metrics(), "time/rollout_s": t_rollout}


def collect_episodes(a: Args, agent: lfpc.Agent, tasks: list[lfpc.Task], cfg: lfpc.RolloutConfig,
                     step: int, judge: Judge | None = None, first: int = 0,
                     store: engine.FeatureStore | None = None) -> tuple[list[lfpc.Episode], engine.Work]:
    """`a.group` rollouts of each task, rewarded (episode.reward, episode.reward_parts), and what the
    rollout engine did. Episode k samples from stream (seed, step, first + k): `first` is the index of
    this rank's first episode in the whole step (0 alone)."""
    agent.model.eval()
    work = engine.Work()
    seed = a.seed * 1_000_000_007 + step * 1_000_003 + first       # disjoint streams for every step and episode
    with policy.precision(agent), dist.gathered(agent.model), policy.sampler(agent) as sampler:   # LoRA: merged
        episodes = lfpc.rollout(sampler, tasks, a.group, cfg, seed=seed, work=work, store=store)   # update's precision
    score(a, episodes, tasks, judge or RuleJudge())
    return episodes, work


def update_policy(a: Args, agent: lfpc.Agent, opt, episodes: list[lfpc.Episode], tasks: list[lfpc.Task],
                  ref_model=None, judge: Judge | None = None, w: dist.World = dist.World(),
                  store: engine.FeatureStore | None = None) -> dict[str, float]:
    """Group-normalised advantages, the clipped loss over micro-batches (divided by the token count of the
    WHOLE step: of every rank under torchrun), one optimizer step. Returns the step's metrics, with
    time/forward_s (the log-prob forwards) and time/update_s (all of it)."""
    t_start, t_forward = time.perf_counter(), 0.0
    model = agent.model
    adv, adv_m = grpo.group_advantages(torch.tensor([e.reward for e in episodes]), a.group)
    num_tokens = dist.all_sum(sum(e.num_generated for e in episodes), w)   # the WHOLE step's token count
    num_seqs = dist.all_sum(len(episodes), w)
    # Episodes with advantage 0 have zero policy gradient: not forwarded (their tokens still count), unless a
    # KL term gives every token a gradient.
    live = [i for i in range(len(episodes)) if adv[i] != 0 or a.beta > 0]
    model.train()
    opt.zero_grad(set_to_none=True)
    sums, counted, gap, skip, encodes, positions, padding = {}, 0, 0.0, False, 0, 0, 0
    lengths = [len(episodes[i].token_ids) for i in live]
    packed = pack_micro_batches(a, model)      # each micro-batch one padding-free row (engine.collate)
    batches = [[live[j] for j in mb] for mb in engine.pack(lengths, a.micro_batch, a.train_tokens, longest_first=True,
                                                             packed=packed)]
    batches = dist.micro_batches(batches, w, model)   # under FSDP2 every rank runs as many (a repeat weighs 0)
    for idx in batches:
        weight = float(w.size if idx is not None else 0)      # x world size: the ranks' average is the sum
        idx = idx if idx is not None else [0]
        batch = engine.collate(agent, [episodes[i] for i in idx], store=store, packed=packed)   # store: no vision tower
        encodes += batch.image_encodes
        positions, padding = positions + batch.input_ids.numel(), padding + batch.padding
        t0 = time.perf_counter()
        with policy.precision(agent):
            lp = batch.unpacked(lfpc.token_logprobs(model, batch, a.temperature))       # [b, T]
            ref = None
            if ref_model is not None:
                with torch.no_grad():
                    ref = batch.unpacked(lfpc.token_logprobs(ref_model, batch, a.temperature))   # [b, T]
        t_forward += _elapsed(t0, agent.device)
        mask, old = batch.unpacked(batch.loss_mask), batch.unpacked(batch.old_logprobs)   # [b, T]
        # One update per batch: the old policy IS the current one, so its log-probs are this forward's own,
        # detached (ratio exactly 1, in the precision of the update). The sampler's are only compared.
        loss, m = grpo.policy_loss(lp, lp.detach(), adv[idx].to(lp.device), mask, clip_low=a.clip,
                                   clip_high=a.clip, agg=a.agg, num_tokens=num_tokens, num_seqs=num_seqs,
                                   ref_logprobs=ref, beta=a.beta)
        skip = skip or not torch.isfinite(loss)
        (loss * weight if w.distributed else loss).backward()           # every rank the same backwards (FSDP2)
        if weight:
            gap += float((lp.detach() - old).abs()[mask.bool()].sum())
            for key, v in m.items():
                sums[key] = sums.get(key, 0.0) + v * m["num_tokens"]
            sums["policy"] = sums.get("policy", 0.0) + loss.item()
            counted += m["num_tokens"]
    params = [p for p in model.parameters() if p.requires_grad]
    dist.average_gradients(params, w)
    grad_norm = dist.grad_norm(params, w, 1.0) if w.distributed else float(torch.nn.utils.clip_grad_norm_(params, 1.0))
    keys = sorted({"clip_frac", "ratio_mean", "approx_kl", "num_tokens", "policy"} | ({"kl_ref"} if a.beta > 0 else set()))
    totals = dist.all_sum([sums.get(k, 0.0) for k in keys] + [counted, gap, len(live), float(skip)], w)  # same on every rank
    sums = {k: v for k, v in zip(keys, totals) if k in sums or w.distributed}
    counted, gap, trained, skip = totals[len(keys)], totals[len(keys) + 1], int(totals[len(keys) + 2]), totals[-1]
    if skip or not math.isfinite(grad_norm) or grad_norm > SKIP_GRAD_NORM:
        opt.zero_grad(set_to_none=True)                                   # a step that would wreck the weights
        return {**step_metrics(episodes, tasks, judge, adv_m, {"grad_norm": grad_norm}, w), "loss/skipped": 1.0}
    norm_before = _weight_norm(params, w)
    opt.step()
    opt.zero_grad(set_to_none=True)                                       # the rollout of the next step holds no gradients
    norm_after = _weight_norm(params, w)
    if not math.isfinite(norm_after) or norm_after > MAX_NORM_GROWTH * norm_before:
        raise SystemExit(f"the update blew the weights up (norm {norm_before:.4g} -> {norm_after:.4g}); nothing was "
                         f"saved from this step: resume from the last checkpoint with a lower --lr")
    lm = {"clip_frac": 0.0, "ratio_mean": 1.0, "approx_kl": 0.0}          # when no episode carried an advantage
    lm.update({k: v / counted for k, v in sums.items() if counted and k not in ("policy", "num_tokens")})
    lm.update(policy=sums.get("policy", 0.0), grad_norm=grad_norm, trained_episodes=trained,
              sampler_gap=gap / counted if counted else 0.0)
    m = step_metrics(episodes, tasks, judge, adv_m, lm, w)
    m.update({"time/forward_s": t_forward, "time/update_s": _elapsed(t_start, agent.device),
              "work/train_image_encodes": int(dist.all_sum(encodes, w)),
              "work/train_padding_frac": dist.all_sum(padding, w) / max(1, dist.all_sum(positions, w))})
    return m


def pack_micro_batches(a: Args, model) -> bool:
    """--pack: on, off, or auto (on when the attention kernel reads packed sequences natively)."""
    if a.pack != "auto":
        return a.pack == "on"
    return getattr(model.config.get_text_config(), "_attn_implementation", "") == "flash_attention_2"


def _weight_norm(params: list, w: dist.World) -> float:
    if w.distributed:
        return dist.weight_norm(params, w)
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.detach().float()) for p in params])))


def _elapsed(t0: float, device: torch.device) -> float:
    """Seconds since t0, after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def score(a: Args, episodes: list[lfpc.Episode], tasks: list[lfpc.Task], judge: Judge) -> None:
    """Fill episode.reward and episode.reward_parts; `judge` decides whether the answer is right."""
    w = rewards.RewardWeights(a.w_acc, a.w_format, a.w_tool, a.w_geo)
    for e in episodes:
        t = tasks[e.task_index]
        acc = judge.correct(e.answer, t.answer, t.choices, t.question)
        if a.stage == 1:
            e.reward, e.reward_parts = rewards.outcome_reward(e.answer, t.answer, t.choices, e.malformed_turns,
                                                              len(e.crops), w, acc)
        else:
            box = e.crops[0].box_original if e.crops else None
            e.reward, e.reward_parts = rewards.stage2_reward(
                e.answer, t.answer, t.choices, e.malformed_turns, len(e.crops), box, t.boxes,
                t.image_size, w, a.tau, a.omega, a.stage2_mode, acc)


def step_metrics(episodes, tasks, judge, adv_metrics, loss_metrics, w: dist.World = dist.World()) -> dict[str, float]:
    """The step's line of metrics.jsonl (support/metrics.py): episode metrics, rewards, advantages, loss; under
    torchrun over every rank's episodes."""
    if w.distributed:
        episodes, tasks, zero_std = dist.gather_episodes(episodes, tasks, adv_metrics["frac_zero_std"], w)
        adv_metrics = {"frac_zero_std": zero_std}
    n = len(episodes)
    m = metrics.episode_metrics(episodes, tasks, judge)
    m["reward/mean"] = sum(e.reward for e in episodes) / n
    for part in sorted({p for e in episodes for p in e.reward_parts} - {"total"}):
        m[f"reward/{part}"] = sum(e.reward_parts.get(part, 0.0) for e in episodes) / n
    m["adv/frac_zero_std"] = adv_metrics["frac_zero_std"]
    m.update({f"loss/{k}": v for k, v in loss_metrics.items()})
    return m


# ----------------------------------------------------------------------------- data and model

def read_tasks(a: Args) -> list[lfpc.Task]:
    """The training tasks, every row checked (data.load_tasks), before any model loads."""
    if a.data:
        try:
            tasks = data.load_tasks(a.data)
        except data.DataError as e:
            raise SystemExit(f"--data: {e}") from None
    else:       # a preset that generates its world's tasks (toy: stage 2 gets a small, disjoint annotated set)
        tasks = presets.get(a.preset)["tasks"](a.stage, a.n_train)
    if a.stage == 2 and any(not t.boxes for t in tasks):
        raise SystemExit(f"stage 2 needs 'bboxes' on every task; {sum(not t.boxes for t in tasks)} lack them")
    return tasks


def set_budgets(a: Args, agent: lfpc.Agent, tasks: list[lfpc.Task], judge: Judge | None = None,
                w: dist.World = dist.World(), stop=None) -> None:
    """Each task's global budget: --full-tokens for all (--global-image full), the budget a row carries
    (info_gap.py --out writes it; kept), or else the information gap, probed with the model and cached. Under torchrun
    the ranks probe every w.size-th item each, each into its own part of the cache; the records are
    merged, and rank 0 appends the parts to the cache."""
    if a.global_image == "full":
        for t in tasks:
            t.max_pixels = a.full_tokens * crop_tool.TOKEN_PIXELS
        return
    given = [t for t in tasks if t.max_pixels]
    tasks = [t for t in tasks if not t.max_pixels]          # rows that carry a budget keep it; only the rest are probed
    if given and w.main:
        print(f"info gap: {len(given)} task(s) carry their budget (max_pixels), kept; {len(tasks)} to probe")
    if not tasks:
        return
    cache = a.gap_cache or os.path.join(a.out, "info_gap_cache.jsonl")
    part = f"{cache}.rank{w.rank}" if w.distributed else None
    mine = tasks[w.rank::w.size]
    with policy.precision(agent), dist.gathered(agent.model), policy.sampler(agent) as sampler:
        try:
            records = info_gap.probe(mine, sampler, prober_config(a), os.path.abspath(a.model), cache,
                                     batch_size=a.rollout_batch, judge=judge, write_path=part,
                                     batch_tokens=a.rollout_tokens, stop=stop)
        except info_gap.CacheError as e:
            raise SystemExit(f"--gap-cache: {e}") from None
    if w.distributed:
        merged = dist.gather(records, w)
        records = [merged[i % w.size][i // w.size] for i in range(len(tasks))]
        if w.main:
            info_gap.merge_parts(cache, [f"{cache}.rank{r}" for r in range(w.size)])
        dist.barrier(w)
    if w.main:
        print("info gap:", json.dumps(info_gap.summarize(records)))
    for t, r in zip(tasks, records):
        t.max_pixels = r["max_pixels"]


def load_data(a: Args, agent: lfpc.Agent) -> list[lfpc.Task]:
    """read_tasks, then set_budgets (support/bench.py and tests: one call)."""
    tasks = read_tasks(a)
    set_budgets(a, agent, tasks)
    return tasks


def prober_config(a: Args) -> info_gap.ProberConfig:
    """The information-gap prober's settings from the run's flags (the same object info_gap.py's CLI builds)."""
    return info_gap.ProberConfig(full_tokens=a.full_tokens, floor_tokens=a.floor_tokens, k=a.probe_k,
                                 temperature=a.temperature, max_new_tokens=a.probe_max_new_tokens, resample=a.resample,
                                 judge=a.judge if a.judge == "rule" else f"llm:{a.judge_model}")


if __name__ == "__main__":
    main()

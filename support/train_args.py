"""train.py's command line: every flag (`Args`, its help), the presets filling what is left unset, the
ranges, and what `--resume` may change. Checked before any work: a bad flag is one line from argparse.

`parse_args(argv, doc)` -> Args (doc: train.py's docstring, the --help text); `given_flags(argv, doc)`:
the fields the command line set; `resume_args`: a run's own settings back from its newest checkpoint,
with RESUMABLE flags taken from the command line and any other changed flag refused.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field, fields

import torch

import crop_tool
import grpo
import lfpc
import rewards
from support import checkpoint, cli, dist, policy, presets, prompts

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
    train_tokens: int | None = arg(None, 'tokens per forward/backward, at most: padded (--pack off) or the row\'s '
                                         '(a shared prompt once) (preset; one-gpu from support/memory.py)')
    rollout_batch: int | None = arg(None, 'episodes sampled together, at most (preset)')
    rollout_tokens: int | None = arg(None, 'KV-cache tokens of one rollout chunk, at most: episodes x the bound '
                                            'of their length (preset; one-gpu from support/memory.py)')
    prefill_tokens: int | None = arg(None, 'cached engine: tokens one prefill forward of the rollout computes, at '
                                           'most: bounds its activations, not its results (preset; support/memory.py)')
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
                                            'activations and saves its recompute). Preset: measured by `python -m '
                                            'support.bench --config 7b --estimate-memory --ckpt-sweep` (README)')
    pack: str = arg("auto", 'training micro-batches: "shared" packs each into one padding-free row holding each GRPO '
                            "group's prompt once (support/shared_prompt.py), \"on\" packs without sharing (transformers' "
                            'packed sequences: varlen flash attention; SDPA builds a block mask of the whole row), "off" '
                            'right-pads them, "auto" is shared under sdpa or flash attention, else off')
    device: str | None = arg(None, 'torch device (default: cuda if available, else cpu)')
    save_every: int = arg(20, 'steps between checkpoints (and at the end)')
    seed: int = arg(0, 'data order, sampling, init')


def parse_args(argv=None, doc: str = "") -> Args:
    p = _parser(doc)
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
    if (why := policy.model_problem(a.model)):
        p.error(why + (" (run `python train.py --stage 1` first)" if a.stage == 2 else ""))
    if (why := presets.check_model(a.preset, a.model)):
        p.error(why)
    return a


def _parser(doc: str = "") -> argparse.ArgumentParser:
    head, _, rest = doc.partition("\n\n")
    p = argparse.ArgumentParser(prog="train.py", description=head, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=rest)
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


def given_flags(argv, doc: str = "") -> set[str]:
    """The Args fields the command line set explicitly."""
    p = _parser(doc)
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
    bad += cli.judge_problems(a)
    need(a.stage2_mode in rewards.MODES, f"--stage2-mode is one of {', '.join(rewards.MODES)}, got {a.stage2_mode!r}")
    for name in ("resample", "crop_resample"):
        need(getattr(a, name) in crop_tool.RESAMPLE, f"--{name.replace('_', '-')} is bicubic or box")
    bad += cli.at_least(a, ("steps", "prompts", "micro_batch", "train_tokens", "rollout_batch", "rollout_tokens",
                            "prefill_tokens", "max_turns", "max_new_tokens", "max_response_tokens", "full_tokens", "floor_tokens",
                            "probe_k", "probe_max_new_tokens", "min_tokens", "crop_max_tokens", "crop_min_tokens",
                            "save_every", "n_train"))
    need(a.group is None or a.group >= 2, f"--group must be at least 2 (GRPO learns from differences within a "
                                          f"group; one rollout has none), got {a.group}")
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
    need(a.pack in ("auto", "shared", "on", "off"), f"--pack is auto, shared, on or off, got {a.pack!r}")
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
    presets.fill(saved, saved.preset)                  # a setting newer than the run's checkpoint: its preset's
    clash = sorted(k for k in given - set(RESUMABLE) if getattr(a, k) != getattr(saved, k))
    if clash:
        raise SystemExit("--resume continues a run with its own settings; " + "; ".join(
            f"--{k.replace('_', '-')} is {getattr(saved, k)!r} in the run, not {getattr(a, k)!r}" for k in clash)
            + f". Only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE if k not in ('out', 'resume'))} may "
            f"change; start another --out for the rest")
    changes = {k: getattr(a, k) for k in given & set(RESUMABLE)}
    resumed = Args(**{**state["args"], **changes, "out": a.out, "resume": True})
    presets.fill(resumed, resumed.preset)
    if found is None:
        return resumed, None
    if resumed.steps <= state["step"]:
        raise SystemExit(f"--resume: the run in {a.out} already did {state['step']} of {resumed.steps} steps; "
                         f"pass --steps N (N > {state['step']}) to go on")
    return resumed, state


MAX_BETA = 10.0          # a KL weight beyond this freezes the policy at the reference
MAX_TEMPERATURE = 10.0   # beyond this the samples are noise: nothing to learn from
MAX_LR = 1e-2            # a higher learning rate destroys a pretrained policy in a step or two
RESUMABLE = ("steps", "lr", "save_every", "out", "device", "resume", "judge_timeout", "ckpt_fraction",
             "prefill_tokens")   # what --resume may change

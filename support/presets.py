"""Named settings for train.py, eval.py and support/bench.py, chosen with `--preset NAME`.

    toy      the toy world on a CPU (the default: `python train.py --stage 1` just works)
    paper    the paper's published set-up: Qwen2.5-VL-7B-Instruct, 256 prompts x 16 rollouts, lr 1e-6,
             2,048 response tokens, 80 steps (8 x A100, full fine-tuning)
    one-gpu  7B stage 1 on one 80 GB GPU: LoRA r64 on a bf16 base, 32 prompts x 16 rollouts a step,
             rollout chunks and micro-batches sized by support/memory.py's estimate (README)

A preset fills every setting the command line leaves unset (None); a flag given on the command line
always wins, including one that sets a value back to a preset's "off" (e.g. --no-grad-ckpt). Keys that
are not flags describe the world a preset belongs to:
    tasks         (stage, n) -> generated training tasks, for presets that need no --data
    eval_tasks    n -> generated held-out tasks, for eval.py without a data flag
    checkpoints   eval.py's default --model: the first of these folders that exists
    system_prompt a model must carry this prompt (saved beside it, `policy.read_prompts`) to run under the
                  preset: the toy preset refuses a real checkpoint instead of training it with toy settings
`rollout_config(a, tokens)` turns a script's settings into the rollout's `lfpc.RolloutConfig`.
"""
from __future__ import annotations

import importlib

import crop_tool
import lfpc
from support import policy

# ckpt_fraction 0.5: the cheapest that fits one rank of 8 (full fine-tuning, 16K-token micro-batches) in the 71
# GiB usable of 80, measured by `python -m support.bench --config 7b --estimate-memory --ckpt-sweep --world 8
# --rollout-rows 64 --train-tokens 16384` (README): 68.3 GiB at the training peak (1/4: 82.0); the rollout's, in
# its 64 slots, 62.7 whatever the fraction.
PAPER = dict(
    tasks=None, eval_tasks=None, checkpoints=(), system_prompt=None,
    model="Qwen/Qwen2.5-VL-7B-Instruct", steps=80, prompts=256, group=16, lr=1e-6, micro_batch=4, n_train=None,
    lora=0, grad_ckpt=True, ckpt_fraction=0.5, rollout_batch=64, rollout_tokens=64 * 8512, train_tokens=16384,
    prefill_tokens=16384,
    max_turns=5, max_new_tokens=1024, max_response_tokens=2048, min_tokens=4, resample="bicubic",
    crop_max_tokens=1280, crop_min_tokens=4, crop_snap=0, crop_resample="bicubic",
    full_tokens=16384, floor_tokens=256, probe_max_new_tokens=64,
    budget=1024, limit=None, batch_size=16,
)

# From `python -m support.bench --config 7b --estimate-memory` (README): 64 slots of 8,512-token episodes (1K global,
# 2,048 response tokens, 4 crops of 1,280), prefill forwards of at most 16K tokens, and the merged bf16 copy that
# samples peak at 64.1 GiB, under the 71 GiB usable of 80 (--rollout-batch 32 --rollout-tokens 272384: 49.5 GiB,
# at ~1.8x the decode steps); at the 16K global budget the same token budget holds 22 slots (65.8 GiB).
# Micro-batches of 32K tokens, 3/4 of the decoder layers checkpointed (2.75 forwards a training token instead of 3):
# `python -m support.bench --config 7b --estimate-memory --ckpt-sweep --lora 64 --rollout-rows 64 --train-tokens
# 32768` (README) measured 59.2 GiB at the training peak, under the rollout's; half of them, 93.3 GiB, overflows.
ONE_GPU = {**PAPER, "lora": 64, "ckpt_fraction": 0.75, "prompts": 32, "rollout_batch": 64, "rollout_tokens": 64 * 8512,
           "train_tokens": 32768, "micro_batch": 8}

# The toy preset belongs to the toy world and lives there (toy/world.py's PRESET): named here by its module,
# imported only when chosen, so the real presets never load toy/ (tests/test_project.py checks it).
PRESETS = {"toy": "toy.world", "paper": PAPER, "one-gpu": ONE_GPU}
NAMES = tuple(PRESETS)


def get(name: str) -> dict:
    """The settings of preset `name` (KeyError for an unknown one)."""
    v = PRESETS[name]
    return importlib.import_module(v).PRESET if isinstance(v, str) else v
WORLD_KEYS = ("tasks", "eval_tasks", "checkpoints", "system_prompt")


def fill(a, preset: str) -> None:
    """Set every attribute of `a` that is None and named in the preset to the preset's value."""
    for k, v in get(preset).items():
        if k not in WORLD_KEYS and hasattr(a, k) and getattr(a, k) is None:
            setattr(a, k, v)


def check_model(preset: str, model: str) -> str | None:
    """Why `model` cannot run under `preset`, or None. Reads only the prompts saved beside a folder."""
    want = get(preset)["system_prompt"]
    if want is None:
        return None
    if policy.read_prompts(model).get("system_prompt") != want:
        return (f"--preset {preset} runs models built for its world (their saved system prompt is the toy's); "
                f"{model!r} is not one. For a real checkpoint pick --preset paper or one-gpu.")
    return None


def rollout_config(a, global_tokens: int, **kw) -> lfpc.RolloutConfig:
    """The RolloutConfig of a script's settings (token budgets are converted to pixels); `kw` overrides."""
    px = crop_tool.TOKEN_PIXELS
    crop = crop_tool.CropConfig(min_pixels=a.crop_min_tokens * px, max_pixels=a.crop_max_tokens * px,
                                resample=a.crop_resample, snap=a.crop_snap)
    return lfpc.RolloutConfig(**{**dict(
        global_max_pixels=global_tokens * px, global_min_pixels=a.min_tokens * px, global_resample=a.resample,
        crop=crop, max_turns=a.max_turns, max_new_tokens=a.max_new_tokens,
        max_response_tokens=a.max_response_tokens), **kw})

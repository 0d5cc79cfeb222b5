"""The policy as it trains: its weights' precision, LoRA adapters, gradient checkpointing; checkpoints.

Contract
--------
- Full fine-tuning: fp32 master weights; on a GPU every forward (rollouts, the info-gap prober, the
  training forward) runs under bf16 autocast (`precision`), the embeddings entering the decoder in bf16
  (`batches.hidden_states`, as FSDP2's mixed precision does), so the KV cache is bf16. Pure-bf16 AdamW
  at lr 1e-6 would round most updates away (tests/test_train.py shows the trap).
- LoRA (`--lora R`): rank R, alpha 2R, on the language model's q, k, v, o, gate, up, down projections
  (peft); the frozen base in bf16, the adapters and their AdamW state in fp32. A folder of adapters (what
  a --lora run saves) loads its base, then the adapters: trained on with --lora, merged without. Under
  autocast the adapters take the layer's bf16 input as it is (`autocast_adapters`): peft would copy it
  to fp32 first, only for autocast to cast it back to bf16 for the matmul and keep that second copy for
  the backward (the same numbers; 7B: 28 KB less a token and layer left out of checkpointing).
- Gradient checkpointing, non-reentrant, of a fraction of the language model's decoder layers
  (`--ckpt-fraction`, evenly spread; the vision blocks, trained only under full fine-tuning, are all
  checkpointed). A checkpointed layer keeps only its input and runs its forward again in the backward; a
  layer left out keeps its activations and saves that recompute (`python -m support.bench --config 7b
  --estimate-memory --ckpt-sweep` measures the trade on the real config, README).
- Checkpoints: `load_agent` reads a Qwen2.5-VL checkpoint (a hub name or a folder) as an `lfpc.Agent`, its
  weights straight onto the device; `save_agent` writes the model, tokenizer, image processor and the
  prompts it was trained with (PROMPT_FILE), which `load_agent` reads back; `model_problem` says why a
  model cannot load, before anything tries.
`a` is train.py's Args (support/train_args.py: lora, grad_ckpt, ckpt_fraction, device, model).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import re
from dataclasses import replace

import torch

import lfpc


def base_dtype(a) -> torch.dtype:
    """The weights' dtype: with --lora the frozen base in bf16 (its adapters are fp32), else fp32 masters."""
    return torch.bfloat16 if a.lora else torch.float32


def precision(agent: lfpc.Agent):
    """The precision of every forward, rollouts and the info-gap prober included: bf16 autocast on a GPU
    (fp32 master weights, or a bf16 base with fp32 adapters), the weights' own dtypes on a CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocasts(agent))


def autocasts(agent: lfpc.Agent) -> bool:
    """Does `precision` autocast the agent's forwards (on a GPU)?"""
    return agent.device.type == "cuda"


@contextlib.contextmanager
def sampler(agent: lfpc.Agent):
    """The policy that samples (rollouts, the information-gap prober): the agent itself, or under LoRA a
    copy of its model with the adapters merged into the (bf16) weights, built now from the current
    adapters and freed afterwards. Unmerged, peft adds ~70 aten ops a layer to every decode step (153
    against 83 a layer of the tiny model, counted by `count_ops`); merged, a decode step is the plain model's. The
    training forward keeps the unmerged adapters (fp32, trained); the two differ by the rounding of the
    merge, which loss/sampler_gap measures."""
    if not _is_lora(agent.model):
        yield agent
        return
    merged = copy.deepcopy(agent.model).merge_and_unload().eval().requires_grad_(False)
    try:
        yield replace(agent, model=merged)
    finally:
        del merged


def vision_frozen(agent: lfpc.Agent) -> bool:
    """Is the vision tower frozen (LoRA on the language model)? Then the rollout's image features are the
    training forward's (engine.FeatureStore)."""
    return not any(p.requires_grad for p in agent.model.model.visual.parameters())


def _is_lora(model) -> bool:
    return hasattr(model, "merge_and_unload") and hasattr(model, "peft_config")


def count_ops(model, tokens: int = 1, rows: int = 2) -> int:
    """The aten operations (kernel launches on a GPU) of one decode-like forward of the language model:
    `rows` rows of `tokens` new tokens each (`counting_ops`)."""
    lm = model.model.language_model if hasattr(model.model, "language_model") else model.base_model.model.model.language_model
    dev = next(model.parameters()).device
    embeds = torch.zeros(rows, tokens, lm.config.hidden_size, device=dev, dtype=next(lm.parameters()).dtype)
    pos = torch.zeros(3, rows, tokens, dtype=torch.long, device=dev)
    with torch.no_grad(), counting_ops() as seen:
        lm(inputs_embeds=embeds, position_ids=pos, use_cache=False)
    return sum(seen.values())


@contextlib.contextmanager
def counting_ops():
    """Count the aten operations run inside (kernel launches, or dispatches, on a GPU), by name: yields a
    collections.Counter, filled as they run. A TorchDispatchMode: the same counts on every device."""
    from collections import Counter
    from torch.utils._python_dispatch import TorchDispatchMode
    seen = Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen[str(func)] += 1
            return func(*args, **(kwargs or {}))
    with Count():
        yield seen


def device_problem(device: str) -> str | None:
    """Why `device` cannot hold the model, or None: a name torch does not know, a GPU asked for where
    there is none, or an index past the last GPU."""
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError) as e:
        return f"--device {device!r} is not a torch device ({str(e).splitlines()[0]}); use cpu, cuda or cuda:N"
    if d.type not in ("cpu", "cuda"):
        return f"--device {device!r}: only cpu and cuda are supported"
    if d.type == "cuda" and not torch.cuda.is_available():
        return f"--device {device!r}: no CUDA device is available on this machine (use --device cpu)"
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        return f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def training_state_problem(n_params: int, lora: int, ranks: int, device_bytes: int) -> str | None:
    """Why full fine-tuning cannot fit: its training state (fp32 weights, gradients, two AdamW moments: 16
    bytes a parameter), shared by `ranks` devices, already exceeds one device's memory. None: it may fit."""
    need = 16 * n_params / ranks
    if lora or need <= device_bytes:
        return None
    return (f"full fine-tuning of {n_params / 1e9:.1f}B parameters holds 16 bytes a parameter of training state "
            f"(fp32 weights, gradients, two AdamW moments): {need / 2**30:.0f} GiB a device with {ranks} "
            f"device(s) of {device_bytes / 2**30:.0f} GiB. Use LoRA (--lora 64, or --preset one-gpu) or more "
            f"GPUs under torchrun (README: Past one GPU)")


def load_model(a, ckpt: str = "") -> lfpc.Agent:
    """The policy: fp32 master weights (full fine-tuning; autocast does bf16 on GPU), or with --lora a
    frozen bf16 base and fp32 LoRA adapters (pure-bf16 AdamW at lr 1e-6 would drop most updates).
    Loads `ckpt` (resuming) or else `a.model`. A folder of LoRA adapters (what a --lora run saves)
    loads its base model, then the adapters: trained on with --lora, merged into the weights without."""
    src = ckpt or a.model
    adapter_cfg = os.path.join(src, "adapter_config.json")
    if not os.path.isfile(adapter_cfg):
        agent = load_agent(src, device=a.device, dtype=base_dtype(a))
        if a.lora:
            agent = apply_lora(agent, a.lora)
    else:
        with open(adapter_cfg) as f:
            base = json.load(f)["base_model_name_or_path"]
        agent = load_agent(base, device=a.device, dtype=base_dtype(a))
        for k, v in read_prompts(src).items():                       # the run's prompts, not the base's
            setattr(agent, k, v)
        agent = apply_lora(agent, a.lora, adapters=src)
        if not a.lora:                                                       # fp32 masters for full fine-tuning
            agent.model = agent.model.merge_and_unload().float().requires_grad_(True)     # peft froze the base
    if a.grad_ckpt:
        enable_grad_ckpt(agent.model, a.ckpt_fraction or 1.0)
    return agent


def apply_lora(agent: lfpc.Agent, rank: int, adapters: str = "") -> lfpc.Agent:
    """LoRA adapters (rank r, alpha 2r) on the language model's projections, everything else frozen;
    `adapters`: a folder of saved adapters to continue from instead of fresh ones."""
    try:
        import peft
    except ImportError:
        raise SystemExit("LoRA (--lora, or a checkpoint of LoRA adapters) needs peft, which requirements.txt installs: "
                         "pip install -r requirements.txt") from None
    if adapters:                        # their own rank and targets, from their adapter_config.json
        agent.model = peft.PeftModel.from_pretrained(agent.model, adapters, is_trainable=True)
    else:
        cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                              target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
        agent.model = peft.get_peft_model(agent.model, cfg, autocast_adapter_dtype=True)   # adapters in fp32
    if autocasts(agent):
        autocast_adapters(agent.model)
    agent.model.model = agent.model.base_model.model.model        # lfpc calls model.model / model.lm_head
    agent.model.lm_head = agent.model.base_model.model.lm_head
    return agent


def autocast_adapters(model: torch.nn.Module) -> int:
    """Let the LoRA adapters of `model` take their layer's input in its own dtype, for forwards that run under
    autocast only (`precision`'s, on a GPU). peft casts a bf16 input to the adapters' fp32 first; autocast then
    casts that copy back to bf16 for lora_A's matmul and saves it for lora_A's gradient: a copy of the
    input for every adapted layer, held until the backward (q, k and v three of the same input). Uncast,
    lora_A gets the same bf16 numbers and saves the input itself, shared: outputs and gradients are
    bit-equal (tested under CPU autocast); 7B keeps 28 KB less a token in each layer that is not
    checkpointed (3 hidden vectors and the attention's output). A forward without autocast would then
    fail loudly (bf16 input, fp32 adapter), never silently. The number of adapted layers."""
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "_cast_input_dtype")]
    for m in layers:
        m.cast_input_dtype_enabled = False          # peft's own switch (peft.helpers.disable_input_dtype_casting)
    return len(layers)


def enable_grad_ckpt(model: torch.nn.Module, fraction: float = 1.0) -> list[int]:
    """Gradient checkpointing, non-reentrant (renamed activation_checkpointing_enable after transformers 5.17),
    on `fraction` of the language model's decoder layers (`checkpointed_layers`); the indices checkpointed."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(model)
    chosen = checkpointed_layers(len(layers), fraction)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i in chosen       # transformers' per-layer switch (GradientCheckpointingLayer)
    return chosen


def checkpointed_layers(n: int, fraction: float) -> list[int]:
    """round(fraction x n) of n layers (at least one), evenly spread: 0.5 of 28 checkpoints every other layer."""
    k = min(n, max(1, round(fraction * n)))
    return sorted({j * n // k for j in range(k)})


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The language model's decoder layers in order (not the vision blocks), for a full model, a peft
    wrapper or a bare text model."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    return [m for name, m in model.named_modules()
            if isinstance(m, GradientCheckpointingLayer) and "visual" not in name.split(".")]


# ----------------------------------------------------------------------------- checkpoints: loading and saving

PROMPT_FILE = "lfpc_agent.json"   # saved beside a checkpoint: the prompts it was trained with


def load_agent(name_or_path: str, device: str = "cpu", dtype: torch.dtype = torch.bfloat16,
               attn_implementation: str = "sdpa") -> lfpc.Agent:
    """A Qwen2.5-VL checkpoint (hub name or local folder), e.g. Qwen/Qwen2.5-VL-7B-Instruct, or a folder
    written by `save_agent` (then its prompts come back too). The weights load straight onto `device`
    (accelerate's device_map): under torchrun no rank holds a host copy of the model (33 GB for 7B in fp32).
    Always the model's own PyTorch layers: transformers 5.25 on would otherwise swap some of them for kernels
    fetched from the Hub by default (and refuse to load without the `kernels` package)."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(name_or_path)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        name_or_path, dtype=dtype, attn_implementation=attn_implementation, device_map={"": torch.device(device)},
        use_kernels=False)
    return lfpc.Agent(model, tokenizer, image_processor, **read_prompts(name_or_path))


def model_problem(model: str) -> str | None:
    """Why `model` cannot be loaded, when that is known without trying: a local path that does not exist.
    A name that is not a folder is a hub id only if it looks like one (owner/name) and its first part is
    not a local folder (runs/stage1/ckpt is a path, Qwen/Qwen2.5-VL-7B-Instruct an id)."""
    if os.path.exists(model):
        return None if os.path.isdir(model) else f"model {model!r} is a file; pass its folder"
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model) and not os.path.isdir(model.split("/")[0]):
        return None
    return f"model {model!r} not found (no such folder, and not a hub id owner/name)"


def read_prompts(path: str) -> dict[str, str]:
    """The prompts `save_agent` wrote beside a checkpoint ({} for a hub name or a plain checkpoint)."""
    file = os.path.join(path, PROMPT_FILE)
    if not os.path.isfile(file):
        return {}
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def save_agent(agent: lfpc.Agent, path: str, state_dict: dict | None = None) -> None:
    """Model, tokenizer, image processor and prompts in one folder that `load_agent` reads back.
    `state_dict`: the model's weights gathered whole (a sharded model's, dist.full_state)."""
    from transformers.utils import logging as hf_logging
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()                   # no bar for each checkpoint between the step lines
    try:
        agent.model.save_pretrained(path, **({"state_dict": state_dict} if state_dict is not None else {}))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    agent.tokenizer.save_pretrained(path)
    agent.image_processor.save_pretrained(path)
    with open(os.path.join(path, PROMPT_FILE), "w", encoding="utf-8") as f:
        json.dump({"system_prompt": agent.system_prompt, "instruction": agent.instruction, "style": agent.style,
                   "direct_instruction": agent.direct_instruction}, f,
                  indent=1)

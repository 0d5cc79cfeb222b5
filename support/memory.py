"""Peak GPU memory of one stage-1 step of a real Qwen2.5-VL config, estimated on a CPU in minutes without
allocating the weights.

    python -m support.bench --config 7b --estimate-memory --lora 64                   # 7B LoRA r64, 1K global images
    python -m support.bench --config 7b --estimate-memory --lora 64 --visual-tokens 16384 --rollout-rows 8
    python -m support.bench --config 3b --estimate-memory                             # 3B full fine-tuning
    python -m support.bench --config 7b --estimate-memory --world 8                   # 7B full fine-tuning, a rank of 8

Method: the language model runs under torch's FakeTensorMode (shapes and dtypes, no storage) inside
`torch.distributed._tools.mem_tracker.MemTracker`, which records the bytes alive at the peak by kind
(parameters, gradients, optimizer state, activations and temporaries). A step has two phases, and its
peak is the larger of the two:
- held throughout: the weights and AdamW's two fp32 moments of what trains (from the first step on);
  gradients exist from the first backward of a step until `train.update_policy` frees them after its
  optimizer step (so the rollout never holds them);
- rollout: under LoRA the copy of the model that samples (`policy.sampler`: bf16, the adapters merged
  into it); the KV cache of one rollout chunk at its longest (`--rollout-rows` rows of the
  bound length: prompt + all response tokens + every crop; exact formula `kv_bytes`), and the largest
  prefill of the cached engine (one chunk's prompts, or an observation of one crop for every row, as
  many rows as `prefill_tokens` admit: the engine's cap on one forward), tracked as a no-grad forward;
- training: every gradient (a step's later micro-batches run while the earlier ones' gradients are
  held), and the peak activations of one micro-batch of `--train-tokens` padded tokens (episodes of
  the bound length) through the forward with gradient checkpointing, the chunked log-prob head
  (`lfpc.token_logprobs`'s building block, `--logprob-chunk` tokens at a time) and backward, tracked.
  The AdamW update itself adds nothing of the parameters' size: train.py uses fused AdamW on a GPU
  (the default for-each AdamW would add up to the trainable parameters' size again).
The vision tower cannot run under fake tensors (its windowing computes shapes from values), so it is
measured on REAL CPU tensors with the published vision config on a small image and scaled linearly
in patches (windowed attention and memory-efficient full attention are linear in memory): frozen under
LoRA (a transient of the forward), trained under full fine-tuning (its checkpointed activations held
through the backward). What the estimate leaves out: the CUDA context and cuBLAS workspaces (~1 GB),
allocator fragmentation (10-20 % on long runs), the host memory of the episodes (`episode_bytes`), and
the copy of its rows' cached keys and values an extension forward gathers, a layer at a time (7B: 12 rows
of an 8.5K context, 0.2 GiB; support/attention.py keeps sdpa from repeating them to the query heads).
A test checks that the fake-tensor numbers of the tiny model agree with the same step on real tensors.
Under torchrun (`world` ranks), full fine-tuning holds 1/world of the weights, gradients and AdamW
state (FSDP2) but the lm_head's, which every rank holds whole (support/dist.py says why), and gathers the
sharded weights for its rollouts, in bf16 (the mixed-precision policy's param_dtype); the activations
of the sharded training step are those of the unsharded one (one layer gathered at a time is not
counted).
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, replace

import torch

import lfpc
from support import models

GiB = 2**30


@dataclass
class StepShape:
    """The step whose memory is estimated (defaults: 7B, LoRA r64, the 1K global budget, 16 rows a rollout
    chunk, 16K-token micro-batches, every layer checkpointed; the one-gpu preset: `rollout_rows=64,
    train_tokens=32768, ckpt_fraction=0.75`, as .ci/gpu and the README's commands pass them)."""
    config: str = "7b"
    lora: int = 64                   # 0: full fine-tuning (fp32 master weights, bf16 autocast)
    visual_tokens: int = 1024        # global image
    text_tokens: int = 200           # system prompt, question, chat tags
    response_tokens: int = 2048      # sampled tokens of an episode, all turns
    crops: int = 4                   # crops an episode may hold (max_turns - 1)
    crop_tokens: int = 1280          # visual tokens of a crop (the crop budget)
    rollout_rows: int = 16           # episodes sharing one rollout chunk's KV cache
    prefill_tokens: int = lfpc.RolloutConfig.prefill_tokens   # tokens one prefill forward computes, at most
    group: int = 16                  # rollouts per prompt: a chunk prefills rollout_rows / group prompts
    train_tokens: int = 16384        # padded tokens per training micro-batch
    logprob_chunk: int = 1024        # lm_head rows at a time in the log-prob head
    grad_ckpt: bool = True
    ckpt_fraction: float = 1.0       # of the decoder layers checkpointed (policy.enable_grad_ckpt)
    world: int = 1                   # ranks under torchrun: full fine-tuning shards its training state (support/dist.py)

    @property
    def episode_tokens(self) -> int:
        """The bound on an episode's length: prompt, responses, and each crop with its turn's tags."""
        return self.visual_tokens + self.text_tokens + self.response_tokens + self.crops * (self.crop_tokens + 30)


def estimate(s: StepShape, vision: bool = True, fake: bool = True) -> dict:
    """The two phases' peaks by kind, in bytes, and the step's peak (module docstring). `fake=False` runs
    the same phases on real CPU tensors (the tiny config: what the test compares against)."""
    config = model_config(s.config)
    text = config.get_text_config()
    weights = _weights_bytes(config, s.lora)
    kv = kv_bytes(text, s.rollout_rows, s.episode_tokens)
    prompts = max(1, s.rollout_rows // s.group)
    frozen = lambda: _language_model(config, 0, frozen=True)[:1]
    rows = lambda n, tokens: max(1, min(n, s.prefill_tokens // tokens))   # the engine's cap on one forward
    prefill = max(_tracked(frozen, lambda lm: _prefill_step(lm, rows(prompts, s.visual_tokens + s.text_tokens),
                                                            s.visual_tokens + s.text_tokens), fake),
                  _tracked(frozen, lambda lm: _prefill_step(lm, rows(s.rollout_rows, s.crop_tokens + 30),
                                                            s.crop_tokens + 30), fake),
                  key=lambda snap: snap["activations"])
    trainable = _trainable_bytes(config, s.lora)
    shards = s.world if not s.lora else 1                             # FSDP2 shards full fine-tuning only
    whole = 4 * text.vocab_size * text.hidden_size if shards > 1 else 0   # the lm_head, whole on every rank (fp32)
    part = lambda n: (n - whole) // shards + whole                    # n bytes (the lm_head's `whole` in them)
    held = {"weights": part(weights), "optimizer": 2 * part(trainable)}   # AdamW's moments: from step 1 on
    rollout = {**held, "kv_cache": kv, "activations": prefill["activations"]}
    if s.lora:
        rollout["merged_copy"] = 2 * _parameters(config)       # policy.sampler: a bf16 copy, the adapters merged in
    if shards > 1:
        rollout["gathered_weights"] = (weights - whole) // 2   # the shards gathered for rollouts, in bf16
                                                               # (FSDP2's param_dtype, dist.shard)
    per_mb = max(1, s.train_tokens // s.episode_tokens)
    step = _training_step(config, s, fake)
    train = {**held, "gradients": part(trainable), "activations": step["activations"]}   # every gradient
    head = _tracked(lambda: (_Policy(*_language_model(config, s.lora), s).head,),
                    lambda h: _head_step(h, s, config.get_text_config().hidden_size), fake)
    out = {"shape": {**asdict(s), "episode_tokens": s.episode_tokens, "episodes_per_micro_batch": per_mb},
           "rollout": rollout, "training": train, "logits_per_chunk": head["activations"],
           "tracked_training_step": step}
    if vision:
        v = vision_bytes(config, s.visual_tokens * 4, train=not s.lora)
        rollout["vision"] = v["transient"]
        train["vision"] = v["held"] * per_mb + v["transient"]
    for phase in ("rollout", "training"):
        out[phase]["total"] = sum(v for k, v in out[phase].items() if k != "total")
    out["peak"] = max(out["rollout"]["total"], out["training"]["total"])
    return out


def _training_step(config, s: StepShape, fake: bool = True, device: str = "cpu") -> dict:
    """The tracked forward and backward of one micro-batch (the training phase's activations)."""
    per_mb = max(1, s.train_tokens // s.episode_tokens)
    policy = lambda: (_Policy(*_language_model(config, s.lora), s),)
    return _tracked(policy, lambda p: _forward_backward(p, s, per_mb), fake, device)


def measure_training(s: StepShape, device: str = "cuda", with_estimate: bool = True) -> dict:
    """The training phase's micro-batch on REAL tensors on `device` (a GPU: `.ci/gpu`), beside the estimate:
    bytes by kind as MemTracker saw them on the device, the allocator's own peak above what was allocated
    before (the weights included: the language model's, built there), and the fake-tensor estimate of the
    same step. What the estimate's training activations claim, checked where it matters."""
    config = model_config(s.config)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else 0
    real = _training_step(config, s, fake=False, device=device)
    peak = torch.cuda.max_memory_allocated(device) - before if cuda else None
    return {"device": str(device), "tracked": real, "allocator_peak": peak,
            "estimate": _training_step(config, s, fake=True) if with_estimate else None}


@contextlib.contextmanager
def kept_for_backward():
    """The bytes autograd keeps for the backward of the forwards run inside: yields a dict whose "bytes" (the
    distinct storages saved, each once however many ops save it) is filled as they run."""
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        kept["bytes"] = sum(storages.values())
        return t
    kept = {"bytes": 0}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield kept


CKPT_FRACTIONS = (1.0, 0.75, 0.5, 0.25, 0.0)     # 0: no checkpointing


def ckpt_sweep(s: StepShape, device_gib: float = 80.0) -> dict:
    """The training phase's peak for each fraction of checkpointed decoder layers, beside its cost in
    forward-equivalents a training token (forward 1, the recompute `fraction`, backward 2 under full
    fine-tuning or 1 under LoRA: frozen weights get no weight gradients), and the cheapest fraction whose
    step fits `device_gib` less the CUDA context (1 GiB) and 10 % for fragmentation."""
    full = estimate(replace(s, ckpt_fraction=1.0, grad_ckpt=True))
    config = model_config(s.config)
    rows = []
    for f in CKPT_FRACTIONS:
        if f == 1.0:
            train = full["training"]
        else:
            step = _training_step(config, replace(s, ckpt_fraction=f or 1.0, grad_ckpt=f > 0))
            train = {**full["training"], "activations": step["activations"]}
            train["total"] = sum(v for k, v in train.items() if k != "total")
        peak = max(full["rollout"]["total"], train["total"])
        rows.append({"ckpt_fraction": f, "activations_bytes": train["activations"],
                     "training_gib": round(train["total"] / GiB, 2), "activations_gib": round(train["activations"] / GiB, 2),
                     "step_peak_bytes": peak, "step_peak_gib": round(peak / GiB, 2),
                     "forwards_per_token": 1 + f + (1 if s.lora else 2)})
    return fit_sweep({"mode": "ckpt-sweep", "shape": full["shape"],
                      "rollout_gib": round(full["rollout"]["total"] / GiB, 2), "rows": rows}, device_gib)


def fit_sweep(r: dict, device_gib: float) -> dict:
    """The sweep `r` against a device of `device_gib`: which rows fit, and the cheapest that does."""
    usable = (0.9 * device_gib - 1) * GiB
    rows = [{**x, "fits": x["step_peak_bytes"] <= usable} for x in r["rows"]]
    fitting = [x for x in rows if x["fits"]]
    best = min(fitting, key=lambda x: x["forwards_per_token"]) if fitting else None
    return {**r, "device_gib": device_gib, "usable_gib": round(usable / GiB, 2), "rows": rows,
            "choice": best and best["ckpt_fraction"]}


def format_sweep(r: dict) -> str:
    """The sweep as a table, and the choice."""
    lines = [f"rollout phase {r['rollout_gib']} GiB; usable of {r['device_gib']:g} GiB: {r['usable_gib']} GiB",
             "| ckpt fraction | activations GiB | training GiB | step peak GiB | forwards a token | fits |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {x['ckpt_fraction']:g} | {x['activations_gib']} | {x['training_gib']} | {x['step_peak_gib']} | "
              f"{x['forwards_per_token']:g} | {'yes' if x['fits'] else 'no'} |" for x in r["rows"]]
    lines.append(f"cheapest that fits: --ckpt-fraction {r['choice']:g}" if r["choice"] is not None
                 else "none fits: lower --train-tokens")
    return "\n".join(lines)


def model_config(name: str):
    """The published config of "7b" / "3b" (models.real_config), or "tiny" (models.tiny_agent's)."""
    if name == "tiny":
        return models.tiny_agent().model.config
    return models.real_config(name, models.build_tiny_tokenizer())


def kv_bytes(text_config, rows: int, tokens: int, bytes_per: int = 2) -> int:
    """Keys and values of every layer for rows x tokens, in bf16: 2 x layers x kv heads x head dim each."""
    c = text_config
    head_dim = c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * bytes_per * rows * tokens


def _weights_bytes(config, lora: int) -> int:
    """The whole model's weights: a bf16 base and fp32 adapters under LoRA, fp32 master weights else."""
    return 4 * _parameters(config) if not lora else 2 * _parameters(config) + _trainable_bytes(config, lora)


def _parameters(config) -> int:
    from transformers import Qwen2_5_VLForConditionalGeneration
    with torch.device("meta"):
        return sum(p.numel() for p in Qwen2_5_VLForConditionalGeneration(config).parameters())


def _trainable_bytes(config, lora: int) -> int:
    """fp32 bytes of what trains: the LoRA adapters (rank `lora` on q, k, v, o, gate, up, down of every
    layer), or the whole model. Gradients take as much, AdamW's two moments twice as much."""
    if not lora:
        return 4 * _parameters(config)
    c = config.get_text_config()
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    shapes = [(c.hidden_size, c.hidden_size), (c.hidden_size, kv), (c.hidden_size, kv), (c.hidden_size, c.hidden_size),
              (c.hidden_size, c.intermediate_size), (c.hidden_size, c.intermediate_size),
              (c.intermediate_size, c.hidden_size)]                       # q, k, v, o, gate, up, down
    return 4 * c.num_hidden_layers * sum(lora * (i + o) for i, o in shapes)


# ----------------------------------------------------------------------------- the tracked phases

def _tracked(build, run, fake: bool = True, device: str = "cpu") -> dict:
    """Build the modules (under FakeTensorMode when `fake`; on `device`), then `run(*modules)` under MemTracker;
    the peak snapshot in bytes by kind. The modules are built before tracking starts; their trainable parameters
    are registered with the tracker (their gradients and optimizer state are then attributed), frozen
    weights are not (`estimate` counts all weights from the config)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() if fake else contextlib.nullcontext(), torch.device(device):
        modules = build()
        tracker = _tracker()
        trainable = [m for top in modules for m in top.modules()
                     if any(p.requires_grad for p in m.parameters(recurse=False))]
        if trainable:                  # the tracker hooks every parameter it tracks for its gradient
            tracker.track_external(*trainable)
        with tracker:
            run(*modules)
    snap = next(iter(tracker.get_tracker_snapshot("peak").values()))
    return {"weights": snap.get("Parameter", 0) + snap.get("Buffer", 0), "gradients": snap.get("Gradient", 0),
            "optimizer": snap.get("Optstate", 0), "activations": snap.get("Activation", 0) + snap.get("Temp", 0)
            + snap.get("Other", 0)}


def _tracker():
    """torch's MemTracker, taught to skip its gradient hooks on modules holding frozen parameters (it would
    refuse them: a hook needs requires_grad); the LoRA adapters' own modules still get theirs."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            trainable = all(p.requires_grad for p in module.parameters())
            return super()._track_module_params_and_buffers(module, install_grad_hooks and trainable)
    return Tracker()


def _language_model(config, lora: int, frozen: bool = False):
    """The language model and lm_head in training dtypes: bf16 frozen + fp32 LoRA adapters, or fp32 masters;
    `frozen`: bf16, no adapters (the model that samples: the merged copy, or the gathered bf16 shards)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if lora or frozen else torch.float32)     # built in its dtype (fake tensors
    try:                                                                     # cannot be cast after the fact)
        lm = Qwen2_5_VLTextModel(config.get_text_config())
        head = torch.nn.Linear(lm.config.hidden_size, lm.config.vocab_size, bias=False)
    finally:
        torch.set_default_dtype(prev)
    if lora or frozen:
        lm.requires_grad_(False)
        head.requires_grad_(False)
    if lora and not frozen:
        for name, module in list(lm.named_modules()):
            for child, layer in list(module.named_children()):
                if child in LORA_TARGETS and isinstance(layer, torch.nn.Linear):
                    setattr(module, child, LoRALinear(layer, lora))
    return lm, head


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")   # policy.apply_lora's


class LoRALinear(torch.nn.Module):
    """What peft's LoRA Linear computes on the GPU path (tested equal, and that autograd keeps the same
    bytes): base(x) + B(A(x)) * alpha / r under bf16 autocast, x as it comes (`policy.autocast_adapters`),
    the adapters in fp32, B zero at the start. peft itself cannot wrap fake modules (it moves adapters
    with .to(), which fake parameters refuse)."""

    def __init__(self, base: torch.nn.Linear, r: int):
        super().__init__()
        self.base, self.scale = base, 2.0                          # alpha = 2r, as policy.apply_lora
        self.lora_A = torch.nn.Linear(base.in_features, r, bias=False, dtype=torch.float32)
        self.lora_B = torch.nn.Linear(r, base.out_features, bias=False, dtype=torch.float32)
        torch.nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        out = self.base(x)
        return (out + self.lora_B(self.lora_A(x)) * self.scale).to(out.dtype)


def _prefill_step(lm, rows: int, tokens: int) -> None:
    """A no-grad prefill of rows x tokens (the KV cache's own bytes are counted as kv_cache)."""
    x = torch.zeros(rows, tokens, lm.config.hidden_size, dtype=torch.bfloat16)
    with torch.no_grad():
        lm(inputs_embeds=x, position_ids=_positions(rows, tokens), use_cache=False)


class _Policy(torch.nn.Module):
    """The language model and the log-prob head as one module (MemTracker allows a submodule, not a root
    module, to be called several times in a step: the head runs once per chunk)."""

    def __init__(self, lm, head, s: StepShape):
        super().__init__()
        self.lm, self.head, self.s = lm, head, s

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        import lfpc
        s, T = self.s, x.shape[1]
        h = self.lm(inputs_embeds=x, position_ids=_positions(x.shape[0], T), use_cache=False).last_hidden_state
        hs = h[:, T - s.response_tokens - 1:-1].reshape(-1, h.shape[-1])          # [N, H]: the response positions
        return torch.cat([torch.utils.checkpoint.checkpoint(lfpc._target_logprobs, self.head, hs[i:i + s.logprob_chunk],
                                                            targets[i:i + s.logprob_chunk], 1.0, [], use_reentrant=False)
                          for i in range(0, len(targets), s.logprob_chunk)])        # [N]


def _forward_backward(policy: _Policy, s: StepShape, episodes: int) -> None:
    """One micro-batch: forward (gradient checkpointing), the chunked log-prob head over the response
    tokens, backward. Mirrors train.update_policy with a static response slice."""
    from support import policy as policy_lib
    if s.grad_ckpt:
        policy_lib.enable_grad_ckpt(policy.lm, s.ckpt_fraction)
    policy.train()
    x = torch.zeros(episodes, s.episode_tokens, policy.lm.config.hidden_size,     # on the default device
                    dtype=torch.bfloat16 if s.lora else torch.float32)
    targets = torch.zeros(episodes * s.response_tokens, dtype=torch.long)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):    # policy.precision on a GPU
        lp = policy(x, targets)
    lp.sum().backward()


def _head_step(head, s: StepShape, hidden: int) -> None:
    """One chunk of the log-prob head, forward and backward: the [chunk, vocabulary] logits' share."""
    import lfpc
    h = torch.zeros(s.logprob_chunk, hidden, dtype=torch.bfloat16 if s.lora else torch.float32, requires_grad=True)
    with torch.autocast(h.device.type, dtype=torch.bfloat16):    # policy.precision on a GPU
        lp = lfpc._target_logprobs(head, h, torch.zeros(s.logprob_chunk, dtype=torch.long), 1.0, [])
    lp.sum().backward()


def _positions(rows: int, tokens: int) -> torch.Tensor:
    return torch.arange(tokens).view(1, 1, -1).expand(3, rows, -1)


# ----------------------------------------------------------------------------- the vision tower, on real tensors

def vision_bytes(config, patches: int, train: bool, sample_side: int = 16) -> dict:
    """The vision tower's memory for an image of `patches` 14-px patches, measured on real CPU tensors
    (the published vision config, a sample_side x sample_side-patch image, bf16) and scaled linearly:
    "transient" (the forward's peak beyond its weights) and "held" (activations kept for the backward
    when the tower trains, with gradient checkpointing: one tensor per block)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    vc = config.vision_config
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(vc)
    finally:
        torch.set_default_dtype(prev)
    n = sample_side * sample_side
    pix = torch.zeros(n, vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2, dtype=torch.bfloat16)
    grid = torch.tensor([[1, sample_side, sample_side]])
    with torch.no_grad():
        snap = _tracked(lambda: (tower,), lambda t: t(pix, grid_thw=grid), fake=False)
    scale = patches / n
    held = vc.depth * patches * vc.hidden_size * 2 if train else 0     # one bf16 [patches, hidden] per block
    return {"transient": int(snap["activations"] * scale), "held": held}


# ----------------------------------------------------------------------------- host memory of the episodes

def episode_bytes(episodes) -> dict:
    """Host bytes the step's episodes hold, with shared images counted once: the images as PIL (uint8), the
    token lists; and what fp32 pixel tensors kept per episode and image (the design before) would hold."""
    images = {id(im): im for e in episodes for im in e.images}
    pil = sum(im.width * im.height * len(im.getbands()) for im in images.values())
    tokens = sum(len(e.token_ids) for e in episodes)
    fp32_per_episode = sum(im.width * im.height // 14**2 * 3 * 2 * 14**2 * 4 for e in episodes for im in e.images)
    return {"images": pil, "token_lists": tokens * 3 * 8, "distinct_images": len(images),
            "fp32_pixels_per_episode_before": fp32_per_episode}


def format_report(r: dict) -> str:
    """The breakdown as aligned text, in GiB."""
    lines = [f"{r['shape']['config']} {'LoRA r' + str(r['shape']['lora']) if r['shape']['lora'] else 'full fine-tuning'}"
             f"{', one rank of ' + str(r['shape']['world']) if r['shape']['world'] > 1 else ''}, "
             f"episodes of {r['shape']['episode_tokens']} tokens (global {r['shape']['visual_tokens']}, response "
             f"{r['shape']['response_tokens']}, {r['shape']['crops']} crops of {r['shape']['crop_tokens']})"]
    for phase in ("rollout", "training"):
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in r[phase].items() if k != "total")
        lines.append(f"  {phase:<9} {r[phase]['total'] / GiB:6.2f} GiB at its peak ({parts})")
    lines.append(f"  logits of one chunk of the log-prob head (part of the activations) {r['logits_per_chunk'] / GiB:.2f}")
    lines.append(f"  peak      {r['peak'] / GiB:6.2f} GiB")
    return "\n".join(lines)


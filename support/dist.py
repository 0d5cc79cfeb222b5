"""Past one GPU: the same train.py under torchrun, data parallel, with PyTorch's own tools, no framework.

    torchrun --nproc_per_node 8 train.py --stage 1 --preset paper --data train.jsonl

Contract
--------
- `setup()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK). Without it (a plain `python
  train.py`) there is no process group, `World(rank=0, size=1)`, and every helper below is the identity:
  single-process runs are untouched. Backends: nccl for CUDA tensors (device cuda:LOCAL_RANK) and gloo
  for the CPU tensors of the counts and norms; gloo alone on a CPU machine.
- Work: each rank rolls out its own contiguous share of the step's prompts (whole GRPO groups, so
  advantages need no communication; `--prompts` must divide by the world size). Episode k of the step,
  counted over the WHOLE step, samples from the stream seeded (seed, step, k): N ranks sample exactly
  the episodes one process would.
- Gradients: every rank divides its loss by the token count of the whole step (`all_sum` before the
  first backward) and multiplies it by the world size; gradients are then AVERAGED across ranks, so N
  ranks give the gradient of one big batch:
  * parameters a rank holds whole (LoRA adapters; under FSDP2 the few small ones left whole): one
    all-reduce (average) after the step's micro-batches, `average_gradients`: DDP's averaging, written
    out once per step instead of once per micro-batch because ranks hold different numbers of them;
  * full fine-tuning: FSDP2 (`torch.distributed.fsdp.fully_shard`, `shard`) on every decoder layer,
    every vision block and the token embedding (untied), each its own root (the engine calls them
    directly); master weights fp32, compute bf16 on a GPU (MixedPrecisionPolicy). The lm_head stays
    whole on every rank: the chunked log-prob head calls it once per chunk of sampled tokens, a count
    that differs between ranks, and every call of a sharded module is a collective. Sharded gradients
    are reduce-scattered (averaged) after every micro-batch (accumulating them unsynchronised would hold
    them unsharded, in fp32); every rank runs the same number of micro-batches (`micro_batches`: the
    largest any rank has; the others repeat one of their own with a zero loss). Sharded and whole
    parameters sit in separate optimizer groups (`param_groups`: fused AdamW takes one kind a call).
    Rollouts and the prober run with every shard gathered (`gathered`): ranks sample turns of different
    lengths, and a sharded forward would hold them in lock-step.
- Clipping and the weight guard use norms over all ranks (`grad_norm`, `weight_norm`).
- Checkpoints: the full state dicts are gathered (torch.distributed.checkpoint.state_dict) and rank 0
  writes them, atomically, as a single process does; the world size is saved and a resume under
  another is refused. Logs and metrics: rank 0, over every rank's episodes (`gather`).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def setup() -> World:
    """The process group when launched by torchrun (idempotent), else a world of one."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return World()
    if not tdist.is_initialized():
        # nccl for CUDA tensors (FSDP2, gradients); gloo for the small CPU tensors of all_sum, all_max, norms
        tdist.init_process_group("cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo")
    w = World(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if torch.cuda.is_available():
        torch.cuda.set_device(w.local_rank)
    return w


def device(w: World, requested: str) -> str:
    """The rank's device: cuda:LOCAL_RANK on a GPU machine under torchrun, else what was asked."""
    return f"cuda:{w.local_rank}" if w.distributed and requested.startswith("cuda") else requested


def share(items: list, w: World) -> tuple[list, int]:
    """This rank's contiguous share of `items` (their count divides by the world size) and its offset."""
    n = len(items) // w.size
    return items[w.rank * n:(w.rank + 1) * n], w.rank * n


# ----------------------------------------------------------------------------- collectives (identity alone)

def all_sum(x, w: World):
    """The sum over ranks of a number, or of each number of a list (one collective)."""
    if not w.distributed:
        return x
    t = torch.tensor([float(v) for v in x] if isinstance(x, list) else [float(x)], dtype=torch.float64)
    tdist.all_reduce(t)
    return t.tolist() if isinstance(x, list) else float(t[0])


def all_max(x: int, w: World) -> int:
    if not w.distributed:
        return x
    t = torch.tensor([int(x)])
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return int(t[0])


def gather(obj, w: World) -> list:
    """Every rank's `obj`, in rank order (pickled; keep it small)."""
    if not w.distributed:
        return [obj]
    out = [None] * w.size
    tdist.all_gather_object(out, obj)
    return out


def gather_episodes(episodes: list, tasks: list, zero_std: float, w: World) -> tuple[list, list, float]:
    """Every rank's episodes and tasks (episodes re-indexed to the joined task list), for the step's
    metrics: sent without token ids, log-probs and images (an in-memory image becomes a 1-bit blank of
    its size), and the fraction of all-equal groups over all ranks."""
    from PIL import Image
    light = ([replace(e, token_ids=[], logprobs=[], images=[], grids=[], crops=[replace(c, image=None) for c in e.crops])
              for e in episodes],
             [replace(t, image=t.image if isinstance(t.image, str) else Image.new("1", t.image.size)) for t in tasks],
             zero_std)
    all_eps, all_tasks = [], []
    parts = gather(light, w)
    for eps, ts, _ in parts:
        all_eps += [replace(e, task_index=e.task_index + len(all_tasks)) for e in eps]
        all_tasks += ts
    return all_eps, all_tasks, sum(z for _, _, z in parts) / len(parts)


def barrier(w: World) -> None:
    if w.distributed:
        tdist.barrier()


# ----------------------------------------------------------------------------- the model across ranks

def shard(model, w: World) -> None:
    """FSDP2 on the bulk of a full fine-tuned model (module docstring); the rest stays whole."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if torch.cuda.is_available() else None,
                              reduce_dtype=torch.float32)
    for module in sharded_modules(model):
        fully_shard(module, mp_policy=mp, reshard_after_forward=True)


def sharded_modules(model) -> list:
    """Modules every rank calls equally often: decoder layers, vision blocks, and the token embedding
    unless the lm_head shares its weight (tied, e.g. the 3B config). Not the lm_head (module docstring)."""
    lm = model.model.language_model
    tied = model.lm_head.weight is lm.embed_tokens.weight
    return [*lm.layers, *model.model.visual.blocks] + ([] if tied else [lm.embed_tokens])


def param_groups(params: list) -> list[dict]:
    """AdamW groups: the sharded parameters, then the whole ones (a fused step takes one kind a call)."""
    groups = [[p for p in params if _is_sharded(p)], [p for p in params if not _is_sharded(p)]]
    return [{"params": g} for g in groups if g]


def _fsdp(model) -> list:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model):
    """Every FSDP2 shard gathered for the duration (rollouts: ranks run independently); no-op unsharded."""
    mods = _fsdp(model)
    for m in mods:
        m.set_reshard_after_forward(False)
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(True)


def _is_sharded(p) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(p, DTensor)


def average_gradients(params: list, w: World) -> None:
    """All-reduce (average) the gradients of the parameters every rank holds whole."""
    if not w.distributed:
        return
    for p in params:
        if _is_sharded(p):
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        tdist.all_reduce(p.grad)
        p.grad /= w.size


def _norm(tensors: list, w: World) -> float:
    """The 2-norm of tensors across ranks: a sharded tensor's local shards summed over ranks, whole ones once."""
    local = torch.zeros((), dtype=torch.float64)
    whole = torch.zeros((), dtype=torch.float64)
    for t in tensors:
        if _is_sharded(t):
            local += t.to_local().double().pow(2).sum().cpu()
        else:
            whole += t.double().pow(2).sum().cpu()
    if w.distributed:
        tdist.all_reduce(local)
    return float((local + whole).sqrt())


def grad_norm(params: list, w: World, max_norm: float) -> float:
    """The gradients' total norm over all ranks, clipped to max_norm (as clip_grad_norm_); the norm before."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = _norm(grads, w)
    if norm > max_norm and norm == norm:                 # not nan
        for g in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return norm


def weight_norm(params: list, w: World) -> float:
    return _norm([p.detach() for p in params], w)


def micro_batches(batches: list, w: World, model) -> list:
    """Under FSDP2, the same number of micro-batches on every rank: the largest any rank has, the others
    padded with None (the trainer repeats one of its episodes with a zero weight); else as they are."""
    if not _fsdp(model):
        return batches
    n = all_max(len(batches), w)
    return batches + [None] * (n - len(batches))


def full_state(model, opt, w: World) -> tuple[dict | None, dict]:
    """(model state dict or None when unsharded, optimizer state dict), whole, on every rank."""
    if not _fsdp(model):
        return None, opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, opt, options=options)


def load_optimizer(model, opt, state: dict) -> None:
    """Load a whole optimizer state (as full_state wrote it) into a sharded or unsharded optimizer."""
    if not _fsdp(model):
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    # strict=False: AdamW has no state for a parameter that never had a gradient yet
    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True, strict=False))

"""GRPO: group-normalised advantages and the clipped token-level policy loss, written out by hand.

Contract (torch only; pure: tensors in, (loss or advantages, metrics) out; no model, no tokenizer)
--------
Advantages. Rewards [N], N = P*G, the G rollouts of prompt p in rows p*G .. p*G+G-1:
    A_i = (r_i - mean_group) / (std_group + eps),   std = SAMPLE std (ddof=1),  eps = 1e-6
The sample std and eps = 1e-6 are verl's (DeepEyes, and so LFPC, build on verl); the original
GRPO formula only says "std". A group whose rewards are all equal has no signal: its advantages
are set to exactly 0 (not float noise / eps, which can be ~0.05 for G identical 0.9s in fp32) and
its fraction is logged ("frac_zero_std"). group_size 1 has no std: every advantage is 0 (and
every group counts as all-equal).

Policy loss, per generated token t of sequence i (mask 1), with one advantage per sequence:
    ratio_t = exp(logp_t - old_t)
    l_t     = -min(ratio_t * A_i, clip(ratio_t, 1 - clip_low, 1 + clip_high) * A_i) + beta * k3_t
    k3_t    = min(exp(d) - d - 1, 10),  d = clamp(ref_t - logp_t, -20, 20)   (Schulman's k3, >= 0, of KL(pi || ref);
              the clamps are verl's: one token can neither own the whole gradient nor make the loss inf)
clip 0.2 / 0.2 (PPO; DAPO raises clip_high); beta = 0 as DeepEyes and LFPC (no reference model).
Two aggregations, both divided by counts of the WHOLE optimiser step, not of the micro-batch:
    "token-mean" (DAPO, verl; DeepEyes): loss = sum_it l_it / num_tokens      (every token weighs 1)
    "seq-mean"   (original GRPO):        loss = sum_i (sum_t l_it / n_i) / num_seqs
n_i is sequence i's own token count (a sequence with none contributes 0 but still counts in
num_seqs, whose default is B). Seq-mean gives each sequence equal weight, so each token of a long
answer weighs less (the length bias DAPO removes).
Why whole-step counts: the step's loss is a mean over the whole step. Dividing each micro-batch by
its own count and summing would weigh tokens of small micro-batches more. With num_tokens /
num_seqs of the whole step, the sum of the micro-batch losses (and gradients) equals the loss
(and gradient) of one big batch, up to float rounding. None means "this batch is the whole step".

WARNING, reading the loss. With one update per batch, logp == old, so ratio = 1, nothing is
clipped and the loss is -sum(A * m) / count. Under seq-mean that is 0 up to rounding (advantages
are zero-mean in each group); under token-mean it is -sum_i A_i n_i / N (n_i episode i's tokens),
so it follows how length goes with reward (rewards [1, 0], lengths [100, 300]: +0.35), not
progress. Its gradient is the REINFORCE gradient and is not 0. Watch the reward, not the loss.

Masked positions (prompt, tool responses, padding) get EXACTLY zero gradient whatever their
values (-inf, nan): they are replaced by 0 with torch.where BEFORE any arithmetic, since a where
after exp() would still send inf * 0 = nan back through the unused branch.

Metrics (python floats, over mask-1 tokens of this batch only, no grad): "clip_frac" (the min
picked the clipped term and it differs), "ratio_mean", "approx_kl" (k3 of KL(pi_old || pi_theta)
on the sampled tokens: mean(ratio - 1 - log ratio) >= 0, where verl logs k1 = mean(old - logp)),
"kl_ref" (mean k3 to the reference, only when beta > 0), "num_tokens" (this batch's mask count).
"""
from __future__ import annotations

import torch

AGGREGATIONS = ("token-mean", "seq-mean")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x where mask is true (nonzero), over `dim` (None: all). Empty -> 0, never nan;
    values under mask 0 are never read, so they may be inf or nan."""
    m = mask.bool()
    x = torch.where(m, x, torch.zeros_like(x))
    if dim is None:
        return x.sum() / m.sum().clamp(min=1)
    return x.sum(dim) / m.sum(dim).clamp(min=1)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """Advantages [N] from rewards [N] (float), groups of `group_size` contiguous rows.
    Metrics: "frac_zero_std" (fraction of groups with all-equal rewards), "reward_mean",
    "reward_std" (over all N rewards, population std so that N = 1 gives 0, not nan)."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"N = {rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.detach() if rewards.is_floating_point() else rewards.detach().float()
    groups = r.view(-1, group_size)                                   # [P, G]
    all_equal = (groups == groups[:, :1]).all(dim=1)                  # [P]  exact test, not std < tol
    if group_size == 1:
        adv = torch.zeros_like(groups)                                # [P, 1]  std undefined
    else:
        mean = groups.mean(dim=1, keepdim=True)                       # [P, 1]
        std = groups.std(dim=1, correction=1, keepdim=True)           # [P, 1]  sample std
        adv = (groups - mean) / (std + eps)                           # [P, G]
        adv = torch.where(all_equal[:, None], torch.zeros_like(adv), adv)
    metrics = {
        "frac_zero_std": all_equal.float().mean().item(),
        "reward_mean": r.mean().item(),
        "reward_std": r.std(correction=0).item(),
    }
    return adv.reshape(-1), metrics                                   # [N]


K3_LOG_RATIO_CLAMP, K3_MAX = 20.0, 10.0          # verl's clamps (low_var_kl)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref) on tokens sampled from pi: exp(d) - d - 1, d = ref - logp,
    d clamped to +-20 and the result to at most 10 (as verl). Non-negative, 0 where the two agree; same
    shape as the inputs."""
    d = (ref_logprobs - logprobs).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    return (torch.exp(d) - d - 1).clamp(max=K3_MAX)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped GRPO loss (scalar, differentiable w.r.t. logprobs) and metrics; see the module docstring.
    logprobs / old_logprobs / ref_logprobs / mask: [B, T]; advantages: [B]; mask 1 = trained token.
    old_logprobs and ref_logprobs are treated as constants (detached)."""
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown agg {agg!r}; expected one of {AGGREGATIONS}")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    for name, t in (("old_logprobs", old_logprobs), ("mask", mask), ("ref_logprobs", ref_logprobs)):
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, logprobs has {tuple(logprobs.shape)}")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be [B] = [{logprobs.shape[0]}], got {tuple(advantages.shape)}")
    if beta < 0 or (beta > 0 and ref_logprobs is None):
        raise ValueError(f"beta must be >= 0 and beta > 0 needs ref_logprobs (beta={beta})")
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    for name, count in (("num_tokens", num_tokens), ("num_seqs", num_seqs)):
        if count is not None and count <= 0:
            raise ValueError(f"{name} must be > 0, got {count}")

    m = mask.bool()                                                   # [B, T]
    zero = torch.zeros_like(logprobs)
    logp = torch.where(m, logprobs, zero)                             # [B, T]  garbage under mask 0 -> 0
    old = torch.where(m, old_logprobs.detach(), zero)                 # [B, T]
    adv = advantages.detach().to(logp.dtype)[:, None]                 # [B, 1]

    ratio = torch.exp(logp - old)                                     # [B, T]
    surr = ratio * adv                                                # [B, T]
    surr_clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv     # [B, T]
    per_token = -torch.minimum(surr, surr_clipped)                    # [B, T]
    if beta > 0:
        ref = torch.where(m, ref_logprobs.detach(), zero)             # [B, T]
        kl_ref = k3_kl(logp, ref)                                     # [B, T]
        per_token = per_token + beta * kl_ref
    per_token = torch.where(m, per_token, zero)                       # [B, T]  masked tokens add 0

    n_i = m.sum(dim=1)                                                # [B]  tokens per sequence
    if agg == "token-mean":
        denom = float(num_tokens) if num_tokens is not None else max(float(n_i.sum()), 1.0)
        loss = per_token.sum() / denom
    else:
        seq_loss = per_token.sum(dim=1) / n_i.clamp(min=1)            # [B]  0 for empty sequences
        denom = float(num_seqs) if num_seqs is not None else max(float(logprobs.shape[0]), 1.0)
        loss = seq_loss.sum() / denom

    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean((surr_clipped < surr).to(logp.dtype), m).item(),
            "ratio_mean": masked_mean(ratio, m).item(),
            "approx_kl": masked_mean(k3_kl(old, logp), m).item(),
            "num_tokens": float(n_i.sum()),
        }
        if beta > 0:
            metrics["kl_ref"] = masked_mean(kl_ref, m).item()
    return loss, metrics

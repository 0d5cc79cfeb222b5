"""Tests for grpo.py: group advantages, the clipped policy loss in both aggregations, k3 KL.

Every expected value is computed by hand, in float64; the arithmetic is in the comments."""
import math

import pytest
import torch

from grpo import group_advantages, k3_kl, masked_mean, policy_loss

F64 = torch.float64


# ----------------------------------------------------------------------------- advantages

def test_group_advantages_hand_computed():
    # mean 0.5; sample var = 4 * 0.25 / (4 - 1) = 1/3, std = 0.57735; A = +-0.5 / (0.57735 + 1e-6)
    adv, metrics = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=F64), group_size=4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert torch.allclose(adv, torch.tensor([a, -a, -a, a], dtype=F64))
    assert metrics["frac_zero_std"] == 0.0
    assert metrics["reward_mean"] == pytest.approx(0.5)
    assert metrics["reward_std"] == pytest.approx(0.5)  # population std over all N


def test_group_advantages_all_equal_group_is_exactly_zero():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv, metrics = group_advantages(rewards, group_size=4)
    assert torch.equal(adv[4:], torch.zeros(4))
    assert adv[:4].abs().min() > 0.8
    assert metrics["frac_zero_std"] == 0.5


def test_group_advantages_equal_rewards_no_float_noise():
    # three 0.9s in fp32: the mean is off by one ulp, so a naive (r - mean) / (std + eps) gives
    # about +-0.056 of pure noise instead of 0.
    rewards = torch.full((3,), 0.9, dtype=torch.float32)
    naive = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    assert naive.abs().max() > 0.01  # the trap is real on this input
    adv, metrics = group_advantages(rewards, group_size=3)
    assert torch.equal(adv, torch.zeros(3))
    assert metrics["frac_zero_std"] == 1.0


def test_group_advantages_group_size_one_and_bad_shapes():
    adv, metrics = group_advantages(torch.tensor([1.0, 0.0, 3.0]), group_size=1)
    assert torch.equal(adv, torch.zeros(3))
    assert metrics["frac_zero_std"] == 1.0
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(7), group_size=4)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(2, 4), group_size=4)


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert masked_mean(x, m).item() == pytest.approx((1 + 2 + 4 + 6) / 4)
    assert torch.equal(masked_mean(x, m, dim=1), torch.tensor([1.5, 5.0]))
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0


# ----------------------------------------------------------------------------- policy loss, by hand

def _hand_case():
    """Two sequences, T = 3, clip 0.2 -> ratio clipped to [0.8, 1.2]; old = 0 so ratio = exp(logp).
    seq 0, A = +1, mask 1 1 1, ratios 1.5 1.1 1.0:
        1.5: min(1.5, 1.2) = 1.2, clipped  -> l = -1.2, zero gradient
        1.1: unclipped -> l = -1.1;  1.0: l = -1.0;      sum -3.3, n = 3
    seq 1, A = -2, mask 1 1 0, ratios 0.5 0.9 (garbage):
        0.5: min(-1.0, 0.8 * -2 = -1.6) = -1.6, clipped -> l = 1.6, zero gradient
        0.9: min(-1.8, -1.8) -> l = 1.8;                 sum 3.4, n = 2
    clip_frac = 2 / 5."""
    logprobs = torch.log(torch.tensor([[1.5, 1.1, 1.0], [0.5, 0.9, 1.0]], dtype=F64)).requires_grad_()
    old = torch.zeros(2, 3, dtype=F64)
    adv = torch.tensor([1.0, -2.0], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logprobs, old, adv, mask


def test_policy_loss_token_mean_by_hand():
    logprobs, old, adv, mask = _hand_case()
    loss, metrics = policy_loss(logprobs, old, adv, mask, agg="token-mean")
    assert loss.item() == pytest.approx((-3.3 + 3.4) / 5)  # 0.02
    loss.backward()
    # d l_t / d logp_t = -A * ratio on unclipped tokens, 0 on clipped ones; / 5 tokens
    expected = torch.tensor([[0.0, -1.1 / 5, -1.0 / 5], [0.0, 2 * 0.9 / 5, 0.0]], dtype=F64)
    assert torch.allclose(logprobs.grad, expected)
    assert logprobs.grad[0, 0] == 0 and logprobs.grad[1, 0] == 0  # clipped: exactly zero
    assert metrics["clip_frac"] == pytest.approx(2 / 5)
    assert metrics["ratio_mean"] == pytest.approx((1.5 + 1.1 + 1.0 + 0.5 + 0.9) / 5)
    assert metrics["num_tokens"] == 5.0
    # k3(old || new) per token = ratio - 1 - log ratio
    k3 = [r - 1 - math.log(r) for r in (1.5, 1.1, 1.0, 0.5, 0.9)]
    assert metrics["approx_kl"] == pytest.approx(sum(k3) / 5)
    assert "kl_ref" not in metrics


def test_policy_loss_seq_mean_by_hand():
    logprobs, old, adv, mask = _hand_case()
    loss, _ = policy_loss(logprobs, old, adv, mask, agg="seq-mean")
    # (-3.3 / 3 + 3.4 / 2) / 2 = (-1.1 + 1.7) / 2 = 0.3, not token-mean's 0.02: short seq 1 weighs more
    assert loss.item() == pytest.approx(0.3)
    loss.backward()
    expected = torch.tensor([[0.0, -1.1 / 6, -1.0 / 6], [0.0, 2 * 0.9 / 4, 0.0]], dtype=F64)
    assert torch.allclose(logprobs.grad, expected)


def test_pessimistic_side_is_not_clipped():
    # A = -1, ratio 1.5 > 1.2: min(-1.5, -1.2) = -1.5 is the UNclipped term -> l = 1.5, gradient flows;
    # A = +1, ratio 0.5 < 0.8: min(0.5, 0.8) = 0.5, unclipped -> l = -0.5.
    logprobs = torch.log(torch.tensor([[1.5], [0.5]], dtype=F64)).requires_grad_()
    loss, metrics = policy_loss(logprobs, torch.zeros(2, 1, dtype=F64), torch.tensor([-1.0, 1.0], dtype=F64),
                                torch.ones(2, 1))
    assert loss.item() == pytest.approx((1.5 - 0.5) / 2)
    loss.backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[1.5 / 2], [-0.5 / 2]], dtype=F64))
    assert metrics["clip_frac"] == 0.0


def test_asymmetric_clip():
    # clip_high 0.28 (DAPO): ratio 1.25 with A = +1 is inside [0.8, 1.28] -> l = -1.25, not clipped
    logprobs = torch.log(torch.tensor([[1.25]], dtype=F64)).requires_grad_()
    args = (logprobs, torch.zeros(1, 1, dtype=F64), torch.ones(1, dtype=F64), torch.ones(1, 1))
    assert policy_loss(*args)[0].item() == pytest.approx(-1.2)
    assert policy_loss(*args, clip_high=0.28)[0].item() == pytest.approx(-1.25)


# ----------------------------------------------------------------------------- ratio 1 = REINFORCE

def _random_batch(seed, B=8, T=12):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    starts = torch.randint(0, T, (B,), generator=g)
    pos = torch.arange(T)[None]
    mask = ((pos >= starts[:, None].clamp(max=T - lengths[:, None])) &
            (pos < starts[:, None].clamp(max=T - lengths[:, None]) + lengths[:, None])).long()  # [B, T]
    mask[0, 2:4] = 0  # a tool response inside sequence 0
    logprobs = -torch.rand(B, T, generator=g, dtype=F64) * 3               # [B, T]
    old = logprobs + 0.3 * torch.randn(B, T, generator=g, dtype=F64)       # [B, T]  some ratios clip
    adv = torch.randn(B, generator=g, dtype=F64)                           # [B]
    return logprobs, old, adv, mask


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean"])
def test_ratio_one_gradient_is_reinforce(agg):
    logprobs, _, adv, mask = _random_batch(0)
    logprobs.requires_grad_()
    loss, metrics = policy_loss(logprobs, logprobs.detach(), adv, mask, agg=agg)
    loss.backward()
    m = mask.to(F64)
    if agg == "token-mean":
        expected = -adv[:, None] * m / m.sum()
    else:
        expected = -adv[:, None] * m / (m.sum(1, keepdim=True) * len(adv))
    # equal up to the order of float operations (1/B/n_i vs 1/(n_i*B)): rtol 1e-12 in fp64
    assert torch.allclose(logprobs.grad, expected, rtol=1e-12, atol=0)
    assert torch.equal(logprobs.grad[mask == 0], torch.zeros(int((mask == 0).sum()), dtype=F64))
    assert metrics["ratio_mean"] == 1.0 and metrics["clip_frac"] == 0.0 and metrics["approx_kl"] == 0.0


def test_loss_reads_zero_while_gradient_is_not():
    # the docstring's warning: zero-mean advantages in a group, ratio 1, seq-mean -> loss 0, gradient not
    adv, _ = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=F64), group_size=4)
    logprobs = torch.full((4, 5), -1.0, dtype=F64, requires_grad=True)
    loss, _ = policy_loss(logprobs, logprobs.detach(), adv, torch.ones(4, 5), agg="seq-mean")
    loss.backward()
    assert abs(loss.item()) < 1e-12
    assert logprobs.grad.abs().min() > 0.01


# ----------------------------------------------------------------------------- masks and garbage

@pytest.mark.parametrize("agg", ["token-mean", "seq-mean"])
def test_masked_positions_get_exactly_zero_gradient(agg):
    logprobs, old, adv, mask = _random_batch(1)
    ref = logprobs + 0.1
    clean = policy_loss(logprobs, old, adv, mask, agg=agg, ref_logprobs=ref, beta=0.1)[0]
    masked = mask == 0
    garbage = torch.tensor([-math.inf, 1e30, math.nan, math.inf], dtype=F64)
    fill = garbage[torch.arange(int(masked.sum())) % 4]
    dirty = logprobs.clone()
    dirty[masked] = fill
    old, ref = old.clone(), ref.clone()
    old[masked], ref[masked] = fill.flip(0), fill
    dirty.requires_grad_()
    loss, metrics = policy_loss(dirty, old, adv, mask, agg=agg, ref_logprobs=ref, beta=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.allclose(loss, clean)
    assert torch.isfinite(dirty.grad).all()
    assert torch.equal(dirty.grad[masked], torch.zeros(int(masked.sum()), dtype=F64))
    assert (dirty.grad[~masked] != 0).any()
    assert all(math.isfinite(v) for v in metrics.values())


def test_empty_mask_gives_zero_loss_not_nan():
    logprobs = torch.zeros(2, 3, requires_grad=True)
    for agg in ("token-mean", "seq-mean"):
        loss, metrics = policy_loss(logprobs, torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3), agg=agg)
        assert loss.item() == 0.0 and metrics["num_tokens"] == 0.0


# ----------------------------------------------------------------------------- micro-batching

@pytest.mark.parametrize("agg", ["token-mean", "seq-mean"])
def test_micro_batches_with_whole_step_counts_match_one_big_batch(agg):
    logprobs, old, adv, mask = _random_batch(2)
    logprobs.requires_grad_()
    big_loss, metrics = policy_loss(logprobs, old, adv, mask, agg=agg)
    assert metrics["clip_frac"] > 0  # the case exercises the clip
    (big_grad,) = torch.autograd.grad(big_loss, logprobs)

    def accumulated(num_tokens, num_seqs):
        total, grad = 0.0, torch.zeros_like(logprobs)
        for sl in (slice(0, 3), slice(3, 6), slice(6, 8)):
            loss, _ = policy_loss(logprobs[sl], old[sl], adv[sl], mask[sl], agg=agg,
                                  num_tokens=num_tokens, num_seqs=num_seqs)
            grad += torch.autograd.grad(loss, logprobs)[0]
            total += loss.item()
        return total, grad

    total, grad = accumulated(num_tokens=float(mask.sum()), num_seqs=8)
    assert total == pytest.approx(big_loss.item())
    assert torch.allclose(grad, big_grad)
    _, grad_local = accumulated(num_tokens=None, num_seqs=None)  # per-micro-batch counts: wrong
    assert not torch.allclose(grad_local, big_grad)


# ----------------------------------------------------------------------------- k3 KL

def test_k3_kl():
    logp = torch.zeros(3, dtype=F64)
    ref = torch.tensor([0.0, math.log(2), -math.log(2)], dtype=F64)
    # d = ln 2: 2 - ln 2 - 1 = 0.30685;  d = -ln 2: 0.5 + ln 2 - 1 = 0.19315
    expected = torch.tensor([0.0, 1 - math.log(2), math.log(2) - 0.5], dtype=F64)
    assert torch.allclose(k3_kl(logp, ref), expected)
    x = torch.randn(100, dtype=F64)
    assert (k3_kl(x, x + torch.randn(100, dtype=F64)) > 0).all()


def test_beta_adds_beta_times_mean_k3():
    # ratio 1, A = [1, -1], mask 1 1 / 1 0: base = -(1 + 1 - 1) / 3 = -1/3
    # ref - logp = ln 2 on every token -> k3 = 1 - ln 2 each; mean over 3 tokens = 1 - ln 2
    logprobs = torch.full((2, 2), -1.0, dtype=F64)
    ref = logprobs + math.log(2)
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    loss, metrics = policy_loss(logprobs, logprobs, adv, mask, ref_logprobs=ref, beta=0.5)
    assert loss.item() == pytest.approx(-1 / 3 + 0.5 * (1 - math.log(2)))
    assert metrics["kl_ref"] == pytest.approx(1 - math.log(2))
    assert policy_loss(logprobs, logprobs, adv, mask, ref_logprobs=ref)[0].item() == pytest.approx(-1 / 3)


# ----------------------------------------------------------------------------- validation

def test_bad_arguments_raise():
    lp, old, adv, mask = torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3)
    with pytest.raises(ValueError, match="agg"):
        policy_loss(lp, old, adv, mask, agg="sum")
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(lp, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="old_logprobs"):
        policy_loss(lp, torch.zeros(2, 4), adv, mask)
    with pytest.raises(ValueError, match="mask"):
        policy_loss(lp, old, adv, torch.ones(3, 3))
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(lp, old, torch.zeros(2, 3), mask)
    with pytest.raises(ValueError, match="logprobs"):
        policy_loss(torch.zeros(6), torch.zeros(6), adv, torch.ones(6))
    with pytest.raises(ValueError, match="num_tokens"):
        policy_loss(lp, old, adv, mask, num_tokens=0)


def test_k3_is_clamped_as_verl():
    """A token whose log-ratio to the reference is huge can neither make the loss inf nor own the gradient."""
    logp = torch.tensor([-1.0, -1.0, -1.0], dtype=F64, requires_grad=True)
    ref = torch.tensor([-1.0, 50.0, -80.0], dtype=F64)     # d = 0, 51 (-> 20), -79 (-> -20)
    k3 = k3_kl(logp, ref)
    assert k3[0].item() == 0 and k3[1].item() == 10.0      # exp(20) - 21 clamped to 10
    assert k3[2].item() == pytest.approx(10.0)             # exp(-20) + 20 - 1 = 19.0.. clamped to 10
    k3.sum().backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[1] == 0 and logp.grad[2] == 0

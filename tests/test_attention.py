"""support/attention.py: without gradients the attention reads the KV cache as it is (grouped-query heads
regrouped, not repeated), equal to the repeated-heads attention."""
import pytest
import torch
import torch.nn.functional as F
import transformers.integrations.sdpa_attention as hf_sdpa

import lfpc
from conftest import QWEN_TOKENIZER, noise_image
from support import attention, engine, models


def repeated(query, key, value, mask, scaling):
    """The plain reference: the key/value heads repeated to the query heads, then SDPA ([b, 1, Hq, d])."""
    rep = query.shape[1] // key.shape[1]
    out = F.scaled_dot_product_attention(query, key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1),
                                         attn_mask=mask, scale=scaling)
    return out.transpose(1, 2)


@pytest.mark.parametrize("n, mask_kind", [(1, "bool"), (1, "float"), (1, "none"), (5, "bool"), (5, "float")])
def test_grouped_equals_the_repeated_heads_attention(n, mask_kind):
    """A decode step (one query a row) and an extension (5 new tokens a row after its cache)."""
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, t, d = 3, 28, 4, 11, 16                               # 7B's grouping: 7 query heads a key head
    q, k, v = (torch.randn(b, h, m, d, generator=g) for h, m in ((hq, n), (hkv, t), (hkv, t)))
    start = torch.tensor([6, 0, 2])                                  # ragged rows: row r's new tokens at start[r]..
    allowed = torch.arange(t)[None, None, :] <= (start[:, None] + torch.arange(n)[None, :])[:, :, None]
    allowed = allowed[:, None]                                       # [b, 1, n, T]
    mask = {"bool": allowed, "float": torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf")),
            "none": None}[mask_kind]
    ours, _ = attention.grouped(q, k, v, mask, scaling=0.3)
    torch.testing.assert_close(ours, repeated(q, k, v, mask, 0.3), rtol=1e-6, atol=1e-6)
    assert ours.shape == (b, n, hq, d)


def test_rollouts_attend_without_repeating_the_cache(monkeypatch):
    """The engine installs the routing: on the real-shape model every decode step's attention is `grouped`
    and transformers' repeat_kv (called whenever a mask is given: 5.17 in every decode step, 5.24 in every
    extension) never runs in a rollout: its prompt prefills (extensions of a cache) and its decode steps."""
    agent = models.real_shape_agent(QWEN_TOKENIZER, layers=1)
    seen = {"grouped": 0, "repeat_kv": 0}
    real_one, real_repeat = attention.grouped, hf_sdpa.repeat_kv
    in_decode = [False]

    def one(*a, **kw):
        seen["grouped"] += in_decode[0]
        return real_one(*a, **kw)

    def rep(h, n):
        seen["repeat_kv"] += n > 1
        return real_repeat(h, n)
    real_decode = engine.SlotSession.decode

    def decode(self):
        in_decode[0] = True
        try:
            return real_decode(self)
        finally:
            in_decode[0] = False
    monkeypatch.setattr(attention, "grouped", one)
    monkeypatch.setattr(hf_sdpa, "repeat_kv", rep)
    monkeypatch.setattr(engine.SlotSession, "decode", decode)
    tasks = [lfpc.Task(noise_image(112, 112, seed=i), "What colour?", "A") for i in range(2)]
    cfg = lfpc.RolloutConfig(max_new_tokens=5, max_response_tokens=5, max_turns=1, global_max_pixels=112 * 112)
    with torch.no_grad():
        lfpc.rollout(agent, tasks, 2, cfg, seed=0)
    assert seen["grouped"] >= 4 and seen["repeat_kv"] == 0, seen


def test_install_is_idempotent_and_passes_other_calls_through(tiny):
    from transformers import AttentionInterface
    attention.install(tiny.model)
    first = AttentionInterface._global_mapping["sdpa"]
    attention.install(tiny.model)
    assert AttentionInterface._global_mapping["sdpa"] is first and first.routed_by_lfpc
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 4, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g)
    module = type("M", (), {"num_key_value_groups": 2, "is_causal": True, "training": False})()
    out, _ = first(module, q, k, v, None, scaling=0.5, dropout=0.0)            # 5 queries: transformers' own
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True, scale=0.5)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-6, atol=1e-6)

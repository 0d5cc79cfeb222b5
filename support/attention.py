"""The attention the model runs, routed: what the project's own batches need that transformers' does not do.

Contract
--------
- `install(model)` wraps the function transformers has registered under the model's attention
  implementation (AttentionInterface), once; every call it does not route goes to that function unchanged:
  - a mask that computes its own attention (`shared_prompt.Layout`, training's shared prompt: its
    `attend` method, `shared_prompt.attention`);
  - under "sdpa", without gradients (rollouts, the prober, a reference model), grouped-query heads with a
    mask shared by the heads -> `grouped`: each query head reads its key/value head where it is, never a
    copy. transformers' sdpa repeats the keys and values to the query heads whenever a mask is given (for
    7B a copy of 7x the cache's bytes a layer: every decode step under 5.17, the GPU machine's, ~7.8 GB a
    layer at 64 slots of 8.5K tokens; every extension forward under 5.24 too, ~1.5 GB a layer for 12
    rows of an 8.5K context). One query token a row (a decode step): a key/value head's query heads are
    packed as its queries, one SDPA call (5.24 does this itself); more: one SDPA call per query head of
    a group, each reading every key/value head. The training forward (gradients on) is left to
    transformers.
- Exact: the same products, regrouped (tested against the repeated-heads attention).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def install(model) -> None:
    """Route `model`'s attention (module docstring). Idempotent; affects every model of that implementation
    in the process, as transformers' registry does."""
    from transformers import AttentionInterface
    impl = model.config.get_text_config()._attn_implementation
    base = AttentionInterface._global_mapping.get(impl)
    if base is None or getattr(base, "routed_by_lfpc", False):
        return

    def routed(module, query, key, value, attention_mask, *args, **kwargs):
        if hasattr(attention_mask, "attend"):
            if args:
                raise TypeError(f"{type(attention_mask).__name__}.attend takes keyword arguments only, got "
                                f"{len(args)} more")
            return attention_mask.attend(module, query, key, value, **kwargs)
        if (impl == "sdpa" and not args and not torch.is_grad_enabled() and key.shape[1] < query.shape[1]
                and (attention_mask is not None or query.shape[2] == 1) and kwargs.get("sliding_window") is None
                and not kwargs.get("output_attentions")
                and (attention_mask is None or attention_mask.dim() == 4 and attention_mask.shape[1] == 1)):
            return grouped(query, key, value, attention_mask, kwargs.get("dropout", 0.0), kwargs.get("scaling"))
        return base(module, query, key, value, attention_mask, *args, **kwargs)
    routed.routed_by_lfpc = True
    AttentionInterface.register(impl, routed)


def grouped(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
            dropout: float = 0.0, scaling: float | None = None) -> tuple[torch.Tensor, None]:
    """query [b, Hq, n, d]; key, value [b, Hkv, T, d]; mask None (n = 1 only) or [b, 1, n, T] (bool: attend;
    float: added) -> ([b, n, Hq, d], None). Query head j reads key/value head j // (Hq / Hkv), as when the
    heads are repeated."""
    b, hq, n, d = query.shape
    hkv = key.shape[1]
    rep = hq // hkv
    sdpa = lambda q, m: F.scaled_dot_product_attention(q, key, value, attn_mask=m, dropout_p=dropout, scale=scaling)
    if n == 1:                                              # [b, Hkv, rep, d]: a group's heads as its queries
        out = sdpa(query.reshape(b, hkv, rep, d), mask)
    else:                                                   # [b, Hkv, rep, n, d]: head r of every group at once
        q = query.reshape(b, hkv, rep, n, d)
        out = torch.stack([sdpa(q[:, :, r], mask) for r in range(rep)], 2)
    return out.reshape(b, hq, n, d).transpose(1, 2).contiguous(), None           # [b, n, Hq, d]

"""The attention the model runs, routed: what the project's own batches need that transformers' does not do.

Contract
--------
- `install(model)` wraps the function transformers has registered under the model's attention
  implementation (AttentionInterface), once; every call it does not route goes to that function unchanged:
  - a mask that computes its own attention (`shared_prompt.Layout`, training's shared prompt: its
    `attend` method, `shared_prompt.attention`);
  - under "sdpa", ONE query token a row with grouped-query heads (every decode step of the engines) ->
    `one_query`: the query heads of each key/value head are packed as that head's queries, so SDPA reads
    the cache as it is. transformers 5.17's sdpa (the GPU machine's) repeats the keys and values to the
    query heads first whenever a mask is given: for 7B a copy of 7x the cache's bytes a layer, every
    decode step (64 slots of 8.5K tokens: ~7.8 GB a layer, more than the memory estimate's margin, and the
    step's largest memory traffic). transformers 5.24 packs the heads itself; the results are the same
    (tested against the repeated-heads attention).
- Exact: a permutation of the same products; no approximation.
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
        if (impl == "sdpa" and not args and query.shape[2] == 1 and key.shape[1] < query.shape[1]
                and kwargs.get("sliding_window") is None and not kwargs.get("output_attentions")):
            return one_query(query, key, value, attention_mask, kwargs.get("dropout", 0.0), kwargs.get("scaling"))
        return base(module, query, key, value, attention_mask, *args, **kwargs)
    routed.routed_by_lfpc = True
    AttentionInterface.register(impl, routed)


def one_query(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
              dropout: float = 0.0, scaling: float | None = None) -> tuple[torch.Tensor, None]:
    """query [b, Hq, 1, d]; key, value [b, Hkv, T, d]; mask None or [b, 1, 1, T] (bool: attend; float:
    added) -> ([b, 1, Hq, d], None). Query head j reads key/value head j // (Hq / Hkv), as when the heads are
    repeated."""
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    q = query.reshape(b, hkv, hq // hkv, d)                 # [b, Hkv, group, d]: a group's heads as its queries
    if mask is not None and mask.dim() == 4 and mask.shape[1] != 1:
        raise ValueError(f"one_query takes a mask shared by the heads ([b, 1, 1, T]), got {tuple(mask.shape)}")
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.reshape(b, hq, 1, d).transpose(1, 2).contiguous(), None        # [b, 1, Hq, d]

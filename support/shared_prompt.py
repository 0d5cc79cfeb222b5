"""A GRPO group's prompt computed once in the training forward: its layout and its attention.

The G rollouts of a task begin with the same prompt (system text, question, the global image: ~1.2K
tokens at the 1K budget, ~16K at 16K) and differ from their first sampled token on. The training
forward would run that prompt G times. A shared micro-batch is one row holding each group's prompt ONCE,
then every episode's own tokens (its suffix); a suffix attends to the prompt's keys and values and to
itself (causal), the prompt to itself. Exact, not an approximation: a prompt's hidden states do not
depend on what follows it, and autograd sums the gradients the G suffixes send back through the one
copy of the prompt (tested against the padded forward: tests/test_shared_prompt.py).

Contract
--------
- `prompt_length(sampled)`: the tokens before an episode's first sampled one, the part its group shares.
- `Layout`: the row's spans in order: for each group (start, prompt length, [(suffix start, suffix length)]).
  A group of one is a "prompt" of its whole episode with no suffixes.
- `attention(module, query, key, value, layout, ...)`: transformers' attention-function signature with a
  `Layout` where the mask goes; PyTorch SDPA on each span (a suffix: the prompt's keys first, then its own,
  under `suffix_mask`), so no [N, N] mask is ever built; grouped-query heads repeated per span (copies of
  the prompt's keys and values per suffix: README, "Real scale on one GPU").
- `install(model)`: routes a `Layout` mask to `attention` for the model's attention implementation
  (sdpa or flash_attention_*; support/attention.py wraps the function transformers has registered under
  that name, every call without a `Layout` going to it unchanged). Idempotent. batches.forward passes
  the layout as the model's prepared mask mapping, so a checkpointed layer's recompute sees it too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def prompt_length(sampled: list[int]) -> int:
    """Tokens before the first sampled one (`sampled`: an episode's loss mask); its length if none is."""
    return next((t for t, s in enumerate(sampled) if s), len(sampled))


@dataclass
class Layout:
    """The spans of one shared row, in row order: (start, prompt length, [(suffix start, suffix length)])."""
    groups: list[tuple[int, int, list[tuple[int, int]]]]

    @property
    def tokens(self) -> int:
        return sum(n + sum(m for _, m in suffixes) for _, n, suffixes in self.groups)

    def attend(self, module, query, key, value, **kwargs):
        """This row's attention (`attention`): how support/attention.py routes a Layout mask."""
        return attention(module, query, key, value, self, **kwargs)

    def attention_spans(self) -> list[tuple[int, int]]:
        """(queries, keys) of each span's attention, in row order: a prompt (n, n), a suffix (m, n + m)."""
        return [q for _, n, suffixes in self.groups for q in [(n, n)] + [(m, n + m) for _, m in suffixes]]


def attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: Layout,
              dropout: float = 0.0, scaling: float | None = None, sliding_window: int | None = None,
              **_) -> tuple[torch.Tensor, None]:
    """query [1, Hq, N, d], key and value [1, Hkv, N, d] of one shared row -> ([1, N, Hq, d], None)."""
    if sliding_window is not None:
        raise ValueError("a shared prompt has no sliding-window attention: train with --pack on or off")
    rep = query.shape[1] // key.shape[1]
    heads = lambda x, a, b: x[:, :, a:b].repeat_interleave(rep, dim=1)         # [1, Hq, b - a, d]
    sdpa = lambda q, k, v, **kw: F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, **kw)
    parts = []
    for start, n, suffixes in layout.groups:
        pk, pv = heads(key, start, start + n), heads(value, start, start + n)      # [1, Hq, n, d]
        parts.append(sdpa(query[:, :, start:start + n], pk, pv, is_causal=True))
        for s, m in suffixes:                          # token i of a suffix sees the prompt and suffix[:i + 1]
            k = torch.cat([pk, heads(key, s, s + m)], dim=2)                       # [1, Hq, n + m, d]
            v = torch.cat([pv, heads(value, s, s + m)], dim=2)
            parts.append(sdpa(query[:, :, s:s + m], k, v, attn_mask=suffix_mask(m, n, query.device)))
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None               # [1, N, Hq, d]


def suffix_mask(m: int, n: int, device: torch.device):
    """Query i of a suffix of m sees keys 0 .. n + i of its prompt's n and its own m (lower-right causal).
    On CUDA torch's CausalBias: SDPA's flash or memory-efficient kernel, no mask in memory. Elsewhere the
    same as a [m, n + m] bool tensor (CausalBias, a tensor subclass, breaks under dispatch modes such as
    torch's FLOP counter, and a CPU has no kernel to gain)."""
    if device.type == "cuda":
        return causal_lower_right(m, n + m)
    return torch.ones(m, n + m, dtype=torch.bool, device=device).tril(n)


SUPPORTED = ("sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4")


def install(model) -> None:
    """Route `Layout` masks of `model`'s decoder attention to `attention` (support/attention.py routes them);
    ValueError for an implementation a shared prompt cannot run under."""
    from support import attention as routing
    impl = model.config.get_text_config()._attn_implementation
    if impl not in SUPPORTED:
        raise ValueError(f"a shared prompt (--pack shared) needs sdpa or flash attention; the model runs {impl!r} "
                         f"(load it with attn_implementation='sdpa', or train with --pack on/off)")
    routing.install(model)

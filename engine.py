"""The model side of the agent: episodes batched into tensors, M-RoPE positions, the forward pass,
and sampling one assistant turn with a KV cache.

Contract
--------
- `collate(agent, episodes)` pads episodes into a `Batch` (right padding for training, left for
  sampling) with their images' pixel values (each distinct image object processed once per batch).
- `mrope_positions` computes Qwen2.5-VL's 3-D rotary positions; they are always passed explicitly,
  so the model's stateful `rope_deltas` cache is never used. Tests check them against the model's
  own `get_rope_index` (with `mm_token_type_ids`, which transformers 5.x requires).
- `forward(model, batch)` is the one forward pass (training and sampling alike): token embeddings,
  the vision tower on the batch's images, their features scattered onto the <|image_pad|> tokens,
  the language model; last-layer hidden states [B, T, H], no lm_head.
- `sample_turn(agent, episodes, max_new_tokens, cfg)` continues every episode by one assistant turn:
  one prefill over the whole episodes, then one token per step from a KV cache ("dynamic": grows a
  step at a time; "static": preallocated, fixed shapes). One device sync per decode step.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from lfpc import Agent, Episode, RolloutConfig

SampleFn = Callable[["Agent", list["Episode"], list[int], "RolloutConfig"], list[tuple[list[int], list[float], str]]]


# ----------------------------------------------------------------------------- batches

@dataclass
class Batch:
    """Episodes collated for one forward. Token-aligned tensors are [B, T]."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor          # [3, B, T]
    pixel_values: torch.Tensor | None   # [sum of patches, C*tp*p*p]
    image_grid_thw: torch.Tensor | None # [n_images, 3]
    loss_mask: torch.Tensor             # [B, T] 1 where the token was sampled
    old_logprobs: torch.Tensor          # [B, T] sampling-time log-probs (0 where loss_mask is 0)


def collate(agent: "Agent", episodes: list["Episode"], left_pad: bool = False) -> Batch:
    """Pad episodes to one length (right by default; left for sampling) and gather all their images."""
    T = max(len(e.token_ids) for e in episodes)
    B = len(episodes)
    ids = torch.full((B, T), agent.pad_id, dtype=torch.long)
    attn, lmask = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    old = torch.zeros(B, T)
    for b, e in enumerate(episodes):
        n = len(e.token_ids)
        sl = slice(T - n, T) if left_pad else slice(0, n)
        ids[b, sl] = torch.tensor(e.token_ids)
        attn[b, sl] = 1
        lmask[b, sl] = torch.tensor(e.loss_mask)
        old[b, sl] = torch.tensor(e.logprobs)
    grids = [g for e in episodes for g in e.grids]
    pix = pixel_values(agent, [im for e in episodes for im in e.images]) if grids else None
    thw = torch.tensor(grids, dtype=torch.long) if grids else None
    pos = mrope_positions(ids, attn, grids, agent.image_pad, agent.merge)
    dev = agent.device
    to = lambda x: None if x is None else x.to(dev)
    return Batch(to(ids), to(attn), to(pos), to(pix), to(thw), to(lmask), to(old))


def pixel_values(agent: "Agent", images: list) -> torch.Tensor:
    """The patches of `images` concatenated in order [sum of patches, C*tp*p*p]; each distinct image
    object goes through the image processor once (the G episodes of a task share their global image)."""
    done: dict[int, torch.Tensor] = {}
    for im in images:
        if id(im) not in done:
            done[id(im)] = agent.encode_image(im)[0]
    return torch.cat([done[id(im)] for im in images])


def mrope_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, grids: list[tuple[int, int, int]],
                    image_token_id: int, merge: int) -> torch.Tensor:
    """Qwen2.5-VL's 3-D rotary positions (temporal, height, width): [3, B, T].

    Text tokens count up by one on all three axes. An image block of (t, h, w) patches, i.e.
    t x h/merge x w/merge tokens, starting at position s gets (s + t_i, s + h_i, s + w_i), and the
    text after it resumes at s + max(t, h/merge, w/merge). Padding (mask 0) gets 0. `grids` lists
    the images of all rows in order, row 0 first.
    """
    B, T = input_ids.shape
    pos = torch.zeros(3, B, T, dtype=torch.long)
    grid_iter = iter(grids)
    for b in range(B):
        keep = attention_mask[b].bool().cpu()
        ids = input_ids[b].cpu()[keep].tolist()
        row = torch.zeros(3, len(ids), dtype=torch.long)
        i, nxt = 0, 0
        while i < len(ids):
            if ids[i] != image_token_id:
                row[:, i] = nxt
                i, nxt = i + 1, nxt + 1
                continue
            t, h, w = next(grid_iter)
            h, w = h // merge, w // merge
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            row[:, i:i + t * h * w] = torch.stack([tt, hh, ww]).reshape(3, -1) + nxt
            i, nxt = i + t * h * w, nxt + max(t, h, w)
        pos[:, b, keep] = row
    return pos.to(input_ids.device)


# ----------------------------------------------------------------------------- the forward pass

def forward(model, batch: Batch) -> torch.Tensor:
    """Last-layer hidden states [B, T, H] of a whole batch (no cache): the training forward."""
    return hidden_states(model, batch.input_ids, batch.attention_mask, batch.position_ids,
                         batch.pixel_values, batch.image_grid_thw)[0]


def hidden_states(model, input_ids, attention_mask, position_ids, pixel_values=None, image_grid_thw=None,
                  cache=None, use_cache=False):
    """Last-layer hidden states [B, T, H] (no lm_head) and the KV cache. Images: the vision tower on
    `pixel_values`, its features scattered onto the <|image_pad|> tokens in order."""
    embeds = model.model.get_input_embeddings()(input_ids)                      # [B, T, H]
    if pixel_values is not None:
        feats = image_features(model, pixel_values, image_grid_thw).to(embeds.dtype)   # [n_image_tokens, H]
        mask = (input_ids == model.config.image_token_id)[..., None]            # [B, T, 1]
        if int(mask.sum()) != feats.shape[0]:
            raise ValueError(f"{int(mask.sum())} <|image_pad|> tokens but {feats.shape[0]} image features")
        embeds = embeds.masked_scatter(mask, feats)
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                     use_cache=use_cache, **{_cache_kw(model): cache})
    return out.last_hidden_state, (_cache_of(out) if use_cache else None)


def image_features(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
    """The vision tower (with its 2x2 merger) on every image: [sum of merged tokens, H]."""
    visual = model.model.visual
    return visual(pixel_values.type(visual.dtype), grid_thw=image_grid_thw).pooler_output


# transformers renamed `past_key_values` to `cache` in 5.2x; 5.17 knows only the old name.
def _cache_kw(model) -> str:
    return "cache" if "cache" in inspect.signature(model.model.language_model.forward).parameters else "past_key_values"


def _cache_of(out):
    return out.cache if getattr(out, "cache", None) is not None else getattr(out, "past_key_values", None)


# ----------------------------------------------------------------------------- sampling one turn

def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None):
    """Sample one token per row from logits [B, V]; returns (tokens [B], log-probs [B])."""
    logits = logits.float()
    if temperature <= 0:
        lp = torch.log_softmax(logits, -1)
        tok = lp.argmax(-1)
        return tok, lp.gather(-1, tok[:, None])[:, 0]
    lp = torch.log_softmax(logits / temperature, -1)                      # [B, V]
    probs = lp.exp()
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p                                   # keep the smallest set reaching top_p
        probs = probs.scatter(-1, si, sp.masked_fill(drop, 0.0))
    tok = torch.multinomial(probs, 1, generator=gen)[:, 0]                 # [B]
    return tok, lp.gather(-1, tok[:, None])[:, 0]


@torch.no_grad()
def sample_turn(agent: "Agent", episodes: list["Episode"], max_new_tokens: list[int], cfg: "RolloutConfig",
                gen: torch.Generator | None = None) -> list[tuple[list[int], list[float], str]]:
    """Continue every episode by one assistant turn, batched with left padding and a KV cache.

    Returns per episode (tokens, log-probs, finish) with finish "stop" (</tool_call>), "eos"
    (<|im_end|>, included in the tokens) or "length". `cfg.decode` picks the KV cache: "dynamic"
    appends to the cache and the attention mask every step; "static" preallocates both for the
    prompt plus the longest turn, so every decode step has the same shapes and addresses.
    """
    if cfg.decode not in ("dynamic", "static"):
        raise ValueError(f"cfg.decode must be 'dynamic' or 'static', got {cfg.decode!r}")
    model, B = agent.model, len(episodes)
    batch = collate(agent, episodes, left_pad=True)
    T, N, dev = batch.input_ids.shape[1], max(max_new_tokens), batch.input_ids.device
    cache, attn = None, batch.attention_mask                                # [B, T]
    if cfg.decode == "static":
        from transformers import StaticCache
        cache = StaticCache(config=model.config.get_text_config(), max_cache_len=T + N)
        attn = torch.zeros(B, T + N, dtype=torch.long, device=dev)          # [B, T+N]: slot t+T is step t
        attn[:, :T] = batch.attention_mask
    h, cache = hidden_states(model, batch.input_ids, attn, batch.position_ids, batch.pixel_values,
                             batch.image_grid_thw, cache=cache, use_cache=True)
    logits = model.lm_head(h[:, -1])                                        # [B, V]
    next_pos = batch.position_ids.amax(dim=(0, 2)) + 1                      # [B]
    out = [([], [], "length") for _ in range(B)]
    live = [True] * B
    for step in range(N):
        tok, lp = sample(logits, cfg.temperature, cfg.top_p, gen)          # [B], [B]
        tok_l, lp_l = tok.tolist(), lp.tolist()                             # one device sync per step
        for b in range(B):
            if not live[b]:
                continue
            toks, lps, _ = out[b]
            toks.append(tok_l[b])
            lps.append(lp_l[b])
            hit = tok_l[b] in agent.stop_ids or (
                agent.stop_strings and agent.tokenizer.decode(toks[-8:]).endswith(agent.stop_strings))
            if hit:
                out[b] = (toks, lps, "eos" if tok_l[b] == agent.im_end else "stop")
            if hit or len(toks) >= max_new_tokens[b]:
                live[b] = False
        if not any(live):
            break
        alive = torch.tensor(live, device=dev)                              # [B]
        tok = tok.masked_fill(~alive, agent.pad_id)
        if cfg.decode == "static":
            attn[:, T + step] = alive.long()
        else:
            attn = torch.cat([attn, alive.long()[:, None]], 1)              # [B, T+step+1]
        pos = (next_pos + step).view(1, B, 1).expand(3, B, 1)                # [3, B, 1]
        h, cache = hidden_states(model, tok[:, None], attn, pos, cache=cache, use_cache=True)
        logits = model.lm_head(h[:, -1])
    return out

"""The model side of the agent: episodes batched into tensors, M-RoPE positions, the forward pass,
and the two rollout engines that sample assistant turns with a KV cache.

Contract
--------
- `collate(agent, episodes)` pads episodes into a `Batch` (right padding for training, left for
  sampling) with the pixel values of its distinct images (the G episodes of a task share one global
  image object: processed and run through the vision tower once per batch, its features reused).
- `mrope_positions` computes Qwen2.5-VL's 3-D rotary positions; they are always passed explicitly,
  so the model's stateful `rope_deltas` cache is never used. Tests check them against the model's
  own `get_rope_index` (with `mm_token_type_ids`, which transformers 5.x requires).
- `forward(model, batch)` is the one forward pass of training: token embeddings, the vision tower on
  the batch's images, their features scattered onto the <|image_pad|> tokens, the language model;
  last-layer hidden states [B, T, H], no lm_head. Sampling runs the same `hidden_states`.
- Two engines continue episodes turn by turn; both decode one token per step for every live row
  from a KV cache (`decode`: "dynamic" grows the cache a step at a time, "static" preallocates it so
  every step has the same shapes) with ONE device sync per step, and sample with the same `sample`:
    "reference" (`sample_turn`): every turn re-collates the whole episodes and prefills them from
        scratch, images through the vision tower again: plain, obviously right, slow.
    "cached" (`run_cached`, the default): each task's prompt is prefilled ONCE and its KV cache
        copied to the task's G rollouts; the cache lives across turns, so after a turn only what the
        environment appended (the turn's last sampled token, the tool response, the crop's image
        tokens, the next assistant header) is prefilled; rows whose episode ended are dropped from
        the cache; each distinct image (by content) goes through the vision tower once per call.
  Tested against each other: the same tokens, greedy and sampled, log-probs equal to float noise.
- Sampling randomness belongs to the episode, not the batch: token j of an episode is drawn by
  inverse CDF with the j-th uniform of a stream seeded by `Episode.seed` (`uniforms`), so the tokens
  do not depend on how episodes are batched, chunked or dropped.
- `Work` counts what the engines did (image encodes, vision patches, prefill and decode positions,
  padding included, and how many of them were padding): counts, unlike times, are the same on every
  machine, and they are what the model computed (tested against a hook on the language model).
"""
from __future__ import annotations

import hashlib
import inspect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from lfpc import Agent, Episode, RolloutConfig

SampleFn = Callable[["Agent", list["Episode"], list[int], "RolloutConfig"], list[tuple[list[int], list[float], str]]]
StepFn = Callable[["Episode", list[int], list[float], str, int], None]    # (episode, tokens, log-probs, finish, turn)


# ----------------------------------------------------------------------------- the two engines

@torch.no_grad()
def run_cached(agent: "Agent", episodes: list["Episode"], group_size: int, cfg: "RolloutConfig", step: StepFn,
               work: Work, script: SampleFn | None = None) -> None:
    """Every turn of `episodes` (whole groups: rows g*G .. g*G+G-1 share one prompt) with one KV cache:
    the prompts prefilled once, copied to their groups, only the environment's tokens prefilled after each
    turn, ended rows dropped. `step(episode, tokens, log-probs, finish, turn)` applies a sampled turn.
    `script` (tests) replaces decoding: its turns are then prefilled with what the environment appends."""
    vision = Vision(agent, work)
    kv = empty_kv(agent, len(episodes) // group_size)
    extend(agent, kv, episodes[::group_size], vision, work)                   # each prompt once
    kv.repeat(group_size)
    rows = list(episodes)
    for turn in range(cfg.max_turns):
        budget = [max(1, min(cfg.max_new_tokens, cfg.max_response_tokens - e.num_generated)) for e in rows]
        if script is None:
            u = None if cfg.temperature <= 0 else uniforms(rows, max(budget), agent.device)
            turns = decode(agent, kv, budget, cfg, u, work)
        else:
            turns = script(agent, rows, budget, cfg)
        for e, (toks, lps, finish) in zip(rows, turns):
            step(e, toks, lps, finish, turn)
        keep = [i for i, e in enumerate(rows) if not e.done]
        if not keep:
            break
        kv.select(keep)
        rows = [rows[i] for i in keep]
        extend(agent, kv, rows, vision, work)


@torch.no_grad()
def sample_turn(agent: "Agent", episodes: list["Episode"], max_new_tokens: list[int], cfg: "RolloutConfig",
                work: Work | None = None, script: SampleFn | None = None) -> list[tuple[list[int], list[float], str]]:
    """The reference engine: continue every episode by one assistant turn, prefilling the WHOLE episodes
    (left-padded, every image through the vision tower) into a fresh KV cache, then `decode` (or, in
    tests, take the turns of `script`)."""
    work = work if work is not None else Work()
    batch = collate(agent, episodes, left_pad=True, share_images=False)
    feats = batch_image_features(agent.model, batch)
    if feats is not None:
        work.image_encodes += batch.image_grid_thw.shape[0]
        work.vision_patches += batch.pixel_values.shape[0]
    h, cache = hidden_states(agent.model, batch.input_ids, batch.attention_mask, batch.position_ids, feats,
                             use_cache=True)
    work.prefill_tokens += batch.input_ids.numel()                          # every position computed, padding too
    work.padding_tokens += batch.input_ids.numel() - int(batch.attention_mask.sum())
    kv = KV(cache, batch.attention_mask, (batch.position_ids.amax(dim=(0, 2)) + 1).tolist(),
            [len(e.token_ids) for e in episodes], [len(e.images) for e in episodes], agent.model.lm_head(h[:, -1]))
    if script is not None:
        return script(agent, episodes, max_new_tokens, cfg)
    u = None if cfg.temperature <= 0 else uniforms(episodes, max(max_new_tokens), agent.device)
    return decode(agent, kv, max_new_tokens, cfg, u, work)


# ----------------------------------------------------------------------------- the KV cache and decoding

@dataclass
class KV:
    """The KV cache of B rows and what each row holds. Slots are shared across rows; a row's unused
    slots (left padding, rows that stopped earlier in a turn) are masked out."""
    cache: object                 # a transformers DynamicCache
    mask: torch.Tensor            # [B, S] 1 where the slot holds one of the row's tokens
    next_pos: list[int]           # per row, the rotary position of its next token
    fed: list[int]                # per row, how many of its episode's tokens are in the cache
    images_fed: list[int]         # per row, how many of its episode's images are in the cache
    logits: torch.Tensor | None = None   # [B, V] next-token logits after the last fed token of each row

    def select(self, rows: list[int]) -> None:
        """Keep only `rows` (cache, mask and bookkeeping), in that order."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(idx)
        self.mask = self.mask[idx]
        self.next_pos, self.fed, self.images_fed = ([x[r] for r in rows] for x in (self.next_pos, self.fed,
                                                                                     self.images_fed))
        self.logits = None if self.logits is None else self.logits[idx]

    def repeat(self, n: int) -> None:
        """Each row n times in a row (a task's prompt, copied to its n rollouts)."""
        self.select([r for r in range(self.mask.shape[0]) for _ in range(n)])


def empty_kv(agent: "Agent", rows: int) -> KV:
    from transformers import DynamicCache
    return KV(DynamicCache(), torch.zeros(rows, 0, dtype=torch.long, device=agent.device), [0] * rows, [0] * rows,
              [0] * rows)


@torch.no_grad()
def extend(agent: "Agent", kv: KV, episodes: list["Episode"], vision: Vision, work: Work) -> None:
    """Prefill, row by row, the tokens of each episode not yet in the cache (left-padded to one length),
    their images' features from `vision`; then kv.logits are the rows' next-token logits."""
    B = len(episodes)
    new = [e.token_ids[f:] for e, f in zip(episodes, kv.fed)]
    L = max(len(n) for n in new)
    ids = torch.full((B, L), agent.pad_id, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    pos = torch.zeros(3, B, L, dtype=torch.long)
    images = []
    for b, (e, n) in enumerate(zip(episodes, new)):
        ids[b, L - len(n):] = torch.tensor(n)
        mask[b, L - len(n):] = 1
        pos[:, b, L - len(n):], kv.next_pos[b] = segment_positions(n, e.grids[kv.images_fed[b]:], kv.next_pos[b],
                                                                   agent.image_pad, agent.merge)
        images += e.images[kv.images_fed[b]:]
        kv.fed[b], kv.images_fed[b] = len(e.token_ids), len(e.images)
    dev = agent.device
    kv.mask = torch.cat([kv.mask, mask.to(dev)], 1)                            # [B, S+L]
    h, kv.cache = hidden_states(agent.model, ids.to(dev), kv.mask, pos.to(dev), vision.features(images),
                                kv.cache, use_cache=True)
    kv.logits = agent.model.lm_head(h[:, -1])                                  # [B, V]
    work.prefill_tokens += B * L                                               # every position computed, padding too
    work.padding_tokens += B * L - sum(len(n) for n in new)


@torch.no_grad()
def decode(agent: "Agent", kv: KV, max_new_tokens: list[int], cfg: "RolloutConfig", u: torch.Tensor | None,
           work: Work) -> list[tuple[list[int], list[float], str]]:
    """Sample one assistant turn for every row of `kv`, up to max_new_tokens[b] tokens, one device sync a
    step; `u` [B, N]: the rows' uniforms (None when greedy). Returns per row (tokens, log-probs, finish),
    finish "stop" (</tool_call>), "eos" (<|im_end|>, included) or "length". Every sampled token except
    each row's last is fed back into the cache (the last one starts the next `extend`)."""
    if cfg.decode not in ("dynamic", "static"):
        raise ValueError(f"cfg.decode must be 'dynamic' or 'static', got {cfg.decode!r}")
    model, B, N = agent.model, len(max_new_tokens), max(max_new_tokens)
    S, dev = kv.mask.shape[1], kv.mask.device
    cache, attn = kv.cache, kv.mask                                         # [B, S]
    if cfg.decode == "static":                                              # fixed shapes for every step
        cache = _static_copy(model, kv.cache, S + N)
        attn = torch.cat([attn, torch.zeros(B, N, dtype=torch.long, device=dev)], 1)   # [B, S+N]: slot S+t is step t
    logits, next_pos = env_only_masked(kv.logits, agent.env_only_ids), torch.tensor(kv.next_pos, device=dev)  # [B, V], [B]
    out = [([], [], "length") for _ in range(B)]
    live, fed = [True] * B, 0
    for step in range(N):
        tok, lp = sample(logits, cfg.temperature, cfg.top_p, None if u is None else u[:, step])   # [B], [B]
        tok_l, lp_l = tok.tolist(), lp.tolist()                             # one device sync per step
        if any(live[b] and not math.isfinite(lp_l[b]) for b in range(B)):
            raise FloatingPointError("the policy's next-token probabilities are not finite (NaN or inf logits): "
                                     "its weights are damaged")
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
            attn[:, S + step] = alive.long()
        else:
            attn = torch.cat([attn, alive.long()[:, None]], 1)              # [B, S+step+1]
        pos = (next_pos + step).view(1, B, 1).expand(3, B, 1)                # [3, B, 1]
        h, cache = hidden_states(model, tok[:, None], attn, pos, cache=cache, use_cache=True)
        logits = env_only_masked(model.lm_head(h[:, -1]), agent.env_only_ids)
        work.decode_tokens += B                                             # finished rows are computed too
        work.padding_tokens += B - sum(live)
        fed += 1
    kv.cache = _dynamic_copy(cache, S + fed) if cfg.decode == "static" else cache
    kv.mask = attn[:, :S + fed]
    for b, (toks, _, _) in enumerate(out):
        kv.next_pos[b] += len(toks) - 1
        kv.fed[b] += len(toks) - 1
    kv.logits = None
    return out


def _static_copy(model, cache, length: int):
    """A StaticCache of `length` slots holding the dynamic `cache`'s keys and values in its first slots."""
    from transformers import StaticCache
    static = StaticCache(config=model.config.get_text_config(), max_cache_len=length)
    for i, layer in enumerate(cache.layers):
        static.update(layer.keys, layer.values, i)
    return static


def _dynamic_copy(static, length: int):
    """A DynamicCache of the first `length` slots of a StaticCache."""
    from transformers import DynamicCache
    cache = DynamicCache()
    for i, layer in enumerate(static.layers):
        cache.update(layer.keys[:, :, :length], layer.values[:, :, :length], i)
    return cache


# ----------------------------------------------------------------------------- batches

@dataclass
class Batch:
    """Episodes collated for one forward. Token-aligned tensors are [B, T]."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor          # [3, B, T]
    pixel_values: torch.Tensor | None   # [sum of patches, C*tp*p*p] of the DISTINCT images of the batch
    image_grid_thw: torch.Tensor | None # [n_distinct, 3]
    image_index: torch.Tensor | None    # [n_blocks]: which distinct image fills each image block, in order
    loss_mask: torch.Tensor             # [B, T] 1 where the token was sampled
    old_logprobs: torch.Tensor          # [B, T] sampling-time log-probs (0 where loss_mask is 0)
    env_only_ids: list[int]             # tokens the policy never emits (Agent.env_only_ids)


def collate(agent: "Agent", episodes: list["Episode"], left_pad: bool = False, share_images: bool = True) -> Batch:
    """Pad episodes to one length (right by default; left for sampling) and gather their images. Each
    distinct image object is processed, and goes through the vision tower, once per batch (the G
    episodes of a task share their global image); share_images=False gives every block its own copy."""
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
    images = [im for e in episodes for im in e.images]
    pix = thw = index = None
    if images:
        key = id if share_images else (lambda im, c=iter(range(len(images))): next(c))
        keys = [key(im) for im in images]
        distinct = {k: (im, g) for k, im, g in zip(keys, images, grids)}      # first occurrence, in order
        pix = torch.cat([agent.encode_image(im)[0] for im, _ in distinct.values()])
        thw = torch.tensor([g for _, g in distinct.values()], dtype=torch.long)
        index = torch.tensor([list(distinct).index(k) for k in keys], dtype=torch.long)
    pos = mrope_positions(ids, attn, grids, agent.image_pad, agent.merge)
    dev = agent.device
    to = lambda x: None if x is None else x.to(dev)
    return Batch(to(ids), to(attn), to(pos), to(pix), to(thw), to(index), to(lmask), to(old), agent.env_only_ids)


def pack(lengths: list[int], max_rows: int, max_tokens: int | None = None, rows: list[int] | None = None,
         longest_first: bool = False) -> list[list[int]]:
    """Item indices grouped into batches: each batch holds at most `max_rows` rows and, padded, at most
    `max_tokens` tokens (its rows x its longest length); an item over the token budget alone gets a batch
    of its own. Item i is rows[i] rows (default 1) of length lengths[i] (a GRPO group: G rows). In item
    order, or longest first (less padding); every item in exactly one batch."""
    rows = rows or [1] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if longest_first else range(len(lengths))
    batches, cur, n, longest = [], [], 0, 0
    for i in order:
        grow_n, grow_len = n + rows[i], max(longest, lengths[i])
        if cur and (grow_n > max_rows or (max_tokens is not None and grow_n * grow_len > max_tokens)):
            batches.append(cur)
            cur, grow_n, grow_len = [], rows[i], lengths[i]
        cur.append(i)
        n, longest = grow_n, grow_len
    return batches + ([cur] if cur else [])


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
        pos[:, b, keep], _ = segment_positions(input_ids[b].cpu()[keep].tolist(), grid_iter, 0, image_token_id, merge)
    return pos.to(input_ids.device)


def segment_positions(ids: list[int], grids, start: int, image_token_id: int, merge: int) -> tuple[torch.Tensor, int]:
    """The positions [3, len(ids)] of a run of tokens whose first text position is `start` (the rules of
    `mrope_positions`; `grids` yields the grid of each image block met), and the next text position."""
    row = torch.zeros(3, len(ids), dtype=torch.long)
    grids = iter(grids)
    i, nxt = 0, start
    while i < len(ids):
        if ids[i] != image_token_id:
            row[:, i] = nxt
            i, nxt = i + 1, nxt + 1
            continue
        t, h, w = next(grids)
        h, w = h // merge, w // merge
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        row[:, i:i + t * h * w] = torch.stack([tt, hh, ww]).reshape(3, -1) + nxt
        i, nxt = i + t * h * w, nxt + max(t, h, w)
    return row, nxt


# ----------------------------------------------------------------------------- the forward pass

def forward(model, batch: Batch) -> torch.Tensor:
    """Last-layer hidden states [B, T, H] of a whole batch (no cache): the training forward."""
    return hidden_states(model, batch.input_ids, batch.attention_mask, batch.position_ids, batch_image_features(model, batch))[0]


def batch_image_features(model, batch: Batch) -> torch.Tensor | None:
    """[n image tokens, H]: the vision tower once on each distinct image, its features for every block."""
    if batch.pixel_values is None:
        return None
    feats = image_features(model, batch.pixel_values, batch.image_grid_thw)            # [distinct tokens, H]
    per_image = feats.split((batch.image_grid_thw.prod(-1) // model.model.visual.spatial_merge_size**2).tolist())
    return torch.cat([per_image[i] for i in batch.image_index.tolist()])


def hidden_states(model, input_ids, attention_mask, position_ids, image_embeds=None, cache=None, use_cache=False):
    """Last-layer hidden states [B, T, H] (no lm_head) and the KV cache. `image_embeds` [n, H]: the vision
    features of the batch's images, scattered onto its n <|image_pad|> tokens in row-major order."""
    embeds = model.model.get_input_embeddings()(input_ids)                      # [B, T, H]
    kind = embeds.device.type
    if torch.is_autocast_enabled(kind):      # fp32 masters under autocast: the stream in the compute dtype, or
        embeds = embeds.to(torch.get_autocast_dtype(kind))   # rotary would promote the cached keys to fp32
    if image_embeds is not None:
        mask = (input_ids == model.config.image_token_id)[..., None]            # [B, T, 1]
        if int(mask.sum()) != image_embeds.shape[0]:
            raise ValueError(f"{int(mask.sum())} <|image_pad|> tokens but {image_embeds.shape[0]} image features")
        embeds = embeds.masked_scatter(mask, image_embeds.to(embeds.dtype))
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


# ----------------------------------------------------------------------------- what the engines did

@dataclass
class Work:
    """Counts of the work of one or more rollouts (each a sum over the model calls)."""
    image_encodes: int = 0     # images through the vision tower
    vision_patches: int = 0    # 14-px patches through the vision tower
    prefill_tokens: int = 0    # positions prefilled (several at a time per row), padding included: the compute
    decode_tokens: int = 0     # positions fed one at a time while decoding, rows that already stopped included
    padding_tokens: int = 0    # of those, positions that held no token of an episode (padding, stopped rows)
    context_tokens: int = 0    # the distinct context: each task's prompt once + every episode's own tokens after it

    def metrics(self) -> dict[str, float]:
        """As the work/* metrics, with work/prefill_ratio = prefill positions (padding included) / distinct
        context tokens."""
        m = {f"work/{k}": v for k, v in self.__dict__.items()}
        m["work/prefill_ratio"] = self.prefill_tokens / self.context_tokens if self.context_tokens else None
        return m


class Vision:
    """The vision tower for one rollout call: features of each distinct image (by content), computed once."""

    def __init__(self, agent: "Agent", work: Work):
        self.agent, self.work, self.seen = agent, work, {}

    def features(self, images: list) -> torch.Tensor | None:
        """[sum of merged tokens, H] for `images` in order; new contents encoded together in one call."""
        if not images:
            return None
        keys = [_content_key(im) for im in images]
        new = {k: im for k, im in zip(keys, images) if k not in self.seen}
        if new:
            enc = [self.agent.encode_image(im) for im in new.values()]
            pix = torch.cat([p for p, _ in enc]).to(self.agent.device)
            thw = torch.tensor([g for _, g in enc], dtype=torch.long, device=self.agent.device)
            feats = image_features(self.agent.model, pix, thw).split((thw.prod(-1) // self.agent.merge**2).tolist())
            self.seen.update(zip(new, feats))
            self.work.image_encodes += len(new)
            self.work.vision_patches += pix.shape[0]
        return torch.cat([self.seen[k] for k in keys])


def _content_key(image) -> tuple:
    return image.size, image.mode, hashlib.sha1(image.tobytes()).hexdigest()


# ----------------------------------------------------------------------------- sampling

def env_only_masked(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """logits [N, V] with the tokens only the environment writes set to -inf (the policy's own vocabulary)."""
    return logits.index_fill(-1, torch.tensor(ids, dtype=torch.long, device=logits.device), float("-inf"))


def sample(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor | None):
    """One token per row from logits [B, V] and uniforms u [B] in [0, 1) (inverse CDF: the first token
    whose cumulative probability exceeds u); greedy when temperature <= 0. Returns (tokens [B],
    log-probs [B]) with log-probs of the untruncated log_softmax(logits / T)."""
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
    cdf = probs.cumsum(-1)                                                  # [B, V]
    tok = torch.searchsorted(cdf, (u.to(cdf) * cdf[:, -1])[:, None], right=True)[:, 0]   # [B]
    tok = tok.clamp(max=logits.shape[-1] - 1)
    return tok, lp.gather(-1, tok[:, None])[:, 0]


def uniforms(episodes: list["Episode"], n: int, device) -> torch.Tensor:
    """[B, n]: for each episode, the uniforms of its next n sampled tokens (its stream, `Episode.seed`,
    from the token after those it already sampled)."""
    out = []
    for e in episodes:
        g = torch.Generator().manual_seed(e.seed)
        out.append(torch.rand(e.num_generated + n, generator=g)[e.num_generated:])
    return torch.stack(out).to(device)

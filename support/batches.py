"""Episodes as tensors for one forward, and that forward: the batch the training forward and the reference
engine read, Qwen2.5-VL's M-RoPE positions, the hidden states.

Contract
--------
- `Row`, `Policy`: what this and the rollout engines (support/engine.py) read of an episode (lfpc.Episode)
  and of the agent (lfpc.Agent); neither file imports lfpc.
- `collate(agent, episodes)` pads episodes into a `Batch` (right padding for training, left for
  sampling) with the pixel values of its distinct images (the G episodes of a task share one global
  image object: processed and run through the vision tower once per batch, its features reused), or
  packs them into one padding-free row (`packed`), each group's prompt in it once (`share_prompt`:
  support/shared_prompt.py; `pack_groups` keeps a group in one micro-batch). `pack` groups items into
  micro-batches under a row and a token bound.
- `mrope_positions` computes Qwen2.5-VL's 3-D rotary positions; they are always passed explicitly,
  so the model's stateful `rope_deltas` cache is never used. Tests check them against the model's
  own `get_rope_index` (with `mm_token_type_ids`, which transformers 5.x requires).
- `forward(model, batch)` is the one forward pass of training: token embeddings, the vision tower on
  the batch's images (or their features from a `FeatureStore`), scattered onto the <|image_pad|> tokens,
  the language model; last-layer hidden states [B, T, H], no lm_head. Sampling runs the same `hidden_states`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from support import pixels, shared_prompt

if TYPE_CHECKING:
    from support.engine import FeatureStore


class Row(Protocol):
    """What the batches and the engines read of an episode (lfpc.Episode): its tokens so far (prompt, sampled turns and the
    environment's answers), which were sampled and with what log-probs, its images, its random stream."""
    token_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float]
    images: list                  # PIL images, one a vision block, in order
    grids: list                   # their (t, h, w) patch grids
    task_index: int               # the episodes of one task share a prompt
    seed: int

    @property
    def num_generated(self) -> int: ...


class Policy(Protocol):
    """What the batches and the engines read of the agent (lfpc.Agent): the model, its special ids, its image
    encoder."""
    model: object
    tokenizer: object
    device: object
    pad_id: int
    im_end: int
    image_pad: int
    merge: int
    stop_ids: set
    stop_strings: tuple
    env_only_ids: list[int]
    image_processor: object

    def encode_image(self, image): ...          # the image processor's pixel values (support/pixels.py: the fast path)

    def image_grid(self, image): ...


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
    sampling_logprobs: torch.Tensor     # [B, T] the sampler's log-probs (0 where loss_mask is 0); NOT the loss's
                                        # old policy (train.py: one update per batch, the old policy is the current one)
    env_only_ids: list[int]             # tokens the policy never emits (Agent.env_only_ids)
    features: torch.Tensor | None = None  # [distinct tokens, H]: the distinct images' features, taken from a
                                          # FeatureStore (then pixel_values is None and no vision tower runs)
    image_encodes: int = 0              # distinct images this batch's forward runs through the vision tower
    unpack: torch.Tensor | None = None  # packed (B = 1, no padding, position_ids [4, 1, N]: text positions first):
                                        # [episodes, longest] the row position of each episode's token, -1 after its end
    prev: torch.Tensor | None = None    # packed: [1, N] the row position of the token before each (-1 at an episode's first)
    layout: "shared_prompt.Layout | None" = None   # shared: each group's prompt once in the row, then its suffixes

    def unpacked(self, x: torch.Tensor) -> torch.Tensor:
        """[1, N] of a packed batch -> [episodes, longest] (zeros after each episode's end; a shared prompt's
        values in every episode of its group); padded: x."""
        if self.unpack is None:
            return x
        return torch.where(self.unpack >= 0, x[0][self.unpack.clamp(min=0)], 0)

    @property
    def padding(self) -> int:
        """Positions of the forward that hold no token."""
        return 0 if self.unpack is not None else self.input_ids.numel() - int(self.attention_mask.sum())

    @property
    def shared(self) -> int:
        """The episodes' tokens that this forward did not compute: their group's prompt ran once."""
        return 0 if self.unpack is None else int((self.unpack >= 0).sum()) - self.input_ids.shape[1]


def collate(agent: Policy, episodes: list[Row], left_pad: bool = False, share_images: bool = True,
            store: "FeatureStore | None" = None, packed: bool = False, share_prompt: bool = False) -> Batch:
    """Pad episodes to one length (right by default; left for sampling) and gather their images. Each
    distinct image object is processed, and goes through the vision tower, once per batch (the G
    episodes of a task share their global image); share_images=False gives every block its own copy.
    `store` (a frozen vision tower: LoRA): when it holds every image's features (the rollout put them
    there), the batch carries those and no pixels: its forward runs no vision tower. `packed` (training):
    the episodes one after the other in ONE row, no padding; each keeps its own M-RoPE positions and the
    attention is block-diagonal (transformers reads the sequences from the text positions that restart
    at 0: flash attention's varlen path on a GPU, a block mask under SDPA). `share_prompt` (packed): the
    episodes whose prompts are the same tokens and image objects (a GRPO group) have that prompt ONCE in the
    row, then each its own tokens (support/shared_prompt.py: the layout and its attention)."""
    T = max(len(e.token_ids) for e in episodes)
    B = len(episodes)
    ids = torch.full((B, T), agent.pad_id, dtype=torch.long)
    attn, lmask = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    sampled = torch.zeros(B, T)
    for b, e in enumerate(episodes):
        n = len(e.token_ids)
        sl = slice(T - n, T) if left_pad else slice(0, n)
        ids[b, sl] = torch.tensor(e.token_ids)
        attn[b, sl] = 1
        lmask[b, sl] = torch.tensor(e.loss_mask)
        sampled[b, sl] = torch.tensor(e.logprobs)
    if packed and left_pad:
        raise ValueError("packed batches are for training (right padding)")
    spans, layout = row_spans(agent, episodes, share_prompt) if packed else (None, None)
    # the image blocks in the order their tokens meet the forward: episode by episode, or the row's spans
    blocks = [(b, j) for b, e in enumerate(episodes) for j in range(len(e.images))] if spans is None else \
        [(b, j) for b, lo, hi in spans for j in range(*_blocks_in(agent, episodes[b], lo, hi))]
    grids = [episodes[b].grids[j] for b, j in blocks]
    images = [episodes[b].images[j] for b, j in blocks]
    pix = thw = index = None
    if images:
        key = id if share_images else (lambda im, c=iter(range(len(images))): next(c))
        keys = [key(im) for im in images]
        distinct = {k: (im, g) for k, im, g in zip(keys, images, grids)}      # first occurrence, in order
        thw = torch.tensor([g for _, g in distinct.values()], dtype=torch.long)
        index = torch.tensor([list(distinct).index(k) for k in keys], dtype=torch.long)
        feats = store.get([im for im, _ in distinct.values()], agent.device) if store is not None else None
        if feats is None:
            pix = pixels.pixel_values(agent, [im for im, _ in distinct.values()])
    pos = mrope_positions(ids, attn, [g for e in episodes for g in e.grids], agent.image_pad, agent.merge)
    unpack = prev = None
    if packed:                                       # [B, T] right-padded -> one row of the spans' tokens
        rb = torch.cat([torch.full((hi - lo,), b) for b, lo, hi in spans])                 # [N] episode of each
        rt = torch.cat([torch.arange(lo, hi) for b, lo, hi in spans])                       # [N] its position there
        unpack = torch.full((B, T), -1, dtype=torch.long)
        unpack[rb, rt] = torch.arange(len(rt))
        for b, lo, _ in spans:                        # a group's other episodes read its prompt where it is
            if lo == 0:
                owner = b                             # a group begins with its first episode's prompt
            elif b != owner:
                unpack[b, :lo] = unpack[owner, :lo]
        prev = torch.where(rt > 0, unpack[rb, (rt - 1).clamp(min=0)], -1)[None]            # [1, N]
        ids, lmask, sampled = ids[rb, rt][None], lmask[rb, rt][None], sampled[rb, rt][None]
        pos = torch.cat([rt[None], pos[:, rb, rt]])[:, None]                               # [4, 1, N]
        attn = torch.ones_like(ids)
    dev = agent.device
    to = lambda x: None if x is None else x.to(dev)
    return Batch(to(ids), to(attn), to(pos), to(pix), to(thw), to(index), to(lmask), to(sampled), agent.env_only_ids,
                 feats if images else None, 0 if pix is None else len(thw), to(unpack), to(prev), layout)


def row_spans(agent: Policy, episodes: list[Row], share_prompt: bool
              ) -> tuple[list[tuple[int, int, int]], "shared_prompt.Layout | None"]:
    """The token spans (episode, from, to) of a packed row, in order, and its Layout when `share_prompt`: each
    group (`prompt_groups`) as its first episode whole, then the others from the end of the shared prompt."""
    if not share_prompt:
        return [(b, 0, len(e.token_ids)) for b, e in enumerate(episodes)], None
    spans, groups, at = [], [], 0
    for g in prompt_groups(agent, episodes):
        n = shared_prompt.prompt_length(episodes[g[0]].loss_mask) if len(g) > 1 else len(episodes[g[0]].token_ids)
        spans.append((g[0], 0, n))
        suffixes, s = [], at + n
        for b in g:                                   # the first episode's own tokens are a suffix as well
            m = len(episodes[b].token_ids) - n
            if m:
                spans.append((b, n, n + m))
                suffixes.append((s, m))
                s += m
        groups.append((at, n, suffixes))
        at = s
    return spans, shared_prompt.Layout(groups)


def prompt_groups(agent: Policy, episodes: list[Row]) -> list[list[int]]:
    """Indices of `episodes` grouped by their prompt (the tokens before the first sampled one, with its image
    objects), in order of first appearance: the episodes that can share one computation of it."""
    groups: dict = {}
    for b, e in enumerate(episodes):
        n = shared_prompt.prompt_length(e.loss_mask)
        k = _blocks_in(agent, e, 0, n)[1]                                         # the prompt's image blocks
        key = (tuple(e.token_ids[:n]), tuple(map(id, e.images[:k])), tuple(map(tuple, e.grids[:k]))) \
            if 0 < n < len(e.token_ids) else b                                     # nothing sampled: alone
        groups.setdefault(key, []).append(b)
    return list(groups.values())


def _blocks_in(agent: Policy, e: Row, lo: int, hi: int) -> tuple[int, int]:
    """The range of e's image blocks whose tokens lie in token_ids[lo:hi] (blocks are never split by a span:
    spans end at a prompt, before any sampled token)."""
    pads = [e.token_ids[a:b].count(agent.image_pad) for a, b in ((0, lo), (lo, hi))]
    sizes = [t * h * w // agent.merge ** 2 for t, h, w in e.grids]
    first = count = 0
    while first < len(sizes) and pads[0] > 0:
        pads[0] -= sizes[first]
        first += 1
    last = first
    while last < len(sizes) and count < pads[1]:
        count += sizes[last]
        last += 1
    return first, last


def pack(lengths: list[int], max_rows: int, max_tokens: int | None = None, rows: list[int] | None = None,
         longest_first: bool = False, packed: bool = False, sizes: list[int] | None = None) -> list[list[int]]:
    """Item indices grouped into batches: each batch holds at most `max_rows` rows and at most `max_tokens`
    tokens: padded, its rows x its longest length; `packed` (one padding-free row, `collate(packed=True)`),
    the sum of its items' sizes (default rows x length). An item over the token budget alone gets a batch of
    its own. Item i is rows[i] rows (default 1) of length lengths[i] (a GRPO group: G rows). In item order,
    or longest first (less padding); every item in exactly one batch."""
    rows = rows or [1] * len(lengths)
    sizes = sizes or [r * n for r, n in zip(rows, lengths)]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if longest_first else range(len(lengths))
    batches, cur, n, longest, total = [], [], 0, 0, 0
    for i in order:
        grow_n, grow_len, grow_total = n + rows[i], max(longest, lengths[i]), total + sizes[i]
        cost = grow_total if packed else grow_n * grow_len
        if cur and (grow_n > max_rows or (max_tokens is not None and cost > max_tokens)):
            batches.append(cur)
            cur, grow_n, grow_len, grow_total = [], rows[i], lengths[i], sizes[i]
        cur.append(i)
        n, longest, total = grow_n, grow_len, grow_total
    return batches + ([cur] if cur else [])


def training_batches(agent: Policy, episodes: list[Row], mode: str, max_rows: int,
                     max_tokens: int | None = None) -> list[list[int]]:
    """Indices of `episodes` in training micro-batches for train.py's --pack `mode`: "shared" (`pack_groups`),
    "on" (one padding-free row each: `pack` on the sum of lengths) or "off" (padded: rows x longest),
    longest first."""
    if mode == "shared":
        return pack_groups(agent, episodes, max_rows, max_tokens)
    return pack([len(e.token_ids) for e in episodes], max_rows, max_tokens, longest_first=True, packed=mode == "on")


def pack_groups(agent: Policy, episodes: list[Row], max_rows: int, max_tokens: int | None = None) -> list[list[int]]:
    """`pack` for shared rows (`collate(packed=True, share_prompt=True)`): a group's episodes (`prompt_groups`)
    stay in one batch, cut into chunks (`group_chunks`) only where a chunk would pass `max_rows` or
    `max_tokens`; a chunk costs its prompt once plus its episodes' own tokens. Longest chunks first."""
    chunks, costs = [], []
    for g in prompt_groups(agent, episodes):
        n = shared_prompt.prompt_length(episodes[g[0]].loss_mask) if len(g) > 1 else 0
        own = [len(episodes[b].token_ids) - n for b in g]
        for c in group_chunks(own, n, max_rows, max_tokens):
            chunks.append([g[k] for k in c])
            costs.append(n + sum(own[k] for k in c))
    return [[b for k in batch for b in chunks[k]]
            for batch in pack(costs, max_rows, max_tokens, [len(c) for c in chunks], longest_first=True, packed=True,
                              sizes=costs)]


def group_chunks(own: list[int], prompt: int, max_rows: int, max_tokens: int | None = None) -> list[list[int]]:
    """A group's episodes (their own token counts after a shared prompt of `prompt` tokens) cut into the
    fewest greedy chunks, longest first, each of at most `max_rows` episodes and `max_tokens` tokens with
    its prompt once (an episode over the bound alone gets a chunk of its own): each chunk runs the prompt."""
    chunks, cur, cost = [], [], prompt
    for k in sorted(range(len(own)), key=lambda k: -own[k]):
        if cur and (len(cur) >= max_rows or (max_tokens is not None and cost + own[k] > max_tokens)):
            chunks.append(cur)
            cur, cost = [], prompt
        cur.append(k)
        cost += own[k]
    return chunks + ([cur] if cur else [])


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
    `mrope_positions`; `grids` yields the grid of each image block met), and the next text position.
    Tensor ops, a Python step per image block only: each token advances the text position by `adv` (a
    text token 1; an image block max(t, h, w), on its last token), a token's base position is the
    exclusive cumulative sum, and an image token adds its (t, h, w) offset inside its block."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    image = ids == image_token_id                                                         # [n]
    adv = (~image).long()                                                                 # [n]
    offset = torch.zeros(3, len(ids), dtype=torch.long)                                   # [3, n]
    if bool(image.any()):
        edges = torch.diff(torch.cat([torch.zeros(1, dtype=torch.long), image.long(), torch.zeros(1, dtype=torch.long)]))
        grids = iter(grids)
        for a, b in zip(edges.eq(1).nonzero()[:, 0].tolist(), edges.eq(-1).nonzero()[:, 0].tolist()):
            while a < b:                                                  # a run may hold adjacent blocks
                t, h, w = next(grids)
                h, w = h // merge, w // merge
                n = t * h * w
                tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
                offset[:, a:a + n] = torch.stack([tt, hh, ww]).reshape(3, -1)
                adv[a + n - 1] = max(t, h, w)
                a += n
    base = start + torch.cumsum(adv, 0) - adv                                             # [n] exclusive sum
    return base[None, :] + offset, start + int(adv.sum())


# ----------------------------------------------------------------------------- the forward pass

def forward(model, batch: Batch) -> torch.Tensor:
    """Last-layer hidden states [B, T, H] of a whole batch (no cache): the training forward. A packed batch
    passes no attention mask, so transformers builds the block-diagonal one from its text positions; a
    shared one passes its Layout as the prepared mask of every layer (shared_prompt.install routes it)."""
    mask = None if batch.unpack is not None else batch.attention_mask
    if batch.layout is not None:
        shared_prompt.install(model)
        mask = {"full_attention": batch.layout, "sliding_attention": batch.layout}
    return hidden_states(model, batch.input_ids, mask, batch.position_ids, batch_image_features(model, batch))[0]


def batch_image_features(model, batch: Batch) -> torch.Tensor | None:
    """[n image tokens, H]: the vision tower once on each distinct image, its features for every block."""
    if batch.pixel_values is None and batch.features is None:
        return None
    feats = batch.features if batch.features is not None else \
        image_features(model, batch.pixel_values, batch.image_grid_thw)                 # [distinct tokens, H]
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

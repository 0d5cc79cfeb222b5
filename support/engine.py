"""The model side of the agent: episodes batched into tensors, M-RoPE positions, the forward pass,
and the two rollout engines that sample assistant turns with a KV cache.

Contract
--------
- The batches and the forward pass they share with training live in support/batches.py (`collate`,
  `mrope_positions`, `hidden_states`; `Row` and `Policy`, what the engines read of an episode and the agent).
- Two engines behind one interface (`open_session`: `submit(i, budget)`, `turns()`, `close(i)`), driven
  by THE turn loop, lfpc.rollout; they import nothing from lfpc (`Row`, `Policy`: what they read of an
  episode and of the agent) and sample with the same `sample`:
    "cached" (`SlotSession`, the default): continuous batching. A fixed number of slots (`slot_count`)
        of one KV cache allocated once in the compute dtype (`SlotKV`, written in place), one episode
        a slot, the rest queued. A pass: free slots take queued episodes (a task's prompt prefilled
        once, its cache copied to its other rollouts); the slots with tokens to prefill (a prompt, or
        what the environment appended after a turn) are extended in one forward (at most
        cfg.prefill_tokens tokens, the rest in the next pass); every live slot decodes one token
        (`sync_every` steps between host syncs). `turns()` returns as soon as a turn has ended (or
        after one pass when `poll()` asks; none while every live turn awaits its caller); a submitted
        slot is extended in the next pass while the others decode; a closed episode's
        slot is freed (the last live slot moves into it, so decode reads the cache as views) and never
        computed again. Stop strings are checked on token ids. `schedule="turns"` keeps the per-turn
        barrier of the engine before it, to measure against.
    "reference" (`ReferenceSession`, `sample_turn`): every turn re-collates the whole episodes and
        prefills them from scratch, images through the vision tower again, then `decode` (a KV cache
        that grows a step at a time, or a StaticCache under decode="static"): plain, obviously right, slow.
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
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from support import attention, batches, pixels
from support.batches import Policy, Row


SampleFn = Callable[[Policy, list[Row], list[int], object], list[tuple[list[int], list[float], str]]]   # tests
ForceFn = Callable[[Row, list[int]], "int | None"]                        # (episode, turn so far) -> a token or None


# ----------------------------------------------------------------------------- the two engines (one interface)

def open_session(agent: Policy, episodes: list[Row], cfg, work: Work, bound: int, script: SampleFn | None = None,
                 force: ForceFn | None = None, store: "FeatureStore | None" = None) -> "SlotSession | ReferenceSession":
    """The engine `cfg.engine` names ("cached" or "reference") for one rollout of `episodes`. Both have the
    same three calls: `submit(i, budget)` (episode i has new tokens, its prompt or the environment's answer
    to its last turn; its next turn samples at most `budget` tokens), `turns(poll)` (decode; the turns that
    ended, as (i, tokens, log-probs, finish); cached: after one pass once `poll()` is true, none when no
    slot can go on), `close(i)` (episode i ended: never computed again); `busy` while a submitted turn has
    not come back (cached: or a returned one awaits its submit or close). `bound`: the most tokens an episode can reach
    (`lfpc.episode_bound`). `script` (tests) replaces decoding: a turn's tokens come from it. `force`
    (benchmarks, cached only) may replace a sampled token. `store`: the images' features kept for the
    training forward (cached only; the reference keeps none, so training encodes them again). A decode
    step's attention reads the cache as it is (support/attention.py)."""
    attention.install(agent.model)
    if cfg.engine == "cached":
        return SlotSession(agent, episodes, cfg, work, bound, script, force, store)
    if cfg.engine != "reference":
        raise ValueError(f"cfg.engine is 'cached' or 'reference', got {cfg.engine!r}")
    if force is not None:
        raise ValueError("force needs the cached engine")
    return ReferenceSession(agent, episodes, cfg, work, script)


def slot_count(cfg, bound: int, episodes: int) -> int:
    """Slots of the KV cache: cfg.batch_size, at most cfg.batch_tokens // bound (a slot holds an episode's
    bound), at most the number of episodes. A KV budget under one episode's bound is a ValueError."""
    S = min(cfg.batch_size, episodes)
    if cfg.batch_tokens is not None:
        if cfg.batch_tokens < bound:
            raise ValueError(f"a KV budget of {cfg.batch_tokens:,} tokens cannot hold one episode of up to {bound:,}")
        S = min(S, cfg.batch_tokens // bound)
    return max(1, S)


@dataclass
class Slot:
    """One live episode. Its sequence is the episode's tokens, then the turn sampled so far; the cache holds
    the first `length` of them, and the next one (`pending`) is fed by the next decode step."""
    ep: Row
    i: int                        # its index in the rollout's episodes
    length: int = 0               # tokens of the sequence in the cache
    pos: int = 0                  # rotary position of the next token fed
    images: int = 0               # the episode's images in the cache
    turn: int = 0                 # assistant turns done
    toks: list = field(default_factory=list)        # this turn's sampled tokens
    lps: list = field(default_factory=list)         # their sampling log-probs
    budget: int = 0               # this turn's token limit
    mode: str = "extend"          # "extend" (tokens to prefill) | "decode" | "ended" (its turn came back, until
                                  # its submit or close) | "wait" (submitted, behind the barrier) | "done"
    share: int | None = None      # "copy": the task whose saved prompt cache this slot takes; a task's first
                                  # slot: its task until its prompt is saved (None after, or if nothing copies it)
    closed: bool = False          # its episode ended

    @property
    def pending(self) -> int:
        n = len(self.ep.token_ids)
        return self.ep.token_ids[self.length] if self.length < n else self.toks[self.length - n]


class ReferenceSession:
    """The reference engine: every turn of every submitted episode at once, in chunks of at most
    cfg.batch_size rows (and cfg.batch_tokens tokens), each chunk re-collated and prefilled from scratch
    (`sample_turn`): a barrier per turn, no cache kept between turns. Plain, obviously right, slow."""

    def __init__(self, agent: Policy, episodes: list[Row], cfg, work: Work, script: SampleFn | None = None):
        self.agent, self.episodes, self.cfg, self.work, self.script = agent, episodes, cfg, work, script
        self.pending: dict[int, int] = {}                       # episode -> its next turn's budget

    @property
    def busy(self) -> bool:
        return bool(self.pending)

    def submit(self, i: int, budget: int) -> None:
        self.pending[i] = budget

    def close(self, i: int) -> None:
        pass                                                    # nothing of it is kept

    def turns(self, poll: Callable[[], bool] | None = None) -> list[tuple[int, list[int], list[float], str]]:
        rows = sorted(self.pending)
        budget = [self.pending[i] for i in rows]
        self.pending = {}
        out = []
        for idx in batches.pack([len(self.episodes[i].token_ids) + budget[j] for j, i in enumerate(rows)],
                        self.cfg.batch_size, self.cfg.batch_tokens):
            chunk = [self.episodes[rows[j]] for j in idx]
            got = sample_turn(self.agent, chunk, [budget[j] for j in idx], self.cfg, self.work, self.script)
            out += [(rows[j], *turn) for j, turn in zip(idx, got)]
        return out


class SlotSession:
    """The cached engine: continuous batching over `slot_count` slots of one preallocated KV cache
    (`SlotKV`), each holding one episode, the rest queued. `turns()` runs passes until a turn ends: free
    slots take queued episodes; the slots with tokens to prefill (a new episode's prompt, the environment's
    answer to a turn) are extended in one forward (at most cfg.prefill_tokens: the rest in the next pass);
    every live slot decodes (`cfg.sync_every` steps, then one host sync). A slot whose turn ended waits,
    computed as padding, for its `submit` (extended in the next pass while the others keep decoding) or
    its `close` (freed, never computed again). The episodes of one task
    (consecutive rows) share its prompt: prefilled once, its cache copied. cfg.schedule "turns": the
    per-turn barrier instead (a submitted slot waits, still computed, until every slot's turn has ended;
    new episodes only once every slot is free), kept to measure against. `force(episode, turn tokens)`
    (benchmarks) may replace a sampled token (its log-prob is the model's)."""

    def __init__(self, agent: Policy, episodes: list[Row], cfg, work: Work, bound: int,
                 script: SampleFn | None = None, force: ForceFn | None = None, store: "FeatureStore | None" = None):
        k = max(1, cfg.sync_every)
        if force is not None and k != 1:
            raise ValueError("force needs sync_every 1: the host must see each token before the next is fed")
        S = slot_count(cfg, bound, len(episodes))
        self.agent, self.cfg, self.work, self.episodes, self.S, self.k = agent, cfg, work, episodes, S, k
        self.script, self.force, self.barrier = script, force, cfg.schedule == "turns"
        self.kv = SlotKV(S, bound + k + 1, cfg.decode == "static")
        self.queue: deque[tuple[int, int]] = deque()           # (episode, budget) not yet in a slot, in order
        self.live: list[Slot] = []                             # slots [0, A) of the cache
        self.slot_of: dict[int, Slot] = {}                     # episode -> its slot
        self.saved: dict[int, tuple] = {}                      # task -> (length, pos, images, cache copy)
        self.vision = Vision(agent, work, store)
        self.dtype = compute_dtype(agent.model)
        self.u = None if cfg.temperature <= 0 else torch.zeros(S, cfg.max_response_tokens + k, device=agent.device)
        self.stop_text = StopText(agent) if agent.stop_strings else None
        self.env_only = torch.tensor(agent.env_only_ids, dtype=torch.long, device=agent.device)   # sent once

    @property
    def busy(self) -> bool:
        return bool(self.queue) or any(s.mode != "done" for s in self.live)

    def submit(self, i: int, budget: int) -> None:
        s = self.slot_of.get(i)
        if s is None:
            self.queue.append((i, budget))
        else:
            s.budget, s.mode = budget, ("wait" if self.barrier else "extend")

    def close(self, i: int) -> None:
        s = self.slot_of.pop(i)
        s.closed, s.mode = True, ("wait" if self.barrier else "done")   # the barrier keeps it computed until the turn ends

    @torch.no_grad()
    def turns(self, poll: Callable[[], bool] | None = None) -> list[tuple[int, list[int], list[float], str]]:
        """Passes until a turn ends, or one pass when `poll()` is true after it (lfpc.rollout: crops are being
        cut, to rejoin after it): the ended turns, each slot's until its submit or close; none when no slot
        can go on before one (every live turn ended, awaiting its caller)."""
        while True:
            if self.barrier and all(s.mode in ("wait", "done") for s in self.live):   # every turn ended
                for s in self.live:
                    s.mode = ("done" if s.closed else "extend") if s.mode == "wait" else s.mode
            self.release()
            if self.queue and (len(self.live) < self.S if not self.barrier else not self.live):
                self.admit()
            if not self.live:
                return []
            self.extend()
            if not any(s.mode == "decode" for s in self.live):
                if any(s.mode == "ended" for s in self.live):
                    return []                                   # the caller holds every turn (a crop being cut)
                raise RuntimeError("turns() with no slot to decode: submit or close every turn it returned")
            ended = self.scripted() if self.script is not None else self.decode()
            if ended or (poll is not None and poll()):
                break
        out = []
        for s, toks, lps, finish in ended:
            out.append((s.i, list(toks), list(lps), finish))
            s.toks, s.lps, s.turn, s.mode = [], [], s.turn + 1, "ended"       # until its submit or close
        return out

    def admit(self) -> None:
        """Free slots take the next queued episodes. A task's first episode prefills the prompt (minus its
        last token, the pending one); its other episodes copy that cache once it is there."""
        first = {}
        unsaved = {o.share for o in self.live if o.mode != "copy" and o.share is not None}   # firsts not prefilled yet
        while self.queue and len(self.live) < self.S:
            i, budget = self.queue.popleft()
            ep = self.episodes[i]
            s = Slot(ep, i, budget=budget)
            self.slot_of[i] = s
            if self.u is not None:                              # the episode's own stream: token j, uniform j
                self.u[len(self.live)] = torch.rand(self.u.shape[1], generator=torch.Generator().manual_seed(ep.seed))
            if ep.task_index in self.saved or ep.task_index in first or ep.task_index in unsaved:
                s.mode, s.share = "copy", ep.task_index
            else:
                first[ep.task_index] = s
            self.live.append(s)
        for task, s in first.items():                           # save it if the task has more episodes
            s.share = task if self._queued(task) or any(o.mode == "copy" and o.share == task for o in self.live) \
                else None

    def _queued(self, task: int) -> bool:
        """Is the next queued episode one of `task`'s?"""
        return bool(self.queue) and self.episodes[self.queue[0][0]].task_index == task

    def extend(self) -> None:
        """One forward over the slots in mode "extend" (right-padded to the longest), in order, while the
        forward stays within cfg.prefill_tokens (the first whatever its length; the rest wait for the next
        pass, computed as padding by its decode): each prefills its sequence from `length` to its pending
        token. Then shared prompts are saved and copied."""
        rows, n = [], 0
        for i, s in enumerate(self.live):
            if s.mode == "extend":
                m = max(n, len(s.ep.token_ids) - 1 - s.length)
                if rows and (len(rows) + 1) * m > self.cfg.prefill_tokens:
                    break
                rows, n = rows + [i], m
        if rows:
            agent = self.agent
            new = [self.live[i].ep.token_ids[self.live[i].length:-1] for i in rows]
            ids = torch.full((len(rows), n), agent.pad_id, dtype=torch.long)
            pos = torch.zeros(3, len(rows), n, dtype=torch.long)
            images = []
            for r, (i, toks) in enumerate(zip(rows, new)):
                s = self.live[i]
                ids[r, :len(toks)] = torch.tensor(toks, dtype=torch.long)
                pos[:, r, :len(toks)], s.pos = batches.segment_positions(toks, s.ep.grids[s.images:], s.pos, agent.image_pad,
                                                                 agent.merge)
                images += s.ep.images[s.images:]
            start = torch.tensor([self.live[i].length for i in rows])
            self._forward(ids, pos, start, torch.tensor(rows), self.vision.features(images),
                          torch.tensor([len(t) for t in new]), max(self.live[i].length + len(t) for i, t in zip(rows, new)))
            for i, toks in zip(rows, new):
                s = self.live[i]
                s.length, s.images, s.mode = s.length + len(toks), len(s.ep.images), "decode"
            self.work.prefill_tokens += len(rows) * n
            self.work.padding_tokens += len(rows) * n - sum(len(t) for t in new)
        for i, s in enumerate(self.live):
            if s.mode == "decode" and s.share is not None and s.turn == 0 and s.share not in self.saved:
                self.saved[s.share] = (s.length, s.pos, s.images, self.kv.save(i, s.length))
                s.share = None                                  # saved once
        for i, s in enumerate(self.live):
            if s.mode == "copy" and s.share in self.saved:   # else its prompt waits for a later pass
                s.length, s.pos, s.images, cache = self.saved[s.share]
                self.kv.restore(cache, i)
                s.mode, s.share = "decode", None
        for task in [t for t in self.saved if not self._queued(t)]:
            del self.saved[task]                                # no episode of it is queued any more

    def decode(self) -> list[tuple]:
        """`k` decode steps of every live slot (a "wait" slot feeds padding in place: computed, kept out),
        one host sync; returns (slot, turn tokens, log-probs, finish) of each slot whose turn ended."""
        agent, A, k, force = self.agent, len(self.live), self.k, self.force
        dev = agent.device
        state = torch.tensor([[s.pending if s.mode == "decode" else agent.pad_id, s.pos, s.length,
                               s.ep.num_generated + len(s.toks), s.mode == "decode"] for s in self.live])
        ids, pos, start, gen, go = state.to(dev).unbind(1)                 # [A] each: one copy to the device
        go = go.bool()
        out_t, out_l, logits = [], [], None
        at = [(s.length, s.mode == "decode") for s in self.live]   # where each slot writes: known here, no sync
        for j in range(k):
            longest = max(n + j * d for n, d in at) + 1
            h = self._forward(ids[:, None], pos.view(1, A, 1).expand(3, A, 1), start, None, None, None, longest)
            logits = env_only_masked(agent.model.lm_head(h[:, -1]), self.env_only)                # [A, V]
            u = None if self.u is None else self.u[torch.arange(A, device=dev), (gen + j).clamp(max=self.u.shape[1] - 1)]
            tok, lp = sample(logits, self.cfg.temperature, self.cfg.top_p, u)                  # [A], [A]
            out_t.append(tok)
            out_l.append(lp)
            ids = torch.where(go, tok, ids)
            pos, start = pos + go.long(), start + go.long()
        toks, lps = torch.stack(out_t, 1).tolist(), torch.stack(out_l, 1).tolist()          # the one sync
        w = self.work
        w.host_syncs += 1
        w.decode_steps += k
        w.slot_steps += k * self.S
        w.decode_tokens += k * A
        ended = []
        for r, s in enumerate(self.live):
            if s.mode != "decode":
                w.padding_tokens += k
                continue
            for j in range(k):
                t, lp = toks[r][j], lps[r][j]
                if force is not None and (f := force(s.ep, s.toks)) is not None and f != t:
                    t = f
                    lp = float(_logprobs(logits[r], self.cfg.temperature)[f])
                if not math.isfinite(lp):
                    raise FloatingPointError("the policy's next-token probabilities are not finite (NaN or inf "
                                             "logits): its weights are damaged")
                s.toks.append(t)
                s.lps.append(lp)
                s.length, s.pos = s.length + 1, s.pos + 1        # the pending token went in
                w.useful_tokens += 1
                finish = self._finish(t, s)
                if finish:
                    ended.append((s, s.toks, s.lps, finish))
                    w.padding_tokens += k - 1 - j
                    break
        return ended

    def scripted(self) -> list[tuple]:
        """Tests: every live decoding slot's whole turn from `script` (its tokens prefilled afterwards)."""
        out = []
        for s in self.live:
            if s.mode == "decode":
                toks, lps, finish = self.script(self.agent, [s.ep], [s.budget], self.cfg)[0]
                out.append((s, toks, lps, finish))
        return out

    def release(self) -> None:
        """Free the slots of ended episodes: the last live slot moves into each hole (its cache copied), so
        the live slots stay [0, A) and a decode step reads the cache without gathering it."""
        for i in sorted((i for i, s in enumerate(self.live) if s.mode == "done"), reverse=True):
            last = len(self.live) - 1
            if i != last:
                self.kv.copy(last, i, self.live[last].length)
                if self.u is not None:
                    self.u[i] = self.u[last]
                self.live[i] = self.live[last]
            self.live.pop()

    # ------------------------------------------------------------------------- pieces

    def _finish(self, t: int, s: Slot) -> str:
        """"eos" (<|im_end|>), "stop" (</tool_call>: a stop id, or a stop string's ids ending the turn),
        "length" (the turn's limit), or "" while the turn goes on."""
        if t in self.agent.stop_ids:
            return "eos" if t == self.agent.im_end else "stop"
        if self.stop_text is not None and self.stop_text.ends(s.toks):
            return "stop"
        return "length" if len(s.toks) >= s.budget else ""

    def _forward(self, ids, pos, start, rows, image_embeds, counts, longest: int) -> torch.Tensor:
        """Last-layer hidden states [b, n, H] of ids [b, n] written into the cache at `start` [b] (rows: the
        slots, None = [0, b); counts [b]: each row's real tokens, the rest padding, None: all n); a row
        attends to its own cache and, causally, to its new tokens. `longest`: max(start + counts), from the
        host's own records, so that a decode step reads nothing back from the device."""
        dev = self.agent.device
        b, n = ids.shape
        counts = torch.full((b,), n, device=dev) if counts is None else counts.to(dev)
        self.kv.ensure(longest)                                           # the real tokens always fit
        start = start.to(dev)
        T = self.kv.capacity if self.kv.static else longest
        keys = torch.arange(T, device=dev)
        allowed = keys[None, None, :] <= (start[:, None] + torch.arange(n, device=dev)[None, :])[:, :, None]   # [b, n, T]
        mask = allowed[:, None]                                                              # [b, 1, n, T]
        if self.agent.model.config.get_text_config()._attn_implementation == "eager":            # eager adds masks
            mask = torch.zeros(mask.shape, dtype=self.dtype, device=dev).masked_fill(~mask, torch.finfo(self.dtype).min)
        self.kv.begin(None if rows is None else rows.to(dev), start, counts, n, T)
        h, _ = batches.hidden_states(self.agent.model, ids.to(dev), {"full_attention": mask}, pos.to(dev), image_embeds,
                             self.kv, use_cache=True)
        return h


class SlotKV:
    """The slot engine's KV cache: per layer, keys and values [slots, kv heads, capacity + 1, head dim] in
    the compute dtype, allocated at the first forward and written in place (no growth by concatenation
    per step; a token past the capacity, which `lfpc.episode_bound` should make impossible, grows it
    once). Position `capacity` is scratch: padding is written there. A forward over slots [0, b) reads
    views of it; one over other slots (an extension) reads a gathered copy of theirs. Duck-types the
    `update` of a transformers Cache, which the attention layers call."""

    def __init__(self, slots: int, capacity: int, static: bool = False):
        self.slots, self.capacity, self.static = slots, capacity, static
        self.k, self.v = {}, {}
        self.rows, self.index, self.at, self.T = None, None, None, 0

    def ensure(self, length: int) -> None:
        """Room for `length` real tokens a slot."""
        if length <= self.capacity:
            return
        grow = max(length, self.capacity + self.capacity // 4) - self.capacity
        for c in (self.k, self.v):
            for l, t in c.items():
                c[l] = torch.cat([t[:, :, :self.capacity], t.new_zeros(*t.shape[:2], grow + 1, t.shape[3])], 2)
        self.capacity += grow

    def begin(self, rows: torch.Tensor | None, start: torch.Tensor, counts: torch.Tensor, n: int, T: int) -> None:
        """The next forward writes the counts[r] real tokens of each row at start[r].. and its padding into
        the scratch position (rows None: slots [0, b))."""
        steps = torch.arange(n, device=start.device)
        self.rows, self.T = rows, T
        index = rows if rows is not None else torch.arange(len(start), device=start.device)   # [b]
        self.index = index[:, None]                              # [b, 1]: made once a forward, not in every layer
        at = start[:, None] + steps[None, :]                                                  # [b, n]
        self.at = torch.where(steps[None, :] < counts[:, None], at, self.capacity)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key, value [b, heads, n, dim] -> the rows' keys and values [b, heads, T, dim] after writing them."""
        if layer_idx not in self.k:
            shape = (self.slots, key.shape[1], self.capacity + 1, key.shape[3])
            self.k[layer_idx] = key.new_zeros(shape)
            self.v[layer_idx] = value.new_zeros(shape)
        K, V = self.k[layer_idx], self.v[layer_idx]
        b = key.shape[0]
        K[self.index, :, self.at] = key.permute(0, 2, 1, 3).to(K.dtype)                    # [b, n, heads, dim]
        V[self.index, :, self.at] = value.permute(0, 2, 1, 3).to(V.dtype)
        if self.rows is None:
            return K[:b, :, :self.T], V[:b, :, :self.T]
        return K[:, :, :self.T].index_select(0, self.rows), V[:, :, :self.T].index_select(0, self.rows)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.T

    def copy(self, src: int, dst: int, length: int) -> None:
        for c in (self.k, self.v):
            for t in c.values():
                t[dst, :, :length] = t[src, :, :length]

    def save(self, i: int, length: int) -> list:
        return [(self.k[l][i, :, :length].clone(), self.v[l][i, :, :length].clone()) for l in sorted(self.k)]

    def restore(self, saved: list, i: int) -> None:
        for l, (k, v) in zip(sorted(self.k), saved):
            self.k[l][i, :, :k.shape[1]] = k
            self.v[l][i, :, :v.shape[1]] = v


class StopText:
    """Stop strings made of several tokens, checked on token ids: each id's text, decoded once for the whole
    vocabulary, so the decode loop never calls the tokenizer."""

    def __init__(self, agent: Policy):
        self.strings = tuple(agent.stop_strings)
        vocab = len(agent.tokenizer)
        self.text = agent.tokenizer.batch_decode([[i] for i in range(vocab)])
        self.longest = max(len(s) for s in self.strings)

    def ends(self, toks: list[int]) -> bool:
        tail = ""
        for t in reversed(toks):
            tail = (self.text[t] if t < len(self.text) else "") + tail
            if len(tail) >= self.longest:
                break
        return tail.endswith(self.strings)


def compute_dtype(model) -> torch.dtype:
    """The dtype of the hidden states: the autocast dtype when autocast is on, else the embeddings'."""
    dev = next(model.parameters()).device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return model.model.get_input_embeddings().weight.dtype


def _logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of one row (T <= 0: of the logits), as `sample` computes it."""
    logits = logits.float()
    return torch.log_softmax(logits / temperature if temperature > 0 else logits, -1)

@torch.no_grad()
def sample_turn(agent: Policy, episodes: list[Row], max_new_tokens: list[int], cfg,
                work: Work | None = None, script: SampleFn | None = None) -> list[tuple[list[int], list[float], str]]:
    """The reference engine: continue every episode by one assistant turn, prefilling the WHOLE episodes
    (left-padded, every image through the vision tower) into a fresh KV cache, then `decode` (or, in
    tests, take the turns of `script`)."""
    work = work if work is not None else Work()
    batch = batches.collate(agent, episodes, left_pad=True, share_images=False)
    feats = batches.batch_image_features(agent.model, batch)
    if feats is not None:
        work.image_encodes += batch.image_grid_thw.shape[0]
        work.vision_patches += batch.pixel_values.shape[0]
    h, cache = batches.hidden_states(agent.model, batch.input_ids, batch.attention_mask, batch.position_ids, feats,
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


@torch.no_grad()
def decode(agent: Policy, kv: KV, max_new_tokens: list[int], cfg, u: torch.Tensor | None,
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
        work.host_syncs += 1
        work.decode_steps += 1
        work.slot_steps += B
        work.useful_tokens += sum(live)
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
        h, cache = batches.hidden_states(model, tok[:, None], attn, pos, cache=cache, use_cache=True)
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


# ----------------------------------------------------------------------------- what the engines did

@dataclass
class Work:
    """Counts of the work of one or more rollouts (each a sum over the model calls)."""
    image_encodes: int = 0     # images through the vision tower
    vision_patches: int = 0    # 14-px patches through the vision tower
    prefill_tokens: int = 0    # positions prefilled (several at a time per row), padding included: the compute
    decode_tokens: int = 0     # positions fed one at a time while decoding, rows that already stopped included
    padding_tokens: int = 0    # of those, positions that held no token of an episode (padding, stopped rows)
    decode_steps: int = 0      # decode forwards (one token a row each)
    slot_steps: int = 0        # slots x decode steps: what the decode could have sampled
    useful_tokens: int = 0     # sampled tokens the episodes kept
    host_syncs: int = 0        # device -> host transfers of sampled tokens
    context_tokens: int = 0    # the distinct context: each task's prompt once + every episode's own tokens after it

    def metrics(self) -> dict[str, float]:
        """As the work/* metrics, with work/prefill_ratio = prefill positions (padding included) / distinct
        context tokens."""
        m = {f"work/{k}": v for k, v in self.__dict__.items()}
        m["work/prefill_ratio"] = self.prefill_tokens / self.context_tokens if self.context_tokens else None
        m["work/slot_utilisation"] = self.useful_tokens / self.slot_steps if self.slot_steps else None
        return m


class Vision:
    """The vision tower for one rollout call: features of each distinct image (by content), computed once;
    with a `store`, also kept there for the training forward of the step."""

    def __init__(self, agent: Policy, work: Work, store: "FeatureStore | None" = None):
        self.agent, self.work, self.seen, self.store = agent, work, {}, store

    def features(self, images: list) -> torch.Tensor | None:
        """[sum of merged tokens, H] for `images` in order; new contents encoded together in one call."""
        if not images:
            return None
        keys = [_content_key(im) for im in images]
        new = {k: im for k, im in zip(keys, images) if k not in self.seen}
        if new:
            pix = pixels.pixel_values(self.agent, list(new.values()))                  # [patches, C*tp*p*p]
            thw = torch.tensor([self.agent.image_grid(im) for im in new.values()], dtype=torch.long,
                               device=self.agent.device)
            feats = batches.image_features(self.agent.model, pix, thw).split((thw.prod(-1) // self.agent.merge**2).tolist())
            self.seen.update(zip(new, feats))
            if self.store is not None:
                for k, f in zip(new, feats):
                    self.store.put(k, f)
            self.work.image_encodes += len(new)
            self.work.vision_patches += pix.shape[0]
        return torch.cat([self.seen[k] for k in keys])


class FeatureStore:
    """One step's vision features by image content, on the host: with the vision tower frozen (LoRA), the
    rollout's features are the training forward's (the same weights in the same precision), so training
    takes them instead of encoding every image again in every micro-batch (~16,600 encodes a paper step)."""

    def __init__(self):
        self.features: dict[tuple, torch.Tensor] = {}

    def put(self, key: tuple, features: torch.Tensor) -> None:
        self.features[key] = features.detach().to("cpu")

    def get(self, images: list, device) -> torch.Tensor | None:
        """[sum of merged tokens, H] of `images` in order, on `device`; None unless every one is stored."""
        keys = [_content_key(im) for im in images]
        if not all(k in self.features for k in keys):
            return None
        return torch.cat([self.features[k] for k in keys]).to(device)


def prepare_image(agent: Policy, image) -> None:
    """The engine's host work on an image, done ahead on any thread (lfpc.rollout's pool, while the engine
    runs): its content key and its patches' bytes (support/pixels.py), kept on the image until the vision
    tower takes them. Without it the engine does the same work itself, on the main thread."""
    _content_key(image)
    pixels.cut_ahead(image, agent.image_processor.patch_size, agent.image_processor.merge_size)


def _content_key(image) -> tuple:
    """(size, mode, sha1 of the pixels), computed once per image object (kept in its `info`)."""
    key = image.info.get("lfpc_content_key") if hasattr(image, "info") else None
    if key is None:
        key = (image.size, image.mode, _digest(image))
        if hasattr(image, "info"):
            image.info["lfpc_content_key"] = key
    return key


def _digest(image) -> str:
    """sha1 of an image's pixel bytes."""
    return hashlib.sha1(image.tobytes()).hexdigest()


# ----------------------------------------------------------------------------- sampling

def env_only_masked(logits: torch.Tensor, ids: list[int] | torch.Tensor) -> torch.Tensor:
    """logits [N, V] with the tokens only the environment writes set to -inf (the policy's own vocabulary)."""
    ids = ids if torch.is_tensor(ids) else torch.tensor(ids, dtype=torch.long, device=logits.device)
    return logits.index_fill(-1, ids, float("-inf"))


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


def uniforms(episodes: list[Row], n: int, device) -> torch.Tensor:
    """[B, n]: for each episode, the uniforms of its next n sampled tokens (its stream, `Episode.seed`,
    from the token after those it already sampled)."""
    out = []
    for e in episodes:
        g = torch.Generator().manual_seed(e.seed)
        out.append(torch.rand(e.num_generated + n, generator=g)[e.num_generated:])
    return torch.stack(out).to(device)

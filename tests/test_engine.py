"""Tests for support/engine.py: M-RoPE positions, the forward pass, sampling with a KV cache, log-prob parity."""
import os
from dataclasses import replace

import pytest
import torch

import crop_tool
import lfpc
from support import batches, engine, pixels, policy
from conftest import noise_image

SMALL = lfpc.RolloutConfig(global_max_pixels=8 * 8 * 28 * 28, max_new_tokens=12, max_turns=3,
                           crop=crop_tool.CropConfig(min_pixels=4 * 28 * 28, max_pixels=4 * 4 * 28 * 28))


def task(w=300, h=200, seed=0, **kw):
    return lfpc.Task(image=noise_image(w, h, seed), question="What colour is the box?", answer="red", **kw)


# ----------------------------------------------------------------------------- positions

def _two_row_batch(agent):
    """Row 0: two images of different shapes; row 1: one image, left-padded."""
    eps = []
    for k, sizes in enumerate([[(112, 56), (56, 84)], [(84, 84)]]):
        ep = lfpc.Episode(0)
        ep.append(agent.encode("hello"))
        for w, h in sizes:
            im = noise_image(w, h, k)
            g = agent.image_grid(im)
            ep.append(agent.image_block(g) + agent.encode(" and more text"), images=[(im, g)])
        eps.append(ep)
    return batches.collate(agent, eps, left_pad=True)


def test_mrope_positions_match_the_models_own_rope_index(tiny):
    batch = _two_row_batch(tiny)
    mm_types = (batch.input_ids == tiny.image_pad).int()
    ref, _ = tiny.model.model.get_rope_index(batch.input_ids, mm_token_type_ids=mm_types,
                                             image_grid_thw=batch.image_grid_thw,
                                             attention_mask=batch.attention_mask)
    assert batch.attention_mask[1, 0] == 0, "row 1 should be left-padded"
    torch.testing.assert_close(batch.position_ids, ref.long(), rtol=0, atol=0)


def test_mrope_positions_by_hand(tiny):
    # text(2) + image 1x4x4 patches -> 2x2 tokens + text(1): text 0,1; image (2+t, 2+h, 2+w); text 2+2=4
    ids = torch.tensor([[5, 6] + [tiny.image_pad] * 4 + [7]])
    pos = batches.mrope_positions(ids, torch.ones_like(ids), [(1, 4, 4)], tiny.image_pad, merge=2)
    assert pos[0, 0].tolist() == [0, 1, 2, 2, 2, 2, 4]
    assert pos[1, 0].tolist() == [0, 1, 2, 2, 3, 3, 4]
    assert pos[2, 0].tolist() == [0, 1, 2, 3, 2, 3, 4]


def test_our_forward_equals_the_models_own_forward_with_mm_token_type_ids(tiny):
    """batches.forward (our positions, our image scatter) gives the hidden states the model computes
    itself from pixel values and mm_token_type_ids."""
    b = _two_row_batch(tiny)
    with torch.no_grad():
        ours = batches.forward(tiny.model, b)
        tiny.model.model.rope_deltas = None
        theirs = tiny.model.model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                  mm_token_type_ids=(b.input_ids == tiny.image_pad).int(),
                                  pixel_values=b.pixel_values, image_grid_thw=b.image_grid_thw).last_hidden_state
    m = b.attention_mask.bool()
    torch.testing.assert_close(ours[m], theirs[m], rtol=1e-5, atol=1e-5)


def test_image_grid_equals_the_image_processors(tiny):
    for w, h in [(56, 56), (112, 84), (252, 168)]:
        im = noise_image(w, h)
        assert tiny.image_grid(im) == tiny.encode_image(im)[1]
    with pytest.raises(ValueError, match="shown size"):
        tiny.image_grid(noise_image(57, 56))


def test_collate_processes_each_distinct_image_once(tiny, monkeypatch):
    ep = lfpc.start_episode(tiny, task(), 0, SMALL)
    copies = [lfpc.Episode(0) for _ in range(3)]
    for c in copies:
        c.append(ep.token_ids, images=list(zip(ep.images, ep.grids)))
    calls = []
    real = pixels.pixel_values
    monkeypatch.setattr(pixels, "pixel_values", lambda agent, ims: calls.extend(ims) or real(agent, ims))
    b = batches.collate(tiny, copies)
    assert len(calls) == 1 and b.pixel_values.shape[0] == tiny.encode_image(ep.images[0])[0].shape[0]
    assert b.image_index.tolist() == [0, 0, 0] and b.image_grid_thw.tolist() == [list(ep.grids[0])]
    with torch.no_grad():                              # the shared features equal per-copy features
        shared = batches.forward(tiny.model, b)
        alone = batches.forward(tiny.model, batches.collate(tiny, copies, share_images=False))
    torch.testing.assert_close(shared, alone, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- sampling and log-prob parity

def test_sampling_logprobs_equal_training_forward_two_turns_two_images_padded(tiny):
    """Turn 2 is sampled with the KV-cache sampler after a crop turn; the episodes have different
    lengths (different crop sizes), so the batch is padded; one training forward must agree."""
    cfg = lfpc.RolloutConfig(**{**SMALL.__dict__, "temperature": 0.7, "max_new_tokens": 10})
    boxes = [[0, 0, 100, 100], [20, 10, 200, 60], [5, 5, 60, 180]]
    tasks = [task(w=400, h=300, seed=s) for s in range(3)]
    eps = [lfpc.start_episode(tiny, t, i, cfg) for i, t in enumerate(tasks)]
    for i, ep in enumerate(eps):   # turn 1: a scripted tool call (its log-probs are not compared)
        toks = tiny.encode(crop_tool.format_tool_call(boxes[i]))
        lfpc.step_episode(tiny, ep, tasks[i], toks, [0.0] * len(toks), "stop", cfg)
        assert len(ep.images) == 2
    start = [len(e.token_ids) for e in eps]
    assert len(set(start)) > 1, "episodes should differ in length so the batch is padded"
    for i, ep in enumerate(eps):
        ep.seed = i
    turn2 = engine.sample_turn(tiny, eps, [10] * 3, cfg)
    for ep, (toks, lps, finish) in zip(eps, turn2):
        ep.append(toks, lps)
    batch = batches.collate(tiny, eps)
    lp = lfpc.token_logprobs(tiny.model, batch, temperature=0.7).detach()    # with gradients: training's path
    for b, ep in enumerate(eps):
        n = len(ep.token_ids)
        torch.testing.assert_close(lp[b, start[b]:n], batch.sampling_logprobs[b, start[b]:n], rtol=0, atol=1e-4)


def test_full_rollout_logprobs_parity_and_seeded_reproducibility(tiny):
    cfg = lfpc.RolloutConfig(**{**SMALL.__dict__, "max_new_tokens": 16})
    tasks = [task(seed=1), task(w=200, h=280, seed=2)]
    a = lfpc.rollout(tiny, tasks, 3, cfg, seed=123)
    b = lfpc.rollout(tiny, tasks, 3, cfg, seed=123)
    assert [e.token_ids for e in a] == [e.token_ids for e in b]
    assert [e.task_index for e in a] == [0, 0, 0, 1, 1, 1]
    assert all(e.done for e in a)
    batch = batches.collate(tiny, a)
    lp = lfpc.token_logprobs(tiny.model, batch).detach()    # with gradients: training's path, not the sampler's
    m = batch.loss_mask.bool()
    assert m.sum() > 0
    torch.testing.assert_close(lp[m], batch.sampling_logprobs[m], rtol=0, atol=1e-4)
    assert (lp[~m] == 0).all()


def test_greedy_sampling_matches_plain_forward_argmax(tiny):
    """Each greedy token equals the argmax of a fresh, cache-free forward over the prefix."""
    cfg = lfpc.RolloutConfig(**{**SMALL.__dict__, "temperature": 0.0, "max_new_tokens": 6})
    ep = lfpc.start_episode(tiny, task(), 0, cfg)
    toks, _, _ = engine.sample_turn(tiny, [ep], [6], cfg)[0]
    ids = list(ep.token_ids)
    for t in toks:
        e = lfpc.Episode(0)
        e.append(ids, images=list(zip(ep.images, ep.grids)))
        b = batches.collate(tiny, [e])
        with torch.no_grad():
            h = batches.forward(tiny.model, b)
            assert int(tiny.model.lm_head(h[0, -1]).argmax()) == t
        ids = ids + [t]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_static_kv_cache_decode_gives_the_dynamic_paths_tokens(tiny, temperature):
    """decode="static" (preallocated cache and mask) against the reference decode="dynamic": the same
    tokens, log-probs within float noise, for left-padded prompts of different lengths, one with two
    images, rows stopping at different limits (padding written into the static slots of dead rows)."""
    base = lfpc.RolloutConfig(**{**SMALL.__dict__, "temperature": temperature})
    eps = [lfpc.start_episode(tiny, task(seed=i, w=300 - 60 * i), i, base) for i in range(3)]
    for i, ep in enumerate(eps):
        ep.seed = 7 + i
    eps[2].append(tiny.encode(" a longer user text") + tiny.image_block(eps[2].grids[0]),
                  images=[(eps[2].images[0], eps[2].grids[0])])          # a second image: a longer prompt
    limits = [5, 16, 11]
    runs = {}
    for mode in ("dynamic", "static"):
        cfg = lfpc.RolloutConfig(**{**base.__dict__, "decode": mode})
        runs[mode] = engine.sample_turn(tiny, eps, limits, cfg)
    for (t_dyn, lp_dyn, fin_dyn), (t_st, lp_st, fin_st), n in zip(runs["dynamic"], runs["static"], limits):
        assert t_dyn == t_st and fin_dyn == fin_st and len(t_dyn) <= n
        assert lp_st == pytest.approx(lp_dyn, abs=1e-4)
    assert len({len(t) for t, _, _ in runs["static"]}) > 1                 # the rows really differ in length
    with pytest.raises(ValueError, match="decode"):
        lfpc.RolloutConfig(**{**base.__dict__, "decode": "graph"})


def test_token_logprobs_gradient_flows_only_through_sampled_positions(tiny):
    cfg = lfpc.RolloutConfig(**{**SMALL.__dict__, "max_new_tokens": 5})
    eps = lfpc.rollout(tiny, [task()], 2, cfg, seed=0)
    batch = batches.collate(tiny, eps)
    lp = lfpc.token_logprobs(tiny.model, batch)                              # [2, T]
    mask = batch.loss_mask.bool()
    assert lp.requires_grad and mask.any() and (~mask).any()
    assert (lp[~mask] == 0).all()                                            # context: exactly 0, no log-prob
    params = [p for p in tiny.model.parameters() if p.requires_grad]
    through_context = torch.autograd.grad(lp[~mask].sum(), params, allow_unused=True, retain_graph=True)
    assert all(g is None or not g.any() for g in through_context)             # and no gradient through it
    through_sampled = torch.autograd.grad(lp[mask].sum(), params, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in through_sampled)


# ----------------------------------------------------------------------------- the cached engine

def _full_logits(agent, episodes):
    """Next-token logits after each episode's last token, from one plain forward over whole episodes."""
    batch = batches.collate(agent, episodes)
    with torch.no_grad():
        h = batches.forward(agent.model, batch)
    last = torch.tensor([len(e.token_ids) - 1 for e in episodes])
    return agent.model.lm_head(h[torch.arange(len(episodes)), last])


def _agent(name, tiny):
    from support import models
    from conftest import QWEN_TOKENIZER
    return tiny if name == "tiny" else models.real_shape_agent(QWEN_TOKENIZER)


@pytest.mark.parametrize("name", ["tiny", "real-shape"])
def test_slots_give_the_logits_of_a_full_forward_through_ragged_turns(tiny, name, monkeypatch):
    """The slot engine's mechanics: 2 prompts of different images x 3 rollouts in 4 slots (so slots are
    refilled and a task's rollouts are split over slots, its prompt prefilled once and copied); ragged
    turns (0, 1 and 2 crops of different sizes, an error turn, turns closed by <|im_end|> or stopped at
    </tool_call>). After every extension, each slot's next-token logits (a decode step of its pending
    token) equal a plain forward over its whole episode. The real-shape model: 152,064-row vocabulary,
    head dim 128, M-RoPE [16, 24, 24], windowed vision, a 4000x3000 original."""
    agent = _agent(name, tiny)
    big = name == "real-shape"
    tasks = [task(w=4000 if big else 400, h=3000 if big else 300, seed=1), task(w=300, h=500, seed=2)]
    cfg = lfpc.RolloutConfig(**{**SMALL.__dict__, "global_max_pixels": (64 if big else 36) * 784, "batch_size": 4})
    call = lambda x, y, w, h: agent.encode(crop_tool.format_tool_call([x, y, x + w, y + h]))
    turns = [  # per episode, per turn: (tokens, finish) -- what a policy might have sampled
        [(call(0, 0, 56, 56), "stop"), (call(28, 28, 84, 56), "stop")],                        # 2 crops
        [(agent.encode("<answer>red</answer>") + [agent.im_end], "eos")],                      # answers at once
        [(call(10, 10, 120, 60), "stop"), (agent.encode("<answer>b</answer>") + [agent.im_end], "eos")],
        [(agent.encode("<tool_call>{bad</tool_call>"), "stop"), (call(0, 0, 60, 90), "stop")],  # error, then a crop
        [(call(5, 5, 200, 200), "stop"), (agent.encode("thinking") + [agent.im_end], "eos")],  # crop, then no call
        [(agent.encode("<think>x</think>") + call(0, 28, 112, 112) + [agent.im_end], "eos"), (call(0, 0, 28, 28), "stop")],
    ]
    order, count = {}, {}

    def script(a, eps, budget, c):
        e = eps[0]
        row = order.setdefault(id(e), len(order))
        k = count[id(e)] = count.get(id(e), -1) + 1
        toks, finish = (turns[row] + [(agent.encode("<answer>c</answer>") + [agent.im_end], "eos")])[k]
        return [(toks, [-1.0] * len(toks), finish)]
    checked = []
    real = engine.SlotSession.extend

    def extend_and_check(run):
        real(run)
        A = len(run.live)
        if not A:
            return
        ids = torch.tensor([s.pending for s in run.live])
        h = run._forward(ids[:, None], torch.tensor([s.pos for s in run.live]).view(1, A, 1).expand(3, A, 1),
                         torch.tensor([s.length for s in run.live]), None, None, None,
                         max(s.length for s in run.live) + 1)                          # writes what decode would write
        logits = agent.model.lm_head(h[:, -1])
        ready = [r for r, s in enumerate(run.live) if s.mode != "ended"]     # not those awaiting their crop
        if not ready:
            return
        torch.testing.assert_close(logits[ready], _full_logits(agent, [run.live[r].ep for r in ready]),
                                   rtol=1e-4, atol=1e-4)
        checked.append(len(ready))
    monkeypatch.setattr(engine.SlotSession, "extend", extend_and_check)
    work = engine.Work()
    eps = lfpc.rollout(agent, tasks, 3, cfg, sample_fn=script, work=work)
    assert [len(e.crops) for e in sorted(eps, key=lambda e: order[id(e)])] == [2, 0, 1, 1, 1, 2]
    assert sum(checked) >= 10 and max(checked) == 4
    distinct = {engine._content_key(im) for e in eps for im in e.images}
    assert work.image_encodes == len(distinct)                      # every image through the vision tower once


def _rollout(agent, tasks, group, cfg, engine_name, seed=5, **kw):
    cfg = lfpc.RolloutConfig(**{**cfg.__dict__, "engine": engine_name})
    work = engine.Work()
    return lfpc.rollout(agent, tasks, group, cfg, seed=seed, work=work, **kw), work


def _same_episodes(a, b, atol, ties=None):
    """Episodes equal token for token, log-probs within atol. `ties` (agent, temperature): an episode may
    part from the other at a sampled token whose uniform lies within 1e-5 of the boundary between the two
    tokens in the inverse CDF (fp32 rounding of equal math decides such a coin flip), at most 1 in 16."""
    flips = 0
    for x, y in zip(a, b, strict=True):
        if ties is not None and x.token_ids != y.token_ids and _near_tie(*ties, x, y):
            flips += 1
            continue
        assert x.token_ids == y.token_ids and x.loss_mask == y.loss_mask and x.stop_reason == y.stop_reason
        assert [c.box_original for c in x.crops] == [c.box_original for c in y.crops] and x.turns == y.turns
        assert x.logprobs == pytest.approx(y.logprobs, abs=atol)
    assert flips <= len(a) / 16, f"{flips} episodes parted at near-ties"


@torch.no_grad()
def _near_tie(agent, temperature, x, y) -> bool:
    """x and y part at a sampled token where the sampler's uniform sits on the CDF boundary between them."""
    j = next(j for j, (p, q) in enumerate(zip(x.token_ids, y.token_ids)) if p != q)
    if not (x.loss_mask[j] and y.loss_mask[j]) or x.logprobs[:j] != pytest.approx(y.logprobs[:j], abs=1e-5):
        return False
    prefix = lfpc.Episode(x.task_index)
    blocks = sum(t == agent.vision_start for t in x.token_ids[:j])
    prefix.append(x.token_ids[:j], images=list(zip(x.images[:blocks], x.grids[:blocks])))
    logits = engine.env_only_masked(_full_logits(agent, [prefix]), agent.env_only_ids)[0].float()
    cdf = torch.softmax(logits / temperature, -1).cumsum(0)
    u = engine.uniforms([lfpc.Episode(0, seed=x.seed)], sum(x.loss_mask[:j]) + 1, "cpu")[0, -1]
    edge = cdf[min(x.token_ids[j], y.token_ids[j])]
    return abs(float(u * cdf[-1] - edge)) < 1e-5


BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "toy", "base")


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_cached_engine_gives_the_reference_engines_episodes_on_the_toy_base(decode):
    """The shipped base, greedy and sampled (temperature 1 and 1.5), 12 tasks x 4 rollouts: the cached
    engine and the re-prefilling reference give identical tokens, masks, stop reasons and crops, and
    log-probs within 1e-5. The episodes are ragged: crops, error turns, malformed turns, answers that
    close with <|im_end|>, turns cut by the length limit."""
    import toy.world
    agent = policy.load_agent(BASE, "cpu", torch.float32)
    tasks = toy.world.eval_tasks(12)
    seen = set()
    for temperature in (0.0, 1.0, 1.5):
        cfg = toy.world.rollout_config(global_max_pixels=16 * 784, temperature=temperature, decode=decode, batch_size=16)
        cached, _ = _rollout(agent, tasks, 4, cfg, "cached")
        ref, _ = _rollout(agent, tasks, 4, cfg, "reference")
        _same_episodes(cached, ref, atol=1e-5, ties=(agent, temperature) if temperature > 0 else None)
        seen |= {(len(e.crops) > 0, bool(e.tool_errors), e.malformed_turns > 0, e.stop_reason) for e in cached}
    assert {s[3] for s in seen} >= {"answer", "no_tool_call", "length"}
    assert any(s[0] for s in seen) and any(s[1] for s in seen) and any(s[2] for s in seen)


def test_sampled_tokens_do_not_depend_on_batching(tiny):
    """An episode's randomness is its own (Episode.seed): batch size 2 or 8 and either engine give the
    same episodes."""
    cfg = lfpc.RolloutConfig(**{**SMALL.__dict__, "max_new_tokens": 8})
    tasks = [task(seed=s) for s in range(3)]
    runs = [_rollout(tiny, tasks, 2, lfpc.RolloutConfig(**{**cfg.__dict__, "batch_size": bs}), name)[0]
            for bs in (2, 8) for name in ("cached", "reference")]
    for other in runs[1:]:
        _same_episodes(runs[0], other, atol=1e-5)


def _count_model_work(agent):
    """Hooks on the vision tower and the language model: what really ran (encodes, patches, tokens)."""
    seen = {"encodes": 0, "patches": 0, "tokens": 0}

    def vision(_, args, kwargs):
        grid = kwargs["grid_thw"]
        seen["encodes"] += grid.shape[0]
        seen["patches"] += int(grid.prod(-1).sum())

    def language(_, args, kwargs):
        B, L = kwargs["inputs_embeds"].shape[:2]
        seen["tokens"] += B * L                                                # every position computed

    def embedding(_, args):
        seen["real"] = seen.get("real", 0) + int((args[0] != agent.pad_id).sum())   # of them, episode tokens
        if args[0].shape[1] > 1:                                                      # a prefill's
            seen["real_prefill"] = seen.get("real_prefill", 0) + int((args[0] != agent.pad_id).sum())
    hooks = [agent.model.model.visual.register_forward_pre_hook(vision, with_kwargs=True),
             agent.model.model.language_model.register_forward_pre_hook(language, with_kwargs=True),
             agent.model.model.get_input_embeddings().register_forward_pre_hook(embedding)]
    return seen, hooks


def test_real_shape_model_one_task_16_rollouts_4_turns_encodes_each_image_once(tiny):
    """The issue's measurement: 1 task x 16 rollouts x 4 turns (three crops of the same three boxes,
    then an answer) on the real-shape model and a 4000x3000 original. The reference re-encodes every
    image at every turn: 16 x (1 + 2 + 3 + 4) = 160 encodes for 4 distinct images; the cached engine
    encodes 4. Its counters agree with hooks on the model, and it prefills each context token at most
    once (the prompt once for the 16 rollouts)."""
    from conftest import scripted
    agent = _agent("real-shape", tiny)
    t = task(w=4000, h=3000, seed=3)
    cfg = lfpc.RolloutConfig(**{**SMALL.__dict__, "global_max_pixels": 256 * 784, "max_turns": 4, "batch_size": 16})
    shown = lfpc.start_episode(agent, t, 0, cfg).shown_size
    calls = [crop_tool.format_tool_call(b) for b in ([0, 0, 112, 84], [56, 56, 168, 140], [100, 60, 300, 200])]
    turns = {0: [(c, "stop") for c in calls] + [("<answer>red</answer>", "eos")]}
    assert shown == (504, 364)                       # smart_resize of 4000x3000 to <= 256 tokens
    out = {}
    for name in ("cached", "reference"):
        seen, hooks = _count_model_work(agent)
        eps, work = _rollout(agent, [t], 16, cfg, name, sample_fn=scripted(agent, turns))
        for h in hooks:
            h.remove()
        assert all(len(e.crops) == 3 and e.answer == "red" for e in eps)
        assert (work.image_encodes, work.vision_patches) == (seen["encodes"], seen["patches"])
        assert work.prefill_tokens + work.decode_tokens == seen["tokens"]
        assert work.padding_tokens == seen["tokens"] - seen["real"]
        out[name] = (eps, work)
    _same_episodes(out["cached"][0], out["reference"][0], atol=0)
    cached, ref = out["cached"][1], out["reference"][1]
    assert (cached.image_encodes, ref.image_encodes) == (4, 160)
    assert cached.prefill_tokens <= cached.context_tokens and ref.prefill_tokens > 10 * ref.context_tokens


def test_crops_are_cut_off_the_main_thread_while_the_other_slots_go_on(tiny, monkeypatch):
    """lfpc.rollout hands a tool call to its threads and runs the engine's next pass meanwhile: episode 0's
    crop cannot finish until that pass has run (episode 1's next turn); cut on the main thread, as before,
    it would wait for it forever (here: 10 s, then the test fails). The episodes equal the reference
    engine's, where each crop is back before the next turn; every crop ran off the main thread."""
    import threading
    from conftest import scripted
    bad = "<tool_call>oops</tool_call>"                                # an invalid call: answered at once
    turns = {0: [(crop_tool.format_tool_call([0, 0, 100, 80]), "stop"), ("<answer>red</answer>", "eos")],
             1: [(bad, "stop"), (bad, "stop"), ("<answer>x</answer>", "eos")]}
    tasks = [task(seed=1), task(seed=2)]
    ref, _ = _rollout(tiny, tasks, 1, SMALL, "reference", sample_fn=scripted(tiny, turns))
    go, threads, waited = threading.Event(), [], []
    real_tool, real_pass = lfpc._run_tool, engine.SlotSession.scripted

    def tool(*args):
        threads.append(threading.get_ident())
        if len(threads) == 1:
            waited.append(go.wait(timeout=10))                        # until the engine ran its next pass
        return real_tool(*args)

    def one_pass(self):
        if threads:
            go.set()
        return real_pass(self)
    monkeypatch.setattr(lfpc, "_run_tool", tool)
    monkeypatch.setattr(engine.SlotSession, "scripted", one_pass)
    eps, work = _rollout(tiny, tasks, 1, SMALL, "cached", sample_fn=scripted(tiny, turns))
    assert waited == [True], "the crop blocked the engine: no pass ran while it was cut"
    assert len(threads) == 1 and threading.get_ident() not in threads
    assert [len(e.crops) for e in eps] == [1, 0] and [len(e.tool_errors) for e in eps] == [0, 2]
    _same_episodes(eps, ref, atol=0)


@pytest.mark.parametrize("engine_name", ["cached", "reference"])
def test_the_main_thread_cuts_no_patches_and_hashes_no_image(tiny, monkeypatch, engine_name):
    """The engine's host work on each image (its patches' bytes, its content key's sha1) is done by the
    rollout's threads, the global images' while they are opened and each crop's while it is cut, once an
    image: the slot engine's main thread does none of it (the reference engine encodes every image again
    each turn, on the main thread). The episodes are those of a rollout whose main thread does it all
    (prepare_image a no-op)."""
    import threading
    from conftest import scripted
    turns = {0: [(crop_tool.format_tool_call([0, 0, 100, 80]), "stop"), ("<answer>red</answer>", "eos")],
             1: [(crop_tool.format_tool_call([10, 20, 60, 60]), "stop"),
                 (crop_tool.format_tool_call([50, 0, 110, 80]), "stop"), ("<answer>x</answer>", "eos")]}
    tasks = [task(seed=1), task(seed=2)]
    monkeypatch.setattr(engine, "prepare_image", lambda agent, image: None)
    plain, plain_work = _rollout(tiny, tasks, 2, SMALL, engine_name, sample_fn=scripted(tiny, turns))
    monkeypatch.undo()
    on_main = {"patches": 0, "digest": 0}
    counted = {"patches": 0, "digest": 0}
    real_patches, real_digest = pixels.patches, engine._digest

    def seen(name, real):
        def wrapped(*args):
            counted[name] += 1
            on_main[name] += threading.current_thread() is threading.main_thread()
            return real(*args)
        return wrapped
    monkeypatch.setattr(pixels, "patches", seen("patches", real_patches))
    monkeypatch.setattr(engine, "_digest", seen("digest", real_digest))
    eps, work = _rollout(tiny, tasks, 2, SMALL, engine_name, sample_fn=scripted(tiny, turns))
    images = 2 + 2 * 3                                  # a global image a task; 1 + 2 crops in each of its 2 rollouts
    assert sum(len(e.crops) for e in eps) == 6 and counted["digest"] == images and on_main["digest"] == 0
    if engine_name == "cached":
        assert counted["patches"] == images and on_main["patches"] == 0
    _same_episodes(eps, plain, atol=0)
    assert work == plain_work


@pytest.mark.parametrize("engine_name", ["cached", "reference"])
def test_how_long_a_crop_takes_changes_nothing(tiny, monkeypatch, engine_name):
    """A crop rejoins its episode at a fixed point (after the engine's next pass; the reference engine's:
    before its next turn), so crops of random durations give the same episodes, log-probs and work,
    bit for bit, run after run. Cached: the tiny model's sampled turns, steered into tool calls of
    ragged lengths (bench.plan_policy), 9 episodes in 5 slots; reference: scripted turns."""
    import random
    import time
    from conftest import scripted
    from support import bench
    rng = random.Random(0)
    real_tool = lfpc._run_tool

    def slow(*args):
        time.sleep(rng.random() * 0.02)
        return real_tool(*args)
    cfg = replace(SMALL, max_new_tokens=80, max_response_tokens=240, max_turns=3, temperature=1.0, batch_size=5)
    tasks = [task(seed=s) for s in range(3)]
    calls = [crop_tool.format_tool_call(b) for b in ([0, 0, 56, 56], [28, 28, 140, 112])]
    turns = {0: [(calls[0], "stop"), ("<answer>red</answer>", "eos")], 1: [("<answer>no</answer>", "eos")],
             2: [(calls[1], "stop"), (calls[0], "stop"), ("<answer>x</answer>", "eos")]}
    plan = [[4, 6, 3], [2, 8], [5], [7, 1, 2], [3, 3], [9, 2, 5], [1], [6, 4], [2, 2, 2]]
    runs = []
    for sleep in (False, True, True):
        if sleep:
            monkeypatch.setattr(lfpc, "_run_tool", slow)
        kw = dict(force=bench.plan_policy(tiny, plan, seed=5)) if engine_name == "cached" else \
            dict(sample_fn=scripted(tiny, turns))
        runs.append(_rollout(tiny, tasks, 3, cfg, engine_name, seed=5, **kw))
    assert sum(len(e.crops) for e in runs[0][0]) >= 6
    for eps, work in runs[1:]:
        _same_episodes(eps, runs[0][0], atol=0)
        assert work == runs[0][1]


# ----------------------------------------------------------------------------- token-budget batching

@pytest.mark.parametrize("seed", range(5))
def test_pack_puts_every_item_in_exactly_one_batch_within_both_budgets(seed):
    import random
    rng = random.Random(seed)
    lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 60))]
    rows = [rng.choice([1, 4]) for _ in lengths]
    max_rows, max_tokens = rng.randint(4, 16), rng.randint(200, 2000)
    for longest_first in (False, True):
        packed = batches.pack(lengths, max_rows, max_tokens, rows, longest_first)
        assert sorted(i for b in packed for i in b) == list(range(len(lengths)))
        for b in packed:
            n, longest = sum(rows[i] for i in b), max(lengths[i] for i in b)
            assert len(b) == 1 or (n <= max_rows and n * longest <= max_tokens)
        if not longest_first:
            assert [i for b in packed for i in b] == list(range(len(lengths)))      # item order kept


def test_pack_by_hand():
    # rows x longest: [100, 50] -> 2 x 100 = 200 fits 250; adding 120 -> 3 x 120 = 360 does not
    assert batches.pack([100, 50, 120, 10], max_rows=8, max_tokens=250) == [[0, 1], [2, 3]]
    assert batches.pack([100, 50, 120, 10], max_rows=8, max_tokens=250, longest_first=True) == [[2, 0], [1, 3]]
    assert batches.pack([400, 10], max_rows=8, max_tokens=250) == [[0], [1]]          # too long alone: its own batch
    assert batches.pack([5, 5, 5], max_rows=2) == [[0, 1], [2]]


def test_rollout_chunks_by_kv_tokens_give_the_same_episodes(tiny):
    """Whole groups per chunk within the KV budget (rows x lfpc.episode_bound): the episodes do not
    depend on the budget."""
    cfg = lfpc.RolloutConfig(**{**SMALL.__dict__, "max_new_tokens": 6, "max_response_tokens": 12})
    tasks = [task(seed=s, w=200 + 40 * s) for s in range(4)]
    bound = lfpc.episode_bound(len(lfpc.start_episode(tiny, tasks[0], 0, cfg).token_ids), cfg)
    tight = lfpc.RolloutConfig(**{**cfg.__dict__, "batch_tokens": 2 * bound})     # ~one group of 2 a chunk
    a, _ = _rollout(tiny, tasks, 2, cfg, "cached")
    b, _ = _rollout(tiny, tasks, 2, tight, "cached")
    _same_episodes(a, b, atol=1e-5)


def test_fp32_masters_under_autocast_cache_keys_and_values_in_the_compute_dtype(tiny):
    """Full fine-tuning samples with fp32 weights under bf16 autocast: the rotary embedding would promote
    the keys to fp32 (1.5x the KV cache `memory.kv_bytes` counts) unless the stream enters in bf16."""
    ids = torch.tensor([[1, 2, 3, 4, 5]])                                    # [1, 5]
    pos = torch.arange(5)[None, None].expand(3, 1, 5)                         # [3, 1, 5]: text positions
    assert next(tiny.model.parameters()).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, cache = batches.hidden_states(tiny.model, ids, torch.ones_like(ids), pos, use_cache=True)
    assert {layer.keys.dtype for layer in cache.layers} == {layer.values.dtype for layer in cache.layers} == {torch.bfloat16}


@pytest.mark.parametrize("engine_name, sync_every", [("cached", 1), ("cached", 4), ("reference", 1)],
                         ids=["cached", "cached, sync every 4", "reference"])
def test_work_counts_every_position_the_model_computed_on_ragged_batches(tiny, engine_name, sync_every):
    """Ragged turns (scripted: tasks with different turn counts and lengths, so prefills are padded) and
    ragged decoding (a tenth of the vocabulary stops a turn, so rows stop at different steps and are
    still computed; with decode steps between host syncs, also after their end inside a block): prefill +
    decode positions = what a hook on the language model saw, padding_tokens = those positions that held
    no episode token, useful_tokens = the sampled tokens the episodes kept."""
    from conftest import scripted
    from dataclasses import replace
    agent = replace(tiny)
    agent.stop_ids = set(agent.stop_ids) | set(range(100, 220))            # rows stop at random steps
    tasks = [task(seed=k) for k in range(3)]
    seen, hooks = _count_model_work(agent)
    try:
        eps, work = _rollout(agent, tasks, 4, replace(SMALL, max_new_tokens=16, sync_every=sync_every), engine_name)
        sampled = sum(e.num_generated for e in eps)
        assert work.useful_tokens == sampled > 0
        calls = [crop_tool.format_tool_call(b) for b in ([0, 0, 56, 56], [28, 28, 140, 112])]
        turns = {0: [(calls[0], "stop"), ("<answer>red</answer>", "eos")], 1: [("<answer>no idea at all</answer>", "eos")],
                 2: [(calls[1], "stop"), (calls[0], "stop"), ("<answer>x</answer>", "eos")]}
        eps2 = lfpc.rollout(agent, tasks, 2, replace(SMALL, engine=engine_name), seed=1, work=work,
                            sample_fn=scripted(agent, turns))
    finally:
        for h in hooks:
            h.remove()
    assert len({len(e.token_ids) for e in eps}) > 1 and len({len(e.turns) for e in eps2}) > 1, "ragged"
    assert work.prefill_tokens + work.decode_tokens == seen["tokens"]
    if sync_every == 1:                                  # every token fed was kept or is the pad id
        assert work.padding_tokens == seen["tokens"] - seen["real"] > 0
    if engine_name == "cached":
        # the slot engine's decode feeds a turn's pending token first: a turn of n sampled tokens holds n
        # decode positions (the prompt's last, then all but its own last); every other position computed
        # is padding, the steps a row runs past its end inside a block of decode steps included (they feed
        # tokens it did not keep, which a pad-id count cannot see)
        assert work.padding_tokens == seen["tokens"] - seen["real_prefill"] - sampled > 0
        if sync_every > 1:
            assert work.padding_tokens > seen["tokens"] - seen["real"], "rows ran past their end in a block"


# ----------------------------------------------------------------------------- continuous batching

@pytest.mark.parametrize("slots, extra", [(3, {}), (5, {"sync_every": 4}), (7, {"decode": "static"}),
                                          (6, {"schedule": "turns"})],
                         ids=["3 slots", "5 slots, sync every 4", "static shapes", "per-turn barrier"])
def test_slots_give_the_reference_engines_episodes_whatever_the_slots(slots, extra):
    """Fewer slots than a group (4 rollouts in 3 slots: a group split over slots, its prompt copied),
    slots refilled mid-turn as episodes end, decode steps between host syncs, attention over the whole
    capacity, the per-turn barrier: greedy and seeded sampling give the reference engine's episodes
    (tokens, masks, stop reasons, crops; log-probs within 1e-5); seeded, ragged episodes with error turns."""
    import toy.world
    agent = policy.load_agent(BASE, "cpu", torch.float32)
    tasks = toy.world.eval_tasks(6)
    for temperature in (0.0, 1.0):
        cfg = toy.world.rollout_config(global_max_pixels=16 * 784, temperature=temperature, batch_size=slots, **extra)
        cached, work = _rollout(agent, tasks, 4, cfg, "cached", seed=11)
        ref, _ = _rollout(agent, tasks, 4, cfg, "reference", seed=11)
        _same_episodes(cached, ref, atol=1e-5, ties=(agent, temperature) if temperature > 0 else None)
        assert work.useful_tokens == sum(e.num_generated for e in cached)
        assert work.host_syncs * extra.get("sync_every", 1) == work.decode_steps
        assert work.slot_steps == slots * work.decode_steps
        assert any(e.crops for e in cached)
        if temperature > 0:                              # greedy, all 24 episodes are alike (200 tokens)
            assert len({len(e.token_ids) for e in cached}) > 1 and any(e.tool_errors for e in cached), "ragged"


@pytest.mark.parametrize("case", ["real shape, 1 step a sync", "real shape, 4 steps a sync",
                                  "toy with crops, prefills capped"])
def test_decode_steps_read_nothing_back_until_their_one_host_sync(case, monkeypatch):
    """Between two host syncs a decode step neither reads a device value on the host (an item(), int() or
    comparison in Python: aten._local_scalar_dense; nonzero, masked_select, repeat_interleave: shapes
    from values; on a GPU each waits for the device) nor builds a tensor from host data (aten.lift_fresh:
    a copy to the device). One call of `decode` (k steps) builds one tensor (the slots' state) and reads
    its tokens once (`tolist`), whatever k: on a real-shape model whose turns end at ragged lengths, and
    on the toy base with crops and error turns while capped prefills leave slots waiting."""
    from conftest import QWEN_TOKENIZER
    from support import models
    import toy.world
    host = ("aten._local_scalar_dense.default", "aten.lift_fresh.default", "aten.nonzero.default",
            "aten.masked_select.default", "aten.repeat_interleave.Tensor")
    calls = []
    real = engine.SlotSession.decode

    def counted(self):
        with policy.counting_ops() as seen:
            ended = real(self)
        calls.append({h: seen[h] for h in host})
        return ended
    monkeypatch.setattr(engine.SlotSession, "decode", counted)
    if case.startswith("toy"):
        agent = policy.load_agent(BASE, "cpu", torch.float32)
        tasks, group = toy.world.eval_tasks(4), 4
        cfg = toy.world.rollout_config(global_max_pixels=16 * 784, temperature=1.0, batch_size=8, prefill_tokens=64)
    else:
        agent = models.real_shape_agent(QWEN_TOKENIZER, layers=1)
        tasks, group = [lfpc.Task(noise_image(112, 112, seed=i), "What colour?", "A") for i in range(2)], 2
        cfg = lfpc.RolloutConfig(max_new_tokens=9, max_response_tokens=9, max_turns=1, global_max_pixels=112 * 112,
                                 sync_every=4 if "4 steps" in case else 1, temperature=1.0, top_p=0.9)
    with torch.no_grad():
        eps = lfpc.rollout(agent, tasks, group, cfg, seed=0)
    assert len(calls) >= 2 and sum(e.num_generated for e in eps) > 0
    if case.startswith("toy"):
        assert any(e.crops for e in eps), "the toy's episodes must hold crops (slots extended mid-rollout)"
    want = {**dict.fromkeys(host, 0), "aten.lift_fresh.default": 1}
    assert all(c == want for c in calls), calls


def test_a_prefill_forward_stays_within_prefill_tokens_and_the_episodes_do_not_change(monkeypatch):
    """RolloutConfig.prefill_tokens caps one extension forward (rows x the longest, padding included; a
    longer row alone): the slots left waiting are extended in later passes, and the episodes are those
    of an uncapped run (tokens, masks, crops; log-probs within 1e-5), greedy and sampled."""
    import toy.world
    agent = policy.load_agent(BASE, "cpu", torch.float32)
    tasks = toy.world.eval_tasks(6)
    sizes = []
    real = engine.SlotSession._forward

    def spy(self, ids, pos, start, rows, *rest):
        if rows is not None:                                  # an extension (a decode step passes rows None)
            sizes.append(tuple(ids.shape))
        return real(self, ids, pos, start, rows, *rest)
    monkeypatch.setattr(engine.SlotSession, "_forward", spy)
    for temperature in (0.0, 1.0):
        cfg = toy.world.rollout_config(global_max_pixels=16 * 784, temperature=temperature, batch_size=8)
        sizes.clear()
        free, _ = _rollout(agent, tasks, 4, cfg, "cached", seed=11)
        uncapped = list(sizes)
        cap = max(n for _, n in uncapped) + 1                 # the longest extension, alone
        sizes.clear()
        capped, _ = _rollout(agent, tasks, 4, replace(cfg, prefill_tokens=cap), "cached", seed=11)
        _same_episodes(capped, free, atol=1e-5, ties=(agent, temperature) if temperature > 0 else None)
        assert max(b * n for b, n in uncapped) > cap, "the uncapped run must exceed the cap somewhere"
        assert all(b * n <= cap or b == 1 for b, n in sizes) and len(sizes) > len(uncapped)


def test_a_kv_budget_under_one_episode_is_refused_with_what_would_fit(tiny):
    cfg = lfpc.RolloutConfig(**{**SMALL.__dict__, "batch_tokens": 50})
    with pytest.raises(ValueError, match="cannot hold one episode of up to"):
        lfpc.rollout(tiny, [task()], 2, cfg, seed=0)


def test_continuous_batching_keeps_slots_busy_where_the_barrier_waits(tiny):
    """Ragged turns forced on the tiny model (1 to 40 tokens, then an answer or a tool call): the same
    episodes under both schedules, the continuous one with fewer decode steps and a higher utilisation."""
    import random
    rng = random.Random(0)
    plan = {}
    call = tiny.encode(crop_tool.format_tool_call([0, 0, 56, 56]))
    answer = tiny.encode("<answer>red</answer>") + [tiny.im_end]

    def force(ep, toks):
        lengths = plan.setdefault(ep.seed, [rng.randint(1, 40) for _ in range(3)])
        turn = len(ep.turns)
        text = call if turn < 1 else answer
        n = lengths[turn]
        return (tiny.encode(" x")[0] if len(toks) < n else text[len(toks) - n]) if len(toks) < n + len(text) else None
    cfg = lfpc.RolloutConfig(**{**SMALL.__dict__, "max_new_tokens": 96, "max_response_tokens": 200, "batch_size": 4})
    runs = {}
    for schedule in ("continuous", "turns"):
        runs[schedule] = _rollout(tiny, [task(seed=k) for k in range(4)], 3,
                                  lfpc.RolloutConfig(**{**cfg.__dict__, "schedule": schedule}), "cached", force=force)
    (a, wa), (b, wb) = runs["continuous"], runs["turns"]
    _same_episodes(a, b, atol=1e-5)
    assert all(e.stop_reason == "answer" and len(e.crops) == 1 for e in a)
    assert wa.useful_tokens == wb.useful_tokens and wa.decode_steps < wb.decode_steps
    assert wa.useful_tokens / wa.slot_steps > wb.useful_tokens / wb.slot_steps


@pytest.mark.parametrize("engine_name", ["cached", "reference"])
def test_a_session_hands_back_turns_through_submit_turns_close(tiny, engine_name):
    """The engine interface by hand (lfpc.rollout's loop, spelled out): two episodes submitted, every turn
    that comes back closed at once. A cached session whose one turn came back and was neither submitted
    again nor closed has nothing to run: turns() hands back none, and the session stays busy until the close."""
    cfg = lfpc.RolloutConfig(**{**SMALL.__dict__, "engine": engine_name, "temperature": 0.0})
    first = lfpc.start_episode(tiny, task(), 0, cfg)
    eps = []
    for seed in (1, 2):
        ep = lfpc.Episode(0, shown_size=first.shown_size, seed=seed)
        ep.append(first.token_ids, images=list(zip(first.images, first.grids)))
        eps.append(ep)
    work = engine.Work()
    s = engine.open_session(tiny, eps, cfg, work, lfpc.episode_bound(len(first.token_ids), cfg))
    for k, ep in enumerate(eps):
        s.submit(k, 3)
    back = []
    while s.busy:
        for k, toks, lps, finish in s.turns():
            assert 1 <= len(toks) == len(lps) <= 3 and finish in ("eos", "stop", "length")
            back.append(k)
            s.close(k)
    assert sorted(back) == [0, 1] and not s.busy and work.useful_tokens > 0
    if engine_name == "cached":
        s = engine.open_session(tiny, eps[:1], cfg, engine.Work(), lfpc.episode_bound(len(first.token_ids), cfg))
        s.submit(0, 3)
        s.turns()
        assert s.turns() == [] and s.busy           # the turn is the caller's (its crop being cut): nothing to run
        s.close(0)
        assert s.turns() == [] and not s.busy


def test_the_engine_imports_nothing_from_the_method_files():
    """support/engine.py reads episodes and the agent through its own Protocols (Row, Policy): no import
    of lfpc or any other method file, not even for type checking."""
    import ast
    tree = ast.parse(open(engine.__file__, encoding="utf-8").read())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not names & {"lfpc", "crop_tool", "rewards", "grpo", "info_gap", "train", "eval"}, names

"""Tests for engine.py: M-RoPE positions, the forward pass, sampling with a KV cache, log-prob parity."""
import pytest
import torch

import crop_tool
import engine
import lfpc
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
    return engine.collate(agent, eps, left_pad=True)


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
    pos = engine.mrope_positions(ids, torch.ones_like(ids), [(1, 4, 4)], tiny.image_pad, merge=2)
    assert pos[0, 0].tolist() == [0, 1, 2, 2, 2, 2, 4]
    assert pos[1, 0].tolist() == [0, 1, 2, 2, 3, 3, 4]
    assert pos[2, 0].tolist() == [0, 1, 2, 3, 2, 3, 4]


def test_our_forward_equals_the_models_own_forward_with_mm_token_type_ids(tiny):
    """engine.forward (our positions, our image scatter) gives the hidden states the model computes
    itself from pixel values and mm_token_type_ids."""
    b = _two_row_batch(tiny)
    with torch.no_grad():
        ours = engine.forward(tiny.model, b)
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
    real = tiny.encode_image
    monkeypatch.setattr(tiny, "encode_image", lambda im: calls.append(im) or real(im))
    b = engine.collate(tiny, copies)
    assert len(calls) == 1 and b.pixel_values.shape[0] == 3 * real(ep.images[0])[0].shape[0]


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
        lfpc.step_episode(tiny, ep, tasks[i], toks, [0.0] * len(toks), "stop", 0, cfg)
        assert len(ep.images) == 2
    start = [len(e.token_ids) for e in eps]
    assert len(set(start)) > 1, "episodes should differ in length so the batch is padded"
    for i, ep in enumerate(eps):
        ep.seed = i
    turn2 = engine.sample_turn(tiny, eps, [10] * 3, cfg)
    for ep, (toks, lps, finish) in zip(eps, turn2):
        ep.append(toks, lps)
    batch = engine.collate(tiny, eps)
    with torch.no_grad():
        lp = lfpc.token_logprobs(tiny.model, batch, temperature=0.7)
    for b, ep in enumerate(eps):
        n = len(ep.token_ids)
        torch.testing.assert_close(lp[b, start[b]:n], batch.old_logprobs[b, start[b]:n], rtol=0, atol=1e-4)


def test_full_rollout_logprobs_parity_and_seeded_reproducibility(tiny):
    cfg = lfpc.RolloutConfig(**{**SMALL.__dict__, "max_new_tokens": 16})
    tasks = [task(seed=1), task(w=200, h=280, seed=2)]
    a = lfpc.rollout(tiny, tasks, 3, cfg, seed=123)
    b = lfpc.rollout(tiny, tasks, 3, cfg, seed=123)
    assert [e.token_ids for e in a] == [e.token_ids for e in b]
    assert [e.task_index for e in a] == [0, 0, 0, 1, 1, 1]
    assert all(e.done for e in a)
    batch = engine.collate(tiny, a)
    with torch.no_grad():
        lp = lfpc.token_logprobs(tiny.model, batch)
    m = batch.loss_mask.bool()
    assert m.sum() > 0
    torch.testing.assert_close(lp[m], batch.old_logprobs[m], rtol=0, atol=1e-4)
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
        b = engine.collate(tiny, [e])
        with torch.no_grad():
            h = engine.forward(tiny.model, b)
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
    assert [len(t) for t, _, _ in runs["static"]] != [limits[0]] * 3      # the rows really differ in length
    with pytest.raises(ValueError, match="decode"):
        lfpc.RolloutConfig(**{**base.__dict__, "decode": "graph"})


def test_token_logprobs_gradient_flows_only_through_sampled_positions(tiny):
    cfg = lfpc.RolloutConfig(**{**SMALL.__dict__, "max_new_tokens": 5})
    eps = lfpc.rollout(tiny, [task()], 2, cfg, seed=0)
    batch = engine.collate(tiny, eps)
    lp = lfpc.token_logprobs(tiny.model, batch)
    assert lp.requires_grad
    lp.sum().backward()
    grads = [p.grad for p in tiny.model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    tiny.model.zero_grad(set_to_none=True)

"""Tests for lfpc.py: tokenizer, M-RoPE positions, loading, the rollout and log-prob parity."""
import numpy as np
import pytest
import torch
from PIL import Image

import crop_tool
import lfpc


@pytest.fixture(scope="module")
def agent():
    return lfpc.tiny_agent(seed=0)


def noise_image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def task(w=300, h=200, seed=0, **kw):
    return lfpc.Task(image=noise_image(w, h, seed), question="What colour is the box?", answer="red", **kw)


SMALL = lfpc.RolloutConfig(global_max_pixels=8 * 8 * 28 * 28, max_new_tokens=12, max_turns=3,
                           crop=crop_tool.CropConfig(min_pixels=4 * 28 * 28, max_pixels=4 * 4 * 28 * 28))


# ----------------------------------------------------------------------------- tokenizer

def test_tiny_tokenizer_is_deterministic_and_keeps_tags_whole():
    a, b = lfpc.build_tiny_tokenizer(), lfpc.build_tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    for t in lfpc.SPECIAL_TOKENS + lfpc.TAG_TOKENS:
        assert len(a.encode(t, add_special_tokens=False)) == 1, t
    text = crop_tool.format_tool_call([10, 20, 110, 220], "red box") + "<answer>B</answer>"
    assert a.decode(a.encode(text, add_special_tokens=False)) == text
    assert len(set(a.convert_tokens_to_ids(lfpc.SPECIAL_TOKENS))) == len(lfpc.SPECIAL_TOKENS)


# ----------------------------------------------------------------------------- positions

def _two_row_batch(agent):
    """Row 0: two images of different shapes; row 1: one image, left-padded."""
    eps = []
    for k, sizes in enumerate([[(112, 56), (56, 84)], [(84, 84)]]):
        ids, grids, pix = agent.encode("hello"), [], []
        for w, h in sizes:
            p, g = agent.encode_image(noise_image(w, h, k))
            ids += agent.image_block(g) + agent.encode(" and more text")
            grids.append(g)
            pix.append(p)
        eps.append(lfpc.Episode(0, ids, [0] * len(ids), [0.0] * len(ids), [], pix, grids))
    return lfpc.collate(agent, eps, left_pad=True)


def test_mrope_positions_match_the_models_own_rope_index(agent):
    batch = _two_row_batch(agent)
    mm_types = (batch.input_ids == agent.image_pad).int()
    ref, _ = agent.model.model.get_rope_index(batch.input_ids, mm_token_type_ids=mm_types,
                                              image_grid_thw=batch.image_grid_thw,
                                              attention_mask=batch.attention_mask)
    assert batch.attention_mask[1, 0] == 0, "row 1 should be left-padded"
    torch.testing.assert_close(batch.position_ids, ref.long(), rtol=0, atol=0)


def test_mrope_positions_by_hand(agent):
    # text(2) + image 1x4x4 patches -> 2x2 tokens + text(1): text 0,1; image (2+t, 2+h, 2+w); text 2+2=4
    ids = torch.tensor([[5, 6] + [agent.image_pad] * 4 + [7]])
    pos = lfpc.mrope_positions(ids, torch.ones_like(ids), [(1, 4, 4)], agent.image_pad, merge=2)
    assert pos[0, 0].tolist() == [0, 1, 2, 2, 2, 2, 4]
    assert pos[1, 0].tolist() == [0, 1, 2, 2, 3, 3, 4]
    assert pos[2, 0].tolist() == [0, 1, 2, 3, 2, 3, 4]


def test_explicit_positions_equal_models_own_path_with_mm_token_type_ids(agent):
    """Passing our positions gives the logits the model computes itself from mm_token_type_ids."""
    b = _two_row_batch(agent)
    with torch.no_grad():
        ours = agent.model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                           pixel_values=b.pixel_values, image_grid_thw=b.image_grid_thw).logits
        agent.model.model.rope_deltas = None
        theirs = agent.model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                             mm_token_type_ids=(b.input_ids == agent.image_pad).int(),
                             pixel_values=b.pixel_values, image_grid_thw=b.image_grid_thw).logits
    m = b.attention_mask.bool()
    torch.testing.assert_close(ours[m], theirs[m], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- loading

def test_load_agent_roundtrips_a_saved_checkpoint(agent, tmp_path):
    agent = lfpc.Agent(agent.model, agent.tokenizer, agent.image_processor, "Short system.", "Crop, then answer.")
    lfpc.save_agent(agent, str(tmp_path))
    loaded = lfpc.load_agent(str(tmp_path), dtype=torch.float32)
    assert loaded.tokenizer.get_vocab() == agent.tokenizer.get_vocab()
    assert (loaded.system_prompt, loaded.instruction) == ("Short system.", "Crop, then answer.")
    ep = lfpc.start_episode(loaded, task(), 0, SMALL)
    b1, b2 = lfpc.collate(agent, [ep]), lfpc.collate(loaded, [ep])
    with torch.no_grad():
        kw = lambda b: dict(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                            pixel_values=b.pixel_values, image_grid_thw=b.image_grid_thw)
        torch.testing.assert_close(agent.model(**kw(b1)).logits, loaded.model(**kw(b2)).logits)


# ----------------------------------------------------------------------------- prompt

def test_prompt_states_the_shown_size_and_holds_one_image_block(agent):
    t = task(w=1000, h=500)
    ep = lfpc.start_episode(agent, t, 0, SMALL)
    w, h = ep.shown_size
    assert (w, h) == ep.images[0].size and w % 28 == 0 and h % 28 == 0 and w * h <= SMALL.global_max_pixels
    text = agent.tokenizer.decode(ep.token_ids)
    assert f"The image is {w}x{h} pixels." in text
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    g = ep.grids[0]
    assert ep.token_ids.count(agent.image_pad) == g[1] * g[2] // 4
    assert sum(ep.loss_mask) == 0


# ----------------------------------------------------------------------------- rollout control flow

def scripted(agent, turns_by_task):
    """A sampler that emits canned turns: turns_by_task[task_index][turn] (text, finish)."""
    count = {}

    def sample_fn(a, episodes, budget, cfg):
        out = []
        for ep, n in zip(episodes, budget):
            k = count.get(id(ep), 0)
            count[id(ep)] = k + 1
            text, finish = turns_by_task[ep.task_index][k]
            toks = agent.encode(text) + ([agent.im_end] if finish == "eos" else [])
            out.append((toks, [-0.5] * len(toks), finish))
        return out
    return sample_fn


def test_rollout_crop_turn_then_answer_builds_the_mask_while_generating(agent):
    t = task(w=600, h=400)
    call = crop_tool.format_tool_call([10, 10, 150, 120], "box")
    eps = lfpc.rollout(agent, [t], 2, SMALL,
                       sample_fn=scripted(agent, {0: [(call, "stop"), ("<answer>red</answer>", "eos")]}))
    assert len(eps) == 2
    e = eps[0]
    assert e.stop_reason == "answer" and e.answer == "red" and e.malformed_turns == 0
    assert len(e.crops) == 1 and len(e.images) == 2 and len(e.grids) == 2
    # the crop was cut from the original after mapping out of the shown frame
    sx, sy = t.image.size[0] / e.shown_size[0], t.image.size[1] / e.shown_size[1]
    x1, y1, x2, y2 = e.crops[0].box_original
    assert abs(x1 - 10 * sx) <= 1 and abs(y2 - 120 * sy) <= 1
    # mask 1 exactly on the sampled tokens, in order
    sampled = [tok for tok, m in zip(e.token_ids, e.loss_mask) if m]
    assert sampled == agent.encode(call) + agent.encode("<answer>red</answer>") + [agent.im_end]
    # the environment closed the turn that stopped at </tool_call> and opened the next
    text = agent.tokenizer.decode(e.token_ids)
    assert call + "<|im_end|>\n<|im_start|>user\n<tool_response><|vision_start|>" in text
    assert "</tool_response><|im_end|>\n<|im_start|>assistant\n<answer>red</answer><|im_end|>" in text
    assert e.token_ids.count(agent.image_pad) == sum(g[1] * g[2] // 4 for g in e.grids)
    assert len(e.token_ids) == len(e.loss_mask) == len(e.logprobs)


@pytest.mark.parametrize("turns, reason, malformed, n_errors", [
    ([("I think it is red.", "eos")], "no_tool_call", 1, 0),
    ([("<answer>red</answer>" + crop_tool.format_tool_call([0, 0, 50, 50]), "stop")], "answer", 1, 0),
    ([("<tool_call>{bad json</tool_call>", "stop"), ("<answer>red</answer>", "eos")], "answer", 1, 1),
    ([(crop_tool.format_tool_call([50, 50, 10, 10]), "stop"), ("<answer>red</answer>", "eos")], "answer", 0, 1),
    ([(crop_tool.format_tool_call([0, 0, 100, 100]), "stop")] * 3, "max_turns", 0, 0),
    ([("<think>long thoughts", "length")], "length", 1, 0),
])
def test_rollout_stop_reasons(agent, turns, reason, malformed, n_errors):
    e = lfpc.rollout(agent, [task()], 1, SMALL, sample_fn=scripted(agent, {0: turns}))[0]
    assert (e.stop_reason, e.malformed_turns, len(e.tool_errors)) == (reason, malformed, n_errors)
    assert len(e.turns) <= SMALL.max_turns
    if n_errors:
        assert "Error: " in agent.tokenizer.decode(e.token_ids)


# ----------------------------------------------------------------------------- sampling and log-prob parity

def test_sampling_logprobs_equal_training_forward_two_turns_two_images_padded(agent):
    """Turn 2 is sampled with the KV-cache sampler after a crop turn; the episodes have different
    lengths (different crop sizes), so the batch is padded; one training forward must agree."""
    cfg = lfpc.RolloutConfig(**{**SMALL.__dict__, "temperature": 0.7, "max_new_tokens": 10})
    boxes = [[0, 0, 100, 100], [20, 10, 200, 60], [5, 5, 60, 180]]
    tasks = [task(w=400, h=300, seed=s) for s in range(3)]
    eps = [lfpc.start_episode(agent, t, i, cfg) for i, t in enumerate(tasks)]
    for i, ep in enumerate(eps):   # turn 1: a scripted tool call (its log-probs are not compared)
        toks = agent.encode(crop_tool.format_tool_call(boxes[i]))
        lfpc.step_episode(agent, ep, tasks[i], toks, [0.0] * len(toks), "stop", 0, cfg)
        assert len(ep.images) == 2
    start = [len(e.token_ids) for e in eps]
    assert len(set(start)) > 1, "episodes should differ in length so the batch is padded"
    gen = torch.Generator().manual_seed(0)
    turn2 = lfpc.sample_turn(agent, eps, [10] * 3, cfg, gen)
    for ep, (toks, lps, finish), t in zip(eps, turn2, tasks):
        ep.token_ids += toks
        ep.loss_mask += [1] * len(toks)
        ep.logprobs += lps
    batch = lfpc.collate(agent, eps)
    with torch.no_grad():
        lp = lfpc.token_logprobs(agent.model, batch, temperature=0.7)
    for b, ep in enumerate(eps):
        n = len(ep.token_ids)
        torch.testing.assert_close(lp[b, start[b]:n], batch.old_logprobs[b, start[b]:n], rtol=0, atol=1e-4)


def test_full_rollout_logprobs_parity_and_seeded_reproducibility(agent):
    cfg = lfpc.RolloutConfig(**{**SMALL.__dict__, "max_new_tokens": 16})
    tasks = [task(seed=1), task(w=200, h=280, seed=2)]
    a = lfpc.rollout(agent, tasks, 3, cfg, seed=123)
    b = lfpc.rollout(agent, tasks, 3, cfg, seed=123)
    assert [e.token_ids for e in a] == [e.token_ids for e in b]
    assert [e.task_index for e in a] == [0, 0, 0, 1, 1, 1]
    assert all(e.done for e in a)
    batch = lfpc.collate(agent, a)
    with torch.no_grad():
        lp = lfpc.token_logprobs(agent.model, batch)
    m = batch.loss_mask.bool()
    assert m.sum() > 0
    torch.testing.assert_close(lp[m], batch.old_logprobs[m], rtol=0, atol=1e-4)
    assert (lp[~m] == 0).all()


def test_greedy_sampling_matches_plain_forward_argmax(agent):
    """Each greedy token equals the argmax of a fresh, cache-free forward over the prefix."""
    cfg = lfpc.RolloutConfig(**{**SMALL.__dict__, "temperature": 0.0, "max_new_tokens": 6})
    ep = lfpc.start_episode(agent, task(), 0, cfg)
    toks, _, _ = lfpc.sample_turn(agent, [ep], [6], cfg)[0]
    ids = list(ep.token_ids)
    for t in toks:
        e = lfpc.Episode(0, ids, [0] * len(ids), [0.0] * len(ids), [], ep.pixel_values, ep.grids)
        b = lfpc.collate(agent, [e])
        with torch.no_grad():
            h, _ = lfpc.hidden_states(agent.model, b.input_ids, b.attention_mask, b.position_ids,
                                      b.pixel_values, b.image_grid_thw)
            assert int(agent.model.lm_head(h[0, -1]).argmax()) == t
        ids = ids + [t]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_static_kv_cache_decode_gives_the_dynamic_paths_tokens(agent, temperature):
    """decode="static" (preallocated cache and mask) against the reference decode="dynamic": the same
    tokens, log-probs within float noise, for left-padded prompts of different lengths, one with two
    images, rows stopping at different limits (padding written into the static slots of dead rows)."""
    base = lfpc.RolloutConfig(**{**SMALL.__dict__, "temperature": temperature})
    eps = [lfpc.start_episode(agent, task(seed=i, w=300 - 60 * i), i, base) for i in range(3)]
    extra = agent.encode(" a longer user text") + agent.image_block(eps[2].grids[0])
    eps[2].token_ids += extra                                     # a second image: a longer prompt
    eps[2].loss_mask += [0] * len(extra)
    eps[2].logprobs += [0.0] * len(extra)
    eps[2].pixel_values, eps[2].grids = eps[2].pixel_values * 2, eps[2].grids * 2
    limits = [5, 16, 11]
    runs = {}
    for mode in ("dynamic", "static"):
        cfg = lfpc.RolloutConfig(**{**base.__dict__, "decode": mode})
        runs[mode] = lfpc.sample_turn(agent, eps, limits, cfg, torch.Generator().manual_seed(7))
    for (t_dyn, lp_dyn, fin_dyn), (t_st, lp_st, fin_st), n in zip(runs["dynamic"], runs["static"], limits):
        assert t_dyn == t_st and fin_dyn == fin_st and len(t_dyn) <= n
        assert lp_st == pytest.approx(lp_dyn, abs=1e-4)
    assert [len(t) for t, _, _ in runs["static"]] != [limits[0]] * 3      # the rows really differ in length
    with pytest.raises(ValueError, match="decode"):
        lfpc.sample_turn(agent, eps, limits, lfpc.RolloutConfig(**{**base.__dict__, "decode": "graph"}))


def test_token_logprobs_gradient_flows_only_through_sampled_positions(agent):
    cfg = lfpc.RolloutConfig(**{**SMALL.__dict__, "max_new_tokens": 5})
    eps = lfpc.rollout(agent, [task()], 2, cfg, seed=0)
    batch = lfpc.collate(agent, eps)
    lp = lfpc.token_logprobs(agent.model, batch)
    assert lp.requires_grad
    lp.sum().backward()
    grads = [p.grad for p in agent.model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    agent.model.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- modes, probes, data

def test_no_tool_mode_prompts_without_the_tool_and_ends_after_one_turn(agent):
    cfg = lfpc.RolloutConfig(**{**SMALL.__dict__, "use_tool": False})
    call = crop_tool.format_tool_call([0, 0, 100, 100])
    e = lfpc.rollout(agent, [task()], 1, cfg, sample_fn=scripted(agent, {0: [(call, "stop")]}))[0]
    text = agent.tokenizer.decode(e.token_ids)
    assert crop_tool.TOOL_NAME not in text.split("<|im_start|>assistant")[0]
    assert e.stop_reason == "no_answer" and not e.crops and len(e.turns) == 1


@pytest.mark.parametrize("probe", ["none", "noise", "gt"])
def test_crop_dependency_probes_swap_what_the_model_sees(agent, probe):
    t = task(w=600, h=400, boxes=[[300, 200, 400, 300]])
    cfg = lfpc.RolloutConfig(**{**SMALL.__dict__, "probe": probe})
    call = crop_tool.format_tool_call([0, 0, 100, 100])
    e = lfpc.rollout(agent, [t], 1, cfg, sample_fn=scripted(agent, {0: [(call, "stop"), ("<answer>x</answer>", "eos")]}))[0]
    c = e.crops[0]
    if probe == "gt":
        assert c.box_original == (300, 200, 400, 300)
    else:
        assert c.box_original[0] == 0 and c.box_original[2] > 100   # mapped out of the smaller shown frame
    expected = crop_tool.resize_to_budget(t.image.crop(c.cut), cfg.crop.min_pixels, cfg.crop.max_pixels)
    same = np.array_equal(np.asarray(c.image), np.asarray(expected))
    assert same == (probe != "noise")
    assert c.image.size == expected.size


def _write_jsonl(tmp_path, rows, image_size=(64, 48)):
    import json
    Image.new("RGB", image_size).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(p)


def test_load_tasks_reads_rows_relative_to_the_file(tmp_path):
    p = _write_jsonl(tmp_path, [{"id": "x", "image": "a.png", "question": "q?", "answer": "B",
                                 "choices": ["r", "g"], "bboxes": [[1, 2, 30, 40]]}])
    (t,) = lfpc.load_tasks(p)
    assert (t.id, t.answer, t.choices, t.boxes) == ("x", "B", ["r", "g"], [[1, 2, 30, 40]])
    assert t.load_image().size == (64, 48)


@pytest.mark.parametrize("row, message", [
    ("{not json", "not valid JSON"),
    ({"image": "a.png", "answer": "x"}, "'question'"),
    ({"image": "a.png", "question": "q"}, "'answer'"),
    ({"image": "missing.png", "question": "q", "answer": "a"}, "image file not found"),
    ({"image": "bad.png", "question": "q", "answer": "a"}, "cannot read image"),
    ({"image": "a.png", "question": "q", "answer": "a", "bboxes": [[0, 0, 65, 10]]}, "inside the 64x48 image"),
    ({"image": "a.png", "question": "q", "answer": "a", "bboxes": [[5, 0, 2, 10]]}, "inside the 64x48 image"),
])
def test_load_tasks_names_file_and_line_on_bad_rows(tmp_path, row, message):
    good = {"image": "a.png", "question": "q", "answer": "a"}
    p = _write_jsonl(tmp_path, [good, row])
    with pytest.raises(ValueError, match=message) as e:
        lfpc.load_tasks(p)
    assert f"{p}:2" in str(e.value)

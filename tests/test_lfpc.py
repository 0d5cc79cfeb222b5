"""Tests for lfpc.py: records, loading, the prompt, the rollout's control flow, probes, JSONL tasks."""
import numpy as np
import pytest
import torch

import crop_tool
import lfpc
from support import batches, policy
from conftest import noise_image, scripted


@pytest.fixture(scope="module")
def agent(tiny):
    return tiny


def task(w=300, h=200, seed=0, **kw):
    return lfpc.Task(image=noise_image(w, h, seed), question="What colour is the box?", answer="red", **kw)


SMALL = lfpc.RolloutConfig(global_max_pixels=8 * 8 * 28 * 28, max_new_tokens=12, max_turns=3,
                           crop=crop_tool.CropConfig(min_pixels=4 * 28 * 28, max_pixels=4 * 4 * 28 * 28))


# ----------------------------------------------------------------------------- loading

def test_load_agent_roundtrips_a_saved_checkpoint(agent, tmp_path):
    agent = lfpc.Agent(agent.model, agent.tokenizer, agent.image_processor, "Short system.", "Crop, then answer.")
    policy.save_agent(agent, str(tmp_path))
    loaded = policy.load_agent(str(tmp_path), dtype=torch.float32)
    assert loaded.tokenizer.get_vocab() == agent.tokenizer.get_vocab()
    assert (loaded.system_prompt, loaded.instruction) == ("Short system.", "Crop, then answer.")
    ep = lfpc.start_episode(loaded, task(), 0, SMALL)
    b1, b2 = batches.collate(agent, [ep]), batches.collate(loaded, [ep])
    with torch.no_grad():
        kw = lambda b: dict(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                            pixel_values=b.pixel_values, image_grid_thw=b.image_grid_thw)
        torch.testing.assert_close(agent.model(**kw(b1)).logits, loaded.model(**kw(b2)).logits)


def test_load_agent_places_the_weights_while_loading(agent, tmp_path, monkeypatch):
    """device_map: each tensor goes to its device as it is read; the model is never built on the host and
    then moved whole (under torchrun that host copy was 33 GB a rank for 7B in fp32)."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    policy.save_agent(agent, str(tmp_path))

    def no_move(self, *a, **k):
        raise AssertionError("the whole model was moved after loading")
    monkeypatch.setattr(Qwen2_5_VLForConditionalGeneration, "to", no_move)
    loaded = policy.load_agent(str(tmp_path), device="cpu", dtype=torch.float32)
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    for (k, a), b in zip(agent.model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), k


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
    assert len(e.turns) == len(turns) <= SMALL.max_turns                  # every scripted turn, no other
    if n_errors:
        assert "Error: " in agent.tokenizer.decode(e.token_ids)


# ----------------------------------------------------------------------------- modes and probes

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


# ----------------------------------------------------------------------------- the episode record

def test_episode_append_keeps_ids_mask_and_logprobs_aligned():
    e = lfpc.Episode(0)
    e.append([1, 2, 3])                                  # context: mask 0, log-prob 0
    e.append([4, 5], [-0.1, -0.2])                       # sampled: mask 1, its log-probs
    assert (e.token_ids, e.loss_mask, e.logprobs) == ([1, 2, 3, 4, 5], [0, 0, 0, 1, 1], [0, 0, 0, -0.1, -0.2])
    assert e.num_generated == 2
    with pytest.raises(ValueError, match="log-probs"):
        e.append([6, 7], [-0.1])


@pytest.mark.parametrize("probe", ["none", "noise", "gt"])
@pytest.mark.parametrize("box", [[50, 50, 10, 10], [0, 0, 5, 5], [900, 900, 990, 990], [0, 0, 100, 1]])
def test_invalid_boxes_go_back_as_error_turns_but_the_gt_probe_answers_them_with_b1(agent, probe, box):
    """Inverted, too small, outside, too thin: the model gets an error turn and the episode goes on, with
    or without the noise probe (which used to raise here and lose the whole evaluation); the gt probe
    replaces the predicted box, whatever it is, by B1 (module docstring)."""
    t = task(w=600, h=400, boxes=[[300, 200, 400, 300]])
    cfg = lfpc.RolloutConfig(**{**SMALL.__dict__, "probe": probe})
    call = crop_tool.format_tool_call(box)
    e = lfpc.rollout(agent, [t], 1, cfg, sample_fn=scripted(agent, {0: [(call, "stop"), ("<answer>x</answer>", "eos")]}))[0]
    assert e.stop_reason == "answer" and e.tool_calls == 1
    if probe == "gt":        # every parsed call is answered with B1's crop, whatever box was asked for
        assert len(e.crops) == 1 and e.crops[0].box_original == (300, 200, 400, 300)
    else:
        assert not e.crops and len(e.tool_errors) == 1
        assert "Error: " in agent.tokenizer.decode(e.token_ids)


def test_tool_calls_count_every_call_valid_or_not(agent):
    good, bad = crop_tool.format_tool_call([0, 0, 100, 100]), "<tool_call>{bad json</tool_call>"
    e = lfpc.rollout(agent, [task()], 1, SMALL, sample_fn=scripted(agent, {0: [(good, "stop"), (bad, "stop"),
                                                                                (good, "stop")]}))[0]
    assert e.tool_calls == 3 and len(e.crops) == 1 and len(e.tool_errors) == 1 and e.stop_reason == "max_turns"

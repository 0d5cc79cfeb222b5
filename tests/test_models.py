"""Tests for support/models.py: the tiny tokenizer, the real Qwen2.5-VL tokenizer, the published configs."""
import pytest
import torch

import crop_tool
import lfpc
from support import models
from conftest import QWEN_TOKENIZER


def test_tiny_tokenizer_is_deterministic_and_keeps_tags_whole():
    a, b = models.build_tiny_tokenizer(), models.build_tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    for t in models.SPECIAL_TOKENS + models.TAG_TOKENS:
        assert len(a.encode(t, add_special_tokens=False)) == 1, t
    text = crop_tool.format_tool_call([10, 20, 110, 220], "red box") + "<answer>B</answer>"
    assert a.decode(a.encode(text, add_special_tokens=False)) == text
    assert len(set(a.convert_tokens_to_ids(models.SPECIAL_TOKENS))) == len(models.SPECIAL_TOKENS)


def test_real_tokenizer_has_the_released_ids(qwen_tokenizer):
    tok = qwen_tokenizer
    assert tok.encode("Hello", add_special_tokens=False) == [9707]
    assert tok.encode(" world", add_special_tokens=False) == [1879]
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                      "<|image_pad|>", "<tool_call>", "</tool_call>"]) == \
        [151643, 151644, 151645, 151652, 151655, 151657, 151658]
    assert tok.encode("<tool_call>{}</tool_call>", add_special_tokens=False)[0] == 151657
    assert len(tok) == 151665


@pytest.mark.parametrize("name, total", [("7b", 8_292_166_656), ("3b", 3_754_622_976)])
def test_real_configs_have_the_released_checkpoints_parameter_counts(name, total):
    """Built on the meta device (no memory): the counts of Qwen2.5-VL-7B/3B-Instruct's safetensors."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(models.real_config(name, models.build_tiny_tokenizer()))
    assert sum(p.numel() for p in model.parameters()) == total
    assert model.config.vision_config.out_hidden_size == model.config.get_text_config().hidden_size


def test_real_shape_agent_has_the_7b_shape_where_it_matters():
    agent = models.real_shape_agent(QWEN_TOKENIZER)
    c = agent.model.config
    text = c.get_text_config()
    assert text.vocab_size == 152064 and text.hidden_size // text.num_attention_heads == 128
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert c.vision_config.patch_size == 14 and c.vision_config.spatial_merge_size == 2
    assert c.vision_config.fullatt_block_indexes == [1] and c.vision_config.window_size == 112
    assert agent.image_pad == 151655 and agent.stop_ids == {151645, 151658} and not agent.stop_strings
    assert isinstance(agent, lfpc.Agent)

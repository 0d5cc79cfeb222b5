"""Qwen2.5-VL models built from a config, no download: the tiny offline model (tests, the toy world),
random-weight models of the published 3B / 7B shapes (support/bench.py, memory estimates), and the real
Qwen2.5-VL tokenizer built from its two vocabulary files.

Contract
--------
- `tiny_agent()`: a randomly initialised Qwen2.5-VL (text 128 x 2 layers, vision 64 x 2; ≈0.8M
  parameters) with `build_tiny_tokenizer()`, an offline byte-level BPE trained on this project's
  prompts. Same transformers classes as a real checkpoint (`Qwen2_5_VLForConditionalGeneration`,
  `Qwen2VLImageProcessorPil`), so every code path a test runs is the real one.
- `real_config("7b" | "3b", tokenizer)`: the published architecture (`CONFIGS`, `VISION`; the
  parameter counts equal the released checkpoints', tested on the meta device), with the special-token
  ids of `tokenizer`. `random_agent(name, device)` builds it with random weights, in place on `device`.
- `real_tokenizer(folder)`: Qwen2.5-VL's tokenizer from `vocab.json` + `merges.txt` (the test fixture
  `tests/fixtures/qwen2-tokenizer/`) with its 22 added tokens at their released ids (151643..151664;
  `<tool_call>` = 151657, `<|im_end|>` = 151645). `real_shape_agent(folder)`: a model of the REAL
  7B shape where it matters to the engine (152,064-row embeddings, head dim 128, M-RoPE sections
  [16, 24, 24], theta 1e6, patch 14, merge 2, windowed vision attention with a full-attention block)
  but two layers and narrow, with the released image processor settings: what a test needs to see
  what a real checkpoint does, on a CPU.
"""
from __future__ import annotations

import random

import torch

import crop_tool
import lfpc
from support import prompts

# Qwen2.5's special tokens (their ids follow this order in the tiny tokenizer, after its BPE vocabulary)
# and the tags it keeps whole, as Qwen's keeps <tool_call> and </tool_call> whole.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
TAG_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<answer>",
              "</answer>", "<think>", "</think>"]
# Qwen2.5-VL's added tokens, ids 151643.. in this order; the first 14 are special.
QWEN_ADDED_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                     "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                     "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
                     "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                     "<|repo_name|>", "<|file_sep|>"]
QWEN_FIRST_ADDED_ID = 151643
# The released preprocessor_config.json of Qwen2.5-VL (patch 14, merge 2, temporal patch 2).
QWEN_IMAGE_PROCESSOR = dict(min_pixels=3136, max_pixels=12845056, image_mean=[0.48145466, 0.4578275, 0.40821073],
                            image_std=[0.26862954, 0.26130258, 0.27577711], patch_size=14, temporal_patch_size=2,
                            merge_size=2)


# ----------------------------------------------------------------------------- the tiny model

def build_tiny_tokenizer(extra_corpus: list[str] | None = None, vocab_size: int = 1024):
    """A deterministic byte-level BPE tokenizer trained offline on the prompts of this project."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(0)
    boxes = [crop_tool.format_tool_call([rng.randrange(0, 900) for _ in range(4)], "object")
             for _ in range(200)]
    corpus = [prompts.SYSTEM_PROMPT, prompts.INSTRUCTION, "The image is 448x448 pixels.", "Error: " * 3] * 20 + boxes
    core.train_from_iterator(corpus + list(extra_corpus or []), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.add_tokens(TAG_TOKENS)
    return tok


def tiny_agent(seed: int = 0, hidden: int = 128, layers: int = 2, vision_hidden: int = 64,
               vision_depth: int = 2, tokenizer=None, system_prompt: str = prompts.SYSTEM_PROMPT,
               instruction: str = prompts.INSTRUCTION, rope_theta: float = 10000.0, mrope_section=None) -> lfpc.Agent:
    """A randomly initialised Qwen2.5-VL small enough for CPU tests (≈0.8M parameters by default)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil
    tok = tokenizer or build_tiny_tokenizer()
    heads = max(2, hidden // 32)
    half = hidden // heads // 2                    # rotary frequencies per head, split over (t, h, w)
    section = mrope_section or [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]   # 16 -> [4, 6, 6] as 64 -> [16, 24, 24]
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         intermediate_size=2 * hidden, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": rope_theta},
                         **_token_ids(tok)),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, num_heads=max(1, vision_hidden // 16),
                           intermediate_size=2 * vision_hidden, out_hidden_size=hidden,
                           fullatt_block_indexes=[vision_depth - 1], window_size=112),
        tie_word_embeddings=False, **_vision_ids(tok))
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).float().eval()
    image_processor = Qwen2VLImageProcessorPil(min_pixels=4 * crop_tool.TOKEN_PIXELS,
                                               max_pixels=16384 * crop_tool.TOKEN_PIXELS)
    return lfpc.Agent(model, tok, image_processor, system_prompt, instruction)


def _token_ids(tok) -> dict:
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")}
    return dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])


def _vision_ids(tok) -> dict:
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


# ----------------------------------------------------------------------------- the published shapes

# Qwen2.5-VL-{7B,3B}-Instruct's config.json (text model, then the shared vision tower): 8,292,166,656 and
# 3,754,622,976 parameters, as the released checkpoints (tested on the meta device).
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], in_channels=3,
              hidden_act="silu")
ROPE = {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}
CONFIGS = {
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}


def real_config(name: str, tokenizer, text: dict | None = None, vision: dict | None = None):
    """The published architecture of `name` ("7b" | "3b"), with the special-token ids of `tokenizer`; the
    vocabulary keeps its real size (the lm_head's cost). `text` / `vision` override config entries."""
    from transformers import Qwen2_5_VLConfig
    c = {**CONFIGS[name], **(text or {})}
    tie = c.pop("tie_word_embeddings")
    return Qwen2_5_VLConfig(
        text_config=dict(**c, max_position_embeddings=128000, rms_norm_eps=1e-6, rope_parameters=ROPE,
                         **_token_ids(tokenizer)),
        vision_config={**VISION, "out_hidden_size": c["hidden_size"], **(vision or {})}, tie_word_embeddings=tie,
        **_vision_ids(tokenizer))


def random_agent(name: str, device: str, dtype: torch.dtype = torch.float32) -> lfpc.Agent:
    """An agent around a randomly initialised model of config `name` ("tiny": `tiny_agent`; "3b", "7b"),
    with the tiny tokenizer (its special-token ids are wired into the config)."""
    if name == "tiny":
        agent = tiny_agent(seed=0)
        agent.model.to(device=device, dtype=dtype)
        return agent
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil
    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    with torch.device(device):                         # built in place: no CPU copy of 8B weights
        model = Qwen2_5_VLForConditionalGeneration(real_config(name, tok)).to(dtype).eval()
    return lfpc.Agent(model, tok, Qwen2VLImageProcessorPil(min_pixels=4 * crop_tool.TOKEN_PIXELS,
                                                           max_pixels=16384 * crop_tool.TOKEN_PIXELS))


# ----------------------------------------------------------------------------- the real tokenizer

def real_tokenizer(folder: str):
    """Qwen2.5-VL's tokenizer from `folder`/vocab.json and merges.txt, its added tokens at their released ids."""
    from transformers import AddedToken, Qwen2Tokenizer
    tok = Qwen2Tokenizer.from_pretrained(folder)
    for k, t in enumerate(QWEN_ADDED_TOKENS):
        tok.add_tokens([AddedToken(t, special=k < 14, normalized=False)], special_tokens=k < 14)
        if tok.convert_tokens_to_ids(t) != QWEN_FIRST_ADDED_ID + k:
            raise ValueError(f"{folder}: {t} got id {tok.convert_tokens_to_ids(t)}, expected {QWEN_FIRST_ADDED_ID + k}")
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    return tok


def real_shape_agent(folder: str, layers: int = 2, hidden: int = 256, seed: int = 0) -> lfpc.Agent:
    """The 7B's shape where it matters to the engine (module docstring), two layers, random weights,
    with the real tokenizer from `folder` and the released image processor settings."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil
    tok = real_tokenizer(folder)
    text = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=hidden // 128, num_key_value_heads=1)           # head dim 128, as 7B
    vision = dict(depth=2, hidden_size=160, intermediate_size=320, num_heads=2, fullatt_block_indexes=[1])  # head dim 80
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(real_config("7b", tok, text, vision)).float().eval()
    return lfpc.Agent(model, tok, Qwen2VLImageProcessorPil(**QWEN_IMAGE_PROCESSOR))

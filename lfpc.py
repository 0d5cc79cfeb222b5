"""The LFPC agent: prompt, model loading, and the multi-turn crop-tool rollout.

Contract
--------
- `load_agent(name_or_path)` loads a real Qwen2.5-VL checkpoint (tokenizer, PIL image processor,
  model); `tiny_agent()` builds a TINY Qwen2.5-VL from a config with an offline byte-level BPE
  tokenizer, for tests and the toy world. Both return the same `Agent` and go through the same
  transformers classes (`Qwen2_5_VLForConditionalGeneration`, `Qwen2VLImageProcessorPil`).
  The stock `AutoProcessor` is not used: in transformers 5.x it builds a video processor that needs
  torchvision, and the agent renders its chat text itself anyway (format below).
- Chat format (Qwen2.5-VL's ChatML, as its chat template renders it):
      <|im_start|>system\n{SYSTEM}<|im_end|>\n
      <|im_start|>user\n<|vision_start|><|image_pad|>*n<|vision_end|>{question}<|im_end|>\n
      <|im_start|>assistant\n{turn 1}
      [<|im_end|> if the turn stopped at </tool_call>]\n<|im_start|>user\n<tool_response>{crop image
      or error text}</tool_response><|im_end|>\n<|im_start|>assistant\n{turn 2} ...
- Frames: the global image is resized to a pixel budget (`crop_tool.resize_to_budget`); that
  resized image is what the model is SHOWN, its size is stated in the question, and every box the
  model writes is in its frame. `crop_tool.crop` maps boxes to the ORIGINAL and cuts from there.
- `rollout(agent, tasks, group_size, cfg)` samples `len(tasks) * group_size` episodes in batches
  of turns (rollouts of task i are rows i*G .. i*G+G-1). Each turn is sampled until `</tool_call>`,
  end of turn (`<|im_end|>`) or the per-turn token limit. The loss mask is built while generating:
  sampled tokens get 1, everything the environment appends (prompt, tool responses, the
  `<|im_end|>` that closes a turn stopped at `</tool_call>`) gets 0.
- Turn rules (see `crop_tool.parse_turn`): an answer ends the episode ("answer"); a valid tool
  call is executed and its crop (or an error text) goes back as a user turn; a turn with neither
  ends the episode ("no_tool_call", never loops); a turn cut by the token limit without an answer
  ends it ("length"); after `max_turns` turns without an answer: "max_turns".
- `token_logprobs(agent.model, batch)` recomputes, in ONE forward over whole episodes (all
  images), log pi(token) for every loss-mask token; at temperature T both the sampler and this
  function use log_softmax(logits / T). Top-p truncation is not in these log-probs (as verl).
- M-RoPE: positions are computed here (`mrope_positions`) and passed explicitly, so the model's
  stateful `rope_deltas` cache is never used; tests check them against the model's own
  `get_rope_index` with `mm_token_type_ids` (which transformers 5.x requires).
"""
from __future__ import annotations

import inspect
import json
import random
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from PIL import Image

import crop_tool

# ----------------------------------------------------------------------------- prompt

TOOL_SCHEMA = {
    "type": "function",
    "function": {
        "name": crop_tool.TOOL_NAME,
        "description": "Zoom in on a region of the image: the region is cut from the full-resolution "
        "original and shown to you as a new image.",
        "parameters": {
            "type": "object",
            "properties": {
                "bbox_2d": {
                    "type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4,
                    "description": "[x1, y1, x2, y2]: top-left and bottom-right corners, in pixels of "
                    "the image you were shown.",
                },
                "label": {"type": "string", "description": "What is in the region (optional)."},
            },
            "required": ["bbox_2d"],
        },
    },
}

SYSTEM_PROMPT = (
    "You are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to assist with the "
    "user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + json.dumps(TOOL_SCHEMA)
    + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call>"
)

INSTRUCTION = (
    "Think first, call image_zoom_in_tool if a detail is too small to see, then answer. "
    "Format: <think>...</think> <tool_call>...</tool_call> (if needed) <answer>...</answer>"
)


NO_TOOL_SYSTEM_PROMPT = "You are a helpful assistant."
NO_TOOL_INSTRUCTION = "Answer with <answer>...</answer>."


def format_question(task: "Task", shown_size: tuple[int, int], use_tool: bool = True,
                    instruction: str = INSTRUCTION) -> str:
    """The user text of the first turn: question, options as (A) ..., the shown frame, instruction."""
    lines = [task.question]
    if task.choices:
        lines += [f"({chr(65 + i)}) {c}" for i, c in enumerate(task.choices)]
    lines.append(f"The image is {shown_size[0]}x{shown_size[1]} pixels. "
                 + (instruction if use_tool else NO_TOOL_INSTRUCTION))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- records

@dataclass
class Task:
    """One question about one image. Boxes (x1, y1, x2, y2) are in ORIGINAL-image pixels."""
    image: Image.Image | str                # the original, full-resolution image, or its path (opened on use)
    question: str
    answer: str                             # option letter or free text
    choices: list[str] | None = None
    boxes: list[list[float]] | None = None  # nested B1 ⊂ B2 ⊂ ... (stage 2), B1 first
    max_pixels: int | None = None           # global-image budget for this task (stage 1: from info_gap)
    id: str = ""

    def load_image(self) -> Image.Image:
        return self.image if isinstance(self.image, Image.Image) else Image.open(self.image).convert("RGB")

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the original; reads only the file's header when the image is a path."""
        if isinstance(self.image, Image.Image):
            return self.image.size
        with Image.open(self.image) as im:
            return im.size


def load_tasks(path: str) -> list[Task]:
    """Tasks from a JSONL file, one object a line:
        {"id": "...", "image": "relative/to/the/jsonl.png", "question": "...", "answer": "...",
         "choices": ["...", ...] (optional), "bboxes": [[x1, y1, x2, y2], ...] (optional, original pixels,
         nested B1 ⊂ B2 ..., B1 first), "max_pixels": int (optional, the global-image budget)}
    Every problem raises ValueError naming the file and line. Images are checked (opened, size read)
    but kept as paths, so a large set of 8K images does not sit in memory."""
    import os
    base, tasks = os.path.dirname(os.path.abspath(path)), []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: each line must be a JSON object")
            for key in ("image", "question", "answer"):
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise ValueError(f"{where}: missing or empty string field {key!r}")
            img_path = os.path.join(base, row["image"])
            if not os.path.isfile(img_path):
                raise ValueError(f"{where}: image file not found: {img_path}")
            try:
                with Image.open(img_path) as im:
                    W, H = im.size
            except Exception as e:   # PIL raises several types for unreadable files
                raise ValueError(f"{where}: cannot read image {img_path}: {e}") from None
            boxes = row.get("bboxes")
            for b in boxes or []:
                ok = isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)
                if not ok or not (0 <= b[0] < b[2] <= W and 0 <= b[1] < b[3] <= H):
                    raise ValueError(f"{where}: box {b} is not [x1, y1, x2, y2] inside the {W}x{H} image")
            choices = row.get("choices")
            if choices is not None and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
                raise ValueError(f"{where}: 'choices' must be a list of strings")
            tasks.append(Task(img_path, row["question"], row["answer"], choices, boxes, row.get("max_pixels"),
                              str(row.get("id", n))))
    if not tasks:
        raise ValueError(f"{path}: no tasks")
    return tasks


@dataclass
class Episode:
    """One rollout. `token_ids`, `loss_mask` and `logprobs` are aligned, one entry per token."""
    task_index: int
    token_ids: list[int]
    loss_mask: list[int]                  # 1: sampled by the policy (trained on); 0: prompt / tool output
    logprobs: list[float]                 # sampling-time log pi(token) at the sampling temperature; 0 where mask 0
    images: list[Image.Image]             # images as SHOWN, in the order of their <|image_pad|> blocks
    pixel_values: list[torch.Tensor]      # per image [n_patches, C*tp*p*p], ready for the vision tower
    grids: list[tuple[int, int, int]]     # per image (t, h, w) in patches
    shown_size: tuple[int, int] = (0, 0)  # (width, height) of the global image as shown
    turns: list[str] = field(default_factory=list)        # decoded text of each sampled turn
    crops: list[crop_tool.Crop] = field(default_factory=list)
    tool_errors: list[str] = field(default_factory=list)
    malformed_turns: int = 0
    answer: str | None = None
    stop_reason: str = ""                 # "answer" | "no_tool_call" | "no_answer" | "max_turns" | "length"
    reward: float = 0.0
    reward_parts: dict[str, float] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return bool(self.stop_reason)

    @property
    def num_generated(self) -> int:
        return sum(self.loss_mask)


@dataclass
class RolloutConfig:
    global_max_pixels: int = 1024 * 28 * 28   # global image budget when the task sets none (1K visual tokens)
    global_min_pixels: int = 4 * 28 * 28
    global_resample: str = "bicubic"          # how the global image is resized: "bicubic" (Qwen's) or "box"
    crop: crop_tool.CropConfig = field(default_factory=crop_tool.CropConfig)
    max_turns: int = 5                        # DeepEyes' training limit
    max_new_tokens: int = 512                 # per turn
    max_response_tokens: int = 2048           # sampled tokens per episode, all turns (paper: 2048)
    temperature: float = 1.0                  # 0 = greedy
    top_p: float = 1.0
    batch_size: int = 64                      # episodes per forward while sampling
    use_tool: bool = True                     # False: no tool in the prompt, one turn, answer directly
    probe: str = "none"                       # crop-dependency diagnostic: "noise" shows noise of the crop's size
                                              # instead of the crop; "gt" crops the task's B1 instead of the box
    decode: str = "dynamic"                   # KV cache while sampling: "dynamic" (grows by one token a step) or
                                              # "static" (preallocated, fixed shapes: what CUDA graphs need);
                                              # same tokens either way (tested)


# ----------------------------------------------------------------------------- agent and loading

@dataclass
class Agent:
    model: torch.nn.Module        # Qwen2_5_VLForConditionalGeneration
    tokenizer: object             # a transformers tokenizer
    image_processor: object       # Qwen2VLImageProcessorPil
    system_prompt: str = SYSTEM_PROMPT
    instruction: str = INSTRUCTION   # appended to the first user turn when the tool is offered

    def __post_init__(self):
        tok = self.tokenizer
        ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS[:6]}
        self.im_start, self.im_end = ids["<|im_start|>"], ids["<|im_end|>"]
        self.vision_start, self.vision_end = ids["<|vision_start|>"], ids["<|vision_end|>"]
        self.image_pad = ids["<|image_pad|>"]
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else ids["<|endoftext|>"]
        self.merge = self.model.config.vision_config.spatial_merge_size
        if self.image_pad != self.model.config.image_token_id:
            raise ValueError(f"tokenizer's <|image_pad|> id {self.image_pad} != model's image_token_id "
                             f"{self.model.config.image_token_id}")
        # A turn stops at </tool_call> or <|im_end|>; Qwen's tokenizers hold </tool_call> as one token.
        end_call = tok.encode("</tool_call>", add_special_tokens=False)
        self.stop_ids = {self.im_end} | ({end_call[0]} if len(end_call) == 1 else set())
        self.stop_strings = () if len(end_call) == 1 else ("</tool_call>",)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_image(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """An image already at its shown size (sides multiples of 28) -> (patches [n, C*tp*p*p], grid)."""
        out = self.image_processor(images=[image], do_resize=False, return_tensors="pt")
        return out["pixel_values"], tuple(int(v) for v in out["image_grid_thw"][0])

    def image_block(self, grid: tuple[int, int, int]) -> list[int]:
        n = grid[0] * grid[1] * grid[2] // self.merge**2
        return [self.vision_start] + [self.image_pad] * n + [self.vision_end]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


PROMPT_FILE = "lfpc_agent.json"   # saved beside a checkpoint: the prompts it was trained with


def load_agent(name_or_path: str, device: str = "cpu", dtype: torch.dtype = torch.bfloat16,
               attn_implementation: str = "sdpa") -> Agent:
    """A Qwen2.5-VL checkpoint (hub name or local folder), e.g. Qwen/Qwen2.5-VL-7B-Instruct, or a folder
    written by `save_agent` (then its prompts come back too)."""
    import os
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(name_or_path)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        name_or_path, dtype=dtype, attn_implementation=attn_implementation).to(device)
    return Agent(model, tokenizer, image_processor, **read_prompts(name_or_path))


def read_prompts(path: str) -> dict[str, str]:
    """The prompts `save_agent` wrote beside a checkpoint ({} for a hub name or a plain checkpoint)."""
    import os
    file = os.path.join(path, PROMPT_FILE)
    if not os.path.isfile(file):
        return {}
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def save_agent(agent: Agent, path: str) -> None:
    """Model, tokenizer, image processor and prompts in one folder that `load_agent` reads back."""
    import os
    agent.model.save_pretrained(path)
    agent.tokenizer.save_pretrained(path)
    agent.image_processor.save_pretrained(path)
    with open(os.path.join(path, PROMPT_FILE), "w", encoding="utf-8") as f:
        json.dump({"system_prompt": agent.system_prompt, "instruction": agent.instruction}, f, indent=1)


# Qwen2.5's special tokens (first six) and the tags the tiny tokenizer keeps whole, as Qwen's keeps
# <tool_call> and </tool_call> whole. Ids follow this order, after the learned BPE vocabulary.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
TAG_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<answer>",
              "</answer>", "<think>", "</think>"]


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
    corpus = [SYSTEM_PROMPT, INSTRUCTION, "The image is 448x448 pixels.", "Error: " * 3] * 20 + boxes
    core.train_from_iterator(corpus + list(extra_corpus or []), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.add_tokens(TAG_TOKENS)
    return tok


def tiny_agent(seed: int = 0, hidden: int = 128, layers: int = 2, vision_hidden: int = 64,
               vision_depth: int = 2, tokenizer=None, system_prompt: str = SYSTEM_PROMPT,
               instruction: str = INSTRUCTION, rope_theta: float = 10000.0, mrope_section=None) -> Agent:
    """A randomly initialised Qwen2.5-VL small enough for CPU tests (≈0.8M parameters by default)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil
    tok = tokenizer or build_tiny_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    heads = max(2, hidden // 32)
    half = hidden // heads // 2                    # rotary frequencies per head, split over (t, h, w)
    section = mrope_section or [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]   # 16 -> [4, 6, 6] as 64 -> [16, 24, 24]
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         intermediate_size=2 * hidden, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": rope_theta},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, num_heads=max(1, vision_hidden // 16),
                           intermediate_size=2 * vision_hidden, out_hidden_size=hidden,
                           fullatt_block_indexes=[vision_depth - 1], window_size=112),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).float().eval()
    image_processor = Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=16384 * 28 * 28)
    return Agent(model, tok, image_processor, system_prompt, instruction)


# ----------------------------------------------------------------------------- positions and forward

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


# transformers renamed `past_key_values` to `cache` in 5.2x; 5.17 knows only the old name.
def _cache_kw(model) -> str:
    return "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"


def _cache_of(out):
    return out.cache if getattr(out, "cache", None) is not None else getattr(out, "past_key_values", None)


def hidden_states(model, input_ids, attention_mask, position_ids, pixel_values=None, image_grid_thw=None,
                  cache=None, use_cache=False):
    """Last-layer hidden states [B, T, H] (no lm_head) and the KV cache."""
    kw = {_cache_kw(model): cache}
    out = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      pixel_values=pixel_values, image_grid_thw=image_grid_thw, use_cache=use_cache, **kw)
    return out.last_hidden_state, (_cache_of(out) if use_cache else None)


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


def collate(agent: Agent, episodes: list[Episode], left_pad: bool = False) -> Batch:
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
    pix = torch.cat([p for e in episodes for p in e.pixel_values]) if grids else None
    thw = torch.tensor(grids, dtype=torch.long) if grids else None
    pos = mrope_positions(ids, attn, grids, agent.image_pad, agent.merge)
    dev = agent.device
    to = lambda x: None if x is None else x.to(dev)
    return Batch(to(ids), to(attn), to(pos), to(pix), to(thw), to(lmask), to(old))


def token_logprobs(model, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
    """log pi(token_t | tokens_<t) at every loss-mask position, 0 elsewhere: [B, T].

    One forward over whole episodes; the lm_head runs only where the loss needs it.
    """
    dtype = next(model.parameters()).dtype
    pix = None if batch.pixel_values is None else batch.pixel_values.to(dtype)
    h, _ = hidden_states(model, batch.input_ids, batch.attention_mask, batch.position_ids, pix,
                         batch.image_grid_thw)                                   # [B, T, H]
    want = batch.loss_mask[:, 1:].bool()                                         # [B, T-1]: token t+1 is sampled
    logits = model.lm_head(h[:, :-1][want]).float()                              # [N, V]
    if temperature > 0:
        logits = logits / temperature
    lp = torch.log_softmax(logits, -1).gather(-1, batch.input_ids[:, 1:][want][:, None])[:, 0]   # [N]
    out = torch.zeros(batch.input_ids.shape, dtype=lp.dtype, device=lp.device)  # [B, T]
    out[:, 1:][want] = lp
    return out


# ----------------------------------------------------------------------------- sampling one turn

def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None):
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
def sample_turn(agent: Agent, episodes: list[Episode], max_new_tokens: list[int], cfg: RolloutConfig,
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
    dtype = next(model.parameters()).dtype
    pix = None if batch.pixel_values is None else batch.pixel_values.to(dtype)
    h, cache = hidden_states(model, batch.input_ids, attn, batch.position_ids, pix,
                             batch.image_grid_thw, cache=cache, use_cache=True)
    logits = model.lm_head(h[:, -1])                                        # [B, V]
    next_pos = batch.position_ids.amax(dim=(0, 2)) + 1                      # [B]
    out = [([], [], "length") for _ in range(B)]
    live = [True] * B
    for step in range(N):
        tok, lp = _sample(logits, cfg.temperature, cfg.top_p, gen)         # [B], [B]
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


# ----------------------------------------------------------------------------- the rollout

def _user_turn(agent: Agent, closed: bool, parts: list[str | tuple[int, int, int]]) -> list[int]:
    """Tokens the environment appends after an assistant turn: close it, a user turn, open the next."""
    ids = [] if closed else [agent.im_end]
    ids += agent.encode("\n") + [agent.im_start] + agent.encode("user\n")
    for p in parts:
        ids += agent.image_block(p) if isinstance(p, tuple) else agent.encode(p)
    return ids + [agent.im_end] + agent.encode("\n") + [agent.im_start] + agent.encode("assistant\n")


def start_episode(agent: Agent, task: Task, task_index: int, cfg: RolloutConfig) -> Episode:
    """The prompt of a new episode: system turn, user turn with the global image at its budget."""
    shown = crop_tool.resize_to_budget(task.load_image(), cfg.global_min_pixels,
                                       task.max_pixels or cfg.global_max_pixels, cfg.global_resample)
    pix, grid = agent.encode_image(shown)
    system = agent.system_prompt if cfg.use_tool else NO_TOOL_SYSTEM_PROMPT
    ids = [agent.im_start] + agent.encode("system\n" + system) + [agent.im_end]
    ids += agent.encode("\n") + [agent.im_start] + agent.encode("user\n") + agent.image_block(grid)
    ids += agent.encode(format_question(task, shown.size, cfg.use_tool, agent.instruction)) + [agent.im_end]
    ids += agent.encode("\n")
    ids += [agent.im_start] + agent.encode("assistant\n")
    return Episode(task_index, ids, [0] * len(ids), [0.0] * len(ids), [shown], [pix], [grid], shown.size)


def _run_tool(call: crop_tool.ToolCall, task: Task, ep: Episode, cfg: RolloutConfig):
    """Execute a tool call; under a diagnostic probe, swap what the model gets to see."""
    original = task.load_image()
    if cfg.probe == "gt":
        if not task.boxes:
            raise ValueError(f"probe 'gt' needs boxes, task {task.id!r} has none")
        return crop_tool.crop(original, task.boxes[0], original.size, cfg.crop)   # B1 is in the original frame
    result = crop_tool.execute(call, original, ep.shown_size, cfg.crop)
    if cfg.probe == "noise" and isinstance(result, crop_tool.Crop):
        g = torch.Generator().manual_seed(len(ep.token_ids))
        w, h = result.image.size
        noise = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        result = crop_tool.Crop(Image.fromarray(noise), result.box_shown, result.box_original, result.cut)
    elif cfg.probe != "none":
        raise ValueError(f"unknown probe {cfg.probe!r}; use 'none', 'noise' or 'gt'")
    return result


def step_episode(agent: Agent, ep: Episode, task: Task, tokens: list[int], logprobs: list[float],
                 finish: str, turn: int, cfg: RolloutConfig) -> None:
    """Append one sampled turn, parse it, and either end the episode or append the tool's response."""
    ep.token_ids += tokens
    ep.loss_mask += [1] * len(tokens)
    ep.logprobs += logprobs
    text = agent.tokenizer.decode(tokens, skip_special_tokens=False).removesuffix("<|im_end|>")
    ep.turns.append(text)
    parsed = crop_tool.parse_turn(text)
    ep.malformed_turns += int(parsed.malformed)
    if parsed.answer is not None:
        ep.answer, ep.stop_reason = parsed.answer, "answer"
        return
    if finish == "length" or ep.num_generated >= cfg.max_response_tokens:
        ep.stop_reason = "length"
        return
    if not cfg.use_tool:
        ep.stop_reason = "no_answer"
        return
    if parsed.call is None and parsed.error is None:
        ep.stop_reason = "no_tool_call"
        return
    if turn + 1 >= cfg.max_turns:
        ep.stop_reason = "max_turns"
        return
    result = parsed.error or _run_tool(parsed.call, task, ep, cfg)
    if isinstance(result, crop_tool.Crop):
        pix, grid = agent.encode_image(result.image)
        ep.crops.append(result)
        ep.images.append(result.image)
        ep.pixel_values.append(pix)
        ep.grids.append(grid)
        parts = ["<tool_response>", grid, "</tool_response>"]
    else:
        reason = result if isinstance(result, str) else result.reason
        ep.tool_errors.append(reason)
        parts = [f"<tool_response>Error: {reason}</tool_response>"]
    obs = _user_turn(agent, closed=finish == "eos", parts=parts)
    ep.token_ids += obs
    ep.loss_mask += [0] * len(obs)
    ep.logprobs += [0.0] * len(obs)


SampleFn = Callable[[Agent, list[Episode], list[int], RolloutConfig], list[tuple[list[int], list[float], str]]]


def rollout(agent: Agent, tasks: list[Task], group_size: int, cfg: RolloutConfig, seed: int | None = None,
            sample_fn: SampleFn | None = None) -> list[Episode]:
    """`len(tasks) * group_size` episodes; the rollouts of task i are rows i*G .. i*G+G-1.

    `sample_fn` replaces the model's sampler (tests script turns with it); default `sample_turn`.
    """
    gen = None
    if seed is not None:
        gen = torch.Generator(device=agent.device).manual_seed(seed)
    sample_fn = sample_fn or (lambda a, eps, n, c: sample_turn(a, eps, n, c, gen))
    tasks = [replace(t, image=t.load_image()) for t in tasks]   # open each image once per rollout
    episodes = []
    for i, task in enumerate(tasks):
        first = start_episode(agent, task, i, cfg)
        for _ in range(group_size):
            episodes.append(Episode(i, list(first.token_ids), list(first.loss_mask), list(first.logprobs),
                                    list(first.images), list(first.pixel_values), list(first.grids),
                                    first.shown_size))
    for turn in range(cfg.max_turns):
        live = [e for e in episodes if not e.done]
        for k in range(0, len(live), cfg.batch_size):
            chunk = live[k:k + cfg.batch_size]
            budget = [max(1, min(cfg.max_new_tokens, cfg.max_response_tokens - e.num_generated)) for e in chunk]
            for ep, (toks, lps, finish) in zip(chunk, sample_fn(agent, chunk, budget, cfg)):
                step_episode(agent, ep, tasks[ep.task_index], toks, lps, finish, turn, cfg)
    for e in episodes:
        e.stop_reason = e.stop_reason or "max_turns"
    return episodes


# ----------------------------------------------------------------------------- demo

def _demo_tasks(n: int, seed: int) -> list[Task]:
    """Synthetic stand-ins: a 1344x896 grey canvas with one small coloured square to find."""
    rng = random.Random(seed)
    colours = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220)}
    tasks = []
    for i in range(n):
        img = Image.new("RGB", (1344, 896), (128, 128, 128))
        name = rng.choice(sorted(colours))
        x, y = rng.randrange(0, 1280), rng.randrange(0, 832)
        img.paste(colours[name], (x, y, x + 64, y + 64))
        tasks.append(Task(img, "What colour is the small square?", name, choices=sorted(colours),
                          boxes=[[x, y, x + 64, y + 64]], id=f"demo-{i}"))
    return tasks


def main() -> None:
    import argparse
    p = argparse.ArgumentParser(description="Roll out the LFPC agent on synthetic tasks and print each episode. "
                                "Without --model it uses a randomly initialised tiny Qwen2.5-VL, so the text is "
                                "noise: the demo shows the machinery (turns, masks, stop reasons), not skill.")
    p.add_argument("--model", default=None, help="Qwen2.5-VL checkpoint (name or folder); default: tiny random model")
    p.add_argument("--tasks", type=int, default=2, help="number of tasks")
    p.add_argument("--group", type=int, default=4, help="rollouts per task (GRPO group size)")
    p.add_argument("--budget", type=int, default=64, help="global-image budget in visual tokens (28x28 px each)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="sampled tokens per turn")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--seed", type=int, default=0, help="seed for the tasks, the tiny model and sampling")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    a = p.parse_args()
    agent = load_agent(a.model, a.device) if a.model else tiny_agent(seed=a.seed)
    agent.model.to(a.device)
    cfg = RolloutConfig(global_max_pixels=a.budget * 28 * 28, max_new_tokens=a.max_new_tokens,
                        temperature=a.temperature)
    episodes = rollout(agent, _demo_tasks(a.tasks, a.seed), a.group, cfg, seed=a.seed)
    for e in episodes:
        print(f"task {e.task_index}: stop={e.stop_reason:<12} turns={len(e.turns)} sampled={e.num_generated:>3} "
              f"of {len(e.token_ids)} tokens, images={len(e.images)}, crops={len(e.crops)}, "
              f"answer={e.answer!r}\n    turn 1: {e.turns[0][:100]!r}")


if __name__ == "__main__":
    main()

"""The LFPC agent: its records, its prompt and tool, the multi-turn crop-tool rollout, its log-probs.

Contract
--------
- Records. `Task`: one question about one ORIGINAL image (boxes in its pixels). `Episode`: one rollout,
  whose `token_ids`, `loss_mask` and `logprobs` are aligned; `Episode.append` is the only way they grow.
  `RolloutConfig`: budgets, turn limits, sampling, probes.
- The turns' text around the model's own (system prompt, question, tool responses) is support/prompts.py's,
  in the agent's style (`Agent.style`: "qwen" or "deepeyes").
- Frames: the global image is resized to a pixel budget (`crop_tool.resize_to_budget`); that
  resized image is what the model is SHOWN (the "qwen" style states its size in the question; DeepEyes'
  prompt does not), and every box the model writes is in its frame. `crop_tool.crop` maps boxes to the
  ORIGINAL and cuts from there.
- `rollout(agent, tasks, group_size, cfg)` samples `len(tasks) * group_size` episodes (rollouts of
  task i are rows i*G .. i*G+G-1). Its turn loop is the method's: an engine (`support/engine.py`, which runs
  the model) hands back each turn as it ends; `take_turn` parses it, the rollout's threads run the tool
  while the engine's next pass goes on, `answer_turn` appends the answer after it; the episode goes back
  for its next turn or is closed. Each turn is sampled until
  `</tool_call>`, end of turn (`<|im_end|>`) or the per-turn token limit. The loss mask
  is built while generating: sampled tokens get 1, everything the environment appends (prompt, tool
  responses, the `<|im_end|>` that closes a turn stopped at `</tool_call>`) gets 0.
- Turn rules (see `crop_tool.parse_turn`): an answer ends the episode ("answer"); a valid tool
  call is executed and its crop (or an error text) goes back as a user turn; a turn with neither
  ends the episode ("no_tool_call", never loops); a turn cut by the token limit without an answer
  ends it ("length"); after `max_turns` turns without an answer: "max_turns". Without the tool
  (`use_tool=False`) one turn, then "answer", "no_answer" or "length".
- Probes (the paper's crop-dependency diagnostic) change what a tool call returns: "noise" shows noise
  of the crop's size instead of a successful crop (a box the tool refuses still gets its error turn);
  "gt" answers every parsed call with the crop of the task's B1, a box the tool would refuse included
  (the paper's predicted box replaced by the ground-truth one). A call that does not parse goes back
  as an error turn under every probe.
- `token_logprobs(model, batch)` recomputes, in one forward over whole episodes (all images),
  log pi(token) for every loss-mask token; at temperature T both the sampler and this function use
  log_softmax(logits / T) over the policy's vocabulary (the tokens only the environment writes, such as
  <|image_pad|>, are never sampled: -inf in both). Top-p truncation is not in these log-probs (as
  verl). The lm_head runs a chunk of tokens at a time (no [tokens, vocabulary] logits for a batch).
"""
from __future__ import annotations

import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import torch
import torch.utils.checkpoint
from PIL import Image

import crop_tool
from support import batches, engine, prompts

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
    cycle: str | None = None                # HR-Bench's cycle_category: which rotation of the options (support/metrics.py)

    def load_image(self) -> Image.Image:
        """The original as the model sees it (crop_tool.open_image: EXIF orientation, alpha on white, RGB)."""
        return self.image if isinstance(self.image, Image.Image) else crop_tool.open_image(self.image)

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the original: THE way to read it; only the file's header when a path."""
        return self.image.size if isinstance(self.image, Image.Image) else crop_tool.image_size(self.image)


@dataclass
class Episode:
    """One rollout. `token_ids`, `loss_mask` and `logprobs` are aligned, one entry per token, and grow
    only through `append`; `images` and `grids` follow the <|image_pad|> blocks in order."""
    task_index: int
    token_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)    # 1: sampled by the policy (trained on); 0: context
    logprobs: list[float] = field(default_factory=list)   # sampling-time log pi(token) at the sampling temperature; 0 where mask 0
    images: list[Image.Image] = field(default_factory=list)   # images as SHOWN, one per image block
    grids: list[tuple[int, int, int]] = field(default_factory=list)   # per image (t, h, w) in patches
    shown_size: tuple[int, int] = (0, 0)  # (width, height) of the global image as shown
    seed: int = 0                         # its sampling stream: token j is drawn with the j-th uniform of it
    turns: list[str] = field(default_factory=list)        # decoded text of each sampled turn
    crops: list[crop_tool.Crop] = field(default_factory=list)
    tool_calls: int = 0                   # turns that called the tool (valid call or not); executed ones
                                          # became a crop or a tool error
    tool_errors: list[str] = field(default_factory=list)
    malformed_turns: int = 0
    answer: str | None = None
    stop_reason: str = ""                 # "answer" | "no_tool_call" | "no_answer" | "max_turns" | "length"
    reward: float = 0.0
    reward_parts: dict[str, float] = field(default_factory=dict)

    def append(self, tokens: list[int], logprobs: list[float] | None = None,
               images: list[tuple[Image.Image, tuple[int, int, int]]] = ()) -> None:
        """Extend the episode. With `logprobs` the tokens were SAMPLED by the policy (loss mask 1, their
        sampling log-probs); without, they are context the environment wrote (mask 0, log-prob 0).
        `images`: (shown image, grid) of each image block inside `tokens`, in order."""
        if logprobs is not None and len(logprobs) != len(tokens):
            raise ValueError(f"{len(tokens)} tokens but {len(logprobs)} log-probs")
        self.token_ids += tokens
        self.loss_mask += [int(logprobs is not None)] * len(tokens)
        self.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(tokens)
        for image, grid in images:
            self.images.append(image)
            self.grids.append(grid)

    @property
    def done(self) -> bool:
        return bool(self.stop_reason)

    @property
    def num_generated(self) -> int:
        return sum(self.loss_mask)


@dataclass
class RolloutConfig:
    global_max_pixels: int = 1024 * crop_tool.TOKEN_PIXELS   # global image budget when the task sets none (1K tokens)
    global_min_pixels: int = 4 * crop_tool.TOKEN_PIXELS
    global_resample: str = "bicubic"          # how the global image is resized: "bicubic" (Qwen's) or "box"
    crop: crop_tool.CropConfig = field(default_factory=crop_tool.CropConfig)
    max_turns: int = 5                        # DeepEyes' training limit
    max_new_tokens: int = 512                 # per turn
    max_response_tokens: int = 2048           # sampled tokens per episode, all turns (paper: 2048)
    temperature: float = 1.0                  # 0 = greedy
    top_p: float = 1.0
    batch_size: int = 64                      # episodes per forward while sampling (at most)
    batch_tokens: int | None = None           # and at most this many KV-cache tokens per chunk: rows x the
                                              # bound of an episode's length (`episode_bound`); None: no limit
    use_tool: bool = True                     # False: no tool in the prompt, one turn, answer directly
    probe: str = "none"                       # crop-dependency diagnostic (module docstring): "none", "noise", "gt"
    decode: str = "dynamic"                   # attention while decoding: "dynamic" (over the cache's used length)
                                              # or "static" (over its whole capacity: the same shapes every step)
    engine: str = "cached"                    # "cached": slots of one preallocated KV cache, continuous batching
                                              # (engine.SlotSession); "reference": every turn re-prefilled from
                                              # scratch (engine.ReferenceSession). Same tokens in every combination (tested)
    schedule: str = "continuous"              # cached engine: "continuous" (a slot's turn and episode end on
                                              # their own) or "turns" (the per-turn barrier, to measure against)
    sync_every: int = 1                       # cached engine: decode steps between two host syncs
    prefill_tokens: int = 16384               # cached engine: tokens one prefill forward computes (rows x the
                                              # longest, padding included), at most; a longer row runs alone.
                                              # Bounds the rollout's activations (support/memory.py)

    def __post_init__(self):
        for name, value, allowed in (("probe", self.probe, PROBES), ("decode", self.decode, ("dynamic", "static")),
                                     ("engine", self.engine, ENGINES), ("schedule", self.schedule, SCHEDULES)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; use one of {allowed}")
        if self.sync_every < 1:
            raise ValueError(f"sync_every must be at least 1, got {self.sync_every}")
        if self.prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be at least 1, got {self.prefill_tokens}")


PROBES = ("none", "noise", "gt")
ENGINES = ("cached", "reference")
SCHEDULES = ("continuous", "turns")

# ----------------------------------------------------------------------------- the agent

@dataclass
class Agent:
    model: torch.nn.Module        # Qwen2_5_VLForConditionalGeneration
    tokenizer: object             # a transformers tokenizer
    image_processor: object       # Qwen2VLImageProcessorPil
    system_prompt: str = prompts.SYSTEM_PROMPT
    instruction: str = prompts.INSTRUCTION   # appended to the first user turn when the tool is offered
    style: str = "qwen"                       # how turns are written (support/prompts.py): "qwen" or "deepeyes"
    direct_instruction: str | None = None     # the instruction when no tool is offered (None: prompts.direct's
                                              # short answer); the toy keeps the one its base learned

    def __post_init__(self):
        if self.style not in prompts.STYLES:
            raise ValueError(f"unknown prompt style {self.style!r}; use one of {prompts.STYLES}")
        tok = self.tokenizer
        ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                                         "<|vision_end|>", "<|image_pad|>", "<|endoftext|>")}
        self.im_start, self.im_end = ids["<|im_start|>"], ids["<|im_end|>"]
        self.vision_start, self.vision_end = ids["<|vision_start|>"], ids["<|vision_end|>"]
        self.image_pad = ids["<|image_pad|>"]
        # Tokens only the environment writes: a sampled <|image_pad|> would be read as an image slot. The
        # policy never emits them (their logits are -inf when sampling AND in the training forward).
        vision = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")
        self.env_only_ids = sorted({i for i in tok.convert_tokens_to_ids(list(vision))
                                    if i is not None and i != tok.unk_token_id})
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else ids["<|endoftext|>"]
        self.merge = self.model.config.vision_config.spatial_merge_size
        if self.image_pad != self.model.config.image_token_id:
            raise ValueError(f"tokenizer's <|image_pad|> id {self.image_pad} != model's image_token_id "
                             f"{self.model.config.image_token_id}")
        # A turn stops at </tool_call> (style qwen) or <|im_end|>; Qwen's tokenizers hold </tool_call> as one token.
        end_call = tok.encode("</tool_call>", add_special_tokens=False) if prompts.stops_at_tool_call(self.style) else []
        self.stop_ids = {self.im_end} | ({end_call[0]} if len(end_call) == 1 else set())
        self.stop_strings = ("</tool_call>",) if len(end_call) > 1 else ()
        # Every added token's string (control tokens and tags), longest first: where a template splits.
        added = sorted({t.content for t in tok.added_tokens_decoder.values()}, key=len, reverse=True)
        self.control_ids = sorted(tok.convert_tokens_to_ids(added))
        self._control = re.compile("(" + "|".join(map(re.escape, added)) + ")") if added else None
        self._plain_tokenizer = None

    def encode(self, text: str | list[str]) -> list[int]:
        """Token ids of text the environment writes. A str is the project's own template: its control-token
        strings (<|im_end|>, <tool_call>, ...) become control ids, as the official chat template renders
        them. A list mixes template strings with `prompts.Data` (text from a dataset, a benchmark or the
        model): data is encoded as plain text, so a control-token string in it never becomes a control id.
        The text between two of the template's control tokens is encoded in one piece, data included, so
        data without control-token strings gets exactly the official ids (tested with the real tokenizer)."""
        if isinstance(text, str) and not isinstance(text, prompts.Data):
            return self.tokenizer.encode(text, add_special_tokens=False)
        ids, run = [], ""
        for part in [text] if isinstance(text, str) else text:
            if isinstance(part, prompts.Data):
                run += part
                continue
            for k, piece in enumerate(self._control.split(part) if self._control else [part]):
                if k % 2:                                                    # one of the template's control tokens
                    ids += self._plain(run) + [self.tokenizer.convert_tokens_to_ids(piece)]
                    run = ""
                else:
                    run += piece
        return ids + self._plain(run)

    def _plain(self, text: str) -> list[int]:
        """Byte-level BPE of `text` with no added token matched: the tokenizer's own normaliser, pre-tokeniser
        and merges (the same objects), without its added-token table."""
        if not text:
            return []
        if self._plain_tokenizer is None:
            from tokenizers import Tokenizer
            backend = self.tokenizer.backend_tokenizer
            self._plain_tokenizer = Tokenizer(backend.model)
            self._plain_tokenizer.normalizer = backend.normalizer
            self._plain_tokenizer.pre_tokenizer = backend.pre_tokenizer
        return self._plain_tokenizer.encode(text, add_special_tokens=False).ids

    def encode_image(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """An image already at its shown size (sides multiples of 28) -> (patches [n, C*tp*p*p], grid)."""
        out = self.image_processor(images=[image], do_resize=False, return_tensors="pt")
        return out["pixel_values"], tuple(int(v) for v in out["image_grid_thw"][0])

    def image_grid(self, image: Image.Image) -> tuple[int, int, int]:
        """(t, h, w) in patches of an image already at its shown size: what `encode_image` reports, without
        running the image processor (tested equal)."""
        p = self.image_processor.patch_size
        if image.width % (p * self.merge) or image.height % (p * self.merge):
            raise ValueError(f"image of {image.width}x{image.height} px is not at a shown size "
                             f"(sides multiples of {p * self.merge})")
        return (1, image.height // p, image.width // p)

    def image_block(self, grid: tuple[int, int, int]) -> list[int]:
        n = grid[0] * grid[1] * grid[2] // self.merge**2
        return [self.vision_start] + [self.image_pad] * n + [self.vision_end]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


# ----------------------------------------------------------------------------- the rollout

def rollout(agent: Agent, tasks: list[Task], group_size: int, cfg: RolloutConfig, seed: int | list[int] | None = None,
            sample_fn: engine.SampleFn | None = None, work: engine.Work | None = None,
            force: engine.ForceFn | None = None, store: engine.FeatureStore | None = None) -> list[Episode]:
    """`len(tasks) * group_size` episodes; the rollouts of task i are rows i*G .. i*G+G-1.

    The turn loop: the engine samples turns; each one that ends is parsed (`take_turn`); a crop is cut by
    the rollout's threads (as the originals are opened and shown, with the engine's own host work on the
    image: `engine.prepare_image`) while the engine runs its next pass over the other episodes (if any decodes),
    and after that pass (the reference engine: before its next turn) the answer is appended
    (`answer_turn`; an invalid call's at once) and the episode goes back to the engine for its next turn,
    or leaves it. A crop rejoins at that fixed point however long it took, so the batches, and with them
    the numbers, do not depend on the threads' timing. `step_episode` is the same turn in one serial call.
    Episode k samples from its own stream, seeded `seed + k` (`seed` None: drawn from torch's global
    generator; a list: one base seed per task, rollout j of task i seeded seed[i] + j), so its tokens do
    not depend on batching. The engine is `cfg.engine` (`engine.open_session`): "cached", continuous
    batching over at most `cfg.batch_size` slots (and `cfg.batch_tokens` KV-cache tokens), each turn
    handed back as it ends; "reference", a barrier per turn, everything prefilled again. `work`
    (optional) accumulates what the engine did (`engine.Work`). `sample_fn` replaces the decoding of each
    turn (tests script turns with it); the engine still prefills everything else. `force` (benchmarks) and
    `store` (the images' features, kept for the training forward): cached engine only.
    """
    work = work if work is not None else engine.Work()
    seed = int(torch.randint(0, 2**62, ())) if seed is None else seed
    if isinstance(seed, list) and len(seed) != len(tasks):
        raise ValueError(f"{len(seed)} seeds for {len(tasks)} tasks")
    base = seed if isinstance(seed, list) else [seed + i * group_size for i in range(len(tasks))]
    def opened(t: Task) -> tuple[Task, Image.Image]:        # each original opened once a rollout, then shown
        t = replace(t, image=t.load_image())
        shown = shown_image(t, cfg)
        engine.prepare_image(agent, shown)                  # the engine's host work on it, here too
        return t, shown

    def cut(call: crop_tool.ToolCall, task: Task, ep: Episode):   # a crop, and the engine's host work on it
        result = _run_tool(call, task, ep, cfg)
        if isinstance(result, crop_tool.Crop):
            engine.prepare_image(agent, result.image)
        return result
    with ThreadPoolExecutor(IMAGE_THREADS) as pool:        # image work releases the GIL: opening, resizing, cropping
        tasks, shown = zip(*pool.map(opened, tasks)) if tasks else ((), ())
        episodes, prompt_len = [], []
        for i, task in enumerate(tasks):
            first = start_episode(agent, task, i, cfg, shown[i])             # tokenizers stay on one thread
            prompt_len.append(len(first.token_ids))
            for j in range(group_size):          # the G rollouts share the prompt's image objects
                ep = Episode(i, shown_size=first.shown_size, seed=base[i] + j)
                ep.append(first.token_ids, images=list(zip(first.images, first.grids)))
                episodes.append(ep)
        bound = max(episode_bound(n, cfg) for n in prompt_len)
        session = engine.open_session(agent, episodes, cfg, work, bound, sample_fn, force, store)
        for k, ep in enumerate(episodes):
            session.submit(k, turn_budget(ep, cfg))
        every_turn = isinstance(session, engine.ReferenceSession)    # a barrier per turn: each crop back first
        cutting: dict[int, tuple[Future, str]] = {}     # episode -> its crop being cut by the pool, how its turn ended

        def next_turn(k: int) -> None:
            ep = episodes[k]
            session.close(k) if ep.done else session.submit(k, turn_budget(ep, cfg))

        def rejoin() -> None:                           # the crops back, in episode order, each answered
            for k in sorted(cutting):
                f, finish = cutting.pop(k)
                answer_turn(agent, episodes[k], f.result(), finish)     # a tool's exception surfaces here
                next_turn(k)
        while session.busy or cutting:
            if every_turn:
                rejoin()
            ended = session.turns(poll=lambda: bool(cutting))   # crops out: one pass, the crops cut meanwhile
            if not ended and not cutting and session.busy:
                raise RuntimeError("the engine handed back no turn and none is being answered")   # never spin
            rejoin()                         # a crop rejoins after that pass, however long it took
            for k, tokens, logprobs, finish in ended:
                ep = episodes[k]
                call = take_turn(agent, ep, tokens, logprobs, finish, cfg)
                if isinstance(call, crop_tool.ToolCall):
                    cutting[k] = (pool.submit(cut, call, tasks[ep.task_index], ep), finish)
                    continue
                if call is not None:
                    answer_turn(agent, ep, call, finish)
                next_turn(k)
    work.context_tokens += sum(prompt_len) + sum(len(e.token_ids) - prompt_len[e.task_index] for e in episodes)
    return episodes


def turn_budget(ep: Episode, cfg: RolloutConfig) -> int:
    """The most tokens the episode's next turn may sample: a turn's limit, within the episode's."""
    return max(1, min(cfg.max_new_tokens, cfg.max_response_tokens - ep.num_generated))


IMAGE_THREADS = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
                                               # threads that open the tasks' originals and resize them to the budget
MAX_ERROR_CHARS = 200    # an error turn shows at most this much of its reason (it may quote the model's call)


def episode_bound(prompt_tokens: int, cfg: RolloutConfig) -> int:
    """The most tokens an episode can reach: its prompt, every sampled token, and after every turn but the
    last a tool response: the largest crop, or an error of up to MAX_ERROR_CHARS characters (a token a
    character at worst), with its turn's tags (up to 64 tokens)."""
    crop_tokens = cfg.crop.max_pixels // crop_tool.TOKEN_PIXELS
    return prompt_tokens + cfg.max_response_tokens + (cfg.max_turns - 1) * (max(crop_tokens, MAX_ERROR_CHARS + 16) + 64)


def prompt_problem(agent: Agent, tasks: list[Task], cfg: RolloutConfig, limit: int | None = None) -> str | None:
    """Why an episode of some task could outgrow the model's positions, before any rollout: its system and
    question text, the global image at its budget (or the config's), the response and every crop
    (`episode_bound`), counted in tokens (more than the positions M-RoPE uses, so safe) against the text
    model's max_position_embeddings (`limit`). The first such task, or None. Tokenises each question once."""
    limit = limit or agent.model.config.get_text_config().max_position_embeddings
    system = len(agent.encode(prompts.system(agent.style, agent.system_prompt, cfg.use_tool))) + 16   # + turn tags
    for t in tasks:
        text = len(agent.encode(prompts.question(agent.style, t, (99999, 99999), cfg.use_tool, agent.instruction,
                                                 agent.direct_instruction)))
        image = (t.max_pixels or cfg.global_max_pixels) // crop_tool.TOKEN_PIXELS + 2
        bound = episode_bound(system + text + image, cfg)
        if bound > limit:
            return (f"task {t.id!r}: its prompt is {text:,} tokens of text and {image:,} of image; with the response "
                    f"and crop budgets an episode can reach {bound:,} tokens, over the model's {limit:,} positions "
                    f"(shorten the question, or lower --max-response-tokens / --max-turns / the budgets)")
    return None


def start_episode(agent: Agent, task: Task, task_index: int, cfg: RolloutConfig,
                  shown: Image.Image | None = None) -> Episode:
    """The prompt of a new episode: system turn, user turn with the global image at its budget (`shown`:
    already made by `shown_image`)."""
    shown = shown_image(task, cfg) if shown is None else shown
    grid = agent.image_grid(shown)
    system = prompts.system(agent.style, agent.system_prompt, cfg.use_tool)
    ids = [agent.im_start] + agent.encode("system\n" + system) + [agent.im_end]
    ids += agent.encode("\n") + [agent.im_start] + agent.encode("user\n") + agent.image_block(grid)
    ids += agent.encode(prompts.question(agent.style, task, shown.size, cfg.use_tool, agent.instruction,
                                         agent.direct_instruction)) + [agent.im_end]                  # data stays text
    ids += agent.encode("\n") + [agent.im_start] + agent.encode("assistant\n")
    ep = Episode(task_index, shown_size=shown.size)
    ep.append(ids, images=[(shown, grid)])
    return ep


def shown_image(task: Task, cfg: RolloutConfig) -> Image.Image:
    """The global image as the model is shown it: the original resized to the task's budget (or the config's)."""
    return crop_tool.resize_to_budget(task.load_image(), cfg.global_min_pixels,
                                      task.max_pixels or cfg.global_max_pixels, cfg.global_resample)


def take_turn(agent: Agent, ep: Episode, tokens: list[int], logprobs: list[float], finish: str,
              cfg: RolloutConfig) -> crop_tool.ToolCall | str | None:
    """Append one sampled turn and parse it: None when it ends the episode, else what the environment answers
    with: the tool call to run, or the reason the call is invalid."""
    turn = len(ep.turns)                         # turns before this one
    ep.append(tokens, logprobs)
    text = agent.tokenizer.decode(tokens, skip_special_tokens=False).removesuffix("<|im_end|>")
    ep.turns.append(text)
    parsed = crop_tool.parse_turn(text)
    ep.malformed_turns += int(parsed.malformed)
    if parsed.answer is not None:
        ep.answer, ep.stop_reason = parsed.answer, "answer"
        return None
    if finish == "length" or ep.num_generated >= cfg.max_response_tokens:
        ep.stop_reason = "length"
        return None
    if not cfg.use_tool:
        ep.stop_reason = "no_answer"
        return None
    if parsed.call is None and parsed.error is None:
        ep.stop_reason = "no_tool_call"
        return None
    ep.tool_calls += 1
    if turn + 1 >= cfg.max_turns:
        ep.stop_reason = "max_turns"
        return None
    return parsed.error or parsed.call


def _run_tool(call: crop_tool.ToolCall, task: Task, ep: Episode, cfg: RolloutConfig) -> crop_tool.Crop | crop_tool.CropError:
    """Execute a parsed tool call; under a probe, change what it returns (module docstring).
    Runs on the rollout's threads: it reads the task and the episode, changes neither."""
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
    return result


def answer_turn(agent: Agent, ep: Episode, result: crop_tool.Crop | crop_tool.CropError | str, finish: str) -> None:
    """Append the environment's answer to a tool call: the crop, or the error (`finish`: how the turn ended)."""
    if isinstance(result, crop_tool.Crop):
        grid = agent.image_grid(result.image)
        ep.crops.append(result)
        ep.append(_user_turn(agent, finish == "eos", prompts.observation(agent.style, grid)),
                  images=[(result.image, grid)])
    else:
        reason = result if isinstance(result, str) else result.reason
        ep.tool_errors.append(reason)
        shown = reason if len(reason) <= MAX_ERROR_CHARS else reason[:MAX_ERROR_CHARS] + "..."   # it may quote the call
        ep.append(_user_turn(agent, finish == "eos", prompts.observation(agent.style, shown)))


def step_episode(agent: Agent, ep: Episode, task: Task, tokens: list[int], logprobs: list[float],
                 finish: str, cfg: RolloutConfig) -> None:
    """Append one sampled turn, parse it, and either end the episode or append the tool's response (the
    turn loop's three parts in one call: `take_turn`, `_run_tool`, `answer_turn`)."""
    call = take_turn(agent, ep, tokens, logprobs, finish, cfg)
    if call is not None:
        answer_turn(agent, ep, _run_tool(call, task, ep, cfg) if isinstance(call, crop_tool.ToolCall) else call,
                    finish)


def _user_turn(agent: Agent, closed: bool, parts: list[str | tuple[int, int, int]]) -> list[int]:
    """Tokens the environment appends after an assistant turn: close it, a user turn, open the next. Text
    between two image blocks is encoded together, as a chat template renders it (`prompts.Data` in it,
    e.g. an error quoting the model's call, as plain text)."""
    ids = [] if closed else [agent.im_end]
    ids += agent.encode("\n") + [agent.im_start] + agent.encode("user\n")
    text = []
    for p in parts + [None]:
        if isinstance(p, str):
            text.append(p)
            continue
        ids += agent.encode(text) if text else []
        ids += agent.image_block(p) if p is not None else []
        text = []
    return ids + [agent.im_end] + agent.encode("\n") + [agent.im_start] + agent.encode("assistant\n")


# ----------------------------------------------------------------------------- log-probs

def token_logprobs(model, batch: batches.Batch, temperature: float = 1.0, chunk: int = 1024) -> torch.Tensor:
    """log pi(token_t | tokens_<t) at every loss-mask position, 0 elsewhere: [B, T].

    One forward over whole episodes; a sampled token is predicted by the hidden state of the token before
    it in its episode (in a shared row, `batch.prev`: a suffix's first token by its group's prompt's last).
    The lm_head runs only where the loss needs it, `chunk` sampled tokens at a time under activation
    checkpointing, so [tokens, vocabulary] logits exist for one chunk only, in the forward and again in
    the backward (0: all at once, the plain computation).
    """
    h = batches.forward(model, batch)                                             # [B, T, H]
    b, t = batch.loss_mask.bool().nonzero(as_tuple=True)                         # [N]: the sampled tokens
    src = batch.prev[b, t] if batch.prev is not None else t - 1                  # [N]: the position predicting each
    if bool((src < 0).any()):
        raise ValueError("a sampled token opens an episode: nothing predicts it")
    hs, targets = h[b, src], batch.input_ids[b, t]                               # [N, H], [N]
    step = chunk if chunk > 0 else max(1, len(targets))
    parts = []
    for i in range(0, len(targets), step):
        args = (model.lm_head, hs[i:i + step], targets[i:i + step], temperature, batch.env_only_ids)
        parts.append(torch.utils.checkpoint.checkpoint(_target_logprobs, *args, use_reentrant=False)
                     if chunk > 0 and torch.is_grad_enabled() else _target_logprobs(*args))
    lp = torch.cat(parts) if parts else hs.new_zeros(0, dtype=torch.float32)    # [N]
    out = torch.zeros(batch.input_ids.shape, dtype=lp.dtype, device=lp.device)  # [B, T]
    out[b, t] = lp
    return out


def _target_logprobs(lm_head, h: torch.Tensor, targets: torch.Tensor, temperature: float,
                     env_only_ids: list[int]) -> torch.Tensor:
    """log_softmax(lm_head(h) / T)[target] for n positions: [n] (fp32), h [n, H], targets [n]."""
    logits = engine.env_only_masked(lm_head(h).float(), env_only_ids)            # [n, V]
    if temperature > 0:
        logits = logits / temperature
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]      # [n]

"""How the agent talks: the text around the model's own turns, in two styles (`Agent.style`).

    qwen      (default) Qwen2.5-VL's tool-calling system prompt; the first user turn holds the image, the
              question, its options as "(A) ...", the SHOWN image's size (boxes are written in its
              pixels) and the instruction; a crop comes back as <tool_response>IMAGE</tool_response>, an
              invalid call as <tool_response>Error: ...</tool_response>; a turn stops at </tool_call> and
              the environment closes it with <|im_end|>.
    deepeyes  DeepEyes' exact strings (Visual-Agent/DeepEyes at 6c5e796; notes/deepeyes_prompts.md has
              each source): its system prompt (verbatim, slips included), "Question: ...\nOptions: \nA. ...",
              its instruction suffix after the question AND inside every tool response, errors as a bare
              "Error: ..." user turn, and turns sampled until <|im_end|> (its rollouts set no stop at
              </tool_call>). So `eval.py --prompt deepeyes` evaluates a DeepEyes checkpoint as it was
              trained. Deliberately NOT copied: its unshuffled options (V* puts the correct one first; the
              loaders here shuffle), its crop cut from the original with an unscaled box (the frame bug;
              crop_tool maps the box), and its executing the LAST tool call of a turn (here the first).

Chat format (Qwen2.5-VL's ChatML, as its chat template renders it):
    <|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|>*n<|vision_end|>
    {question}<|im_end|>\n<|im_start|>assistant\n{turn 1}[<|im_end|>]\n<|im_start|>user\n{tool response}
    <|im_end|>\n<|im_start|>assistant\n{turn 2} ...
"""
from __future__ import annotations

import json

import crop_tool

STYLES = ("qwen", "deepeyes")

# ----------------------------------------------------------------------------- qwen

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
# With no tool (the information-gap prober, eval --no-tool): a short answer, as the benchmarks' official
# prompts ask (LLaVA's and V*'s "single word or phrase", "the option's letter ... directly").
DIRECT_INSTRUCTION = "Answer the question using a single word or phrase, in <answer>...</answer>."
DIRECT_CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly, in <answer>...</answer>."
NO_TOOL_INSTRUCTION = "Answer with <answer>...</answer>."   # the toy's direct prompt (its base learned this one)

# ----------------------------------------------------------------------------- deepeyes (verbatim)

DEEPEYES_SYSTEM = (
    'You are a helpful assistant.\n\n# Tools\nYou may call one or more functions to assist with the user query.\n'
    'You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n'
    '{"type":"function","function":{"name":"image_zoom_in_tool","description":"Zoom in on a specific region of an '
    'image by cropping it based on a bounding box (bbox) and an optional object label.","parameters":{"type":'
    '"object","properties":{"bbox_2d":{"type":"array","items":{"type":"number"},"minItems":4,"maxItems":4,'
    '"description":"The bounding box of the region to zoom in, as [x1, y1, x2, y2], where (x1, y1) is the '
    'top-left corner and (x2, y2) is the bottom-right corner."},"label":{"type":"string","description":"The '
    'name or label of the object in the specified bounding box (optional)."}},"required":["bbox"]}}}\n'
    '</tools>\n\n# How to call a tool\nReturn a json object with function name and arguments within '
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    '</tool_call>\n\n**Example**:  \n<tool_call>  \n{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": '
    '[10, 20, 100, 200], "label": "the apple on the desk"}}  \n</tool_call>'
)
DEEPEYES_SUFFIX = ('\nThink first, call **image_zoom_in_tool** if needed, then answer. Format strictly as:  '
                   '<think>...</think>  <tool_call>...</tool_call> (if tools needed)  <answer>...</answer> ')


# ----------------------------------------------------------------------------- the turns

def system(style: str, agent_system: str, use_tool: bool) -> str:
    if not use_tool:
        return NO_TOOL_SYSTEM_PROMPT
    return DEEPEYES_SYSTEM if style == "deepeyes" else agent_system


class Data(str):
    """Text that comes from data (a question, an option, an error quoting the model's call), not from the
    template: `Agent.encode` keeps it plain text, so a control-token string in it (<|im_end|>,
    <|image_pad|>, <tool_call>, ...) can never close a turn, open an image slot or forge a tool call."""


def direct(task, direct_instruction: str | None = None) -> str:
    """The instruction of a turn with no tool: the agent's own (`Agent.direct_instruction`), else a short
    answer (the option's letter when the task has choices)."""
    if direct_instruction:
        return direct_instruction
    return DIRECT_CHOICE_INSTRUCTION if task.choices else DIRECT_INSTRUCTION


def question(style: str, task, shown_size: tuple[int, int], use_tool: bool, instruction: str,
             direct_instruction: str | None = None) -> list[str]:
    """The user text of the first turn (after the image), as parts: the template's strings and the task's
    text as `Data` ("".join gives the text). Without the tool it ends with `direct(...)`."""
    if style == "deepeyes":
        parts = ["Question: ", Data(task.question), "\n"]
        if task.choices:
            parts += ["Options: \n"] + [p for i, o in enumerate(task.choices) for p in (f"{chr(65 + i)}. ", Data(o), "\n")]
            parts.append("\n")
        return parts + [DEEPEYES_SUFFIX if use_tool else direct(task, direct_instruction)]
    parts = [Data(task.question)]
    for i, c in enumerate(task.choices or []):
        parts += [f"\n({chr(65 + i)}) ", Data(c)]
    parts.append(f"\nThe image is {shown_size[0]}x{shown_size[1]} pixels. "
                 + (instruction if use_tool else direct(task, direct_instruction)))
    return parts


def observation(style: str, result: str | tuple[int, int, int]) -> list[str | tuple[int, int, int]]:
    """The user turn's parts after a tool call: a crop (its grid, where its image block goes) or an error
    (its reason is `Data`: it may quote the model's own text)."""
    if isinstance(result, tuple):
        return ["<tool_response>", result] + ([DEEPEYES_SUFFIX] if style == "deepeyes" else []) + ["</tool_response>"]
    if style == "deepeyes":
        return ["Error: ", Data(result)]
    return ["<tool_response>Error: ", Data(result), "</tool_response>"]


def stops_at_tool_call(style: str) -> bool:
    """Does a turn stop at </tool_call> (the environment then closes it), or run to <|im_end|>?"""
    return style != "deepeyes"

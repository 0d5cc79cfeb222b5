"""The crop tool: parse a turn, validate a box, map it to the original image, cut and resize the crop.

Contract
--------
Tool call (DeepEyes' format, one JSON object between the tags):
    <tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [x1, y1, x2, y2], "label": "..."}}</tool_call>
Answer: <answer>...</answer>. Think blocks <think>...</think> are allowed and need no special
handling: their tags are ordinary text, and tags inside them count like tags anywhere else.

Boxes are (x1, y1, x2, y2) in pixels, top-left then bottom-right, continuous edge coordinates: once
made integer a box covers columns x1 <= x < x2 and rows y1 <= y < y2 (half-open). A box the model
writes is in the frame of the image it was SHOWN (the global image resized by `resize_to_budget`);
`map_box_to_original` is the one place a box changes frame, and crops are always cut from the
ORIGINAL image (DeepEyes cut shown-frame boxes from the original unscaled: wrong crops on 8K images).
Sizes are (width, height) as PIL gives them; `smart_resize` alone takes and returns (height, width),
as Qwen's does.

parse_turn(text) rules:
- The answer is the text inside the first <answer>...</answer>, stripped (may be ""). <answer> without
  </answer> is malformed and gives answer None.
- A turn holding an <answer> tag (closed or not) is an answer turn: any tool call in it is counted
  but not parsed or executed (call None, error None); with a tool call too it is malformed.
- Otherwise only the FIRST <tool_call> is considered; `n_tool_calls` counts them all and several are
  not by themselves malformed (the rollout stops sampling at the first </tool_call>, so several only
  arise for text from elsewhere). A <tool_call> without </tool_call> is an error.
- The JSON is parsed with strict `json.loads` (never eval; NaN/Infinity are not JSON). Accepted:
  whitespace and newlines anywhere JSON allows, text before/after the tags, ints or floats, extra
  fields (ignored), "arguments" as an object or as a JSON string holding an object (double-encoded),
  a missing or non-string label (-> None). Rejected, with `error` set and malformed=True: JSON that
  does not parse, a non-object, a wrong tool name, missing arguments or bbox_2d, bbox_2d not a list
  of exactly 4 finite numbers (bools and strings are not numbers).
- A turn with neither a tool call nor an answer: everything None, malformed=True.
- `error` is one sentence for the model, sent back as the tool's response; the episode goes on.

crop() validation order (the first failure is returned as a CropError; no exception escapes for any
box value): 4 finite numbers -> inverted or empty in the shown frame (x2 <= x1 or y2 <= y1) -> clamp
to [0, W_shown] x [0, H_shown] -> nothing left (box entirely outside) -> map_box_to_original ->
integer box: floor x1, y1 and ceil x2, y2 (every pixel the box touches), clamped to the original ->
too thin (min side < cfg.min_side ORIGINAL pixels) -> extreme aspect (> cfg.max_aspect) -> [cfg.snap:
grow the cut region to the snap grid] -> cut from the ORIGINAL -> resize_to_budget(cfg.min_pixels,
cfg.max_pixels), which is the identity for a snapped region of sides multiples of 28 within budget.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from numbers import Real

import numpy as np
from PIL import Image, ImageOps

TOOL_NAME = "image_zoom_in_tool"
FACTOR = 28  # Qwen2.5-VL: 14-px patches merged 2x2, so image sides are multiples of 28
TOKEN_PIXELS = FACTOR * FACTOR  # pixels per visual token: a budget of n tokens is max_pixels = n * TOKEN_PIXELS
EXPECTED = '<tool_call>{"name": "%s", "arguments": {"bbox_2d": [x1, y1, x2, y2]}}</tool_call>' % TOOL_NAME


# ----------------------------------------------------------------------------- opening and resizing

def open_image(source) -> Image.Image:
    """THE one way an image file is opened, as transformers' and qwen_vl_utils' pipelines see it: decoded
    in full (a truncated file raises here), EXIF orientation applied, 16-bit samples scaled to 8-bit,
    alpha composited onto white, RGB."""
    with Image.open(source) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):            # 16-bit grey (PIL reads PNGs as "I")
        im = Image.fromarray((np.asarray(im, dtype=np.uint32) // 257).clip(0, 255).astype(np.uint8), "L")
    return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """`im` as RGB, any transparency composited onto white (as transformers' image processors do); always a
    new image."""
    if "A" in im.getbands() or "transparency" in im.info:
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
    return im.convert("RGB")


def image_size(path: str) -> tuple[int, int]:
    """(width, height) of an image file as `open_image` returns it (EXIF rotations swap the sides), from
    its header alone."""
    with Image.open(path) as im:
        w, h = im.size
        turned = im.getexif().get(0x0112) in (5, 6, 7, 8)              # the orientation tag: a quarter turn
    return (h, w) if turned else (w, h)


def smart_resize(height: int, width: int, factor: int = FACTOR, min_pixels: int = 56 * 56,
                 max_pixels: int = 1280 * 28 * 28) -> tuple[int, int]:
    """Qwen2.5-VL's resize rule (as transformers' Qwen2VL image processor): (height, width) in pixels ->
    (new_height, new_width), both multiples of `factor`, h*w within [min_pixels, max_pixels], aspect
    kept as closely as possible. Each side is rounded to the nearest multiple (Python's round: ties to
    even); over budget both sides scale by 1/beta, beta = sqrt(h*w / max_pixels), floored to multiples
    (at least `factor`); under it they scale by beta = sqrt(min_pixels / (h*w)) and are ceiled."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image sides must be positive, got height={height}, width={width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be at most 200, got {max(height, width) / min(height, width):.1f}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


RESAMPLE = {"bicubic": Image.BICUBIC, "box": Image.BOX}


def resize_to_budget(image: Image.Image, min_pixels: int, max_pixels: int, resample: str = "bicubic") -> Image.Image:
    """`image` as RGB at its smart_resize size; an unchanged copy when already that size.
    "bicubic" is what Qwen's image processor uses; "box" (area averaging) is what the toy world uses for
    its global image, since bicubic's ringing at the edges of a 1-px pattern leaks the pattern."""
    h, w = smart_resize(image.height, image.width, FACTOR, min_pixels, max_pixels)
    rgb = to_rgb(image)  # always a new image
    return rgb if rgb.size == (w, h) else rgb.resize((w, h), RESAMPLE[resample])


# ----------------------------------------------------------------------------- parsing

@dataclass(frozen=True)
class ToolCall:
    box: tuple[float, float, float, float]   # as written by the model, in the SHOWN frame, pixels
    label: str | None = None


@dataclass(frozen=True)
class Turn:
    """What one assistant turn says."""
    answer: str | None        # text inside the first <answer>...</answer>, stripped; None if absent
    call: ToolCall | None     # the tool call to execute, None if none or invalid
    error: str | None         # text to send back to the model when a tool call was attempted but is invalid
    malformed: bool           # the turn counts as a format error (reward format = -1)
    n_tool_calls: int         # how many <tool_call> blocks the text holds


def _short(value, limit: int = 60) -> str:
    """A JSON-ish rendering of a parsed value for an error message, cut to `limit` characters."""
    try:
        s = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):  # not JSON-able, NaN, a huge int, deep nesting
        try:
            s = repr(value)
        except (ValueError, RecursionError):
            s = f"a {type(value).__name__}"
    return s if len(s) <= limit else s[:limit] + "..."


def _finite(v) -> float | None:
    """float(v) if v is a real, finite number (not a bool, not a string), else None."""
    if isinstance(v, bool) or not isinstance(v, Real):
        return None
    try:
        f = float(v)
    except (OverflowError, ValueError, TypeError):
        return None
    return f if math.isfinite(f) else None


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _parse_call(body: str) -> ToolCall | str:
    """The JSON between <tool_call> and </tool_call> -> ToolCall, or an error sentence for the model."""
    def bad(problem: str) -> str:
        return f"Invalid tool call: {problem}; write exactly {EXPECTED} with pixel coordinates."
    try:
        obj = json.loads(body, parse_constant=_no_constants)
    except json.JSONDecodeError as e:
        return bad(f"the text between the tags is not valid JSON ({e.msg} at character {e.pos})")
    except ValueError as e:  # NaN/Infinity, or an int over Python's digit limit
        return bad(f"the text between the tags is not valid JSON ({str(e).split(':')[0][:80]})")
    except RecursionError:
        return bad("the text between the tags is not valid JSON (nested too deeply)")
    if not isinstance(obj, dict):
        return bad(f"expected a JSON object, got {_short(obj)}")
    if obj.get("name") != TOOL_NAME:
        return bad(f'unknown tool name {_short(obj.get("name"))}, the only tool is "{TOOL_NAME}"')
    args = obj.get("arguments")
    if isinstance(args, str):  # some models double-encode the arguments
        try:
            args = json.loads(args, parse_constant=_no_constants)
        except (ValueError, RecursionError):
            return bad('"arguments" is a string that does not hold a JSON object')
    if not isinstance(args, dict):
        return bad('"arguments" is missing or not an object')
    if "bbox_2d" not in args:
        return bad('"bbox_2d" is missing from "arguments"')
    raw = args["bbox_2d"]
    box = [_finite(v) for v in raw] if isinstance(raw, list) and len(raw) == 4 else None
    if box is None or None in box:
        return bad(f'"bbox_2d" must be a list of 4 finite numbers, got {_short(raw)}')
    label = args.get("label")
    return ToolCall(tuple(box), label if isinstance(label, str) else None)


def parse_turn(text: str) -> Turn:
    """One assistant turn's text -> Turn, by the rules in the module docstring."""
    n_calls = text.count("<tool_call>")
    a = text.find("<answer>")
    if a >= 0:  # an answer turn: the answer wins over any tool call
        b = text.find("</answer>", a + len("<answer>"))
        answer = text[a + len("<answer>"):b].strip() if b >= 0 else None
        return Turn(answer, None, None, b < 0 or n_calls > 0, n_calls)
    if n_calls == 0:
        return Turn(None, None, None, True, 0)
    start = text.find("<tool_call>") + len("<tool_call>")
    end = text.find("</tool_call>", start)
    if end < 0:
        err = f"Invalid tool call: <tool_call> is not closed by </tool_call>; write exactly {EXPECTED}."
        return Turn(None, None, err, True, n_calls)
    parsed = _parse_call(text[start:end])
    if isinstance(parsed, str):
        return Turn(None, None, parsed, True, n_calls)
    return Turn(None, parsed, None, False, n_calls)


def _num(v: float) -> int | float:
    return int(v) if float(v).is_integer() and abs(v) < 2**53 else float(v)


def format_tool_call(box, label: str | None = None) -> str:
    """The canonical tool-call text for `box` (shown frame, pixels); integral values are written as ints.
    A label holding a tool-call tag is refused: the tag would end or start a call when parsed."""
    vals = [_finite(v) for v in box]
    if len(vals) != 4 or None in vals:
        raise ValueError(f"box must be 4 finite numbers, got {box!r}")
    if label is not None and ("<tool_call>" in label or "</tool_call>" in label):
        raise ValueError(f"label must not hold a tool-call tag, got {label!r}")
    args = {"bbox_2d": [_num(v) for v in vals]}
    if label is not None:
        args["label"] = label
    return "<tool_call>" + json.dumps({"name": TOOL_NAME, "arguments": args}, ensure_ascii=False) + "</tool_call>"


# ----------------------------------------------------------------------------- cropping

def map_box_to_original(box, shown_size: tuple[int, int],
                        original_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """THE one place a box changes frame: shown-frame pixels -> original-frame pixels, x scaled by
    W_orig / W_shown and y by H_orig / H_shown (sizes (width, height)). Pure float arithmetic, no
    clamping, no rounding; multiplying before dividing keeps integer results exact."""
    (ws, hs), (wo, ho) = shown_size, original_size
    x1, y1, x2, y2 = (float(v) for v in box)
    return (x1 * wo / ws, y1 * ho / hs, x2 * wo / ws, y2 * ho / hs)


@dataclass(frozen=True)
class CropConfig:
    min_side: int = 28            # minimum box side, in ORIGINAL pixels, after mapping and clamping
    max_aspect: float = 100.0     # reject boxes whose long/short side ratio exceeds this
    min_pixels: int = 56 * 56     # crop pixel budget: the cut region is resized with smart_resize to this budget
    max_pixels: int = 1280 * 28 * 28
    resample: str = "bicubic"     # how a cut region is resized to the budget: "bicubic" (Qwen's) or "box"
    snap: int = 0                 # > 0: grow the cut region outward to multiples of `snap` original pixels, so a
                                  # region within the budget is shown at native resolution (no resampling) and
                                  # every crop sees the pixel grid in the same phase (the toy's 1-px patterns need it)


@dataclass(frozen=True)
class Crop:
    image: Image.Image                            # the crop as the model will see it (resized to the crop budget)
    box_shown: tuple[float, float, float, float]  # the box the model wrote, clamped to the shown frame
    box_original: tuple[int, int, int, int]       # integer, half-open, in the original image: the box asked for
    cut: tuple[int, int, int, int]                # the region actually cut (= box_original unless cfg.snap)


@dataclass(frozen=True)
class CropError:
    reason: str    # one sentence for the model


def _fmt_box(vals) -> str:
    return "[" + ", ".join(str(_num(v)) if math.isfinite(v) else str(v) for v in vals) + "]"


def crop(original: Image.Image, box, shown_size: tuple[int, int], cfg: CropConfig = CropConfig()) -> Crop | CropError:
    """Validate `box` (shown frame, pixels), map it to the original, cut there, resize to the crop budget.
    Returns a CropError, never raises, for any box value; the order of checks is in the module docstring."""
    ws, hs = shown_size
    frame = f"boxes are [x1, y1, x2, y2] in pixels of the {ws}x{hs} image you were shown"
    try:
        vals = [_finite(v) for v in box] if not isinstance(box, (str, bytes)) and len(box) == 4 else None
    except TypeError:  # no len(), or not iterable
        vals = None
    if vals is None or None in vals:
        return CropError(f"bbox_2d must be 4 finite numbers, got {_short(box if vals is None else list(box))}; "
                         f"{frame}.")
    x1, y1, x2, y2 = vals
    written = _fmt_box(vals)
    if x2 <= x1 or y2 <= y1:
        what = "inverted" if x2 < x1 or y2 < y1 else "empty"
        axis = "x2 < x1" if x2 < x1 else "y2 < y1" if y2 < y1 else "x2 == x1" if x2 == x1 else "y2 == y1"
        return CropError(f"bbox_2d {written} is {what} ({axis}); {frame}.")
    shown = (min(max(x1, 0.0), ws), min(max(y1, 0.0), hs), min(max(x2, 0.0), ws), min(max(y2, 0.0), hs))
    if shown[2] <= shown[0] or shown[3] <= shown[1]:
        return CropError(f"bbox_2d {written} lies entirely outside the {ws}x{hs} image you were shown; "
                         f"boxes are [x1, y1, x2, y2] in its pixels.")
    wo, ho = original.size
    fx1, fy1, fx2, fy2 = map_box_to_original(shown, shown_size, original.size)
    X1, Y1 = max(0, math.floor(fx1)), max(0, math.floor(fy1))
    X2, Y2 = min(wo, math.ceil(fx2)), min(ho, math.ceil(fy2))
    w, h = X2 - X1, Y2 - Y1
    if min(w, h) < cfg.min_side:
        return CropError(f"bbox_2d {written} is too small to zoom into ({w}x{h} pixels at full resolution, the "
                         f"minimum side is {cfg.min_side}); draw a larger box ({frame}).")
    if max(w, h) / min(w, h) > cfg.max_aspect:
        return CropError(f"bbox_2d {written} is too elongated (aspect ratio {max(w, h) / min(w, h):.1f} > "
                         f"{cfg.max_aspect:g}); draw a box closer to square ({frame}).")
    cut = (X1, Y1, X2, Y2)
    if cfg.snap > 0:
        s = cfg.snap
        cut = (X1 // s * s, Y1 // s * s, min(wo, -(-X2 // s) * s), min(ho, -(-Y2 // s) * s))
    try:
        image = resize_to_budget(original.crop(cut), cfg.min_pixels, cfg.max_pixels, cfg.resample)
    except ValueError as e:  # only if cfg allows an aspect ratio smart_resize refuses (> 200)
        return CropError(f"bbox_2d {written} cannot be resized for viewing ({e}); {frame}.")
    return Crop(image, shown, (X1, Y1, X2, Y2), cut)


def execute(call: ToolCall, original: Image.Image, shown_size: tuple[int, int],
            cfg: CropConfig = CropConfig()) -> Crop | CropError:
    """Run a parsed tool call: `crop(original, call.box, shown_size, cfg)`."""
    return crop(original, call.box, shown_size, cfg)

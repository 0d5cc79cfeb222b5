"""Tests for crop_tool.py: Qwen's resize rule, the parse rules (one case each), the one frame mapping
(the DeepEyes 8K bug), clamping, every rejection, crop sizes, and a seeded fuzz of parse -> execute."""
import json
import math
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

import crop_tool
from crop_tool import CropConfig, CropError, Crop, ToolCall, Turn, crop, execute, parse_turn

BUDGET_1K, BUDGET_DEFAULT = 1024 * 28 * 28, 1280 * 28 * 28


# ----------------------------------------------------------------------------- smart_resize

@pytest.mark.parametrize("hw, kw, expected", [
    # within budget: each side rounded to the nearest multiple of 28 (336 = 12*28, 448 = 16*28)
    ((336, 448), {}, (336, 448)),
    # ties go to even, as Python's round: 42/28 = 1.5 -> 2 -> 56, 70/28 = 2.5 -> 2 -> 56; 56*56 = min_pixels
    ((42, 70), {}, (56, 56)),
    # under min_pixels: 28*28 < 3136, beta = sqrt(3136/600) = 2.286; 20*2.286/28 = 1.63 -> ceil 2 -> 56,
    # 30*2.286/28 = 2.45 -> ceil 3 -> 84
    ((20, 30), {}, (56, 84)),
    # 8K at the default budget: 4312*7672 > 1003520, beta = sqrt(33177600/1003520) = 5.750;
    # 4320/5.750/28 = 26.8 -> 26*28 = 728; 7680/5.750/28 = 47.7 -> 47*28 = 1316
    ((4320, 7680), {}, (728, 1316)),
    # 8K at 1K tokens: beta = sqrt(33177600/802816) = 45/7; 4320*7/45 = 672 = 24*28; 7680*7/45/28 = 42.7 -> 1176
    ((4320, 7680), {"max_pixels": BUDGET_1K}, (672, 1176)),
    # square over budget: beta = sqrt(4e6/1003520) = 1.9965; 2000/1.9965/28 = 35.8 -> 35*28 = 980
    ((2000, 2000), {}, (980, 980)),
    # the short side floors to 0 and is lifted to one factor, so the budget is exceeded (as Qwen's):
    # beta = sqrt(150000/78400) = 1.383; 30/1.383/28 = 0.77 -> 0 -> 28; 5000/1.383/28 = 129.1 -> 3612
    ((30, 5000), {"max_pixels": 100 * 784}, (28, 3612)),
])
def test_smart_resize_hand_computed(hw, kw, expected):
    assert crop_tool.smart_resize(*hw, **kw) == expected


@pytest.mark.parametrize("hw", [(0, 10), (10, 0), (-5, 10), (1, 201), (402, 2)])
def test_smart_resize_rejects_bad_sizes(hw):
    with pytest.raises(ValueError):
        crop_tool.smart_resize(*hw)


SIDES = [7, 28, 100, 333, 1000, 2160, 4320, 8000]
BUDGETS = [(56 * 56, BUDGET_1K), (56 * 56, 16384 * 784), (256 * 784, BUDGET_DEFAULT), (4 * 784, 64 * 784)]


def test_smart_resize_grid_multiples_budget_and_aspect():
    for h in SIDES:
        for w in SIDES:
            if max(h, w) / min(h, w) > 50:
                continue
            for lo, hi in BUDGETS:
                nh, nw = crop_tool.smart_resize(h, w, min_pixels=lo, max_pixels=hi)
                assert nh % 28 == 0 and nw % 28 == 0 and nh >= 28 and nw >= 28, (h, w, lo, hi)
                assert lo <= nh * nw <= hi, (h, w, lo, hi, nh, nw)
                # aspect kept: one scale k brings both sides within one factor of the result
                # (k lies in [(nh-28)/h, (nh+28)/h] and in [(nw-28)/w, (nw+28)/w])
                assert max((nh - 28) / h, (nw - 28) / w) <= min((nh + 28) / h, (nw + 28) / w), (h, w, nh, nw)


def test_smart_resize_agrees_with_transformers():
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as mod
    for h in SIDES + [42, 70, 755, 1288]:
        for w in SIDES + [42, 70, 755, 1288]:
            if max(h, w) / min(h, w) > 200:
                continue
            for lo, hi in BUDGETS:
                assert crop_tool.smart_resize(h, w, 28, lo, hi) == mod.smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


def test_resize_to_budget_rgb_size_and_unchanged_copy():
    rgba = Image.new("RGBA", (300, 200), (10, 20, 30, 255))
    out = crop_tool.resize_to_budget(rgba, 56 * 56, BUDGET_DEFAULT)
    assert out.mode == "RGB" and out.size == (308, 196)   # 300/28 = 10.7 -> 11*28, 200/28 = 7.1 -> 7*28
    same = Image.fromarray(np.random.default_rng(0).integers(0, 255, (84, 112, 3), dtype=np.uint8))
    copy = crop_tool.resize_to_budget(same, 56 * 56, BUDGET_DEFAULT)
    assert copy is not same and copy.size == (112, 84)
    assert np.array_equal(np.asarray(copy), np.asarray(same))


# ----------------------------------------------------------------------------- parse_turn

def call_text(body: str) -> str:
    return f"<tool_call>{body}</tool_call>"


def args(**a) -> str:
    return json.dumps({"name": crop_tool.TOOL_NAME, "arguments": a})


GOOD = call_text(args(bbox_2d=[10, 20, 30, 40]))
BOX = (10.0, 20.0, 30.0, 40.0)

ACCEPTED = [  # (id, text, box, label)
    ("canonical", GOOD, BOX, None),
    ("whitespace_newlines", '<tool_call>\n  {\n  "name" :  "image_zoom_in_tool" ,\n  "arguments": {"bbox_2d": [ 10 ,'
     ' 20,\n 30 , 40 ]}\n}\n\n</tool_call>\n', BOX, None),
    ("floats_and_ints", call_text(args(bbox_2d=[10.5, 20, 30.25, 4e1])), (10.5, 20.0, 30.25, 40.0), None),
    ("extra_fields_ignored", call_text(json.dumps({"name": crop_tool.TOOL_NAME, "id": 7, "arguments": {
        "bbox_2d": [10, 20, 30, 40], "zoom": 2, "label": "sign"}})), BOX, "sign"),
    ("text_before_after", "I need a closer look.\n" + GOOD + " and then I will answer.", BOX, None),
    ("double_encoded_arguments", call_text(json.dumps({"name": crop_tool.TOOL_NAME,
                                                       "arguments": json.dumps({"bbox_2d": [10, 20, 30, 40]})})), BOX, None),
    ("label_missing", GOOD, BOX, None),
    ("label_not_a_string", call_text(args(bbox_2d=[10, 20, 30, 40], label=123)), BOX, None),
    ("label_unicode", call_text(args(bbox_2d=[10, 20, 30, 40], label="红色 \"sign\"")), BOX, "红色 \"sign\""),
    ("think_block", "<think>The text on the sign is too small.</think>\n" + GOOD, BOX, None),
]


@pytest.mark.parametrize("text, box, label", [c[1:] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_parse_accepts(text, box, label):
    t = parse_turn(text)
    assert t == Turn(answer=None, call=ToolCall(box, label), error=None, malformed=False, n_tool_calls=1)


REJECTED = [  # (id, text, words the error must contain)
    ("not_json", call_text("{bad json"), "not valid JSON"),
    ("python_literal_not_json", call_text("{'name': 'image_zoom_in_tool', 'arguments': {'bbox_2d': [1, 2, 3, 4]}}"),
     "not valid JSON"),
    ("nan_is_not_json", call_text('{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [NaN, 2, 3, 4]}}'),
     "not valid JSON"),
    ("top_level_list", call_text("[10, 20, 30, 40]"), "expected a JSON object"),
    ("wrong_name", call_text('{"name": "zoom_in", "arguments": {"bbox_2d": [1, 2, 3, 4]}}'), '"zoom_in"'),
    ("missing_name", call_text('{"arguments": {"bbox_2d": [1, 2, 3, 4]}}'), "unknown tool name"),
    ("missing_arguments", call_text('{"name": "image_zoom_in_tool"}'), '"arguments" is missing'),
    ("arguments_string_not_object", call_text(json.dumps({"name": crop_tool.TOOL_NAME, "arguments": "[1, 2, 3, 4]"})),
     '"arguments" is missing or not an object'),
    ("arguments_string_not_json", call_text(json.dumps({"name": crop_tool.TOOL_NAME, "arguments": "bbox 1 2 3 4"})),
     "does not hold a JSON object"),
    ("missing_bbox", call_text(args(box=[1, 2, 3, 4])), '"bbox_2d" is missing'),
    ("three_numbers", call_text(args(bbox_2d=[1, 2, 3])), "4 finite numbers"),
    ("five_numbers", call_text(args(bbox_2d=[1, 2, 3, 4, 5])), "4 finite numbers"),
    ("numbers_as_strings", call_text(args(bbox_2d=["1", "2", "3", "4"])), "4 finite numbers"),
    ("bools", call_text(args(bbox_2d=[True, 2, 3, 4])), "4 finite numbers"),
    ("bbox_a_string", call_text(args(bbox_2d="1, 2, 3, 4")), "4 finite numbers"),
    ("nested_lists", call_text(args(bbox_2d=[[1, 2], [3, 4]])), "4 finite numbers"),
    ("overflow_to_inf", call_text('{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1e999, 2, 3, 4]}}'),
     "4 finite numbers"),
    ("unclosed_tool_call", GOOD.removesuffix("</tool_call>"), "not closed by </tool_call>"),
]


@pytest.mark.parametrize("text, words", [c[1:] for c in REJECTED], ids=[c[0] for c in REJECTED])
def test_parse_rejects_with_a_reason(text, words):
    t = parse_turn(text)
    assert t.answer is None and t.call is None and t.malformed and t.n_tool_calls == 1
    assert words in t.error
    # one sentence that shows the expected format
    assert crop_tool.EXPECTED in t.error and "\n" not in t.error and t.error.endswith(".")


@pytest.mark.parametrize("text, expected", [
    ("<think>easy</think><answer> B </answer>", Turn("B", None, None, False, 0)),
    ("<answer>A</answer> then <answer>B</answer>", Turn("A", None, None, False, 0)),   # the first answer
    ("<answer></answer>", Turn("", None, None, False, 0)),                            # empty, not absent
    # both: the answer wins, the call is not executed, the turn is malformed (either order)
    ("<answer>B</answer>" + GOOD, Turn("B", None, None, True, 1)),
    (GOOD + "<answer>B</answer>", Turn("B", None, None, True, 1)),
    ("<answer>B</answer>" + call_text("{bad"), Turn("B", None, None, True, 1)),
    # an unclosed answer: malformed, no answer, and any tool call beside it is not executed
    ("<answer>B", Turn(None, None, None, True, 0)),
    ("<answer>B " + GOOD, Turn(None, None, None, True, 1)),
    # neither: ends the episode as a format error
    ("I think it is red.", Turn(None, None, None, True, 0)),
    ("<think>long thoughts</think>", Turn(None, None, None, True, 0)),
    ("", Turn(None, None, None, True, 0)),
    ("stray </tool_call> and </answer>", Turn(None, None, None, True, 0)),
    # several calls: only the first is considered; not malformed by itself
    (GOOD + call_text(args(bbox_2d=[0, 0, 5, 5])), Turn(None, ToolCall(BOX), None, False, 2)),
    (GOOD + call_text("{bad"), Turn(None, ToolCall(BOX), None, False, 2)),
])
def test_parse_answer_and_counting_rules(text, expected):
    assert parse_turn(text) == expected


def test_parse_several_calls_first_invalid_is_the_one_considered():
    t = parse_turn(call_text("{bad") + GOOD)
    assert t.call is None and t.malformed and t.n_tool_calls == 2 and "not valid JSON" in t.error


def test_parse_nested_tags_are_invalid_json():
    t = parse_turn("<tool_call>" + GOOD + "</tool_call>")
    assert t.call is None and t.malformed and t.n_tool_calls == 2 and "not valid JSON" in t.error


# ----------------------------------------------------------------------------- format_tool_call

def test_format_tool_call_canonical_text():
    assert crop_tool.format_tool_call([10, 20, 30, 40], "sign") == (
        '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 30, 40], "label": "sign"}}'
        "</tool_call>")
    assert crop_tool.format_tool_call((10.0, 20, 30.5, 40)) == (
        '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 30.5, 40]}}</tool_call>')


@pytest.mark.parametrize("box, label", [
    ([0, 0, 1, 1], None), ([10, 20, 110, 220], "red box"), ((0.125, 3.5, 1e6, 2.75), "引号 \"q\" \\ }]?"),
    (np.array([1, 2, 3, 4]), ""),
])
def test_format_tool_call_round_trips(box, label):
    t = parse_turn(crop_tool.format_tool_call(box, label))
    assert t == Turn(None, ToolCall(tuple(float(v) for v in box), label), None, False, 1)


@pytest.mark.parametrize("box, label", [([1, 2, 3], None), ([1, 2, 3, float("nan")], None), ([1, 2, 3, "4"], None),
                                        ([True, 2, 3, 4], None), ([1, 2, 3, 4], "a </tool_call> b")])
def test_format_tool_call_refuses_what_would_not_round_trip(box, label):
    with pytest.raises(ValueError):
        crop_tool.format_tool_call(box, label)


# ----------------------------------------------------------------------------- frames: the DeepEyes 8K bug

def test_map_box_to_original_scales_each_axis_and_does_not_clamp():
    assert crop_tool.map_box_to_original((10, 20, 30, 40), (100, 50), (300, 200)) == (30.0, 80.0, 90.0, 160.0)
    assert crop_tool.map_box_to_original((-10, 0, 150, 60), (100, 50), (300, 200)) == (-30.0, 0.0, 450.0, 240.0)
    assert crop_tool.map_box_to_original((1316, 728, 0, 0), (1316, 728), (7680, 4320)) == (7680.0, 4320.0, 0.0, 0.0)


def test_8k_crop_is_cut_from_the_original_after_rescaling():
    """Original 7680x4320 shown at 1316x728 (smart_resize at 1280 tokens): factors 5.836 and 5.934, not integers.
    A red marker sits in the original at x [4900, 5140), y [3000, 3120); in the shown frame that is
    x [839.7, 880.8), y [505.6, 525.8), so the model writes [839, 505, 881, 526]. A blue decoy sits where
    DeepEyes' bug (the shown-frame box cut from the original, unscaled) would look."""
    W, H = 7680, 4320
    shown_size = crop_tool.smart_resize(H, W)[::-1]
    assert shown_size == (1316, 728)
    original = Image.new("RGB", (W, H), (128, 128, 128))
    draw = ImageDraw.Draw(original)
    draw.rectangle([4900, 3000, 5139, 3119], fill=(255, 0, 0))    # PIL's rectangle includes both corners
    draw.rectangle([839, 505, 880, 525], fill=(0, 0, 255))
    box = [839, 505, 881, 526]
    out = crop(original, box, shown_size)
    assert isinstance(out, Crop)
    # by hand: 839*7680/1316 = 4896.29 -> floor 4896; 505*4320/728 = 2996.70 -> floor 2996;
    #          881*7680/1316 = 5141.40 -> ceil 5142;  526*4320/728 = 3121.32 -> ceil 3122
    assert out.box_original == (4896, 2996, 5142, 3122)
    assert out.box_shown == (839.0, 505.0, 881.0, 526.0)
    # the cut is 246x126: smart_resize(126, 246) = (112, 252) (126/28 = 4.5 ties to 4, 246/28 = 8.8 -> 9)
    assert out.image.size == (252, 112)
    px = np.asarray(out.image).astype(int)
    red = (px[..., 0] > 200) & (px[..., 1] < 60) & (px[..., 2] < 60)
    assert red[56, 126] and red.mean() > 0.85                     # the marker fills the crop
    assert not ((px[..., 2] > 200) & (px[..., 0] < 60)).any()     # and the decoy is nowhere in it
    # the bug, for contrast: the same box cut from the original without rescaling shows only the decoy
    buggy = np.asarray(original.crop(tuple(box))).astype(int)
    assert (buggy[..., 0] < 60).all() and not (buggy[..., 0] > 200).any()


# ----------------------------------------------------------------------------- clamping and rejections

def checker(w, h):
    """An image whose pixel (x, y) encodes its position: R = x % 256, G = y % 256."""
    xs, ys = np.meshgrid(np.arange(w), np.arange(h))
    return Image.fromarray(np.stack([xs % 256, ys % 256, np.zeros_like(xs)], -1).astype(np.uint8))


ORIG_2X = checker(896, 672)   # shown at 448x336: exactly 2x, so expectations are easy to compute
SHOWN_2X = (448, 336)


@pytest.mark.parametrize("box, shown, original", [
    ([-20, -10, 100, 80], (0, 0, 100, 80), (0, 0, 200, 160)),
    ([400, 300, 500, 400], (400, 300, 448, 336), (800, 600, 896, 672)),
    ([-1e9, 100, 1e9, 200], (0, 100, 448, 200), (0, 200, 896, 400)),
    ([10.4, 20.6, 99.2, 80.1], (10.4, 20.6, 99.2, 80.1), (20, 41, 199, 161)),  # floor 20.8, 41.2; ceil 198.4, 160.2
])
def test_crop_clamps_to_the_shown_frame(box, shown, original):
    out = crop(ORIG_2X, box, SHOWN_2X)
    assert isinstance(out, Crop)
    assert out.box_shown == pytest.approx(shown) and out.box_original == original


@pytest.mark.parametrize("box, words", [
    ([50, 10, 20, 40], "is inverted (x2 < x1)"),
    ([10, 50, 40, 20], "is inverted (y2 < y1)"),
    ([10, 10, 10, 40], "is empty (x2 == x1)"),
    ([10, 10, 40, 10], "is empty (y2 == y1)"),
    ([448, 0, 500, 40], "entirely outside the 448x336 image"),
    ([-50, -50, -10, -10], "entirely outside the 448x336 image"),
    ([0, 0, 13, 200], "too small to zoom into (26x400 pixels at full resolution"),   # 13 shown px = 26 original px
    ([440, 0, 500, 200], "too small to zoom into (16x400 pixels"),                   # clamped first: 440..448
    ([float("nan"), 0, 10, 10], "must be 4 finite numbers"),
    ([0, 0, float("inf"), 10], "must be 4 finite numbers"),
    ([0, 0, 10], "must be 4 finite numbers"),
    ("0, 0, 10, 10", "must be 4 finite numbers"),
    (None, "must be 4 finite numbers"),
    ([0, 0, "10", 10], "must be 4 finite numbers"),
    ([0, 0, 10**400, 10], "must be 4 finite numbers"),
])
def test_crop_rejections_have_useful_reasons(box, words):
    out = crop(ORIG_2X, box, SHOWN_2X)
    assert isinstance(out, CropError) and words in out.reason, out
    assert "448x336" in out.reason and "\n" not in out.reason and out.reason.endswith(".")


def test_min_side_is_in_original_pixels():
    # 14 shown px = 28 original px: accepted at 2x; the same box on an unscaled image is too thin
    assert isinstance(crop(ORIG_2X, [0, 0, 14, 100], SHOWN_2X), Crop)
    thin = crop(checker(448, 336), [0, 0, 14, 100], SHOWN_2X)
    assert isinstance(thin, CropError) and "14x100" in thin.reason


def test_extreme_aspect_is_rejected():
    wide = checker(3000, 100)
    assert isinstance(crop(wide, [0, 0, 2800, 28], (3000, 100)), Crop)          # exactly 100: allowed
    out = crop(wide, [0, 0, 2900, 28], (3000, 100))
    assert isinstance(out, CropError) and "aspect ratio 103.6 > 100" in out.reason
    loose = CropConfig(max_aspect=1000)                                          # smart_resize refuses > 200
    out = crop(checker(6000, 100), [0, 0, 6000, 28], (6000, 100), loose)
    assert isinstance(out, CropError) and "cannot be resized" in out.reason


def test_crop_pixels_come_from_the_original_and_size_follows_the_budget():
    orig = checker(448, 336)
    out = crop(orig, [28, 56, 140, 140], (448, 336))        # 112x84, multiples of 28: cut, not resized
    assert out.image.size == (112, 84)
    assert np.array_equal(np.asarray(out.image), np.asarray(orig)[56:140, 28:140])
    big = checker(896, 672)                                  # shown at half size: boxes map x2, pixels still exact
    out = crop(big, [14, 28, 70, 70], (448, 336))
    assert out.box_original == (28, 56, 140, 140) and out.image.size == (112, 84)
    assert np.array_equal(np.asarray(out.image), np.asarray(big)[56:140, 28:140])
    rng, crops = random.Random(0), 0
    for cfg in [CropConfig(), CropConfig(min_pixels=16 * 784, max_pixels=64 * 784), CropConfig(min_side=1)]:
        for _ in range(50):
            x1, y1 = rng.uniform(-50, 400), rng.uniform(-50, 300)
            box = [x1, y1, x1 + rng.uniform(1, 300), y1 + rng.uniform(1, 300)]
            out = crop(ORIG_2X, box, SHOWN_2X, cfg)
            if isinstance(out, Crop):
                crops += 1
                X1, Y1, X2, Y2 = out.box_original
                assert 0 <= X1 < X2 <= 896 and 0 <= Y1 < Y2 <= 672
                h, w = crop_tool.smart_resize(Y2 - Y1, X2 - X1, 28, cfg.min_pixels, cfg.max_pixels)
                assert out.image.size == (w, h) and out.image.mode == "RGB"
    assert crops > 120, crops                                # 140 of the 150 boxes crop: the loop checks something


def test_execute_is_crop_of_the_call():
    call = parse_turn(crop_tool.format_tool_call([10, 20, 110, 220])).call
    a, b = execute(call, ORIG_2X, SHOWN_2X), crop(ORIG_2X, [10, 20, 110, 220], SHOWN_2X)
    assert a.box_original == b.box_original == (20, 40, 220, 440)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


# ----------------------------------------------------------------------------- fuzz

def _mutate(rng: random.Random, s: str) -> str:
    pieces = ["<tool_call>", "</tool_call>", "<answer>", "</answer>", "<think>", "{", "}", "[", "]", '"',
              ",", ":", "-", "1e999", "NaN", "\\", "\n", "\x00", "\ud800", "é", "9" * 30]
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(s) + 1)
        op = rng.random()
        if op < 0.3:
            s = s[:i] + s[i + rng.randint(1, 5):]
        elif op < 0.7:
            s = s[:i] + rng.choice(pieces) + s[i:]
        else:
            s = s[:i] + chr(rng.randrange(32, 0x3000)) + s[i + 1:]
    return s


def _random_value(rng: random.Random, depth: int = 0):
    kinds = ["int", "float", "big", "str", "bool", "none", "list", "dict"] if depth < 3 else ["int", "float", "str"]
    k = rng.choice(kinds)
    return {"int": lambda: rng.randint(-10**6, 10**6), "float": lambda: rng.uniform(-1e4, 1e4),
            "big": lambda: rng.choice([10**300, -10**400, 1e308, 2**63]), "str": lambda: str(rng.randint(0, 500)),
            "bool": lambda: rng.random() < 0.5, "none": lambda: None,
            "list": lambda: [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))],
            "dict": lambda: {"bbox_2d": _random_value(rng, depth + 1)}}[k]()


def _fuzz_texts(n: int, seed: int = 0):
    rng = random.Random(seed)
    valid = [crop_tool.format_tool_call([rng.randint(-20, 60), rng.randint(-20, 40), rng.randint(-20, 80),
                                         rng.randint(-20, 60)], rng.choice([None, "x"])) for _ in range(50)]
    for i in range(n):
        k = i % 8
        if k == 0:
            yield "".join(chr(rng.randrange(0, 0x110000)) for _ in range(rng.randint(0, 80)))
        elif k == 1:
            yield bytes(rng.randrange(256) for _ in range(rng.randint(0, 80))).decode("latin-1")
        elif k == 2:
            v = rng.choice(valid)
            yield v[:rng.randrange(len(v) + 1)]
        elif k in (3, 4):
            yield _mutate(rng, rng.choice(valid) + rng.choice(["", "<answer>A</answer>", "<think>hm</think>"]))
        elif k == 5:
            yield call_text(json.dumps({"name": crop_tool.TOOL_NAME, "arguments": {"bbox_2d": _random_value(rng)}}))
        elif k == 6:
            depth = rng.choice([10, 500, 5000, 100000])
            yield call_text(rng.choice(["[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth,
                                        "[" * depth, '{"name": "image_zoom_in_tool", "arguments": ' * depth]))
        else:
            inner = rng.choice(valid)
            yield rng.choice([f"<tool_call>{inner}</tool_call>", f"<answer>{inner}</answer>", "<answer><tool_call>x"
                              "</answer></tool_call>", call_text(args(bbox_2d=["1e3", "2", "3", "4"])),
                              call_text('{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [%s, 0, 1, 1]}}'
                                        % ("9" * rng.choice([20, 400, 5000]))), inner * rng.randint(2, 4)])


def test_fuzz_parse_then_execute_never_raises():
    small, shown = checker(64, 48), (32, 24)
    cfg = CropConfig(min_side=4)
    n_crops = n_calls = 0
    for text in _fuzz_texts(4000):
        t = parse_turn(text)
        assert isinstance(t, Turn) and isinstance(t.malformed, bool)
        assert t.n_tool_calls == text.count("<tool_call>")
        assert t.answer is None or isinstance(t.answer, str)
        assert t.error is None or (isinstance(t.error, str) and t.malformed and t.call is None)
        assert not (t.answer is not None and t.call is not None)
        if t.call is None:
            continue
        n_calls += 1
        assert len(t.call.box) == 4 and all(type(v) is float and math.isfinite(v) for v in t.call.box)
        assert t.call.label is None or isinstance(t.call.label, str)
        out = execute(t.call, small, shown, cfg)
        assert isinstance(out, (Crop, CropError))
        if isinstance(out, Crop):
            n_crops += 1
            X1, Y1, X2, Y2 = out.box_original
            assert all(type(v) is int for v in out.box_original) and 0 <= X1 < X2 <= 64 and 0 <= Y1 < Y2 <= 48
            assert out.image.mode == "RGB" and out.image.width % 28 == 0 and out.image.height % 28 == 0
        else:
            assert isinstance(out.reason, str) and out.reason
    assert n_calls > 100 and n_crops > 20, (n_calls, n_crops)   # the fuzz reaches the crop path


def test_fuzz_crop_any_box_value_never_raises():
    rng = random.Random(1)
    small, shown = checker(64, 48), (32, 24)
    odd = [None, "abcd", b"abcd", 3, 3.5, {}, {"a": 1, "b": 2, "c": 3, "d": 4}, object(), [[1, 2], [3, 4]],
           np.array([1.0, 2.0, 30.0, 20.0]), np.array([np.nan, 0, 1, 1]), (x for x in range(4)), [10**5000] * 4,
           [[[[[]]]]] * 4, [-1e308, -1e308, 1e308, 1e308], [1, 2, 3, 4, 5], [np.int64(1), np.float32(2), 30, 20]]
    boxes = odd + [[_random_value(rng) for _ in range(4)] for _ in range(1000)]
    for box in boxes:
        out = crop(small, box, shown)
        assert isinstance(out, (Crop, CropError)), box


def test_snap_cuts_at_native_resolution_on_the_grid():
    # 448x448 original shown at 224x224: box [31, 40, 57, 65] shown -> [62, 80, 114, 130] original;
    # snapped to 28: x 56..140, y 56..140 -> an 84x84 native cut, no resampling.
    img = Image.new("RGB", (448, 448))
    img.putdata([((x + y) % 2 * 255, 0, 0) for y in range(448) for x in range(448)])
    cfg = CropConfig(min_pixels=28 * 28, max_pixels=16 * 28 * 28, snap=28)
    c = crop(img, [31, 40, 57, 65], (224, 224), cfg)
    assert c.box_original == (62, 80, 114, 130)
    assert c.cut == (56, 56, 140, 140)
    assert c.image.size == (84, 84)
    assert list(c.image.getdata()) == list(img.crop(c.cut).getdata())   # pixel-exact: not resampled
    plain = crop(img, [31, 40, 57, 65], (224, 224), CropConfig(min_pixels=28 * 28, max_pixels=16 * 28 * 28))
    assert plain.cut == plain.box_original == (62, 80, 114, 130)

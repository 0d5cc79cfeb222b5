"""Convert other projects' RL training sets into the project's JSONL tasks (`support/data.py` reads them).

Contract
--------
Command (`--help`):
    python -m support.convert --from SOURCE INPUT [INPUT ...] --out DIR [--image-root DIR] [--limit N] [--overwrite]
writes
    DIR/train.jsonl    one task a line, the schema of `data.load_tasks`:
                       {"id", "image": "images/<file>" (relative to DIR), "question", "answer",
                        "choices": [str, ...] (multiple choice only; then "answer" is the option's letter),
                        "bboxes": [B1, B2, ...] (only where the source has boxes), "source"}
    DIR/images/        one file a kept row: the source's bytes unchanged when they are a JPEG or a PNG,
                       otherwise re-encoded as PNG. Every image is decoded in full (PIL `load()`) first.
    DIR/dropped.jsonl  one line a dropped row: {"file", "row", "id", "reason", "detail"}
and prints the rows kept, the rows dropped by reason (counts) and the output path (it exits non-zero
when it kept none). A row that `data.load_tasks` would refuse is dropped here instead (too much text,
over 26 choices, an image over 200:1): the file it writes always loads. Boxes are checked in the image's
upright frame (its EXIF orientation applied, as every loader opens it).

Box schema (the project's, as everywhere in lfpc): a box is [x1, y1, x2, y2] in pixels of the ORIGINAL
image, top-left then bottom-right, continuous edges. "bboxes" is a list of NESTED boxes B1 ⊂ B2 ⊂ ...,
B1 first (the smallest region that answers the question). Accepted on input (`--from jsonl`):
    "bboxes": [[x1, y1, x2, y2], ...]   the project's own form (so a project JSONL can be re-checked);
    "bbox":   [[x, y, w, h], ...]       V*'s form, or one COCO-style [x, y, w, h]: converted to
                                        [x, y, x + w, y + h].
A row with both fields is dropped. Checks, each a drop reason when it fails: every coordinate is a real
number (int or float, finite; a bool is NOT a number here), positive area (x1 < x2, y1 < y2), inside the
image (0 <= x1, x2 <= W, 0 <= y1, y2 <= H), and, with several boxes, nested (each inside the next,
edges may touch). V*'s several boxes are several target OBJECTS, not nested regions: such rows are
dropped as "box: not nested" (eval.py's V* loader takes their union instead).

Sources (`--from`). What each reader expects, where that was verified, and what is assumed:
- deepeyes: DeepEyes' RL set (HF ChenShawn/DeepEyes-Datasets-47k: data_0.1.2_visual_toolbox_v2.parquet,
  data_v0.8_visual_toolbox_v2.parquet, data_thinklite_reasoning_acc.parquet), verl-style parquet.
  Required columns prompt (chat messages; the question is the first "user" message's content),
  images (list of {bytes, path}; bytes win, else path), reward_model ({ground_truth, ...}); optional
  data_source (kept in "source"), extra_info, env_name. Verified: the three file names and the training
  script in Visual-Agent/DeepEyes (examples/agent/final_merged_v1v8_thinklite.sh; its reward code
  verl/utils/reward_score/vl_agent.py reads extra_info["question"]); the columns and struct fields in
  xieck13/verl recipe/deepeyes/deepeyes47k_preprocess.py (prompt[1] is the user turn, images[i]["bytes"],
  reward_model["ground_truth"]) and in the column table of another framework's DeepEyes example (Relax;
  found by content search): data_source e.g. "vstar", reward_model {"ground_truth", "style"},
  extra_info {"answer", "question", "index", "split"}, images {"bytes", "path"}. The user content holds
  "<image>" (DeepEyes' verl/utils/dataset/rl_dataset.py splits on it) and the suffix USER_PROMPT_V2
  "\\nThink first, call **image_zoom_in_tool** if needed, then answer. Format strictly as: ..."
  (DeepEyes' verl/workers/agent/envs/mm_process_engine/prompt.py; a DeepEyes-derived dataset reader,
  found by content search, strips it by splitting on "Think first"). Assumed: a row holds one image;
  the suffix comes after the question. The dataset card itself was not readable from here.
- pixelreasoner: Pixel-Reasoner's RL queries (HF TIGER-Lab/PixelReasoner-RL-Data: release.parquet,
  images.zip, videos.zip). Required columns question, image (list of paths relative to the folder where
  the zips are unpacked, e.g. "images/..."), answer (a string or a list of one string, "\\boxed{...}");
  optional is_video (True rows are videos: dropped and counted as "video"; None means image), qid (the
  id). Verified: TIGER-AI-Lab/Pixel-Reasoner (onestep_evaluation/prepare.sh and rename_imagepath.py:
  the paths, relative, prefixed after unzipping; curiosity_driven_rl/openrlhf/datasets/
  prompts_dataset.py: question, image, is_video, qid; experience_maker.py: the reference is "answer",
  and a commented example question "<image>\\n...\\nchoices:\\nA: Lion  \\nB: Sheep ..."); TIGER-AI-Lab/
  verl-tool examples/data_preprocess/pixel_reasoner/prepare_train.py (question, image, is_video, answer,
  qid); a third-party converter found by content search (answer as a list of one "\\boxed{...}", some
  is_video None, multi-image rows). Assumed: a boxed list "[a, b]" means several
  acceptable answers (dropped: the schema holds one); multi-image rows are dropped.
- visualprobe: Mini-o3's VisualProbe training set (HF Mini-o3/VisualProbe_train: train.json + data/).
  A JSON array (or JSONL) of {problem ("<image>\\n..."), solution, images: [path]}. Verified: Mini-o3
  verl port dddraxxx/Mini-o3 examples/minio3/preprocess_visualprobe.py and a third-party converter
  (which maps each image to data/<basename>). Assumed: no ids in the file (ids are row numbers); the
  image paths may carry a prefix the local copy lacks, hence the path fallback below.
- chain-of-focus: Chain-of-Focus RL annotations (HF xintongzhang/CoF-RL-Data). A JSON array (or JSONL) of
  {question, groundtruth, image_name (relative to --image-root), data_source (optional)}; options, when
  any, inline in the question ("(A) ... (B) ..." or "A. ... B. ..."), groundtruth then a letter.
  Verified: xtong-zhang/Chain-of-Focus verl/recipe/zoomin/data_progress/prepare_zoomin_data.py (the
  fields it reads and the prompt it builds). Assumed: the released set's files are what that script
  reads; its dataset card was not readable from here.
- thinklite: ThinkLite-VL (HF russwang/ThinkLite-VL-hard-11k / -70k), math with mostly numeric answers.
  Parquet with columns problem ("<image>..."), answer, image (encoded bytes, or {bytes, path}); optional
  id. Verified: si0wang/ThinkLite-VL mcts.py (problem split on "<image>", answer, image) and a
  third-party conversion of ThinkLite-VL-Hard-11k.parquet into DeepEyes' format (found by content
  search) reading columns id, problem, answer, image (raw bytes). Assumed: MathVista-style "Hint: ..." lines are part of the question (they state the
  answer's form) and are kept.
- jsonl: the generic form, for hand-made sets and boxes (stage 2): JSON Lines (or a JSON array) of
  {image (path), question, answer, id (optional), choices (optional), bboxes | bbox (optional, above),
  source (optional)}.

Question cleaning (`clean_question`): drop the <image>/<video> placeholders and Qwen vision tokens; cut
the first known instruction suffix and everything after it (`SCAFFOLD`: DeepEyes', Chain-of-Focus',
Pixel-Reasoner's and LLaVA-style "Answer with the option's letter ..." lines; never when nothing would
remain before it); drop a leading "Question:" label. Options (`split_options`): a trailing block of
lines "(A) x" / "A. x" / "A: x" / "A) x" (letters A, B, ... in order, at least two, an optional
"Options:"/"Choices:" header line above it), or inline "(A) x (B) y" at the end, become "choices"; the
answer then becomes the option's letter (it may be the letter, "(B)", "B. text" or the option's text;
otherwise the row is dropped). Answers: "\\boxed{x}" and "<answer>x</answer>" unwrapped, numbers as text.

Rows: ids are deterministic: "<source>:<own id>" where the source has ids (pixelreasoner qid,
thinklite id, jsonl id), else "<source>:<input file stem>:<row>" (row = 1-based parquet row, JSON
array element, or JSONL line). A repeated id is dropped. A bad row is dropped with its reason (see
dropped.jsonl), never stops the run; a file not in the source's format at all (missing columns, not
parquet, not JSON, first record without the required keys, a JSON array that breaks off) stops it AT
ONCE, before anything is written, with a message naming the file and what was expected.
Image paths resolve against --image-root (default: the input file's folder): the path as given, then
ever shorter tails of it that still hold the file's folder ("VisualProbe_train/data/x.jpg",
"data/x.jpg"; never the bare "x.jpg" of a path with a folder); "file://" is dropped. Two different
paths that resolve to one file ("/a/data/x.jpg", "/b/data/x.jpg") are ambiguous: the later row is
dropped ("image path ambiguous"), never scored on another row's image.
Boxes are pixels of the original by default; `--box-units unit` reads [0, 1] fractions of the
width/height and `--box-units thousandths` Qwen2-VL's [0, 1000] grid. Under pixels, a row whose every
coordinate lies in [0, 1] is dropped ("box: looks normalised"), and when every boxed row (5 or more)
lies within [0, 1000] on images over 1000 px the report says that they may be thousandths.

Streaming: parquet is read with pyarrow.parquet.ParquetFile(pre_buffer=False).iter_batches,
PARQUET_BATCH_ROWS rows at a time and only the needed columns (pyarrow's default pre_buffer=True reads
ahead every row group: memory then grows with the file); JSON arrays and JSONL are parsed record by
record; each image is written as soon as its row is checked. Memory is bounded by one parquet row group
plus one batch, plus the sets of ids and file names kept (~250 bytes a row). Measured by
tests/test_convert.py's streaming tests. pyarrow (requirements.txt) is imported by the parquet sources
only.

Reruns: an --out folder that already holds train.jsonl, dropped.jsonl or images/ is REFUSED unless
--overwrite is given; --overwrite deletes exactly those three (nothing else in DIR) and converts afresh,
and only when DIR/.lfpc-convert (written by every conversion) says support/convert.py wrote them: a folder of
the user's own images/ is never deleted, and an --out whose images/ or outputs hold an input is refused.
train.jsonl and dropped.jsonl are written as *.tmp and renamed at the end, so a crashed run never leaves
a train.jsonl behind.
"""
from __future__ import annotations

import argparse
import ast
import io
import itertools
import json
import math
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field

from PIL import Image, ImageOps
from tqdm import tqdm

from support import checkpoint
from support.data import MAX_ASPECT, MAX_CHOICES, MAX_TEXT_CHARS     # load_tasks' limits, applied a row at a time

PARQUET_BATCH_ROWS = 16         # rows decoded to Python at a time
JSON_CHUNK_CHARS = 1 << 16      # characters read at a time from a JSON array
KEEP_FORMATS = {"JPEG": ".jpg", "PNG": ".png"}   # written byte for byte; anything else -> PNG
PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}


# ----------------------------------------------------------------------------- records

class ConvertError(Exception):
    """The conversion cannot start (a missing file, a file not in the source's format, a used --out) or
    cannot go on (a JSON array that breaks off)."""


@dataclass
class Drop:
    """Why a row is not kept (an error value, never raised). `reason` is a short category (counted);
    `detail` says what exactly was wrong with this row."""
    reason: str
    detail: str = ""


@dataclass
class Item:
    """One source row, read but not yet cleaned or checked."""
    row: int                            # 1-based row / element / line number in its file
    id: str
    question: str                       # raw: placeholders and instructions still in
    answer: object                      # raw: may be boxed, a number, a list of one
    image: bytes | str                  # encoded bytes, or a path to resolve
    choices: list[str] | None = None    # when the source lists them (jsonl); else parsed from the question
    boxes: object = None                # raw, in `box_format`
    box_format: str = "xyxy"            # "xyxy" ([x1, y1, x2, y2]) or "xywh" ([x, y, w, h])
    source: str = ""


@dataclass
class Report:
    out: str
    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    boxed: int = 0                  # kept rows with boxes
    boxed_within_1000: int = 0      # of them, every coordinate <= 1000 on an image over 1000 px

    def summary(self) -> str:
        lines = [f"kept {self.kept} of {self.read} rows -> {os.path.join(self.out, 'train.jsonl')} "
                 f"(images in {os.path.join(self.out, 'images')})",
                 f"dropped {sum(self.dropped.values())}" + (":" if self.dropped else "")]
        lines += [f"  {reason:<40} {n}" for reason, n in sorted(self.dropped.items(), key=lambda kv: (-kv[1], kv[0]))]
        if self.dropped:
            lines.append(f"each dropped row, with its detail: {os.path.join(self.out, 'dropped.jsonl')}")
        if self.boxed >= 5 and self.boxed_within_1000 == self.boxed:
            lines.append(f"warning: all {self.boxed} boxed rows have every coordinate within [0, 1000] on images over "
                         f"1000 px: if they are Qwen2-VL's 0-1000 grid, convert again with --box-units thousandths")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- questions and answers

_PLACEHOLDER = re.compile(r"<image>|<video>|<\|vision_start\|>|<\|image_pad\|>|<\|video_pad\|>|<\|vision_end\|>")
SCAFFOLD = [re.compile(p, re.IGNORECASE) for p in (
    r"Think first, call \**image_zoom_in_tool\**",                          # DeepEyes USER_PROMPT_V2
    r"Reason in your mind and then give the final answer",                  # DeepEyes USER_PROMPT_V1
    r"Think in the mind first, and then decide whether to call tools",      # DeepEyes V5, Chain-of-Focus
    r"Answer with the option'?s letter from the given choices",             # LLaVA-style, Chain-of-Focus
    r"If there are choices given, answer with the option'?s letter",
    r"Answer the question using a single word or phrase",                   # LLaVA-style, Chain-of-Focus
    r"Guidelines: Understand the given visual information",                 # Pixel-Reasoner "vcot"
    r"Please (?:reason|think) step by step,? and put your final answer within \\boxed",  # Pixel-Reasoner
)]
_OPTION_LINE = re.compile(r"\s*(?:\(([A-Z])\)|([A-Z])[.:)])\s*(\S.*?)\s*")
_OPTIONS_HEADER = re.compile(r"\s*(?:options|choices|answer choices)\s*:?\s*", re.IGNORECASE)
_INLINE_LETTER = re.compile(r"\(([A-Z])\)")
_ANSWER_LETTER = re.compile(r"\(?([A-Za-z])\)?[.:)]?(?:\s+(.+))?", re.DOTALL)


def clean_question(text: str) -> str:
    """The question without placeholders, instruction suffixes or a leading "Question:" label."""
    text = _PLACEHOLDER.sub("", text)
    cut = len(text)
    for rx in SCAFFOLD:
        m = rx.search(text)
        if m and text[:m.start()].strip():          # a suffix, not the whole text
            cut = min(cut, m.start())
    text = text[:cut]
    text = re.sub(r"^\s*question\s*:\s*", "", text, flags=re.IGNORECASE)
    return text.strip()


def split_options(text: str) -> tuple[str, list[str] | None]:
    """(question, choices) when `text` ends with options A, B, ... (at least two, in order), else (text, None).
    Lines "(A) x" / "A. x" / "A: x" / "A) x" at the end (an "Options:" header above them is dropped), or
    inline "(A) x (B) y" at the end."""
    lines = text.rstrip().split("\n")
    k = len(lines)
    while k > 0 and _OPTION_LINE.fullmatch(lines[k - 1]):
        k -= 1
    block = [_OPTION_LINE.fullmatch(s) for s in lines[k:]]
    letters = [m.group(1) or m.group(2) for m in block]
    for start in range(len(block) - 1):                       # the block may start at the last "A"
        if letters[start:] == [chr(65 + i) for i in range(len(block) - start)]:
            head = lines[:k + start]
            if head and _OPTIONS_HEADER.fullmatch(head[-1]):
                head = head[:-1]
            question = "\n".join(head).strip()
            if question:
                return question, [m.group(3) for m in block[start:]]
            break
    marks = list(_INLINE_LETTER.finditer(text))
    for i, m in enumerate(marks):
        tail = marks[i:]
        if [t.group(1) for t in tail] == [chr(65 + j) for j in range(len(tail))] and len(tail) >= 2:
            ends = [t.start() for t in tail[1:]] + [len(text)]
            choices = [text[t.end():e].strip(" \t\n,;") for t, e in zip(tail, ends)]
            question = text[:m.start()].strip()
            if question and all(choices):
                return question, choices
            break
    return text, None


def clean_answer(raw: object) -> str | Drop:
    """The answer as text: numbers written out, a list of one answer unwrapped, "\\boxed{x}" and
    "<answer>x</answer>" unwrapped. A list of several answers, an object or a bool is a Drop (never its
    Python repr as the answer)."""
    if isinstance(raw, list):
        if len(raw) != 1:
            return Drop("empty answer" if not raw else "several reference answers", repr(raw)[:200])
        raw = raw[0]
    if isinstance(raw, (dict, list, tuple, set)):
        return Drop("malformed answer", f"{type(raw).__name__}, not text: {raw!r}"[:200])
    if isinstance(raw, bool) or raw is None:
        return ""
    text = str(raw).strip()
    for rx in (r"\\boxed\{(.*)\}", r"<answer>(.*)</answer>"):
        m = re.fullmatch(rx, text, flags=re.DOTALL)
        if m:
            text = m.group(1).strip()
    return text


def _norm(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .")


def answer_letter(answer: str, choices: list[str]) -> str | None:
    """The letter of the option `answer` names: a letter in range ("B", "(B)", "b.", "B) text" whose
    text is option B's), else the option whose text it is; None when it names none."""
    m = _ANSWER_LETTER.fullmatch(answer.strip())
    if m:
        k = ord(m.group(1).upper()) - 65
        if k < len(choices) and (m.group(2) is None or _norm(m.group(2)) == _norm(choices[k])):
            return chr(65 + k)
    for k, option in enumerate(choices):
        if _norm(answer) and _norm(answer) == _norm(option):
            return chr(65 + k)
    return None


# ----------------------------------------------------------------------------- boxes

def parse_boxes(raw: object, fmt: str) -> list[list[float]] | Drop | None:
    """Boxes as [[x1, y1, x2, y2], ...] from `raw` in `fmt` ("xyxy" or "xywh"); one box may be given
    bare ([a, b, c, d]). None when there are none; a Drop when they are not boxes of real numbers."""
    if raw is None:
        return None
    if isinstance(raw, list) and len(raw) == 4 and not any(isinstance(v, list) for v in raw):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        return Drop("box: not a list of boxes", repr(raw))
    boxes = []
    for b in raw:
        if not isinstance(b, list) or len(b) != 4:
            return Drop("box: not 4 numbers", repr(b))
        for v in b:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                return Drop("box: coordinate not a number", f"{v!r} ({type(v).__name__}) in {b!r}")
        x, y, c, d = b
        boxes.append([x, y, x + c, y + d] if fmt == "xywh" else [x, y, c, d])
    return boxes


def check_boxes(boxes: list[list[float]], size: tuple[int, int]) -> Drop | None:
    """None if every box has positive area, lies inside the W x H image and each is inside the next."""
    W, H = size
    for b in boxes:
        if not (b[0] < b[2] and b[1] < b[3]):
            return Drop("box: empty or inverted", f"{b}")
        if not (0 <= b[0] and b[2] <= W and 0 <= b[1] and b[3] <= H):
            return Drop("box: outside the image", f"{b} in a {W}x{H} image")
    for i, (inner, outer) in enumerate(zip(boxes, boxes[1:]), 1):
        if not (outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]):
            return Drop("box: not nested", f"B{i} {inner} is not inside B{i + 1} {outer}")
    return None


# ----------------------------------------------------------------------------- images

def resolve_image(ref: str, root: str) -> str | None:
    """The file `ref` names: as given (absolute, or under `root`), else the longest tail of it that
    exists under `root` and still names the file's folder ("a/b/data/x.jpg" -> "data/x.jpg", never the
    bare "x.jpg": "cats/1.png" and "dogs/1.png" must not both become root/1.png); None if none does."""
    ref = ref.removeprefix("file://")
    if os.path.isabs(ref) and os.path.isfile(ref):
        return ref
    parts = [p for p in ref.replace("\\", "/").split("/") if p not in ("", ".")]
    for k in range(max(1, len(parts) - 1)):
        candidate = os.path.join(root, *parts[k:])
        if os.path.isfile(candidate):
            return candidate
    return None


def encode_image(data: bytes) -> tuple[bytes, str, tuple[int, int]] | Drop:
    """(bytes to write, file extension, (W, H)) after decoding `data` in full; JPEG and PNG bytes are
    kept as they are, anything else is re-encoded as PNG. (W, H) is the upright size, after the EXIF
    orientation, as `crop_tool.open_image` (and `data.load_tasks`) open it: the frame of the boxes. A Drop
    if it does not decode (truncated...)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            upright = ImageOps.exif_transpose(im)
            if im.format in KEEP_FORMATS:
                return data, KEEP_FORMATS[im.format], upright.size
            buf = io.BytesIO()
            (upright if upright.mode in PNG_MODES else upright.convert("RGB")).save(buf, format="PNG")
            return buf.getvalue(), ".png", upright.size
    except Exception as e:      # PIL raises many types (OSError, SyntaxError, DecompressionBombError...)
        return Drop("image does not decode", f"{type(e).__name__}: {e}")


def _image_ref(value: object) -> bytes | str | Drop:
    """Encoded bytes or a path from one image cell: bytes, a path, or a {bytes, path} struct (bytes win)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, str) and value:
        return value
    return Drop("no image", repr(value)[:200])


def _one_image(value: object) -> bytes | str | Drop:
    """The image of a row whose cell is a list of images: exactly one, else a Drop."""
    if not isinstance(value, list):
        return _image_ref(value)
    if len(value) != 1:
        return Drop("no image" if not value else "several images", f"{len(value)} images")
    return _image_ref(value[0])


# ----------------------------------------------------------------------------- one reader per source

def _text(rec: dict, key: str) -> str | Drop:
    value = rec.get(key)
    if value is None:
        return Drop(f"missing field {key!r}")
    if not isinstance(value, str):
        return Drop(f"malformed field {key!r}", f"{type(value).__name__}, not text")
    return value


def _item(row: int, id: str, question, answer, image, source: str, **kw) -> Item | Drop:
    """An Item, or the first Drop among its parts."""
    for part in (question, answer, image):
        if isinstance(part, Drop):
            return part
    return Item(row, id, question, answer, image, source=source, **kw)


def deepeyes_item(rec: dict, row: int, stem: str) -> Item | Drop:
    prompt = rec.get("prompt")
    users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"] \
        if isinstance(prompt, list) else []
    question = users[0] if users and isinstance(users[0], str) else \
        Drop("malformed field 'prompt'", "no user message with text content")
    rm = rec.get("reward_model")
    answer = rm.get("ground_truth") if isinstance(rm, dict) else None
    answer = Drop("missing field 'reward_model.ground_truth'") if answer is None else answer
    ds = rec.get("data_source")
    return _item(row, f"deepeyes:{stem}:{row}", question, answer, _one_image(rec["images"]),
                 "deepeyes" + (f":{ds}" if isinstance(ds, str) and ds else ""))


def pixelreasoner_item(rec: dict, row: int, stem: str) -> Item | Drop:
    if rec.get("is_video") is True:
        return Drop("video", "is_video is true")
    answer = rec.get("answer")
    if isinstance(answer, list):
        answer = answer[0] if len(answer) == 1 else Drop(
            "empty answer" if not answer else "several reference answers", repr(answer)[:200])
    if not isinstance(answer, Drop):
        inner = clean_answer(answer)
        if not isinstance(inner, Drop) and inner.startswith("[") and inner.endswith("]"):
            try:
                listed = ast.literal_eval(inner)        # a literal, never code
            except (ValueError, SyntaxError):
                listed = None
            if isinstance(listed, list):
                answer = listed[0] if len(listed) == 1 else Drop("several reference answers", inner[:200])
    qid = rec.get("qid")
    id = f"pixelreasoner:{qid}" if qid not in (None, "") else f"pixelreasoner:{stem}:{row}"
    return _item(row, id, _text(rec, "question"), answer, _one_image(rec["image"]), "pixelreasoner")


def thinklite_item(rec: dict, row: int, stem: str) -> Item | Drop:
    own = rec.get("id")
    id = f"thinklite:{own}" if own not in (None, "") else f"thinklite:{stem}:{row}"
    return _item(row, id, _text(rec, "problem"), rec["answer"], _one_image(rec["image"]), "thinklite")


def visualprobe_item(rec: dict, row: int, stem: str) -> Item | Drop:
    return _item(row, f"visualprobe:{stem}:{row}", _text(rec, "problem"), _text(rec, "solution"),
                 _one_image(rec["images"]), "visualprobe")


def chain_of_focus_item(rec: dict, row: int, stem: str) -> Item | Drop:
    ds = rec.get("data_source")
    return _item(row, f"chain-of-focus:{stem}:{row}", _text(rec, "question"), _text(rec, "groundtruth"),
                 _one_image(rec["image_name"]), "chain-of-focus" + (f":{ds}" if isinstance(ds, str) and ds else ""))


def jsonl_item(rec: dict, row: int, stem: str) -> Item | Drop:
    own = rec.get("id")
    id = f"jsonl:{own}" if own not in (None, "") else f"jsonl:{stem}:{row}"
    choices = rec.get("choices")
    if choices is not None and not (isinstance(choices, list) and len(choices) >= 2
                                    and all(isinstance(c, str) and c.strip() for c in choices)):
        return Drop("malformed field 'choices'", "not a list of at least two non-empty strings")
    if "bboxes" in rec and "bbox" in rec:
        return Drop("box: both 'bboxes' and 'bbox'", "give one: bboxes [x1, y1, x2, y2] or bbox [x, y, w, h]")
    fmt = "xywh" if "bbox" in rec else "xyxy"
    source = rec.get("source") if isinstance(rec.get("source"), str) and rec.get("source") else "jsonl"
    return _item(row, id, _text(rec, "question"), rec["answer"], _text(rec, "image"), source, choices=choices, boxes=rec.get("bbox", rec.get("bboxes")),
                 box_format=fmt)


@dataclass(frozen=True)
class Source:
    kind: str                   # "parquet" or "json" (a JSON array or JSON Lines)
    required: tuple[str, ...]   # columns / keys a file must have
    optional: tuple[str, ...]   # read when present
    item: object                # (record, row, file stem) -> Item | Drop


SOURCES = {
    "deepeyes": Source("parquet", ("prompt", "images", "reward_model"), ("data_source", "env_name"), deepeyes_item),
    "pixelreasoner": Source("parquet", ("question", "image", "answer"), ("is_video", "qid"), pixelreasoner_item),
    "thinklite": Source("parquet", ("problem", "answer", "image"), ("id",), thinklite_item),
    "visualprobe": Source("json", ("problem", "solution", "images"), (), visualprobe_item),
    "chain-of-focus": Source("json", ("question", "groundtruth", "image_name"), ("data_source",), chain_of_focus_item),
    "jsonl": Source("json", ("image", "question", "answer"), ("id", "choices", "bboxes", "bbox", "source"), jsonl_item),
}


# ----------------------------------------------------------------------------- streaming input

def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SystemExit("support/convert.py: the parquet sources (--from deepeyes, pixelreasoner, thinklite) need "
                         "pyarrow, which requirements.txt installs: pip install -r requirements.txt") from None
    return pq


def open_parquet(path: str, source: str, spec: Source):
    """(row count, iterator of (row, record)) over a parquet file, PARQUET_BATCH_ROWS rows at a time,
    reading only the columns the source uses. Missing columns -> ConvertError before any row is read."""
    pq = _pyarrow_parquet()
    try:
        # pre_buffer=False: pyarrow's default (True, pyarrow 26) pre-reads the column chunks of EVERY row
        # group iter_batches will visit, so memory grew with the file (measured: pool peak 1.5 / 8.0 /
        # 26 MB at 100 / 1,000 / 3,000 rows of 7 KB); without it the peak stays at one row group.
        pf = pq.ParquetFile(path, pre_buffer=False)
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path}: not a parquet file ({e}); --from {source} expects parquet") from None
    names = pf.schema_arrow.names
    missing = [c for c in spec.required if c not in names]
    if missing:
        raise ConvertError(f"{path}: not a {source} file: expected columns {list(spec.required)} "
                           f"(optional {list(spec.optional)}); missing {missing}; the file has {names}")
    columns = [c for c in spec.required + spec.optional if c in names]

    def rows():
        row = 0
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            for rec in batch.to_pylist():
                row += 1
                yield row, rec
    return pf.metadata.num_rows, rows()


def _json_lines(f):
    """(line number, record or Drop) from a binary JSON Lines file; blank lines are skipped."""
    for n, raw in enumerate(f, 1):
        try:
            line = raw.decode("utf-8").lstrip("\ufeff")
        except UnicodeDecodeError as e:
            yield n, Drop("not UTF-8 text", e.reason)
            continue
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                yield n, Drop("not valid JSON", e.msg)


def _json_array(f, path: str, buf: str):
    """The elements of the JSON array that `buf` (the file's first chunk) opens, one at a time; the
    buffer holds about one element plus a chunk, never the whole file."""
    decoder, pos, n = json.JSONDecoder(), buf.index("[") + 1, 0
    while True:
        while True:                                     # to the next element or the closing "]"
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf):
                break
            buf, pos = f.read(JSON_CHUNK_CHARS), 0
            if not buf:
                raise ConvertError(f"{path}: the JSON array breaks off after element {n}")
        if buf[pos] == "]":
            return
        while True:
            try:
                obj, end = decoder.raw_decode(buf, pos)
                break
            except json.JSONDecodeError as e:           # the element may go on in the next chunk
                more = f.read(JSON_CHUNK_CHARS)
                if not more:
                    raise ConvertError(f"{path}: element {n + 1} of the JSON array is not valid JSON "
                                       f"({e.msg})") from None
                buf, pos = buf[pos:] + more, 0
        n += 1
        yield n, obj
        pos = end
        if pos > JSON_CHUNK_CHARS:
            buf, pos = buf[pos:], 0


def _json_records(path: str):
    """(row, record) from a JSON array (row = element number) or JSON Lines (row = line number)."""
    with open(path, "rb") as f:
        if not f.read(JSON_CHUNK_CHARS).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
            f.seek(0)
            yield from _json_lines(f)
            return
        f.seek(0)
        text = io.TextIOWrapper(f, encoding="utf-8-sig")
        try:
            yield from _json_array(text, path, text.read(JSON_CHUNK_CHARS))
        except UnicodeDecodeError as e:
            raise ConvertError(f"{path}: not UTF-8 text ({e.reason})") from None


def open_json(path: str, source: str, spec: Source):
    """(None, iterator of (row, record)) over a JSON array or JSON Lines file. The first record must be
    an object with the source's required keys, else ConvertError before anything is written."""
    records = _json_records(path)
    first = next(records, None)
    expected = (f"--from {source} expects a JSON array or JSON Lines of objects with keys {list(spec.required)} "
                f"(optional {list(spec.optional)})")
    if first is None:
        raise ConvertError(f"{path}: no records; {expected}")
    row, rec = first
    if isinstance(rec, Drop):
        raise ConvertError(f"{path}:{row}: {rec.reason} ({rec.detail}); {expected}")
    if not isinstance(rec, dict):
        raise ConvertError(f"{path}: record {row} is a {type(rec).__name__}, not an object; {expected}")
    missing = [k for k in spec.required if k not in rec]
    if missing:
        raise ConvertError(f"{path}: record {row} lacks {missing} (it has {sorted(rec)}); {expected}")
    return None, itertools.chain([first], records)


# ----------------------------------------------------------------------------- conversion

MARKER = ".lfpc-convert"        # written into every --out: what support/convert.py wrote there (and may delete)


def _prepare_out(out: str, overwrite: bool, inputs: list[str] = (), roots: list[str] = ()) -> None:
    """Refuse a folder holding an earlier conversion, or (--overwrite) delete exactly its outputs, and
    only those support/convert.py wrote (MARKER); refuse an --out whose outputs would hold an input or an image root."""
    outputs = [os.path.realpath(os.path.join(out, p)) for p in ("train.jsonl", "dropped.jsonl", "images")]
    for path in list(inputs) + list(roots):
        real = os.path.realpath(path)
        if any(real == o or real.startswith(outputs[2] + os.sep) or (real == outputs[2]) for o in outputs):
            raise ConvertError(f"--out {out} would overwrite {path} (an input or its images): choose another --out")
    old = [p for p in ("train.jsonl", "dropped.jsonl", "images") if os.path.exists(os.path.join(out, p))]
    if old and not overwrite:
        raise ConvertError(f"{out}: already holds {', '.join(old)} from an earlier conversion; "
                           f"pass --overwrite to replace them, or choose another --out")
    if old and not os.path.isfile(os.path.join(out, MARKER)):
        raise ConvertError(f"{out}: holds {', '.join(old)} that support/convert.py did not write (no {MARKER} file): "
                           f"--overwrite never deletes your own files; choose another --out")
    for p in old:
        full = os.path.join(out, p)
        if os.path.isdir(full):
            shutil.rmtree(full)
        else:
            os.remove(full)
    os.makedirs(os.path.join(out, "images"))
    with open(os.path.join(out, MARKER), "w", encoding="utf-8") as f:
        json.dump({"wrote": ["train.jsonl", "dropped.jsonl", "images/"]}, f)


def _file_name(id: str, ext: str, taken: set[str]) -> str:
    """A file name for `id` made of [A-Za-z0-9._-], unique in `taken` (which it joins)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", id).strip("._")[:120] or "row"
    name, k = base + ext, 1
    while name in taken:
        k += 1
        name = f"{base}-{k}{ext}"
    taken.add(name)
    return name


BOX_UNITS = {"pixels": None, "unit": 1.0, "thousandths": 1000.0}    # the scale of one image side


def _finish(item: Item, root: str, out: str, taken: set[str], claimed: dict[str, str] | None = None,
            box_units: str = "pixels") -> dict | Drop:
    """The JSONL row of `item`: question cleaned, options split, answer as text (a letter for multiple
    choice), boxes in pixels (`box_units`) checked against the decoded image, image written to out/images/.
    `claimed`: resolved image file -> the path that named it first (two paths, one file: ambiguous)."""
    question = clean_question(item.question)
    choices = item.choices
    if choices is None:
        question, choices = split_options(question)
    if not question:
        return Drop("empty question", repr(item.question)[:200])
    answer = clean_answer(item.answer)
    if isinstance(answer, Drop):
        return answer
    if not answer:
        return Drop("empty answer", repr(item.answer)[:200])
    if choices and len(choices) > MAX_CHOICES:                      # data.load_tasks' limits, row by row here
        return Drop("too many choices", f"{len(choices)}; at most {MAX_CHOICES} (lettered A-Z)")
    if (n := len(question) + len(answer) + sum(map(len, choices or []))) > MAX_TEXT_CHARS:
        return Drop("text too long", f"{n:,} characters of question, answer and choices; at most {MAX_TEXT_CHARS:,}")
    if choices:
        letter = answer_letter(answer, choices)
        if letter is None:
            return Drop("answer matches no option", f"{answer!r} vs {choices!r}"[:300])
        answer = letter
    boxes = parse_boxes(item.boxes, item.box_format)
    if isinstance(boxes, Drop):
        return boxes
    data = item.image
    if isinstance(data, str):
        path = resolve_image(data, root)
        if path is None:
            return Drop("image file not found", f"{data} (under {root})")
        named = "/".join(p for p in data.removeprefix("file://").replace("\\", "/").split("/") if p not in ("", "."))
        if claimed is not None and claimed.setdefault(path, named) != named:
            return Drop("image path ambiguous", f"{data} and {claimed[path]} both resolve to {path}")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            return Drop("image file not readable", f"{path}: {e}")
    encoded = encode_image(data)
    if isinstance(encoded, Drop):
        return encoded
    data, ext, size = encoded
    if max(size) > MAX_ASPECT * min(size):
        return Drop("image too elongated", f"{size[0]}x{size[1]}: aspect ratio over {MAX_ASPECT}")
    if boxes:
        scale = BOX_UNITS[box_units]
        if scale is None and max(size) > 2 and all(0 <= v <= 1 for b in boxes for v in b):
            return Drop("box: looks normalised", f"{boxes} on a {size[0]}x{size[1]} image: if they are fractions of "
                        f"the side, pass --box-units unit")
        if scale is not None:
            boxes = [[b[0] * size[0] / scale, b[1] * size[1] / scale, b[2] * size[0] / scale, b[3] * size[1] / scale]
                     for b in boxes]
        problem = check_boxes(boxes, size)
        if problem:
            return problem
    name = _file_name(item.id, ext, taken)
    with open(os.path.join(out, "images", name), "wb") as f:
        f.write(data)
    row = {"id": item.id, "image": "images/" + name, "question": question, "answer": answer}
    if choices:
        row["choices"] = choices
    if boxes:
        row["bboxes"] = boxes
        row["_box_small"] = max(size) > 1000 and all(v <= 1000 for b in boxes for v in b)   # for the report only
    row["source"] = item.source
    return row


def _read_row(spec: Source, rec: object, row: int, stem: str) -> Item | Drop:
    if isinstance(rec, Drop):
        return rec
    if not isinstance(rec, dict):
        return Drop("not an object", type(rec).__name__)
    missing = [k for k in spec.required if rec.get(k) is None]
    return Drop(f"missing field {missing[0]!r}") if missing else spec.item(rec, row, stem)


def _convert_rows(opened, spec: Source, out: str, image_root: str | None, limit: int | None, bar,
                  report: Report, ft, fd, box_units: str = "pixels") -> None:
    """The row loop: read, clean and check each row, write its image and its line (or its drop line)."""
    seen, taken, claimed = set(), set(), {}
    for path, stem, _, records in opened:
        root = image_root or os.path.dirname(os.path.abspath(path))
        for row, rec in records:
            if limit is not None and report.read >= limit:
                return
            report.read += 1
            bar.update(1)
            result = _read_row(spec, rec, row, stem)
            id = result.id if isinstance(result, Item) else None
            if isinstance(result, Item):
                result = Drop("duplicate id", id) if id in seen else _finish(result, root, out, taken, claimed, box_units)
            if isinstance(result, Drop):
                report.dropped[result.reason] += 1
                fd.write(json.dumps({"file": os.path.basename(path), "row": row, "id": id, "reason": result.reason,
                                     "detail": result.detail}, ensure_ascii=False) + "\n")
            else:
                seen.add(id)
                report.kept += 1
                if "_box_small" in result:
                    report.boxed += 1
                    report.boxed_within_1000 += result.pop("_box_small")
                ft.write(json.dumps(result, ensure_ascii=False) + "\n")


def convert_files(source: str, inputs: list[str], out: str, image_root: str | None = None, limit: int | None = None,
                  overwrite: bool = False, progress: bool = True, box_units: str = "pixels") -> Report:
    """Convert `inputs` (files in the format of `source`) into out/train.jsonl, out/images/ and
    out/dropped.jsonl (module docstring). Every input is opened and checked before anything is written."""
    if source not in SOURCES:
        raise ConvertError(f"unknown source {source!r}; choose one of {sorted(SOURCES)}")
    if limit is not None and limit < 1:
        raise ConvertError(f"--limit must be at least 1, got {limit}")
    if box_units not in BOX_UNITS:
        raise ConvertError(f"--box-units is one of {sorted(BOX_UNITS)}, got {box_units!r}")
    spec = SOURCES[source]
    for path in inputs:
        if not os.path.isfile(path):
            raise ConvertError(f"{path}: " + ("a folder; pass the files in it" if os.path.isdir(path) else "no such file"))
    if image_root is not None and not os.path.isdir(image_root):
        raise ConvertError(f"--image-root {image_root}: no such folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConvertError(f"--out {out} is a file; pass a folder")
    stems = [os.path.splitext(os.path.basename(p))[0] for p in inputs]
    if len(set(stems)) < len(stems):
        raise ConvertError(f"two inputs share a file name ({stems}); ids are made from it, rename one")
    opener = open_parquet if spec.kind == "parquet" else open_json
    opened = [(path, stem, *opener(path, source, spec)) for path, stem in zip(inputs, stems)]
    _prepare_out(out, overwrite, inputs, [image_root] if image_root else [os.path.dirname(os.path.abspath(p)) for p in inputs])
    totals = [total for _, _, total, _ in opened]
    total = None if None in totals else sum(totals)
    if total is not None and limit is not None:
        total = min(total, limit)
    report = Report(out)
    train, dropped = os.path.join(out, "train.jsonl"), os.path.join(out, "dropped.jsonl")
    with checkpoint.writing_whole(train) as ft, checkpoint.writing_whole(dropped) as fd, \
            tqdm(total=total, unit="row", desc=f"convert {source}", disable=not progress) as bar:
        _convert_rows(opened, spec, out, image_root, limit, bar, report, ft, fd, box_units)   # no half-written file left
    return report


# ----------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> Report:
    doc = __doc__.split("\n\n")[0]
    c = argparse.ArgumentParser(prog="python -m support.convert", description=doc + " Writes DIR/train.jsonl (data.load_tasks' "
                                "schema), DIR/images/ and DIR/dropped.jsonl; prints what was kept and dropped. See "
                                "the module docstring for each format.")
    c.add_argument("--from", dest="source", required=True, choices=sorted(SOURCES), metavar="SOURCE",
                   help="the inputs' format: " + ", ".join(sorted(SOURCES)) + " (parquet ones need pyarrow)")
    c.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="files in that format (several: e.g. DeepEyes' three parquet files); ids carry each file's stem")
    c.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    c.add_argument("--image-root", default=None, metavar="DIR",
                   help="folder relative image paths resolve against (default: each input's folder)")
    c.add_argument("--limit", type=int, default=None, metavar="N", help="read only the first N rows (all inputs)")
    c.add_argument("--box-units", default="pixels", choices=sorted(BOX_UNITS),
                   help="what box coordinates count: pixels of the original (default), unit ([0, 1] of a side) or "
                        "thousandths (Qwen2-VL's [0, 1000] grid)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an earlier conversion in DIR (deletes its train.jsonl, dropped.jsonl, images/); "
                        "without it such a DIR is refused")
    args = c.parse_args(argv)
    try:
        report = convert_files(args.source, args.inputs, args.out, args.image_root, args.limit, args.overwrite,
                               box_units=args.box_units)
    except ConvertError as e:
        raise SystemExit(f"support/convert.py: {e}") from None
    print(report.summary())
    if report.read and not report.kept:
        raise SystemExit(f"support/convert.py: no row was kept (the reasons above, one a row in "
                         f"{os.path.join(args.out, 'dropped.jsonl')})")
    return report


if __name__ == "__main__":
    main()

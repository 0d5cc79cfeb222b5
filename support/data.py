"""The project's task data: the JSONL schema, its validation, and the V* and HR-Bench benchmark loaders.
Everything here runs BEFORE a model loads, so a bad file costs seconds, not a 7B load.

Contract
--------
`load_tasks(path)` reads JSONL, one task a line (UTF-8, a byte-order mark accepted; blank lines skipped):
    {"id": str | int (optional, unique; default the line number),
     "image": "path/relative/to/the/jsonl.png",  "question": str,  "answer": str,
     "choices": [str, ...] (optional, >= 2; the answer must name one: its letter or its text),
     "bboxes": [[x1, y1, x2, y2], ...] (optional: nested B1 ⊂ B2 ⊂ ..., B1 first, ORIGINAL pixels as the
               image is SHOWN upright, i.e. after its EXIF orientation),
     "max_pixels": int (optional, >= 784: the global image's budget; info_gap.py writes it)}
other keys are kept out of the way (e.g. "source"). Checked, row by row, each failure a line of the
error naming FILE:LINE and what is wrong (all bad rows are listed, up to 20, then a count): valid
UTF-8 and JSON; field types (a bool is not a number); at most 26 choices and 20,000 characters of
question, answer and choices (a longer prompt is a data bug that would exhaust memory in the prober);
the image exists and DECODES IN FULL (a
truncated file fails here, not at step 700), its aspect ratio is at most 200 (Qwen's resize refuses
more); boxes are 4 finite numbers, non-empty, inside the image, each inside the next; ids unique.
Rows whose text holds a chat-template control-token string (<|im_end|>, <|image_pad|>, <tool_call>, ...)
are kept and counted in one warning naming the first (`report_control_strings`): the agent encodes data
as plain text (`lfpc.Agent.encode`), so such a string can never act as a control token.
Images stay paths (opened on use) so a set of 8K images does not sit in memory; they are decoded in
a thread pool, with a progress bar when there are many.

`open_image` (crop_tool.open_image) is the one place an image file is opened, as transformers' and
qwen_vl_utils' pipelines do: EXIF orientation applied, alpha composited onto WHITE, 16-bit scaled to
8-bit, RGB.

Benchmarks (problems raise DataError naming the file and the row):
- V*, `load_vstar(root)`: root/direct_attributes/ and root/relative_position/, each question an image
  (.jpg .jpeg .png .webp .bmp) and a .json of the same stem (extension in any case) with "question" and
  "options" (correct option FIRST) and, optionally, "bbox": [[x, y, w, h], ...] (the target objects,
  inside the image). Option order, `vstar_protocol(root)` says which:
    "official": root/test_questions.jsonl (the benchmark's release: one line a question, "image"
        "<category>/<file>", "text" with the options as "(A) ...\n(B) ..." in the published shuffled
        order, "label" the right letter) gives the order, the letter and the item order; every line must
        match a question folder's JSON (the same option texts, the label on its first option).
    "seeded": without that file, options are shuffled by `shuffle_options` with
        random.Random("<category>/<stem>") (the same order on every run and machine).
  B1 = the union of the target boxes as (x1, y1, x2, y2), grown about its centre to >= 28 px a side (the
  crop tool's minimum, so the gt probe can cut it) within the image; boxes = [B1]. Task.id =
  "<category>/<stem>". An image with no JSON is left out with a warning (counted, the first named).
- HR-Bench, `load_hrbench(tsv)`: tab-separated with a header holding (at least) index, question,
  answer (letter), A, B, C, D, category (single|cross), image (base64), and optionally cycle_category
  (which rotation of the options a row is: HR-Bench asks each question 4 times, options rotated).
  Each index once. Each image is decoded and written ONCE to a cache folder (default "<tsv stem>_images/"
  beside the TSV) as "<sanitised index>-<hash of the index>.<format>" (two indices never share a file),
  the decoded bytes unchanged, and kept as a path. choices = [A, B, C, D]; Task.id =
  "<category>/<index>"; Task.cycle = cycle_category. Scored as VLMEvalKit's hrbench scorer
  (`metrics.episode_metrics`): accuracy per cycle_category, then averaged over cycles (FSP: single,
  FCP: cross), and the paper's mean (FSP + FCP) / 2; without the column, plain means.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import csv
import io
import json
import math
import os
import random
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from PIL import Image

import crop_tool
from lfpc import Task
from support import answers, checkpoint

MAX_ERRORS = 20
MAX_ASPECT = 200                   # smart_resize refuses more
MAX_CHOICES = 26                   # options are lettered A-Z
MAX_TEXT_CHARS = 20_000            # question + answer + choices of one row


class DataError(ValueError):
    """A data file that cannot be used, with every problem found (file:line: what is wrong)."""


# ----------------------------------------------------------------------------- the project's JSONL

def load_tasks(path: str, progress: bool = True, warn=None) -> list[Task]:
    """The tasks of a JSONL file, every row and image checked (module docstring); DataError otherwise.
    `warn(message)` (default: printed) hears of rows kept with a warning (control-token strings)."""
    if os.path.isdir(path):
        found = sorted(n for n in os.listdir(path) if n.endswith(".jsonl"))
        hint = (" or ".join(os.path.join(path, n) for n in found[:3]) if found
                else "none is in it; toy.world writes items.jsonl, support.convert train.jsonl")
        raise DataError(f"{path}: is a folder; pass the JSONL file of tasks ({hint})")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    base, rows, errors = os.path.dirname(os.path.abspath(path)), [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                errors.append(f"{where}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})")
                continue
            if line.strip():
                row = _parse_row(line, where, errors)
                if row is not None:
                    rows.append((where, row, os.path.join(base, row["image"])))
    sizes = check_images([p for _, _, p in rows], [w for w, _, _ in rows], errors, progress)
    tasks, seen = [], {}
    for (where, row, img), size in zip(rows, sizes):
        tid = str(row.get("id", where.rsplit(":", 1)[1]))
        if tid in seen:
            errors.append(f"{where}: id {tid!r} repeats {seen[tid]}")
        seen.setdefault(tid, where)
        if size is not None and row.get("bboxes") is not None:
            problem = box_problem(row["bboxes"], size)
            if problem:
                errors.append(f"{where}: 'bboxes' {problem}")
        tasks.append(Task(img, row["question"], row["answer"], row.get("choices"), row.get("bboxes"),
                          row.get("max_pixels"), tid))
    if errors:
        raise DataError(_summary(path, errors))
    if not tasks:
        raise DataError(f"{path}: no tasks")
    report_control_strings(tasks, [w for w, _, _ in rows], path, warn)
    return tasks


CONTROL_STRING = re.compile(r"<\|[^|<>\s]{1,40}\|>|</?tool_call>")   # <|im_end|>, <|image_pad|>, <tool_call> ...


def report_control_strings(tasks: list[Task], wheres: list[str], source: str, warn=None) -> int:
    """Warn (once, counted, the first row named) about tasks whose question, choices or answer hold a
    chat-template control-token string. They are kept: `Agent.encode` writes data as plain text, so such a
    string can never close a turn, open an image slot or forge a tool call. Returns the count."""
    hits = [(w, m.group(0)) for t, w in zip(tasks, wheres)
            for m in [CONTROL_STRING.search("\n".join([t.question, t.answer, *(t.choices or [])]))] if m]
    if hits:
        seen = sorted({h for _, h in hits})
        (warn or _print_warning)(f"{source}: {len(hits)} row(s) hold control-token strings ({', '.join(seen[:5])}"
                                 f"{', ...' if len(seen) > 5 else ''}), kept as plain text (never control tokens); "
                                 f"the first: {hits[0][0]}")
    return len(hits)


def _parse_row(line: str, where: str, errors: list[str]) -> dict | None:
    """One JSON row, its fields' types checked; None (and errors appended) when it cannot be used."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        errors.append(f"{where}: not valid JSON ({e.msg} at character {e.pos})")
        return None
    if not isinstance(row, dict):
        errors.append(f"{where}: each line must be a JSON object, got {type(row).__name__}")
        return None
    before = len(errors)
    for key in ("image", "question", "answer"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            errors.append(f"{where}: missing or empty string field {key!r}")
    if "id" in row and (isinstance(row["id"], bool) or not isinstance(row["id"], (str, int))):
        errors.append(f"{where}: 'id' must be a string or an integer, got {row['id']!r}")
    choices = row.get("choices")
    if choices is not None:
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c.strip() for c in choices)):
            errors.append(f"{where}: 'choices' must be a list of at least 2 non-empty strings, got {repr(choices)[:200]}")
        elif len(choices) > MAX_CHOICES:
            errors.append(f"{where}: {len(choices)} choices; at most {MAX_CHOICES} (they are lettered A-Z)")
        elif isinstance(row.get("answer"), str):
            try:
                answers.answer_index(row["answer"], choices)
            except ValueError:
                errors.append(f"{where}: answer {row['answer']!r} is neither a letter A-{chr(64 + len(choices))} "
                              f"nor the text of one of the choices")
    text = sum(len(v) for v in [row.get("question"), row.get("answer"), *(choices if isinstance(choices, list) else [])]
               if isinstance(v, str))
    if text > MAX_TEXT_CHARS:
        errors.append(f"{where}: question, answer and choices hold {text:,} characters; at most {MAX_TEXT_CHARS:,} (a "
                      f"prompt this long cannot be a question about an image; the model's positions run out)")
    mp = row.get("max_pixels")
    if mp is not None and (isinstance(mp, bool) or not isinstance(mp, int) or mp < crop_tool.TOKEN_PIXELS):
        errors.append(f"{where}: 'max_pixels' must be an integer >= {crop_tool.TOKEN_PIXELS} (one visual token), "
                      f"got {mp!r}")
    boxes = row.get("bboxes")
    if boxes is not None and not (isinstance(boxes, list) and boxes):
        errors.append(f"{where}: 'bboxes' must be a non-empty list of [x1, y1, x2, y2], got {boxes!r}")
    return row if len(errors) == before else None


def check_images(paths: list[str], wheres: list[str], errors: list[str], progress: bool = True) -> list:
    """Each image decoded in full (a thread pool: PIL decodes outside the GIL): its upright (width, height),
    or None with a line appended to `errors`."""
    def one(i):
        try:
            if not os.path.isfile(paths[i]):
                return None, f"{wheres[i]}: image file not found: {paths[i]}"
            with open_image(paths[i]) as im:
                w, h = im.size
            if max(w, h) > MAX_ASPECT * min(w, h):
                return None, f"{wheres[i]}: image {paths[i]} is {w}x{h}: aspect ratio over {MAX_ASPECT}"
            return (w, h), None
        except Exception as e:   # PIL raises several types for unreadable files
            return None, f"{wheres[i]}: cannot read image {paths[i]}: {e}"
    from tqdm import tqdm
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(tqdm(pool.map(one, range(len(paths))), total=len(paths), desc="checking images",
                            unit="img", disable=not progress or len(paths) < 200))
    errors += [e for _, e in results if e]
    return [s for s, _ in results]


def box_problem(boxes, size: tuple[int, int]) -> str | None:
    """What is wrong with nested boxes [B1, B2, ...] on an image of `size` (W, H), or None."""
    W, H = size
    for k, b in enumerate(boxes):
        ok = isinstance(b, list) and len(b) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b)
        if not ok:
            return f"box {k + 1} {b!r} is not 4 finite numbers [x1, y1, x2, y2]"
        if not (b[0] < b[2] and b[1] < b[3]):
            return f"box {k + 1} {b} is empty or inverted"
        if not (0 <= b[0] and 0 <= b[1] and b[2] <= W and b[3] <= H):
            return f"box {k + 1} {b} is not inside the {W}x{H} image"
        if k and not (boxes[k][0] <= boxes[k - 1][0] and boxes[k][1] <= boxes[k - 1][1]
                      and boxes[k - 1][2] <= boxes[k][2] and boxes[k - 1][3] <= boxes[k][3]):
            return f"box {k + 1} {b} does not contain box {k} {boxes[k - 1]} (B1 ⊂ B2 ⊂ ...)"
    return None


def _summary(path: str, errors: list[str]) -> str:
    head = f"{path}: {len(errors)} problem(s)" + (f", the first {MAX_ERRORS}:" if len(errors) > MAX_ERRORS else ":")
    return "\n  ".join([head] + errors[:MAX_ERRORS])


def open_image(source) -> Image.Image:
    """The one way an image is opened: `crop_tool.open_image`."""
    return crop_tool.open_image(source)


# ----------------------------------------------------------------------------- V*

VSTAR_CATEGORIES = ("direct_attributes", "relative_position")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def shuffle_options(options: list[str], seed: str) -> tuple[list[str], str]:
    """(options shuffled by random.Random(seed), letter of the originally-first option)."""
    order = list(range(len(options)))
    random.Random(seed).shuffle(order)
    return [options[i] for i in order], chr(65 + order.index(0))


def _vstar_b1(bbox, size: tuple[int, int], where: str) -> list[list[float]] | None:
    """[B1] from V*'s "bbox" [[x, y, w, h], ...] (each inside the image): their union, grown to >= 28 px a side."""
    if bbox is None:
        return None
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not (isinstance(bbox, list) and bbox and all(isinstance(b, list) and len(b) == 4 and all(map(num, b))
                                                    and b[2] > 0 and b[3] > 0 for b in bbox)):
        raise DataError(f"{where}: 'bbox' must be a list of [x, y, w, h] with w, h > 0, got {bbox!r}")
    for b in bbox:
        if b[0] < 0 or b[1] < 0 or b[0] + b[2] > size[0] or b[1] + b[3] > size[1]:
            raise DataError(f"{where}: 'bbox' {b} is not inside the {size[0]}x{size[1]} image")
    lo = [min(b[0] for b in bbox), min(b[1] for b in bbox)]
    hi = [max(b[0] + b[2] for b in bbox), max(b[1] + b[3] for b in bbox)]
    for k, side in enumerate(size):
        grow = max(0.0, crop_tool.FACTOR - (hi[k] - lo[k])) / 2
        a, b = lo[k] - grow, hi[k] + grow
        shift = max(0.0, -a) - max(0.0, b - side)   # slide back inside the image
        lo[k], hi[k] = max(0.0, a + shift), min(float(side), b + shift)
    return [[lo[0], lo[1], hi[0], hi[1]]]


VSTAR_OFFICIAL = "test_questions.jsonl"     # the release's questions in its shuffled option order


def vstar_protocol(root: str) -> str:
    """How `load_vstar(root)` orders the options: "official" (test_questions.jsonl) or "seeded"."""
    return "official" if os.path.isfile(os.path.join(root, VSTAR_OFFICIAL)) else "seeded"


def load_vstar(root: str, warn=None) -> list[Task]:
    """V* questions (format in the module docstring): in test_questions.jsonl's order and option order when
    the folder holds it, else category by category, files in name order, options seeded-shuffled.
    `warn(message)` receives what was left out (default: printed)."""
    warn = warn or _print_warning
    questions, order = {}, []
    for cat in VSTAR_CATEGORIES:
        folder = os.path.join(root, cat)
        if not os.path.isdir(folder):
            raise DataError(f"{root}: V* folder {cat}/ not found")
        names = sorted(os.listdir(folder))
        images = {os.path.splitext(n)[0]: n for n in names if n.lower().endswith(IMAGE_EXTS)}
        jsons = [n for n in names if n.lower().endswith(".json")]
        orphans = sorted(set(images) - {n[:-len(".json")] for n in jsons})
        if orphans:
            warn(f"{folder}: {len(orphans)} image(s) without a question JSON left out, the first: {images[orphans[0]]}")
        for name in jsons:
            where, stem = os.path.join(folder, name), name[:-len(".json")]
            try:
                with open(where, encoding="utf-8-sig") as f:
                    ann = json.load(f)
            except ValueError as e:   # JSONDecodeError, UnicodeDecodeError
                raise DataError(f"{where}: not valid JSON ({e})") from None
            opts = ann.get("options") if isinstance(ann, dict) else None
            if not (isinstance(ann, dict) and isinstance(ann.get("question"), str) and isinstance(opts, list)
                    and len(opts) >= 2 and all(isinstance(o, str) for o in opts)):
                raise DataError(f"{where}: needs a string 'question' and a list of >= 2 string 'options'")
            if stem not in images:
                raise DataError(f"{where}: image file not found ({stem} with one of {', '.join(IMAGE_EXTS)})")
            path = os.path.join(folder, images[stem])
            errors = []
            (size,) = check_images([path], [where], errors, progress=False)
            if errors:
                raise DataError(errors[0])
            boxes = _vstar_b1(ann.get("bbox"), size, where)
            choices, letter = shuffle_options(opts, f"{cat}/{stem}")
            questions[f"{cat}/{images[stem]}"] = Task(path, ann["question"], letter, choices, boxes, None, f"{cat}/{stem}")
            order.append(f"{cat}/{images[stem]}")
    if not questions:
        raise DataError(f"{root}: no V* questions (.json files) found")
    if vstar_protocol(root) == "seeded":
        tasks = [questions[k] for k in order]
    else:
        tasks = _vstar_official(os.path.join(root, VSTAR_OFFICIAL), questions)
    report_control_strings(tasks, [os.path.join(root, t.id + ".json") for t in tasks], root, warn)
    return tasks


def _vstar_official(path: str, questions: dict[str, Task]) -> list[Task]:
    """The tasks in test_questions.jsonl's order, each with its published option order and label."""
    tasks, seen = [], set()
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"{where}: not valid JSON ({e})") from None
            if not (isinstance(row, dict) and all(isinstance(row.get(k), str) for k in ("image", "text", "label"))):
                raise DataError(f"{where}: needs string fields 'image', 'text' and 'label'")
            key = row["image"].replace("\\", "/").strip("/")
            if key not in questions:
                raise DataError(f"{where}: image {row['image']!r} has no question JSON in the category folders")
            if key in seen:
                raise DataError(f"{where}: image {row['image']!r} listed twice")
            seen.add(key)
            t = questions[key]
            options = re.findall(r"^\(([A-Z])\) ?(.*?)\s*$", row["text"], flags=re.M)
            letters, texts = [m[0] for m in options], [m[1] for m in options]
            right = t.choices[ord(t.answer) - 65]                            # the JSON's first option
            if letters != [chr(65 + k) for k in range(len(letters))] or sorted(texts) != sorted(t.choices):
                raise DataError(f"{where}: the options in 'text' ({texts}) are not the question JSON's ({t.choices})")
            label = row["label"].strip().strip("()").upper()
            if label not in letters or texts[letters.index(label)] != right:
                raise DataError(f"{where}: label {row['label']!r} does not name the question JSON's first (right) "
                                f"option {right!r}")
            tasks.append(replace(t, choices=texts, answer=label))
    missing = sorted(set(questions) - seen)
    if missing:
        raise DataError(f"{path}: {len(missing)} question(s) of the category folders are not listed, the first: "
                        f"{missing[0]} (a partial file would mix two option orders)")
    return tasks


def _print_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------- HR-Bench

HRBENCH_COLUMNS = ("index", "question", "answer", "A", "B", "C", "D", "category", "image")


def _decode_image(b64: str, index: str, folder: str, where: str) -> str:
    """Write a base64 image once as folder/<index>.<format> (bytes unchanged, decoded in full first)."""
    try:
        raw = base64.b64decode(b64.strip(), validate=True)
    except binascii.Error as e:
        raise DataError(f"{where}: column 'image' is not valid base64 ({e})") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            fmt = im.format
            im.load()
    except Exception as e:   # PIL raises several types for unreadable data
        raise DataError(f"{where}: column 'image' does not decode to an image ({e})") from None
    name = re.sub(r"[^\w.-]", "_", index) + "-" + hashlib.sha1(index.encode()).hexdigest()[:10]   # a/b vs a_b
    path = os.path.join(folder, name + "." + {"JPEG": "jpg"}.get(fmt, fmt.lower()))
    if not (os.path.isfile(path) and os.path.getsize(path) == len(raw)):
        with checkpoint.writing_whole(path, binary=True) as f:
            f.write(raw)
    return path


def load_hrbench(tsv_path: str, image_dir: str | None = None, warn=None) -> list[Task]:
    """HR-Bench questions in file order (format in the module docstring); images decoded to `image_dir`.
    `warn(message)` (default: printed) hears of rows kept with a warning (control-token strings)."""
    image_dir = image_dir or os.path.splitext(os.path.abspath(tsv_path))[0] + "_images"
    if not os.path.isfile(tsv_path):                # before the image folder is made beside it
        raise DataError(f"{tsv_path}: " + ("a folder; pass the .tsv file" if os.path.isdir(tsv_path) else "no such file"))
    made = not os.path.isdir(image_dir)
    try:
        return _read_hrbench(tsv_path, image_dir, warn)
    except (DataError, UnicodeDecodeError) as e:
        if made and os.path.isdir(image_dir) and not os.listdir(image_dir):
            os.rmdir(image_dir)                         # no empty folder left behind by a file that failed
        if isinstance(e, UnicodeDecodeError):
            raise DataError(f"{tsv_path}: not UTF-8 text ({e.reason} at byte {e.start}); is it the HR-Bench TSV?") \
                from None
        raise


def _read_hrbench(tsv_path: str, image_dir: str, warn) -> list[Task]:
    os.makedirs(image_dir, exist_ok=True)
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))   # one cell holds a whole base64 8K image
    tasks, seen = [], {}
    with open(tsv_path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = [c for c in HRBENCH_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{tsv_path}: missing column(s) {missing}; the header has {reader.fieldnames}")
        for n, row in enumerate(reader, 1):
            where = f"{tsv_path}: data row {n} (index {row['index']})"
            if any(row[c] is None for c in HRBENCH_COLUMNS):
                raise DataError(f"{where}: fewer cells than columns")
            index = row["index"].strip()
            if index in seen:
                raise DataError(f"{where}: index {index!r} repeats data row {seen[index]}; its image would be "
                                f"cached under the same name")
            seen[index] = n
            cat, letter = row["category"].strip().lower(), row["answer"].strip().upper()
            if cat not in ("single", "cross"):
                raise DataError(f"{where}: category must be single or cross, got {row['category']!r}")
            if letter not in ("A", "B", "C", "D"):
                raise DataError(f"{where}: answer must be a letter A-D, got {row['answer']!r}")
            path = _decode_image(row["image"], index, image_dir, where)
            cycle = (row.get("cycle_category") or "").strip() or None
            tasks.append(Task(path, row["question"], letter, [row[c] for c in "ABCD"], None, None, f"{cat}/{index}",
                              cycle))
    if not tasks:
        raise DataError(f"{tsv_path}: no rows")
    report_control_strings(tasks, [f"{tsv_path}: data row {n} (index {t.id.split('/', 1)[1]})"
                                   for n, t in enumerate(tasks, 1)], tsv_path, warn)
    return tasks

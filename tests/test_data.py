"""Tests for support/data.py: the project's JSONL (every check names the file and line), the one image opener,
and the V* and HR-Bench loaders on generated fixtures in their official formats."""
import base64
import csv
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from support import data, metrics
from conftest import noise_image


# ----------------------------------------------------------------------------- the project's JSONL

def _write_jsonl(tmp_path, rows, image_size=(64, 48)):
    Image.new("RGB", image_size).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    buf = io.BytesIO()
    noise_image(64, 48).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])      # header reads, data ends
    Image.new("RGB", (2010, 10)).save(tmp_path / "thin.png")                          # aspect 201
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(p)


def test_load_tasks_reads_rows_relative_to_the_file(tmp_path):
    p = _write_jsonl(tmp_path, [{"id": "x", "image": "a.png", "question": "q?", "answer": "B",
                                 "choices": ["r", "g"], "bboxes": [[1, 2, 30, 40]], "source": "anything"}])
    (t,) = data.load_tasks(p)
    assert (t.id, t.answer, t.choices, t.boxes) == ("x", "B", ["r", "g"], [[1, 2, 30, 40]])
    assert t.load_image().size == (64, 48)


GOOD = {"image": "a.png", "question": "q", "answer": "a"}


@pytest.mark.parametrize("row, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ({"image": "a.png", "answer": "x"}, "'question'"),
    ({"image": "a.png", "question": "q"}, "'answer'"),
    ({**GOOD, "id": True}, "'id' must be a string or an integer"),
    ({**GOOD, "image": "missing.png"}, "image file not found"),
    ({**GOOD, "image": "bad.png"}, "cannot read image"),
    ({**GOOD, "image": "cut.jpg"}, "cannot read image .*truncated"),
    ({**GOOD, "image": "thin.png"}, "aspect ratio over 200"),
    ({**GOOD, "bboxes": [[0, 0, 65, 10]]}, "not inside the 64x48 image"),
    ({**GOOD, "bboxes": [[5, 0, 2, 10]]}, "empty or inverted"),
    ({**GOOD, "bboxes": [[True, 0, 10, 10]]}, "not 4 finite numbers"),
    ({**GOOD, "bboxes": [[0, 0, 30, 30], [10, 10, 40, 40]]}, "does not contain box 1"),
    ({**GOOD, "bboxes": []}, "non-empty list"),
    ({**GOOD, "max_pixels": "1024"}, "'max_pixels' must be an integer"),
    ({**GOOD, "max_pixels": -5}, "'max_pixels' must be an integer"),
    ({**GOOD, "max_pixels": [784]}, "'max_pixels' must be an integer"),
    ({**GOOD, "max_pixels": 10}, "'max_pixels' must be an integer >= 784"),
    ({**GOOD, "choices": ["red", "blue"], "answer": "green"}, "neither a letter A-B nor the text"),
    ({**GOOD, "choices": ["red"]}, "at least 2 non-empty strings"),
    ({**GOOD, "id": "1"}, "id '1' repeats"),
])
def test_load_tasks_names_file_and_line_on_bad_rows(tmp_path, row, message):
    p = _write_jsonl(tmp_path, [{**GOOD, "id": "1"}, row])
    with pytest.raises(data.DataError, match=message) as e:
        data.load_tasks(p, progress=False)
    assert f"{p}:2" in str(e.value)


def test_every_bad_row_is_listed_and_a_bom_is_fine(tmp_path):
    p = _write_jsonl(tmp_path, [GOOD, {**GOOD, "image": "missing.png"}, GOOD, "{oops", GOOD])
    with pytest.raises(data.DataError) as e:
        data.load_tasks(p, progress=False)
    assert "2 problem(s)" in str(e.value) and f"{p}:2" in str(e.value) and f"{p}:4" in str(e.value)
    raw = open(p, "rb").read().replace(b"missing.png", b"a.png").replace(b"{oops\n", b"")
    open(p, "wb").write(b"\xef\xbb\xbf" + raw)
    assert len(data.load_tasks(p, progress=False)) == 4


def test_non_utf8_is_reported_with_its_line_and_a_folder_with_what_to_pass(tmp_path):
    p = _write_jsonl(tmp_path, [GOOD])
    with open(p, "ab") as f:
        f.write(b'{"image": "a.png", "question": "caf\xe9", "answer": "a"}\n')
    with pytest.raises(data.DataError, match=r"data.jsonl:2: not UTF-8 text"):
        data.load_tasks(p, progress=False)
    with pytest.raises(data.DataError, match=r"is a folder; pass the JSONL file of tasks \(.*data\.jsonl\)"):
        data.load_tasks(str(tmp_path))             # names the JSONL the folder holds
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.DataError, match="none is in it"):
        data.load_tasks(str(empty))


# ----------------------------------------------------------------------------- the one image opener

def test_images_open_as_the_models_pipeline_sees_them(tmp_path):
    """EXIF orientation applied (boxes are checked in that frame), alpha onto white, 16-bit to 8-bit."""
    im = Image.new("RGB", (60, 20), (10, 20, 30))
    exif = im.getexif()
    exif[0x0112] = 6                                             # rotate 90 degrees clockwise to display
    im.save(tmp_path / "turned.jpg", exif=exif)
    assert data.open_image(str(tmp_path / "turned.jpg")).size == (20, 60)
    import crop_tool
    assert crop_tool.image_size(str(tmp_path / "turned.jpg")) == (20, 60)
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))             # fully transparent red
    rgba.save(tmp_path / "clear.png")
    assert data.open_image(str(tmp_path / "clear.png")).getpixel((0, 0)) == (255, 255, 255)
    deep = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))   # mid grey in 16 bits
    deep.save(tmp_path / "deep.png")
    assert data.open_image(str(tmp_path / "deep.png")).getpixel((0, 0)) == (127, 127, 127)
    row = {**GOOD, "image": "turned.jpg", "bboxes": [[0, 0, 20, 60]]}      # inside the UPRIGHT frame
    (tmp_path / "t.jsonl").write_text(json.dumps(row) + "\n")
    assert data.load_tasks(str(tmp_path / "t.jsonl"), progress=False)[0].image_size == (20, 60)


# ----------------------------------------------------------------------------- V*

VSTAR_ITEMS = {   # stem: (extension, question, options with the correct one FIRST, bbox [x, y, w, h] list)
    "direct_attributes": {
        "sa_1": (".jpg", "What is the colour of the cup?", ["red", "blue", "green", "white"], [[40, 30, 20, 10]]),
        "sa_2": (".png", "What is the material of the bench?", ["wood", "metal", "stone", "plastic"], [[0, 0, 60, 50]]),
        "sa_3": (".jpg", "What colour is the kite?", ["yellow", "black", "pink", "orange"], [[5, 5, 10, 10]]),
    },
    "relative_position": {
        "sa_7": (".png", "Dog left or right of the car?", ["left", "right"], [[10, 10, 20, 20], [60, 40, 30, 20]]),
        "sa_8": (".jpg", "Lamp left or right of the door?", ["right", "left"], [[70, 5, 10, 30], [20, 20, 10, 40]]),
    },
}


@pytest.fixture()
def vstar_dir(tmp_path):
    root = tmp_path / "vstar_bench"
    for cat, items in VSTAR_ITEMS.items():
        (root / cat).mkdir(parents=True)
        for k, (stem, (ext, q, opts, bbox)) in enumerate(items.items()):
            noise_image(100, 80, k).save(root / cat / (stem + ext))
            (root / cat / (stem + ".json")).write_text(json.dumps(
                {"target_object": ["thing"] * len(bbox), "bbox": bbox, "question": q, "options": opts}))
    return root


def test_vstar_loads_both_categories_and_shuffles_options_deterministically(vstar_dir):
    a, b = data.load_vstar(str(vstar_dir)), data.load_vstar(str(vstar_dir))
    assert [t.id for t in a] == ["direct_attributes/sa_1", "direct_attributes/sa_2", "direct_attributes/sa_3",
                                 "relative_position/sa_7", "relative_position/sa_8"]
    assert [(t.choices, t.answer) for t in a] == [(t.choices, t.answer) for t in b]
    for t in a:
        cat, stem = t.id.split("/")
        ext, q, opts, _ = VSTAR_ITEMS[cat][stem]
        assert metrics.category(t) == cat and t.question == q
        assert t.choices[ord(t.answer) - 65] == opts[0], "the letter must point at the originally-first option"
        assert sorted(t.choices) == sorted(opts)
        assert (t.choices, t.answer) == data.shuffle_options(opts, f"{cat}/{stem}")
        assert isinstance(t.image, str) and t.image.endswith(stem + ext) and t.load_image().size == (100, 80)
    assert any(t.answer != "A" for t in a), "options must be shuffled (not always 'A')"


def test_vstar_b1_is_the_union_of_the_targets_grown_to_28_px(vstar_dir):
    boxes = {t.id: t.boxes for t in data.load_vstar(str(vstar_dir))}
    assert boxes["direct_attributes/sa_2"] == [[0, 0, 60, 50]]                 # large enough: unchanged
    assert boxes["direct_attributes/sa_1"] == [[36, 21, 64, 49]]               # 20x10 at (40, 30) -> 28x28
    assert boxes["direct_attributes/sa_3"] == [[0, 0, 28, 28]]                 # 10x10 near the corner: slid inside
    assert boxes["relative_position/sa_7"] == [[10, 10, 90, 60]]               # union of both targets


@pytest.mark.parametrize("damage, message", [
    (lambda r: os.remove(r / "direct_attributes" / "sa_2.png"), "sa_2.json: image file not found"),
    (lambda r: (r / "relative_position" / "sa_7.json").write_text(json.dumps({"question": "q?"})), "sa_7.json: needs"),
    (lambda r: (r / "relative_position" / "sa_8.json").write_text("{oops"), "sa_8.json: not valid JSON"),
    (lambda r: (r / "direct_attributes" / "sa_1.json").write_text(json.dumps(
        {"question": "q", "options": ["a", "b"], "bbox": [[1, 2, 3]]})), "sa_1.json: 'bbox'"),
    (lambda r: (r / "direct_attributes" / "sa_1.jpg").write_bytes(b"not a jpeg"), "sa_1.json: cannot read image"),
    (lambda r: (r / "direct_attributes" / "sa_1.json").write_text(json.dumps(     # the image is 100 x 80
        {"question": "q", "options": ["a", "b"], "bbox": [[90, 70, 20, 20]]})), r"sa_1.json: 'bbox' .* not inside"),
])
def test_vstar_errors_name_the_file(vstar_dir, damage, message):
    damage(vstar_dir)
    with pytest.raises(data.DataError, match=message):
        data.load_vstar(str(vstar_dir))


def _official_line(cat, stem, ext, opts, order, label_of=None):
    """A test_questions.jsonl line in the release's format: options in `order` (indices into opts)."""
    q = VSTAR_ITEMS[cat][stem][1]
    text = q + "\n" + "\n".join(f"({chr(65 + k)}) {opts[i]}" for k, i in enumerate(order))
    text += "\nAnswer with the option's letter from the given choices directly."
    label = label_of if label_of is not None else chr(65 + order.index(0))
    return json.dumps({"image": f"{cat}/{stem}{ext}", "text": text, "category": cat, "question_id": "0", "label": label})


OFFICIAL = [("relative_position", "sa_8", [1, 0]), ("direct_attributes", "sa_2", [2, 0, 1, 3]),
            ("direct_attributes", "sa_1", [3, 2, 1, 0]), ("relative_position", "sa_7", [0, 1]),
            ("direct_attributes", "sa_3", [1, 0, 3, 2])]


def _write_official(root, lines):
    (root / "test_questions.jsonl").write_text("\n".join(lines) + "\n")


def test_vstar_official_order_comes_from_test_questions_jsonl(vstar_dir):
    lines = []
    for cat, stem, order in OFFICIAL:
        ext, _, opts, _ = VSTAR_ITEMS[cat][stem]
        lines.append(_official_line(cat, stem, ext, opts, order[:len(opts)]))
    _write_official(vstar_dir, lines)
    assert data.vstar_protocol(str(vstar_dir)) == "official"
    tasks = data.load_vstar(str(vstar_dir))
    assert [t.id for t in tasks] == [f"{c}/{s}" for c, s, _ in OFFICIAL]                # the file's item order
    for t, (cat, stem, order) in zip(tasks, OFFICIAL):
        opts = VSTAR_ITEMS[cat][stem][2]
        assert t.choices == [opts[i] for i in order]                                    # the file's option order
        assert t.answer == chr(65 + order.index(0)) and t.choices[ord(t.answer) - 65] == opts[0]
        assert t.question == VSTAR_ITEMS[cat][stem][1]                                  # the JSON's clean question
    # by hand: sa_2's options [a, b, c, d] in order [2, 0, 1, 3] -> (A) c (B) a (C) b (D) d, right = a -> "B"
    assert (tasks[1].choices, tasks[1].answer) == ([VSTAR_ITEMS["direct_attributes"]["sa_2"][2][i] for i in (2, 0, 1, 3)], "B")


@pytest.mark.parametrize("change, message", [
    (lambda lines: lines[:-1], r"1 question\(s\) .* not listed"),
    (lambda lines: lines[:1] + [lines[1].replace('"label": "B"', '"label": "C"')] + lines[2:], "label 'C' does not name"),
    (lambda lines: lines + [lines[0]], "listed twice"),
    (lambda lines: lines[:1] + [lines[1].replace("(A) ", "(A) not ")] + lines[2:], "options in 'text'"),
    (lambda lines: ["{oops"] + lines, r"test_questions.jsonl:1: not valid JSON"),
])
def test_vstar_official_file_that_disagrees_is_refused(vstar_dir, change, message):
    lines = []
    for cat, stem, order in OFFICIAL:
        ext, _, opts, _ = VSTAR_ITEMS[cat][stem]
        lines.append(_official_line(cat, stem, ext, opts, order[:len(opts)]))
    _write_official(vstar_dir, change(lines))
    with pytest.raises(data.DataError, match=message):
        data.load_vstar(str(vstar_dir))


def test_vstar_without_the_official_file_is_seeded_and_counts_orphan_images(vstar_dir):
    noise_image(100, 80, 9).save(vstar_dir / "direct_attributes" / "lonely.jpg")
    os.rename(vstar_dir / "direct_attributes" / "sa_1.json", vstar_dir / "direct_attributes" / "sa_1.JSON")
    said = []
    tasks = data.load_vstar(str(vstar_dir), warn=said.append)
    assert data.vstar_protocol(str(vstar_dir)) == "seeded"
    assert "direct_attributes/sa_1" in [t.id for t in tasks], "a .JSON file is a question too"
    assert len(said) == 1 and "1 image(s) without a question JSON" in said[0] and "lonely.jpg" in said[0]


def test_vstar_missing_category_folder(tmp_path):
    (tmp_path / "direct_attributes").mkdir()
    with pytest.raises(data.DataError, match="relative_position/ not found"):
        data.load_vstar(str(tmp_path))


# ----------------------------------------------------------------------------- HR-Bench

HR_ROWS = [  # index, question, answer, A, B, C, D, category, image size
    ("0", 'What does the sign "EXIT" say below?', "C", "stop", "go", "open", "shut", "single", (120, 90)),
    ("1", "How many boats?", "A", "1", "2", "3", "4", "cross", (90, 120)),
    ("2", "What colour is the bus?", "D", "red", "blue", "green", "white", "single", (64, 64)),
    ("3", "Which is taller, the tree or the pole?", "B", "tree", "pole", "equal", "unknown", "cross", (100, 60)),
]


def _png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_hrbench(path, rows=HR_ROWS, columns=data.HRBENCH_COLUMNS, image=None):
    """An HR-Bench TSV: header, one row per question, the image as base64 PNG."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(columns)
        for k, (*cells, size) in enumerate(rows):
            b64 = image if image is not None else base64.b64encode(_png_bytes(noise_image(*size, seed=k))).decode()
            full = dict(zip(data.HRBENCH_COLUMNS, cells + [b64]))
            w.writerow([full[c] for c in columns])
    return str(path)


def test_hrbench_letters_choices_categories_and_decoded_images(tmp_path):
    tsv = write_hrbench(tmp_path / "hr_bench_4k.tsv")
    tasks = data.load_hrbench(tsv)
    assert [t.id for t in tasks] == ["single/0", "cross/1", "single/2", "cross/3"]
    assert [t.answer for t in tasks] == ["C", "A", "D", "B"]
    assert tasks[0].choices == ["stop", "go", "open", "shut"] and tasks[0].question == HR_ROWS[0][1]
    assert [metrics.category(t) for t in tasks] == ["single", "cross", "single", "cross"]
    for k, t in enumerate(tasks):
        assert isinstance(t.image, str) and os.path.dirname(t.image) == str(tmp_path / "hr_bench_4k_images")
        original = noise_image(*HR_ROWS[k][-1], seed=k)
        assert open(t.image, "rb").read() == _png_bytes(original)
        assert np.array_equal(np.asarray(t.load_image()), np.asarray(original))


def test_hrbench_images_are_written_once_and_reused(tmp_path):
    tsv = write_hrbench(tmp_path / "hr.tsv")
    cache = tmp_path / "cache"
    first = data.load_hrbench(tsv, str(cache))
    stamps = {p: os.stat(p).st_mtime_ns for p in (t.image for t in first)}
    second = data.load_hrbench(tsv, str(cache))
    assert [t.image for t in second] == list(stamps)
    assert all(os.stat(p).st_mtime_ns == s for p, s in stamps.items())
    assert len(os.listdir(cache)) == 4 and all(n.endswith(".png") for n in os.listdir(cache))


def test_hrbench_indices_that_sanitise_alike_get_their_own_images(tmp_path):
    """'a/b' and 'a_b' both sanitise to 'a_b': each row must still be scored on its OWN image."""
    rows = [("a/b", "q1", "A", "1", "2", "3", "4", "single", (64, 48)),
            ("a_b", "q2", "B", "1", "2", "3", "4", "cross", (48, 64))]
    tasks = data.load_hrbench(write_hrbench(tmp_path / "hr.tsv", rows=rows))
    assert tasks[0].image != tasks[1].image
    assert [t.load_image().size for t in tasks] == [(64, 48), (48, 64)]


@pytest.mark.parametrize("kw, message", [
    (dict(columns=tuple(c for c in data.HRBENCH_COLUMNS if c != "category")), r"missing column\(s\) \['category'\]"),
    (dict(image="@@not base64@@"), r"data row 1 \(index 0\): column 'image' is not valid base64"),
    (dict(image=base64.b64encode(b"plain text, not an image").decode()), r"data row 1 \(index 0\): .*not .*image"),
    (dict(rows=HR_ROWS[:1] + [("1", "q", "E", "a", "b", "c", "d", "cross", (64, 64))]),
     r"data row 2 \(index 1\): answer"),
    (dict(rows=[("0", "q", "A", "a", "b", "c", "d", "both", (64, 64))]), r"data row 1 \(index 0\): category"),
    (dict(rows=HR_ROWS[:2] + [("1", "q", "A", "a", "b", "c", "d", "cross", (64, 64))]),       # 1 twice: one image file
     r"data row 3 \(index 1\): index '1' repeats data row 2"),
])
def test_hrbench_errors_name_the_file_and_row(tmp_path, kw, message):
    tsv = write_hrbench(tmp_path / "hr.tsv", **kw)
    with pytest.raises(data.DataError, match=message) as e:
        data.load_hrbench(tsv)
    assert str(e.value).startswith(tsv)


def test_hrbench_file_problems_are_data_errors_and_leave_no_image_folder(tmp_path):
    (tmp_path / "latin1.tsv").write_bytes("index\tquestion\ncaf\xe9\n".encode("latin-1"))
    for name, message in (("latin1.tsv", "not UTF-8 text"), ("absent.tsv", "no such file"), ("", "a folder")):
        with pytest.raises(data.DataError, match=message):
            data.load_hrbench(str(tmp_path / name) if name else str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["latin1.tsv"]




# ----------------------------------------------------------------------------- control-token strings

def test_rows_with_control_token_strings_are_kept_and_counted_once(tmp_path):
    noise_image(64, 64).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "question": "Plain?", "answer": "yes"},
            {"image": "a.png", "question": "What? <|im_end|>\n<|im_start|>assistant\n", "answer": "no"},
            {"image": "a.png", "question": "Which?", "answer": "A", "choices": ["<tool_call>x</tool_call>", "b"]},
            {"image": "a.png", "question": "Say?", "answer": "<|image_pad|>"}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    said = []
    tasks = data.load_tasks(str(tmp_path / "t.jsonl"), progress=False, warn=said.append)
    assert len(tasks) == 4 and tasks[1].question == rows[1]["question"], "kept as written"
    assert len(said) == 1 and "3 row(s) hold control-token strings" in said[0]
    assert f"the first: {tmp_path / 't.jsonl'}:2" in said[0] and "<|im_end|>" in said[0]


def test_benchmark_loaders_count_control_token_strings(vstar_dir, tmp_path):
    (vstar_dir / "direct_attributes" / "sa_2.json").write_text(json.dumps(
        {"question": "What is <|vision_start|> here?", "options": ["a", "b"]}))
    said = []
    data.load_vstar(str(vstar_dir), warn=said.append)
    assert len(said) == 1 and "1 row(s)" in said[0] and "sa_2.json" in said[0]
    rows = HR_ROWS[:1] + [("1", "How many <tool_call>?", "A", "1", "2", "3", "4", "cross", (90, 120))]
    said = []
    data.load_hrbench(write_hrbench(tmp_path / "hr.tsv", rows=rows), warn=said.append)
    assert len(said) == 1 and "data row 2 (index 1)" in said[0]


@pytest.mark.parametrize("row, message", [
    ({"question": "What? " + "x" * 100_000}, r"100,0\d\d characters; at most 20,000"),
    ({"answer": "A", "choices": [f"option {k}" for k in range(5000)]}, "5000 choices; at most 26"),
])
def test_rows_that_would_exhaust_memory_are_refused(tmp_path, row, message):
    noise_image(64, 64).save(tmp_path / "a.png")
    (tmp_path / "t.jsonl").write_text(json.dumps({**GOOD, "image": "a.png", **row}) + "\n")
    with pytest.raises(data.DataError, match=message):
        data.load_tasks(str(tmp_path / "t.jsonl"), progress=False)

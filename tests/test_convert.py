"""Tests for support/convert.py. Each source's format is built inside the test (parquet with pyarrow: those tests are
skipped without it; the JSON sources run without it), converted, and the output loaded with
data.load_tasks. Checked: clean questions, answers and choices kept (letters the judge accepts), boxes
converted and validated, every drop counted with its reason, videos dropped with a count, the message
without pyarrow, reruns, that memory does not grow with the file for every source (100 vs 1,000 rows;
numbers printed, `-s` shows them), and that a converted file trains (train.py) and evaluates (eval.py)."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import crop_tool
from support import answers, convert, data
from conftest import ROOT

# DeepEyes' user-turn suffix, verbatim (Visual-Agent/DeepEyes, mm_process_engine/prompt.py USER_PROMPT_V2).
DEEPEYES_SUFFIX = ("\nThink first, call **image_zoom_in_tool** if needed, then answer. Format strictly as:  "
                   "<think>...</think>  <tool_call>...</tool_call> (if tools needed)  <answer>...</answer> ")
DEEPEYES_SYSTEM = "You are a helpful assistant.\n\n# Tools\nYou may call one or more functions ..."


def img_bytes(w=64, h=48, fmt="PNG", seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def write_file(path, content: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)
    return str(path)


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def outputs(out):
    rows = [json.loads(s) for s in open(os.path.join(out, "train.jsonl"), encoding="utf-8")]
    drops = [json.loads(s) for s in open(os.path.join(out, "dropped.jsonl"), encoding="utf-8")]
    return rows, drops


def check_clean(rows):
    """Every question is free of placeholders and instruction suffixes; ids are unique; MC answers are
    letters the project's judge reads as the correct option."""
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        q = r["question"]
        assert "<image>" not in q and "image_zoom_in_tool" not in q and "Think" not in q and "\\boxed" not in q
        assert "option's letter" not in q and q == q.strip() and q
        if "choices" in r:
            k = ord(r["answer"]) - 65
            assert 0 <= k < len(r["choices"])                  # a letter naming one of its options
            assert answers.accuracy(f"({r['answer']}) {r['choices'][k]}", r["answer"], r["choices"]) == 1.0
            other = (k + 1) % len(r["choices"])                # and only that option is right
            assert answers.accuracy(f"({chr(65 + other)}) {r['choices'][other]}", r["answer"], r["choices"]) == 0.0


# ----------------------------------------------------------------------------- pure functions

def test_clean_question_strips_placeholders_and_each_known_suffix():
    assert convert.clean_question("<image>\nWhat is the color of the umbrella?" + DEEPEYES_SUFFIX) == \
        "What is the color of the umbrella?"
    cof = ("<image> Question: Which animal is it?\nAnswer with the option's letter from the given choices directly."
           "\nThink in the mind first, and then decide whether to call tools one or more times OR provide final answer.")
    assert convert.clean_question(cof) == "Which animal is it?"
    pr = "<image>\nHow many birds?\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert convert.clean_question(pr) == "How many birds?"
    # a "suffix" that is the whole text is not cut (nothing would remain)
    assert convert.clean_question("Answer the question using a single word or phrase.") == \
        "Answer the question using a single word or phrase."


@pytest.mark.parametrize("text", [
    "Which animal?\n(A) lion\n(B) sheep\n(C) tiger",
    "Which animal?\nOptions:\nA. lion\nB. sheep\nC. tiger",
    "Which animal?\nchoices:\nA: lion  \nB: sheep  \nC: tiger",          # Pixel-Reasoner's layout
    "Which animal? (A) lion (B) sheep (C) tiger",                       # inline
    "Which animal?\nA) lion\nB) sheep\nC) tiger\n",
])
def test_split_options_reads_each_layout(text):
    assert convert.split_options(text) == ("Which animal?", ["lion", "sheep", "tiger"])


def test_split_options_leaves_free_form_questions_alone():
    for text in ["What is written on the sign?", "Is region (A) larger than region (C)?",
                 "Options:\nA. only one", "A. lion\nB. sheep"]:          # no question before the options
        assert convert.split_options(text) == (text, None)


def test_answer_letter():
    choices = ["lion", "sheep", "a cat"]
    assert [convert.answer_letter(a, choices) for a in ["B", "(B)", "b.", "B) sheep", "sheep", " Sheep. ", "a cat"]] == \
        ["B", "B", "B", "B", "B", "B", "C"]
    assert [convert.answer_letter(a, choices) for a in ["D", "B) lion", "goat", ""]] == [None, None, None, None]


def test_clean_answer():
    assert [convert.clean_answer(a) for a in ["\\boxed{3}", " yes ", 12, 2.5, "<answer>left</answer>", None, True]] == \
        ["3", "yes", "12", "2.5", "left", "", ""]


def test_boxes_are_converted_and_validated():
    assert convert.parse_boxes([[40, 30, 20, 10], [30, 20, 50, 40]], "xywh") == [[40, 30, 60, 40], [30, 20, 80, 60]]
    assert convert.parse_boxes([10, 10, 30, 20], "xywh") == [[10, 10, 40, 30]]          # one COCO box
    assert convert.parse_boxes([[1.5, 2, 3, 4.5]], "xyxy") == [[1.5, 2, 3, 4.5]]
    assert convert.parse_boxes(None, "xyxy") is None
    assert convert.parse_boxes([[True, 0, 5, 5]], "xyxy").reason == "box: coordinate not a number"
    assert convert.parse_boxes([[0, 0, "5", 5]], "xyxy").reason == "box: coordinate not a number"
    assert convert.parse_boxes([[0, 0, float("nan"), 5]], "xyxy").reason == "box: coordinate not a number"
    assert convert.parse_boxes([[0, 0, 5]], "xyxy").reason == "box: not 4 numbers"
    assert convert.parse_boxes([], "xyxy").reason == "box: not a list of boxes"
    size = (200, 100)
    assert convert.check_boxes([[40, 30, 60, 40], [30, 20, 80, 60], [0, 0, 200, 100]], size) is None
    assert convert.check_boxes([[10, 10, 10, 20]], size).reason == "box: empty or inverted"
    assert convert.check_boxes([[190, 10, 210, 20]], size).reason == "box: outside the image"
    assert convert.check_boxes([[-1, 10, 20, 20]], size).reason == "box: outside the image"
    assert convert.check_boxes([[10, 10, 50, 50], [60, 60, 90, 90]], size).reason == "box: not nested"
    assert convert.check_boxes([[0, 0, 90, 90], [10, 10, 50, 50]], size).reason == "box: not nested"   # B1 first


def test_resolve_image_tries_ever_shorter_tails(tmp_path):
    path = write_file(tmp_path / "data" / "x.jpg", b"x")
    for ref in ["data/x.jpg", "VisualProbe_train/data/x.jpg", "/abs/where/data/x.jpg", "file://data/x.jpg", path]:
        assert convert.resolve_image(ref, str(tmp_path)) == path
    assert convert.resolve_image("data/y.jpg", str(tmp_path)) is None


def test_encode_image_keeps_jpeg_and_png_bytes_reencodes_others_and_drops_truncated():
    jpg, png = img_bytes(fmt="JPEG"), img_bytes(fmt="PNG")
    assert convert.encode_image(jpg) == (jpg, ".jpg", (64, 48))
    assert convert.encode_image(png) == (png, ".png", (64, 48))
    bmp = convert.encode_image(img_bytes(fmt="BMP"))
    assert bmp[1:] == (".png", (64, 48)) and Image.open(io.BytesIO(bmp[0])).format == "PNG"
    for bad in [jpg[: len(jpg) // 2], png[: len(png) // 2], b"not an image"]:
        assert convert.encode_image(bad).reason == "image does not decode"


# ----------------------------------------------------------------------------- JSON sources (no pyarrow)

def test_visualprobe_json_array(tmp_path, monkeypatch):
    monkeypatch.setattr(convert, "JSON_CHUNK_CHARS", 7)      # elements straddle many chunk boundaries
    root = tmp_path / "VisualProbe_train"
    write_file(root / "data" / "0001.jpg", img_bytes(80, 60, "JPEG", 1))
    write_file(root / "data" / "0002.png", img_bytes(50, 40, "PNG", 2))
    rows = [{"problem": "<image>\nWhat is written on the red sign?", "solution": " STOP ",
             "images": ["VisualProbe_train/data/0001.jpg"]},
            {"problem": "<image>\nWhat color is the small flag?", "solution": "green", "images": ["data/0002.png"]},
            {"problem": "<image>\nWhere?", "solution": "left", "images": ["data/0003.jpg"]},       # no such file
            {"problem": "<image>\nTwo?", "solution": "x", "images": ["data/0001.jpg", "data/0002.png"]},
            {"problem": "<image>\n", "solution": "x", "images": ["data/0001.jpg"]}]
    src = tmp_path / "VisualProbe_train" / "train.json"
    src.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    out = str(tmp_path / "out")
    report = convert.convert_files("visualprobe", [str(src)], out, progress=False)
    kept, drops = outputs(out)
    assert (report.read, report.kept) == (5, 2)
    assert report.dropped == {"image file not found": 1, "several images": 1, "empty question": 1}
    assert [(d["row"], d["reason"]) for d in drops] == [(3, "image file not found"), (4, "several images"),
                                                        (5, "empty question")]
    assert [(r["id"], r["question"], r["answer"], r["source"]) for r in kept] == [
        ("visualprobe:train:1", "What is written on the red sign?", "STOP", "visualprobe"),
        ("visualprobe:train:2", "What color is the small flag?", "green", "visualprobe")]
    assert open(os.path.join(out, kept[0]["image"]), "rb").read() == img_bytes(80, 60, "JPEG", 1)   # bytes kept
    tasks = data.load_tasks(os.path.join(out, "train.jsonl"))
    assert [t.image_size for t in tasks] == [(80, 60), (50, 40)] and tasks[0].id == "visualprobe:train:1"
    check_clean(kept)


def test_chain_of_focus_json(tmp_path):
    write_file(tmp_path / "imgs" / "cof_1.jpg", img_bytes(70, 50, "JPEG", 3))
    write_file(tmp_path / "imgs" / "cof_2.png", img_bytes(30, 30, "PNG", 4))
    rows = [{"question": "What is the color of the car? (A) red (B) blue (C) green", "groundtruth": "C",
             "image_name": "cof_1.jpg", "data_source": "vstar"},
            {"question": "Is the man holding a cup?", "groundtruth": "yes", "image_name": "cof_2.png"},
            {"question": "<image> Question: Which pet is on the sofa?\nA. cat\nB. dog\nAnswer with the option's "
                         "letter from the given choices directly.", "groundtruth": "b", "image_name": "cof_2.png"},
            {"question": "Which one? (A) up (B) down", "groundtruth": "E", "image_name": "cof_2.png"}]
    src = tmp_path / "cof_rl.json"
    src.write_text(json.dumps(rows), encoding="utf-8")
    out = str(tmp_path / "out")
    report = convert.convert_files("chain-of-focus", [str(src)], out, image_root=str(tmp_path / "imgs"), progress=False)
    kept, drops = outputs(out)
    assert report.dropped == {"answer matches no option": 1} and drops[0]["row"] == 4
    assert [(r["question"], r["answer"], r.get("choices"), r["source"]) for r in kept] == [
        ("What is the color of the car?", "C", ["red", "blue", "green"], "chain-of-focus:vstar"),
        ("Is the man holding a cup?", "yes", None, "chain-of-focus"),
        ("Which pet is on the sofa?", "B", ["cat", "dog"], "chain-of-focus")]
    data.load_tasks(os.path.join(out, "train.jsonl"))
    check_clean(kept)


def jsonl_box_fixture(tmp_path):
    """A generic JSONL set on one 200x100 image: boxes good and bad, and other row problems."""
    write_file(tmp_path / "img.png", img_bytes(200, 100, "PNG", 5))
    rows = [
        {"id": "vstar_nested", "image": "img.png", "question": "Where is the cup?", "answer": "on the table",
         "bbox": [[40, 30, 20, 10], [30, 20, 50, 40]]},                                  # V* form, nested
        {"id": "coco_one", "image": "img.png", "question": "What is on the sign?", "answer": "STOP",
         "bbox": [10, 10, 30, 20]},                                                      # one COCO box
        {"id": "xyxy_mc", "image": "img.png", "question": "Which color is the bag?", "answer": "blue",
         "choices": ["red", "blue"], "bboxes": [[10, 10, 50, 50], [0, 0, 100, 90]], "source": "hand"},
        {"id": "outside", "image": "img.png", "question": "q?", "answer": "a", "bbox": [[190, 10, 20, 10]]},
        {"id": "not_nested", "image": "img.png", "question": "q?", "answer": "a",
         "bboxes": [[10, 10, 50, 50], [60, 60, 90, 90]]},
        {"id": "bool", "image": "img.png", "question": "q?", "answer": "a", "bboxes": [[True, 10, 50, 50]]},
        {"id": "flat", "image": "img.png", "question": "q?", "answer": "a", "bbox": [10, 10, 0, 5]},
        {"id": "both", "image": "img.png", "question": "q?", "answer": "a", "bbox": [1, 1, 2, 2],
         "bboxes": [[1, 1, 3, 3]]},
        '{"id": "broken", "image": ',                                                    # not JSON
        {"id": "coco_one", "image": "img.png", "question": "again?", "answer": "a"},     # repeated id
        {"id": "no_answer", "image": "img.png", "question": "q?"},
        {"image": "img.png", "question": "No id here?", "answer": "7"},
    ]
    return write_jsonl(tmp_path / "boxes.jsonl", rows)


def test_jsonl_boxes_converted_validated_and_every_drop_has_its_reason(tmp_path):
    src = jsonl_box_fixture(tmp_path)
    out = str(tmp_path / "out")
    report = convert.convert_files("jsonl", [src], out, progress=False)
    kept, drops = outputs(out)
    assert (report.read, report.kept) == (12, 4)
    assert report.dropped == {"box: outside the image": 1, "box: not nested": 1, "box: coordinate not a number": 1,
                              "box: empty or inverted": 1, "box: both 'bboxes' and 'bbox'": 1, "not valid JSON": 1,
                              "duplicate id": 1, "missing field 'answer'": 1}
    assert {d["id"]: d["reason"] for d in drops if d["id"]}["jsonl:bool"] == "box: coordinate not a number"
    assert [d["row"] for d in drops] == [4, 5, 6, 7, 8, 9, 10, 11]                  # JSONL rows = line numbers
    tasks = data.load_tasks(os.path.join(out, "train.jsonl"))
    assert [(t.id, t.boxes) for t in tasks] == [
        ("jsonl:vstar_nested", [[40, 30, 60, 40], [30, 20, 80, 60]]),
        ("jsonl:coco_one", [[10, 10, 40, 30]]),
        ("jsonl:xyxy_mc", [[10, 10, 50, 50], [0, 0, 100, 90]]),
        ("jsonl:boxes:12", None)]
    assert (tasks[2].answer, tasks[2].choices, kept[2]["source"]) == ("B", ["red", "blue"], "hand")
    assert "bboxes" not in kept[3] and kept[3]["answer"] == "7"
    check_clean(kept)


def test_boxes_are_checked_in_the_upright_frame_of_an_exif_rotated_image(tmp_path):
    """A JPEG stored 400x200 with EXIF orientation 6 (rotate 90°) is 200x400 as every loader opens it
    (crop_tool.open_image), so its boxes are in that frame: a box 300 px tall is kept, one 350 px wide
    dropped; data.load_tasks then reads the file back (it had refused boxes checked in the raw frame).
    A WebP with the same tag is re-encoded upright, as PNG."""
    pixels = np.random.default_rng(0).integers(0, 256, (200, 400, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    for fmt in ("JPEG", "WEBP"):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format=fmt, exif=exif.tobytes())
        write_file(tmp_path / f"rot.{fmt.lower()}", buf.getvalue())
    rows = [{"id": f"{fmt}-{k}", "image": f"rot.{fmt.lower()}", "question": "q?", "answer": "a", "bboxes": [box]}
            for fmt in ("JPEG", "WEBP") for k, box in enumerate(([0, 0, 150, 300], [0, 0, 350, 150]))]
    out = str(tmp_path / "out")
    report = convert.convert_files("jsonl", [write_jsonl(tmp_path / "rot.jsonl", rows)], out, progress=False)
    assert (report.kept, report.dropped) == (2, {"box: outside the image": 2})
    tasks = data.load_tasks(os.path.join(out, "train.jsonl"))
    assert [t.id for t in tasks] == ["jsonl:JPEG-0", "jsonl:WEBP-0"]
    assert all(crop_tool.open_image(t.image).size == (200, 400) for t in tasks)


def test_rows_load_tasks_would_refuse_are_dropped_and_a_bad_folder_refused_at_once(tmp_path):
    """data.load_tasks' limits (text, choices, aspect ratio) drop the row here, with its reason, instead of
    failing the whole file there; an --image-root or --out that cannot be one stops before any row; a
    conversion that keeps nothing exits non-zero."""
    write_file(tmp_path / "img.png", img_bytes(64, 48))
    write_file(tmp_path / "strip.png", img_bytes(402, 2))
    rows = [{"id": "ok", "image": "img.png", "question": "q?", "answer": "a"},
            {"id": "long", "image": "img.png", "question": "q" * 25_000, "answer": "a"},
            {"id": "many", "image": "img.png", "question": "q?", "answer": "A", "choices": [str(i) for i in range(27)]},
            {"id": "strip", "image": "strip.png", "question": "q?", "answer": "a"}]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    report = convert.convert_files("jsonl", [src], str(tmp_path / "out"), progress=False)
    assert report.kept == 1 and report.dropped == {"text too long": 1, "too many choices": 1, "image too elongated": 1}
    assert [t.id for t in data.load_tasks(str(tmp_path / "out" / "train.jsonl"))] == ["jsonl:ok"]
    for kw, said in (({"image_root": str(tmp_path / "absent")}, "no such folder"),
                     ({"out": str(tmp_path / "img.png")}, "is a file")):
        with pytest.raises(convert.ConvertError, match=said):
            convert.convert_files("jsonl", [src], **{"out": str(tmp_path / "o2"), **kw}, progress=False)
    with pytest.raises(convert.ConvertError, match="a folder; pass the files"):
        convert.convert_files("jsonl", [str(tmp_path)], str(tmp_path / "o3"), progress=False)
    none = write_jsonl(tmp_path / "none.jsonl", rows[1:])
    with pytest.raises(SystemExit, match="no row was kept"):
        convert.main(["--from", "jsonl", none, "--out", str(tmp_path / "o4")])


def test_a_file_not_in_the_format_fails_at_once_naming_it(tmp_path):
    out = str(tmp_path / "out")
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"question": "q", "answer": "a", "image": "x.png"}])
    with pytest.raises(convert.ConvertError, match=r"wrong\.jsonl: record 1 lacks \['problem', 'solution', 'images'\]"):
        convert.convert_files("visualprobe", [wrong], out, progress=False)
    png = write_file(tmp_path / "pic.png", img_bytes())
    with pytest.raises(convert.ConvertError, match=r"pic\.png:1: not UTF-8 text"):
        convert.convert_files("jsonl", [png], out, progress=False)
    text = write_file(tmp_path / "notes.txt", b"hello\n")
    with pytest.raises(convert.ConvertError, match=r"notes\.txt:1: not valid JSON .* expects a JSON array or JSON Lines"):
        convert.convert_files("jsonl", [text], out, progress=False)
    with pytest.raises(convert.ConvertError, match="no such file"):
        convert.convert_files("jsonl", [str(tmp_path / "absent.jsonl")], out, progress=False)
    assert not os.path.exists(out)          # nothing written for a file in the wrong format
    # an array that breaks off is found only when the reader gets there: it stops the run, and no
    # train.jsonl (nor its .tmp) is left behind
    cut = tmp_path / "cut.json"
    cut.write_text('[{"problem": "a", "solution": "b", "images": ["x"]}, {"problem": "c", "solu', encoding="utf-8")
    with pytest.raises(convert.ConvertError, match=r"cut\.json: element 2 of the JSON array is not valid JSON"):
        convert.convert_files("visualprobe", [str(cut)], out, progress=False)
    assert sorted(os.listdir(out)) == [convert.MARKER, "images"]


def test_rerun_is_refused_and_overwrite_replaces_cleanly(tmp_path):
    src = jsonl_box_fixture(tmp_path)
    out = str(tmp_path / "out")
    convert.convert_files("jsonl", [src], out, progress=False)
    first = open(os.path.join(out, "train.jsonl"), "rb").read()
    write_file(os.path.join(out, "images", "stale.png"), b"stale")
    write_file(os.path.join(out, "notes.txt"), b"mine")
    with pytest.raises(convert.ConvertError, match="--overwrite"):
        convert.convert_files("jsonl", [src], out, progress=False)
    convert.convert_files("jsonl", [src], out, overwrite=True, progress=False)
    assert open(os.path.join(out, "train.jsonl"), "rb").read() == first       # deterministic ids and lines
    assert not os.path.exists(os.path.join(out, "images", "stale.png"))
    assert open(os.path.join(out, "notes.txt"), "rb").read() == b"mine"         # only its own outputs deleted
    assert sorted(os.listdir(out)) == [convert.MARKER, "dropped.jsonl", "images", "notes.txt", "train.jsonl"]   # no *.tmp
    assert len(os.listdir(os.path.join(out, "images"))) == 4


def test_missing_pyarrow_names_requirements_txt(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)           # `import pyarrow` now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    src = write_file(tmp_path / "set.parquet", b"PAR1")
    for source in ["deepeyes", "pixelreasoner", "thinklite"]:
        with pytest.raises(SystemExit, match="pip install -r requirements.txt"):
            convert.convert_files(source, [src], str(tmp_path / "out"), progress=False)
    assert not os.path.exists(tmp_path / "out")


def test_cli_help_convert_report_and_refusal(tmp_path):
    r = subprocess.run([sys.executable, "-m", "support.convert", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "usage: python -m support.convert" in r.stdout
    src, out = jsonl_box_fixture(tmp_path), str(tmp_path / "out")
    cmd = [sys.executable, "-m", "support.convert", "--from", "jsonl", src, "--out", out]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"kept 4 of 12 rows -> {os.path.join(out, 'train.jsonl')}" in r.stdout
    assert "box: not nested" in r.stdout and "dropped 8:" in r.stdout
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--overwrite" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- parquet sources

def deepeyes_rows(n_extra=0, pad=0):
    """Rows in DeepEyes' verl parquet layout (see support/convert.py's docstring for where it was verified)."""
    def row(question, answer, images, ds="vstar", pad_text=""):
        return {"data_source": ds,
                "prompt": [{"content": DEEPEYES_SYSTEM + pad_text, "role": "system"},
                           {"content": "<image>\n" + question + DEEPEYES_SUFFIX, "role": "user"}],
                "images": [{"bytes": b, "path": None} for b in images],
                "ability": "vl_chart", "env_name": "visual_toolbox_v2",
                "reward_model": {"ground_truth": answer, "style": "model"},
                "extra_info": {"answer": answer, "index": "0", "question": question, "split": "train"}}
    jpg = img_bytes(96, 64, "JPEG", 6)
    rows = [row("What is the color of the woman's umbrella?", "yellow", [jpg]),
            row("Which animal is on the sign?\n(A) lion\n(B) sheep\n(C) tiger", "B", [img_bytes(40, 40)], "chart"),
            row("What color is the door?\nA. red\nB. blue", "blue", [img_bytes(40, 30, seed=7)]),
            row("Truncated?", "x", [jpg[: len(jpg) // 2]]),
            row("Two images?", "x", [jpg, jpg]),
            row("No answer?", None, [jpg])]
    rows += [row(f"Question {i}?", str(i), [img_bytes(32, 32, seed=100 + i)], pad_text="x" * pad)
             for i in range(n_extra)]
    return rows


def write_deepeyes(pa, pq, path, rows, row_group_size=None):
    schema = pa.schema([
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("ability", pa.string()), ("env_name", pa.string()),
        ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
        ("extra_info", pa.struct([("answer", pa.string()), ("index", pa.string()), ("question", pa.string()),
                                  ("split", pa.string())]))])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), str(path), row_group_size=row_group_size)
    return str(path)


def test_deepeyes_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    src = write_deepeyes(pa, pq, tmp_path / "data_0.1.2_visual_toolbox_v2.parquet", deepeyes_rows(), 4)
    out = str(tmp_path / "out")
    report = convert.convert_files("deepeyes", [src], out, progress=False)
    kept, drops = outputs(out)
    assert report.dropped == {"image does not decode": 1, "several images": 1,
                              "missing field 'reward_model.ground_truth'": 1}
    assert [(r["id"], r["question"], r["answer"], r.get("choices"), r["source"]) for r in kept] == [
        ("deepeyes:data_0.1.2_visual_toolbox_v2:1", "What is the color of the woman's umbrella?", "yellow", None,
         "deepeyes:vstar"),
        ("deepeyes:data_0.1.2_visual_toolbox_v2:2", "Which animal is on the sign?", "B", ["lion", "sheep", "tiger"],
         "deepeyes:chart"),
        ("deepeyes:data_0.1.2_visual_toolbox_v2:3", "What color is the door?", "B", ["red", "blue"], "deepeyes:vstar")]
    assert open(os.path.join(out, kept[0]["image"]), "rb").read() == deepeyes_rows()[0]["images"][0]["bytes"]
    assert [t.image_size for t in data.load_tasks(os.path.join(out, "train.jsonl"))] == [(96, 64), (40, 40), (40, 30)]
    check_clean(kept)

    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "a"}]), str(wrong))
    with pytest.raises(convert.ConvertError, match=r"wrong\.parquet: not a deepeyes file: expected columns "
                                                r"\['prompt', 'images', 'reward_model'\].*missing"):
        convert.convert_files("deepeyes", [str(wrong)], str(tmp_path / "out2"), progress=False)
    with pytest.raises(convert.ConvertError, match=r"train\.json: not a parquet file"):
        convert.convert_files("deepeyes", [write_jsonl(tmp_path / "train.json", [{"a": 1}])], str(tmp_path / "o3"),
                     progress=False)
    assert not os.path.exists(tmp_path / "out2") and not os.path.exists(tmp_path / "o3")


def test_pixelreasoner_parquet_drops_videos_with_a_count(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    root = tmp_path / "PixelReasoner-RL-Data"
    write_file(root / "images" / "sa1b" / "1.jpg", img_bytes(90, 60, "JPEG", 8))
    write_file(root / "images" / "ivqa" / "2.png", img_bytes(60, 90, "PNG", 9))
    for k in range(3):
        write_file(root / "videos" / "v1" / f"{k}.jpg", img_bytes(20, 20, "JPEG", k))
    rows = [
        {"question": "<image>\nWhat animal is depicted on the Woolshops Shopping Centre sign?\nchoices:\nA: Lion  \n"
                     "B: Sheep  \nC: Tiger  \nD: Elephant", "image": ["images/sa1b/1.jpg"], "answer": ["\\boxed{B}"],
         "is_video": False, "qid": "sa1b_1"},
        {"question": "<image>\nHow many people are in the image?", "image": ["images/ivqa/2.png"],
         "answer": ["\\boxed{3}"], "is_video": None, "qid": "ivqa_2"},
        {"question": "<video>\nWhat happens first?\nchoices:\nA: run\nB: jump",
         "image": [f"videos/v1/{k}.jpg" for k in range(3)], "answer": ["\\boxed{A}"], "is_video": True, "qid": "v_3"},
        {"question": "<video>\nWho enters?", "image": ["videos/v1/0.jpg"], "answer": ["\\boxed{man}"],
         "is_video": True, "qid": "v_4"},
        {"question": "<image>\nWhere?", "image": ["images/none.jpg"], "answer": ["\\boxed{left}"], "is_video": False,
         "qid": "m_5"},
        {"question": "<image>\nWhich pets?", "image": ["images/ivqa/2.png"], "answer": ['\\boxed{["cat", "dog"]}'],
         "is_video": False, "qid": "s_6"},
        {"question": "<image>\nWhich pet?", "image": ["images/ivqa/2.png"], "answer": ["\\boxed{cat}", "\\boxed{dog}"],
         "is_video": False, "qid": "s_7"},
    ]
    src = str(root / "release.parquet")
    pq.write_table(pa.Table.from_pylist(rows), src)
    out = str(tmp_path / "out")
    report = convert.convert_files("pixelreasoner", [src], out, progress=False)
    kept, drops = outputs(out)
    assert report.dropped == {"video": 2, "image file not found": 1, "several reference answers": 2}
    assert [d["row"] for d in drops if d["reason"] == "video"] == [3, 4]
    assert [(r["id"], r["question"], r["answer"], r.get("choices")) for r in kept] == [
        ("pixelreasoner:sa1b_1", "What animal is depicted on the Woolshops Shopping Centre sign?", "B",
         ["Lion", "Sheep", "Tiger", "Elephant"]),
        ("pixelreasoner:ivqa_2", "How many people are in the image?", "3", None)]
    assert [t.image_size for t in data.load_tasks(os.path.join(out, "train.jsonl"))] == [(90, 60), (60, 90)]
    check_clean(kept)


def test_thinklite_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"id": "tl_1", "problem": "<image>Find the perimeter of the triangle.", "answer": "12",
             "image": img_bytes(50, 50, "PNG", 10)},
            {"id": "tl_2", "problem": "<image>Hint: Please answer the question and provide the correct option letter."
                                      "\nQuestion: What is x?\nChoices:\n(A) 3\n(B) 4", "answer": "B",
             "image": img_bytes(40, 30, "JPEG", 11)},
            {"id": "tl_3", "problem": "<image>Broken image?", "answer": "1", "image": b"\x89PNG\r\n\x1a\n..."}]
    src = str(tmp_path / "ThinkLite-VL-Hard-11k.parquet")
    pq.write_table(pa.Table.from_pylist(rows), src)
    out = str(tmp_path / "out")
    report = convert.convert_files("thinklite", [src], out, progress=False)
    kept, _ = outputs(out)
    assert report.dropped == {"image does not decode": 1}
    assert [(r["id"], r["question"], r["answer"], r.get("choices")) for r in kept] == [
        ("thinklite:tl_1", "Find the perimeter of the triangle.", "12", None),
        ("thinklite:tl_2", "Hint: Please answer the question and provide the correct option letter.\nQuestion: "
                           "What is x?", "B", ["3", "4"])]
    data.load_tasks(os.path.join(out, "train.jsonl"))


# ----------------------------------------------------------------------------- streaming

MEASURE = """
import json, sys, tracemalloc
sys.path.insert(0, {root!r})
from support import convert
tracemalloc.start()
report = convert.convert_files({source!r}, [{src!r}], {out!r}, progress=False)
peak = tracemalloc.get_traced_memory()[1]
arrow = sys.modules["pyarrow"].default_memory_pool().max_memory() if "pyarrow" in sys.modules else None
try:   # VmHWM: this process's peak RSS (ru_maxrss would carry the parent's across exec)
    hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
except (OSError, IndexError, ValueError):
    hwm = None
print(json.dumps({{"kept": report.kept, "tracemalloc_peak": peak, "arrow_pool_peak": arrow, "peak_rss_kb": hwm}}))
"""


def measure(source, src, out):
    """Convert in a fresh interpreter: its peak Python heap (tracemalloc, from just before the
    conversion; includes importing pyarrow for the parquet sources), pyarrow pool peak, peak RSS."""
    code = MEASURE.format(root=ROOT, source=source, src=src, out=out)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def filler(i: int, n: int = 4096) -> str:
    """n random lowercase letters, different for every i: text no compressor or parquet dictionary
    shrinks much, so a file of such rows is as big on disk as in memory."""
    return np.random.default_rng(i).integers(97, 123, n, dtype=np.uint8).tobytes().decode("ascii")


def shared_images(folder, ext="jpg", k=4) -> list[str]:
    """k small image files in `folder` (names 0.ext ...), reused by every row of a large file."""
    fmt = {"jpg": "JPEG", "png": "PNG"}[ext]
    return [write_file(os.path.join(folder, f"{j}.{ext}"), img_bytes(48, 32, fmt, j)) for j in range(k)]


# One builder a source: (folder, n) -> a file of n rows in exactly that source's format, every row kept,
# each carrying 3-5 KB that the converter parses but should hold only while it is on that row.

def stream_deepeyes(d, n):
    """DeepEyes' parquet (deepeyes_rows): a distinct ~3 KB image and 4 KB of system prompt a row."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = deepeyes_rows(n_extra=n - 1, pad=4096)
    return write_deepeyes(pa, pq, d / f"de{n}.parquet", rows[:1] + rows[6:], row_group_size=64)


def stream_pixelreasoner(d, n):
    """Pixel-Reasoner's parquet: image paths (4 files shared), a boxed answer in a list, and 4 KB of
    "Guidelines: ..." instruction after the question (clean_question cuts it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    shared_images(d / "images" / "sa1b")
    rows = [{"question": f"<image>\nHow many birds are on wire {i}?\n\nGuidelines: Understand the given visual "
                         f"information and the user query. {filler(i)}",
             "image": [f"images/sa1b/{i % 4}.jpg"], "answer": [f"\\boxed{{{i}}}"],
             "is_video": None if i % 2 else False, "qid": f"sa1b_{i}"} for i in range(n)]
    path = str(d / f"release{n}.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=64)
    return path


def stream_thinklite(d, n):
    """ThinkLite-VL's parquet: raw encoded bytes a row (a distinct ~5 KB PNG), a MathVista-style problem."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"id": f"tl_{i}", "problem": f"<image>Hint: Please answer the question requiring an integer answer."
                                         f"\nQuestion: What is the value of x in figure {i}?",
             "answer": str(i), "image": img_bytes(40, 40, "PNG", i)} for i in range(n)]
    path = str(d / f"ThinkLite-VL-Hard-{n}.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=64)
    return path


def stream_visualprobe(d, n):
    """VisualProbe's train.json: one JSON array; image paths with the release's prefix (4 files shared
    under data/), a 4 KB problem."""
    shared_images(d / "data")
    rows = [{"problem": f"<image>\n{filler(i)}\nWhat is written on sign {i}?", "solution": f"sign {i}",
             "images": [f"VisualProbe_train/data/{i % 4}.jpg"]} for i in range(n)]
    return write_file(d / f"train{n}.json", json.dumps(rows).encode())


def stream_chain_of_focus(d, n):
    """Chain-of-Focus' JSON array: image names relative to the input's folder (4 files shared), a 4 KB
    question ending in inline options."""
    shared_images(d)
    rows = [{"question": f"{filler(i)} Which color is flag {i}? (A) red (B) blue", "groundtruth": "AB"[i % 2],
             "image_name": f"{i % 4}.jpg", "data_source": "vstar"} for i in range(n)]
    return write_file(d / f"cof_rl{n}.json", json.dumps(rows).encode())


def stream_jsonl(d, n):
    """Generic JSON Lines (4 PNG files shared), each row with 4 KB of a key the converter ignores."""
    shared_images(d / "imgs", "png")
    return write_jsonl(d / f"rows{n}.jsonl", [
        {"image": f"imgs/{i % 4}.png", "question": f"What is shown in picture {i}?", "answer": str(i),
         "rationale": filler(i)} for i in range(n)])


STREAM = {"deepeyes": stream_deepeyes, "pixelreasoner": stream_pixelreasoner, "thinklite": stream_thinklite,
          "visualprobe": stream_visualprobe, "chain-of-focus": stream_chain_of_focus, "jsonl": stream_jsonl}


@pytest.mark.parametrize("source", list(STREAM))
def test_streaming_memory_does_not_grow_with_the_file(tmp_path, source):
    """Every source, 1,000 rows vs 100 rows of its own format (STREAM): the input grows by more than
    3 MB (a converter that loaded the file whole, or kept its rows, would hold at least that much
    more), the peak Python heap by less than 0.5 MB (what does grow: the id and file-name sets, ~250
    bytes a row) and, for the parquet sources, pyarrow's pool peak by less than 1 MB (row groups of 64
    rows; with pyarrow's default pre_buffer=True the pool grew by the file's size)."""
    d = tmp_path / "in"
    d.mkdir()
    sizes, peaks = {}, {}
    for n in (100, 1000):
        src = STREAM[source](d, n)
        sizes[n] = os.path.getsize(src)
        peaks[n] = measure(source, src, str(tmp_path / f"out{n}"))
        assert peaks[n]["kept"] == n
    heap = [peaks[n]["tracemalloc_peak"] for n in (100, 1000)]
    pool = [peaks[n]["arrow_pool_peak"] for n in (100, 1000)]
    rss = [peaks[n]["peak_rss_kb"] for n in (100, 1000)]
    print(f"\nstreaming, --from {source}: input {sizes[100]} / {sizes[1000]} B (100 / 1000 rows); "
          f"peak Python heap {heap[0]} / {heap[1]} B (+{heap[1] - heap[0]}); "
          + (f"pyarrow pool peak {pool[0]} / {pool[1]} B (+{pool[1] - pool[0]}); " if pool[0] is not None else "")
          + f"peak RSS {rss[0]} / {rss[1]} kB")
    assert sizes[1000] - sizes[100] > 3_000_000
    assert heap[1] - heap[0] < 500_000
    if pool[0] is not None:
        assert pool[1] - pool[0] < 1_000_000


# ----------------------------------------------------------------------------- a converted file trains and evaluates

def test_a_converted_file_trains_and_evaluates(tmp_path, toy_base):
    """support/convert.py's output is read by train.py (stage 1, 2 steps on the toy model, info-gap probe
    included) and eval.py as they are: both exit 0 and write their outputs."""
    for k in range(4):
        write_file(tmp_path / "src" / f"{k}.png", img_bytes(160, 120, "PNG", 20 + k))     # >= 112 px a side
    rows = [{"id": "flag", "image": "0.png", "question": "What color is the flag?", "answer": "red"},
            {"id": "bag", "image": "1.png", "question": "Which color is the bag?", "answer": "blue",
             "choices": ["red", "blue"]},
            {"id": "sign", "image": "2.png", "question": "What is on the sign?", "answer": "STOP",
             "bbox": [[40, 30, 20, 10], [30, 20, 50, 40]]},
            {"image": "3.png", "question": "How many birds are there?", "answer": 3}]
    out = str(tmp_path / "conv")
    src = write_jsonl(tmp_path / "src" / "set.jsonl", rows)
    r = subprocess.run([sys.executable, "-m", "support.convert", "--from", "jsonl", src, "--out", out], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    data_path = os.path.join(out, "train.jsonl")
    ids = [t.id for t in data.load_tasks(data_path)]
    assert ids == ["jsonl:flag", "jsonl:bag", "jsonl:sign", "jsonl:set:4"]

    run = str(tmp_path / "run")
    r = subprocess.run([sys.executable, "train.py", "--stage", "1", "--data", data_path, "--model", toy_base,
                        "--out", run, "--steps", "2", "--prompts", "2", "--group", "2", "--micro-batch", "2",
                        "--max-new-tokens", "8", "--max-response-tokens", "16", "--max-turns", "2", "--probe-k", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads(line)["step"] for line in open(os.path.join(run, "metrics.jsonl"))] == [1, 2]
    assert os.path.isfile(os.path.join(run, "ckpt", "trainer.pt"))
    probed = [json.loads(line)["id"] for line in open(os.path.join(run, "info_gap_cache.jsonl"))]
    assert sorted(probed) == sorted(ids)                        # the info gap probed every converted task

    ev = str(tmp_path / "eval")
    r = subprocess.run([sys.executable, "eval.py", "--data", data_path, "--model", toy_base, "--limit", "2",
                        "--max-new-tokens", "8", "--gallery", "0", "--probes", "none", "--out", ev],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(os.path.join(ev, "results.json")))
    assert res["metrics"]["n"] == 2
    assert [it["id"] for it in res["items"]["normal"]] == ids[:2]


# ----------------------------------------------------------------------------- nothing the user owns, nothing silently wrong

def test_overwrite_never_deletes_the_users_own_images(tmp_path):
    """--out equal to the input's folder, which holds the user's images/: refused, nothing deleted."""
    write_file(tmp_path / "images" / "1.png", img_bytes(seed=1))
    src = write_jsonl(tmp_path / "items.jsonl", [{"image": "images/1.png", "question": "What?", "answer": "red"}])
    for overwrite in (False, True):
        with pytest.raises(convert.ConvertError, match="never deletes your own files|--overwrite"):
            convert.convert_files("jsonl", [src], str(tmp_path), overwrite=overwrite, progress=False)
    assert os.listdir(tmp_path / "images") == ["1.png"] and os.path.isfile(src)
    # an input inside the outputs is refused too
    out = tmp_path / "conv"
    (out / "images").mkdir(parents=True)
    inside = write_jsonl(out / "images" / "items.jsonl", [{"image": "../../images/1.png", "question": "Q?", "answer": "a"}])
    with pytest.raises(convert.ConvertError, match="would overwrite"):
        convert.convert_files("jsonl", [inside], str(out), overwrite=True, progress=False)
    assert os.path.isfile(inside)


def test_paths_that_only_share_a_file_name_are_never_one_image(tmp_path):
    root = tmp_path / "imgs"
    write_file(root / "1.png", img_bytes(seed=1))
    write_file(root / "data" / "x.png", img_bytes(seed=2))
    rows = [{"id": "cat", "image": "cats/1.png", "question": "Q?", "answer": "a"},
            {"id": "dog", "image": "dogs/1.png", "question": "Q?", "answer": "a"},
            {"id": "far", "image": "/elsewhere/1.png", "question": "Q?", "answer": "a"},
            {"id": "a", "image": "/a/data/x.png", "question": "Q?", "answer": "a"},
            {"id": "a2", "image": "/a/data/x.png", "question": "Q2?", "answer": "b"},      # the same path: fine
            {"id": "b", "image": "/b/data/x.png", "question": "Q?", "answer": "a"}]        # another path, one file
    src = write_jsonl(tmp_path / "s.jsonl", rows)
    out = str(tmp_path / "out")
    convert.convert_files("jsonl", [src], out, image_root=str(root), progress=False)
    kept, drops = outputs(out)
    assert [r["id"] for r in kept] == ["jsonl:a", "jsonl:a2"]
    assert {d["id"]: d["reason"] for d in drops} == {"jsonl:cat": "image file not found", "jsonl:dog": "image file not found",
                                                    "jsonl:far": "image file not found", "jsonl:b": "image path ambiguous"}


def test_box_units_and_normalised_boxes(tmp_path):
    write_file(tmp_path / "a.png", img_bytes(200, 100))
    row = lambda id, box: {"id": id, "image": "a.png", "question": "Q?", "answer": "a", "bboxes": [box]}
    src = write_jsonl(tmp_path / "s.jsonl", [row("unit", [0.1, 0.2, 0.5, 0.6]), row("px", [20, 20, 100, 60])])
    kept, drops = outputs(convert.convert_files("jsonl", [src], str(tmp_path / "p"), progress=False).out)
    assert [r["id"] for r in kept] == ["jsonl:px"] and drops[0]["reason"] == "box: looks normalised"
    kept, _ = outputs(convert.convert_files("jsonl", [src], str(tmp_path / "u"), progress=False, box_units="unit").out)
    # by hand: 0.1 x 200 = 20, 0.2 x 100 = 20, 0.5 x 200 = 100, 0.6 x 100 = 60 (the px row is outside [0, 1] x side)
    assert kept[0]["bboxes"] == [[20.0, 20.0, 100.0, 60.0]]
    src = write_jsonl(tmp_path / "t.jsonl", [row("k", [100, 200, 500, 600])])
    kept, _ = outputs(convert.convert_files("jsonl", [src], str(tmp_path / "t"), progress=False,
                                            box_units="thousandths").out)
    assert kept[0]["bboxes"] == [[20.0, 20.0, 100.0, 60.0]]                  # 100/1000 x 200 ...


def test_thousandth_boxes_on_big_images_are_reported(tmp_path):
    for k in range(5):
        write_file(tmp_path / f"{k}.png", img_bytes(1600, 1200, seed=k))
    rows = [{"id": str(k), "image": f"{k}.png", "question": "Q?", "answer": "a", "bboxes": [[100, 100, 900, 800]]}
            for k in range(5)]
    report = convert.convert_files("jsonl", [write_jsonl(tmp_path / "s.jsonl", rows)], str(tmp_path / "o"), progress=False)
    assert "--box-units thousandths" in report.summary()


def test_list_and_object_answers_are_never_python_reprs(tmp_path):
    write_file(tmp_path / "a.png", img_bytes())
    rows = [{"id": "one", "image": "a.png", "question": "Q?", "answer": ["red"]},
            {"id": "two", "image": "a.png", "question": "Q?", "answer": ["red", "blue"]},
            {"id": "obj", "image": "a.png", "question": "Q?", "answer": {"text": "red"}}]
    kept, drops = outputs(convert.convert_files("jsonl", [write_jsonl(tmp_path / "s.jsonl", rows)], str(tmp_path / "o"),
                                                progress=False).out)
    assert [(r["id"], r["answer"]) for r in kept] == [("jsonl:one", "red")]
    assert {d["id"]: d["reason"] for d in drops} == {"jsonl:two": "several reference answers", "jsonl:obj": "malformed answer"}


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_a_limit_below_one_is_refused(tmp_path, limit):
    src = jsonl_box_fixture(tmp_path)
    with pytest.raises(SystemExit, match="--limit must be at least 1"):    # a one-line refusal, not a traceback
        convert.main(["--from", "jsonl", src, "--out", str(tmp_path / "o"), "--limit", limit])
    assert not os.path.exists(tmp_path / "o")

"""Tests for toy/world.py: determinism, boxes, and the information gap itself (pixel statistics)."""
import json
import os

import numpy as np
import pytest

import crop_tool
from support import data
import toy.world
from conftest import ROOT


def test_items_are_deterministic_per_seed_and_differ_across_seeds():
    a, b, c = toy.world.make_item(7), toy.world.make_item(7), toy.world.make_item(8)
    assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert (a["question"], a["answer"], a["bboxes"]) == (b["question"], b["answer"], b["bboxes"])
    assert not np.array_equal(np.asarray(a["image"]), np.asarray(c["image"]))


@pytest.mark.parametrize("seed", range(20))
def test_boxes_are_nested_and_hold_the_named_squares_detail(seed):
    it = toy.world.make_item(seed, n_boxes=3)
    b1, b2 = it["bboxes"]
    assert b2[0] <= b1[0] < b1[2] <= b2[2] and b2[1] <= b1[1] < b1[3] <= b2[3]
    colour = it["question"].split()[-2]
    (x, y, s, _, pattern), = [q for q in it["squares"] if q[3] == colour]
    assert pattern == it["answer"] and b1 == [x + toy.world.BORDER, y + toy.world.BORDER, x + s - toy.world.BORDER, y + s - toy.world.BORDER]
    img = np.asarray(it["image"]).astype(int)
    frame = img[y, x + s // 2]                          # top edge of the square: its colour
    assert tuple(frame) == toy.world.COLOURS[colour]
    core = img[b1[1]:b1[3], b1[0]:b1[2]].sum(-1)        # [h, w] brightness
    assert _classify_core(core) == it["answer"]
    seen = {tuple(p) for p in img[b1[1]:b1[3], b1[0]:b1[2]].reshape(-1, 3).tolist()}
    assert seen <= {toy.world.COLOURS[colour], (0, 0, 0), tuple(c // 2 for c in toy.world.COLOURS[colour])}


def _classify_core(core: np.ndarray) -> str:
    """Read a full-contrast pattern by hand: which neighbours differ."""
    dx, dy = np.abs(np.diff(core, axis=1)).mean(), np.abs(np.diff(core, axis=0)).mean()
    if dx < 10 and dy < 10:
        return "solid"
    if dx > 100 and dy > 100:
        return "checks"
    return "vertical" if dx > dy else "horizontal"


def _features(image, box, scale):
    """Mean |horizontal| and |vertical| neighbour differences, mean and std inside B1 at `scale`."""
    a = np.asarray(image).astype(float).sum(-1)
    x1, y1, x2, y2 = (int(v // scale) for v in box)
    r = a[y1:y2, x1:x2]
    return [np.abs(np.diff(r, axis=1)).mean(), np.abs(np.diff(r, axis=0)).mean(), r.mean(), r.std()]


def _nearest_centroid_accuracy(scale_tokens):
    """Train a nearest-centroid reader of the pattern on 300 items, test on 300 others."""
    def data(seed):
        X, y = [], []
        for t in toy.world.make_tasks(300, seed=seed):
            shown = crop_tool.resize_to_budget(t.image, 28 * 28, scale_tokens * 784, "box")
            X.append(_features(shown, t.boxes[0], t.image.size[0] / shown.size[0]))
            y.append(toy.world.PATTERNS.index(t.answer))
        return np.array(X), np.array(y)
    Xtr, ytr = data(1)
    Xte, yte = data(2)
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-9
    cent = np.stack([((Xtr[ytr == k] - mu) / sd).mean(0) for k in range(4)])
    pred = np.argmin(((((Xte - mu) / sd)[:, None, :] - cent[None]) ** 2).sum(-1), axis=1)   # [N]
    return (pred == yte).mean()


def test_the_detail_is_readable_at_full_resolution_and_lost_at_half():
    full = _nearest_centroid_accuracy(toy.world.CANVAS ** 2 // 784)    # 64 tokens: native 224 px
    half = _nearest_centroid_accuracy(toy.world.CANVAS ** 2 // 784 // 4)  # 16 tokens: 112 px
    assert full > 0.95, full
    assert half <= 1.5 * 0.25, half


def test_native_crop_keeps_the_pattern_phase():
    """A snapped crop is pixel-identical to the original region, so the 1-px pattern survives."""
    it = toy.world.make_item(3)
    cfg = crop_tool.CropConfig(min_pixels=28 * 28, max_pixels=64 * 784, snap=28)
    c = crop_tool.crop(it["image"], it["bboxes"][1], it["image"].size, cfg)
    assert c.image.size == (c.cut[2] - c.cut[0], c.cut[3] - c.cut[1])
    assert np.array_equal(np.asarray(c.image), np.asarray(it["image"].crop(c.cut)))


def test_written_items_load_through_the_projects_jsonl_loader(tmp_path):
    path = toy.world.write_items(str(tmp_path), 5, seed=4)
    tasks = data.load_tasks(path)
    ref = toy.world.make_tasks(5, seed=4)
    assert [t.answer for t in tasks] == [t.answer for t in ref]
    assert [t.boxes for t in tasks] == [t.boxes for t in ref]
    assert np.array_equal(np.asarray(tasks[2].load_image()), np.asarray(ref[2].image))


@pytest.mark.parametrize("pattern", toy.world.PATTERNS)
def test_halving_turns_every_pattern_into_the_same_colour(pattern):
    """Box-downsampled by 2, each pattern is exactly the solid fill: no pixel statistic can tell them apart."""
    it = next(toy.world.make_item(s) for s in range(100) if toy.world.make_item(s)["answer"] == pattern)
    half = np.asarray(crop_tool.resize_to_budget(it["image"], 28 * 28, 16 * 784, "box")).astype(int)
    colour = it["question"].split()[-2]
    x1, y1, x2, y2 = (v // 2 for v in it["bboxes"][0])
    assert (half[y1:y2, x1:x2] == [c // 2 for c in toy.world.COLOURS[colour]]).all()


def test_rewriting_items_replaces_the_file_and_removes_only_the_pngs_it_named(tmp_path):
    first = toy.world.write_items(str(tmp_path), 4, seed=4)
    (tmp_path / "images" / "mine.png").write_bytes(b"the user's own file")
    old = {json.loads(line)["image"] for line in open(first)}
    path = toy.world.write_items(str(tmp_path), 2, seed=5)
    new = {json.loads(line)["image"] for line in open(path)}
    assert path == first and len(new) == 2 and not new & old
    assert sorted(os.listdir(tmp_path / "images")) == sorted([os.path.basename(r) for r in new] + ["mine.png"])
    assert [t.answer for t in data.load_tasks(path, progress=False)] == [t.answer for t in toy.world.make_tasks(2, seed=5)]


def test_the_world_cli_refuses_to_replace_earlier_items_without_overwrite(tmp_path, capsys):
    out = str(tmp_path / "d")
    toy.world.main(["--out", out, "--n", "2"])
    before = (tmp_path / "d" / "items.jsonl").read_bytes()
    with pytest.raises(SystemExit) as e:
        toy.world.main(["--out", out, "--n", "2", "--seed", "1"])
    assert e.value.code == 2 and "already holds items.jsonl: pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "d" / "items.jsonl").read_bytes() == before
    toy.world.main(["--out", out, "--n", "2", "--seed", "1", "--overwrite"])
    assert (tmp_path / "d" / "items.jsonl").read_bytes() != before


def test_the_world_cli_runs_as_a_module_and_refuses_bad_flags_before_any_work(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "toy.world", "--out", str(tmp_path / "d"), "--boxes", "5"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--boxes 1-4" in r.stderr and not (tmp_path / "d").exists(), r.stderr[-500:]


@pytest.mark.parametrize("argv, said", [(["--n", "0"], "must be at least 1"),
                                        (["--demo", "--model", "/nonexistent"], "not found"),
                                        (["--demo", "--overwrite"], "--demo writes nothing")])
def test_the_world_cli_refuses_bad_flags_before_any_work(argv, said, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        toy.world.main(["--out", str(tmp_path / "d"), *argv])
    assert e.value.code == 2 and said in capsys.readouterr().err and not (tmp_path / "d").exists()

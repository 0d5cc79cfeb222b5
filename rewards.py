"""The rewards of LFPC: the stage-1 outcome reward (DeepEyes'), the stage-2 grounding reward (the paper's).

Contract (stdlib only; every number below is a default you can change by argument)
--------
Boxes are (x1, y1, x2, y2) pixels, top-left then bottom-right, continuous edges (a box covers
x1 <= x < x2), all in the ORIGINAL image's frame: the rollout maps the model's box there before
rewarding, and annotations are in that frame. image_size = (W, H) of the original.

Stage 1 (DeepEyes-style outcome reward; weights 0.8 / 0.2 / 1.2 are DeepEyes', which LFPC
appears to inherit):
    r = w.acc * acc + w.format * format + w.tool * tool
    acc    = accuracy(pred, answer, choices)                      in {0, 1}   (support/answers.py)
    format = -1 if malformed_turns > 0 else 0
    tool   = 1 if acc > 0 and successful_crops > 0 else 0         (paid only for a right answer)

Stage 2 (LFPC grounding reward) on the predicted crop Bp and nested annotations B1 ⊂ B2 ⊂ ... ⊂ Bn
(B1, given first, is the minimal region that answers the question):
    coverage = area(Bp ∩ B1) / area(B1)
    r_iou    = max_i IoU(Bp, Bi)  if coverage > tau (strict)  else 0       tau = 0.9 (paper)
    r_l1     = clip(1 - min_i L1(Bp, Bi), 0, 1),  L1 = mean(|dx1|/W, |dy1|/H, |dx2|/W, |dy2|/H)
    r_geo    = omega * r_iou + (1 - omega) * r_l1                  omega: unpublished, ours 0.5
No crop (Bp = None) gives every grounding part 0. The project rewards the box of the FIRST
successful crop of the episode (where the model looked first); choosing it is the caller's job.
How stage 2 combines r_geo with the stage-1 terms is unpublished, hence `mode`:
    "add"      (default): r = stage-1 r + w.geo * r_geo   (keep answering right, learn to box tightly;
               with w.geo = 1 a WRONG answer boxed perfectly (1.0) outranks a right one never cropped
               (0.8): within a group, box quality can outweigh the answer. Lower --w-geo if that bites)
    "geo_only":           r = w.geo * r_geo
Every reward returns (total, parts): a dict of unweighted parts plus "total", for logging.

Answers are judged by `support/answers.py` (rules) or `support/judge.py` (a model judge beside them).
"""
from dataclasses import dataclass

from support.answers import accuracy

# ----------------------------------------------------------------------------- stage 1

@dataclass(frozen=True)
class RewardWeights:
    acc: float = 0.8     # DeepEyes' weight of the accuracy term
    format: float = 0.2  # DeepEyes' weight of the format term (format is -1 or 0)
    tool: float = 1.2    # DeepEyes' weight of the conditional tool bonus
    geo: float = 1.0     # ours: weight of r_geo in stage 2 (unpublished)


def outcome_reward(pred: str | None, answer: str, choices: list[str] | None, malformed_turns: int,
                   successful_crops: int, w: RewardWeights = RewardWeights(),
                   acc: float | None = None) -> tuple[float, dict[str, float]]:
    """Stage-1 reward (formula in the module docstring). Parts: "acc", "format", "tool", "total".
    `acc`: the verdict of another judge (support/judge.py) in place of `accuracy`'s rules."""
    if malformed_turns < 0 or successful_crops < 0:
        raise ValueError("malformed_turns and successful_crops must be >= 0")
    acc = accuracy(pred, answer, choices) if acc is None else float(acc)
    fmt = -1.0 if malformed_turns > 0 else 0.0
    tool = 1.0 if acc > 0 and successful_crops > 0 else 0.0
    total = w.acc * acc + w.format * fmt + w.tool * tool
    return total, {"acc": acc, "format": fmt, "tool": tool, "total": total}


# ----------------------------------------------------------------------------- box geometry

def box_area(b) -> float:
    """Area in pixels^2; 0 for an empty or inverted box."""
    x1, y1, x2, y2 = b
    return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def box_intersection(a, b) -> float:
    """Area of a ∩ b (boxes sharing only an edge: 0)."""
    return box_area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))


def box_iou(a, b) -> float:
    """Intersection over union; 0 when the union is 0."""
    inter = box_intersection(a, b)
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def coverage(pred, b1) -> float:
    """Fraction of b1 inside pred: area(pred ∩ b1) / area(b1); 0 when b1 is empty."""
    area = box_area(b1)
    return box_intersection(pred, b1) / area if area > 0 else 0.0


def l1_distance(a, b, image_size) -> float:
    """Mean absolute corner distance, x normalised by W and y by H: mean(|dx1|/W, |dy1|/H, |dx2|/W, |dy2|/H)."""
    W, H = image_size
    if W <= 0 or H <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return (abs(a[0] - b[0]) / W + abs(a[1] - b[1]) / H + abs(a[2] - b[2]) / W + abs(a[3] - b[3]) / H) / 4


# ----------------------------------------------------------------------------- stage 2

def grounding_reward(pred_box, gt_boxes: list, image_size: tuple[int, int], tau: float = 0.9,
                     omega: float = 0.5) -> tuple[float, dict[str, float]]:
    """r_geo of the box `pred_box` (None: no crop) against nested gt_boxes [B1, B2, ...], B1 first.
    Parts: "coverage", "gate" (1.0 or 0.0), "iou" (gated), "l1" (r_l1), "geo"."""
    if not gt_boxes:
        raise ValueError("gt_boxes is empty: need at least B1")
    if box_area(gt_boxes[0]) <= 0:
        raise ValueError(f"B1 must have positive area, got {gt_boxes[0]!r}")
    if not (0.0 <= tau <= 1.0 and 0.0 <= omega <= 1.0):
        raise ValueError(f"tau and omega must lie in [0, 1], got tau={tau}, omega={omega}")
    if pred_box is None:
        return 0.0, {"coverage": 0.0, "gate": 0.0, "iou": 0.0, "l1": 0.0, "geo": 0.0}
    cov = coverage(pred_box, gt_boxes[0])
    gate = 1.0 if cov > tau else 0.0
    r_iou = max(box_iou(pred_box, b) for b in gt_boxes) if gate else 0.0
    r_l1 = min(1.0, max(0.0, 1.0 - min(l1_distance(pred_box, b, image_size) for b in gt_boxes)))
    geo = omega * r_iou + (1.0 - omega) * r_l1
    return geo, {"coverage": cov, "gate": gate, "iou": r_iou, "l1": r_l1, "geo": geo}


MODES = ("add", "geo_only")


def stage2_reward(pred, answer, choices, malformed_turns, successful_crops, pred_box, gt_boxes, image_size,
                  w: RewardWeights = RewardWeights(), tau: float = 0.9, omega: float = 0.5,
                  mode: str = "add", acc: float | None = None) -> tuple[float, dict]:
    """Stage-2 reward: "add" = outcome total + w.geo * r_geo; "geo_only" = w.geo * r_geo.
    Parts: "acc", "format", "tool", "outcome" (the stage-1 total), "coverage", "gate", "iou", "l1",
    "geo", "total". The stage-1 parts are logged in both modes."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    outcome, parts = outcome_reward(pred, answer, choices, malformed_turns, successful_crops, w, acc)
    geo, geo_parts = grounding_reward(pred_box, gt_boxes, image_size, tau, omega)
    total = (outcome if mode == "add" else 0.0) + w.geo * geo
    parts["outcome"] = parts.pop("total")
    return total, {**parts, **geo_parts, "total": total}

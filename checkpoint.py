"""A training run's folder: one run at a time, checkpoints that survive a kill at any instant, and a
metrics log that resumes without duplicates.

    OUT/lock            the PID of the live run: a second run into OUT refuses while that process lives
                        (a lock whose process is gone, e.g. after kill -9, is taken over)
    OUT/ckpt/           the latest checkpoint: the model (lfpc.save_agent) and trainer.pt (optimizer, step,
                        arguments, RNG states), trainer.pt written LAST: a folder without it is incomplete
    OUT/ckpt.tmp/       a checkpoint being written
    OUT/ckpt.old/       the previous checkpoint, during the swap
    OUT/metrics.jsonl   one JSON line per step

The swap: write ckpt.tmp (trainer.pt last), rename ckpt -> ckpt.old, rename ckpt.tmp -> ckpt, delete
ckpt.old. A kill at any point leaves at least one complete checkpoint; `RunFolder.latest` finds the newest
(highest step) and `recover` makes it OUT/ckpt again. A fresh run refuses a folder that holds any of
these files (`RunFolder.used`), so a good checkpoint is never deleted by starting over.
"""
from __future__ import annotations

import atexit
import json
import math
import os
import shutil

import torch

NAMES = ("ckpt", "ckpt.tmp", "ckpt.old")


class RunFolder:
    def __init__(self, out: str):
        self.out = out
        self.metrics = os.path.join(out, "metrics.jsonl")
        self.lock_path = os.path.join(out, "lock")

    # ------------------------------------------------------------------------- one run at a time

    def lock(self) -> None:
        """Take OUT/lock for this process, or SystemExit naming the live run that holds it."""
        os.makedirs(self.out, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pid = _read_pid(self.lock_path)
                if pid is not None and pid != os.getpid() and _alive(pid):
                    raise SystemExit(f"{self.out} is in use by a running training (PID {pid}); wait for it, stop it, "
                                     f"or pass another --out") from None
                os.remove(self.lock_path)                      # its process is gone (killed): take it over
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            atexit.register(self.unlock)
            return
        raise SystemExit(f"{self.out}: could not take the lock {self.lock_path}")

    def unlock(self) -> None:
        if _read_pid(self.lock_path) == os.getpid():
            os.remove(self.lock_path)

    # ------------------------------------------------------------------------- checkpoints

    def used(self) -> list[str]:
        """What in OUT a fresh run would overwrite: checkpoints and the metrics log."""
        return [n for n in NAMES + ("metrics.jsonl",) if os.path.exists(os.path.join(self.out, n))]

    def latest(self) -> tuple[str, dict] | None:
        """(path, trainer state) of the newest complete checkpoint in OUT, or None."""
        best = None
        for name in NAMES:                                     # ties: ckpt first
            path = os.path.join(self.out, name)
            state = _trainer_state(path)
            if state is not None and (best is None or state["step"] > best[1]["step"]):
                best = (path, state)
        return best

    def recover(self) -> tuple[str, dict] | None:
        """Make the newest complete checkpoint OUT/ckpt (after a kill inside the swap) and drop the others."""
        found = self.latest()
        if found is None:
            return None
        path, state = found
        final = os.path.join(self.out, "ckpt")
        if path != final:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(path, final)
        for name in NAMES[1:]:
            shutil.rmtree(os.path.join(self.out, name), ignore_errors=True)
        return final, state

    def save(self, save_model, state: dict) -> str:
        """Atomic: `save_model(folder)` and trainer.pt (LAST) into ckpt.tmp, then the swap. Returns OUT/ckpt."""
        final, tmp, old = (os.path.join(self.out, n) for n in NAMES)
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(tmp)
        torch.save(state, os.path.join(tmp, "trainer.pt.part"))
        os.replace(os.path.join(tmp, "trainer.pt.part"), os.path.join(tmp, "trainer.pt"))
        if os.path.isdir(final):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        _swap_window()
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        return final

    # ------------------------------------------------------------------------- metrics

    def truncate_metrics(self, step: int) -> None:
        """Keep the metrics of steps <= `step` (the checkpoint's): a resumed run rewrites the rest."""
        if not os.path.exists(self.metrics):
            return
        rows = []
        with open(self.metrics, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:                   # a line cut short by a kill
                    continue
                if row.get("step", 0) <= step:
                    rows.append(line if line.endswith("\n") else line + "\n")
        with open(self.metrics + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(rows)
        os.replace(self.metrics + ".tmp", self.metrics)

    def log(self, row: dict) -> None:
        """Append one step's metrics as strict JSON: a non-finite number (a skipped step's NaN gradient
        norm) is written as null, which every JSON reader accepts."""
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")

    def read_metrics(self) -> list[dict]:
        """Every complete line of metrics.jsonl, in order."""
        if not os.path.exists(self.metrics):
            return []
        rows = []
        with open(self.metrics, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:                   # a line cut short by a kill
                    continue
        return rows


def _trainer_state(path: str) -> dict | None:
    f = os.path.join(path, "trainer.pt")
    if not os.path.isfile(f):
        return None
    try:
        return torch.load(f, weights_only=False, map_location="cpu")
    except Exception:           # torch raises several types for a damaged file: not a usable checkpoint
        return None


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip() or -1)
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # someone else's process: alive
        return True
    return True


def _swap_window() -> None:
    """Between the two renames of the swap. Tests widen it (LFPC_SWAP_DELAY seconds) to kill a run there."""
    delay = float(os.environ.get("LFPC_SWAP_DELAY", "0"))
    if delay > 0:
        import time
        open(os.path.join(os.environ.get("LFPC_SWAP_MARK", "."), "in_swap"), "w").close()
        time.sleep(delay)

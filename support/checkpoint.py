"""A training run's folder: one run at a time, checkpoints that survive a kill at any instant, and a
metrics log that resumes without duplicates.

    OUT/run.json        the run's settings, written when it starts (a run killed before its first
                        checkpoint resumes from step 0 with them, its caches kept)
    OUT/lock            {"host", "pid", "start"} of the live run: a second run into OUT refuses while that
                        process lives (a lock whose process is gone, e.g. after kill -9, or whose PID now
                        belongs to a process started at another time, is taken over)
    OUT/ckpt/           the latest checkpoint: the model (policy.save_agent) and trainer.pt (optimizer, step,
                        arguments, RNG states), trainer.pt written LAST: a folder without it is incomplete
    OUT/ckpt.tmp/       a checkpoint being written
    OUT/ckpt.old/       the previous checkpoint, during the swap
    OUT/metrics.jsonl   one JSON line per step

The swap: write ckpt.tmp (trainer.pt last), rename ckpt -> ckpt.old, rename ckpt.tmp -> ckpt, delete
ckpt.old. A kill at any point leaves at least one complete checkpoint; `RunFolder.latest` finds the newest
(highest step) and `recover` makes it OUT/ckpt again. A fresh run refuses a folder that holds any of
these files (`RunFolder.used`), so a good checkpoint is never deleted by starting over. Any other file
the project writes is written whole the same way (`write_whole`, or `writing_whole` to stream it). A write that
fails (disk full) removes its partial ckpt.tmp, keeps the previous checkpoint the newest and raises
CheckpointError; `check_writable` and `check_space` refuse an --out that cannot hold a run before any
work. `StopSignal`: SIGTERM / SIGINT ask the run to stop at its next safe point (train.py: after the
step, with a checkpoint; the prober: after its batch, `Preempted`); a second signal exits at once.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import sys
import threading

import torch

NAMES = ("ckpt", "ckpt.tmp", "ckpt.old")
RUN_FILE = "run.json"


class StopSignal:
    """SIGTERM and SIGINT as a request to stop cleanly (a preempted job, Ctrl-C): the first sets `requested`
    (the signal's name), and the run stops at the next safe point (after its current step, with a
    checkpoint; in the prober, after its current batch, the cache holding every finished item); a second
    one exits at once (SystemExit 128 + signal number): the atomic checkpoint still holds. A context
    manager: the previous handlers come back on exit. Installed in the main thread only."""

    def __init__(self):
        self.requested: str | None = None
        self.code = 0
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        return False

    def __call__(self) -> bool:
        return self.requested is not None

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested is not None:
            print(f"\n{name} again: stopping at once (the last complete checkpoint still holds)", file=sys.stderr,
                  flush=True)
            raise SystemExit(128 + signum)
        self.requested, self.code = name, 128 + signum
        print(f"\n{name}: stopping after the current step, with a checkpoint ({name} again stops at once)",
              file=sys.stderr, flush=True)


class CheckpointError(Exception):
    """A checkpoint could not be written (disk full ...); the previous one is intact."""


class Preempted(Exception):
    """A stop was requested (StopSignal) where the work can resume exactly (the prober between batches)."""


class RunFolder:
    def __init__(self, out: str):
        self.out = out
        self.metrics = os.path.join(out, "metrics.jsonl")
        self.lock_path = os.path.join(out, "lock")

    # ------------------------------------------------------------------------- one run at a time

    def lock(self) -> None:
        """Take OUT/lock for this process, or SystemExit naming the live run that holds it. The lock holds
        {"host", "pid", "start"} (start: the process's start time, so a PID reused after a restart, e.g. 1
        in a container, is not mistaken for the run); a lock of this host whose process is gone or started
        at another time is stale and taken over; one of another host is refused with how to remove it."""
        os.makedirs(self.out, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder, written = _read_lock(self.lock_path), None
                with contextlib.suppress(OSError):
                    written = os.path.getmtime(self.lock_path)
                if holder is not None and _holder_alive(holder, written) and holder != _me():
                    where = "" if holder.get("host") == socket.gethostname() else f" on host {holder.get('host')}"
                    raise SystemExit(f"{self.out} is in use by a running training (PID {holder['pid']}{where}); wait "
                                     f"for it, stop it, or pass another --out" + (
                                         f" (if it is not running, delete {self.lock_path})" if where else "")) from None
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.lock_path)                  # its process is gone (killed): take it over
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(_me(), f)
            atexit.register(self.unlock)
            return
        raise SystemExit(f"{self.out}: could not take the lock {self.lock_path}")

    def unlock(self) -> None:
        if _read_lock(self.lock_path) == _me():
            os.remove(self.lock_path)

    # ------------------------------------------------------------------------- checkpoints

    def used(self) -> list[str]:
        """What in OUT a fresh run would overwrite: the run's settings, checkpoints and the metrics log."""
        return [n for n in (RUN_FILE,) + NAMES + ("metrics.jsonl",) if os.path.exists(os.path.join(self.out, n))]

    def write_run(self, state: dict) -> None:
        """OUT/run.json, written when a run starts (atomically): its settings, so --resume can start it over
        from step 0 when it was killed before its first complete checkpoint."""
        write_whole(os.path.join(self.out, RUN_FILE), json.dumps(state, indent=1))

    def read_run(self) -> dict | None:
        path = os.path.join(self.out, RUN_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def start_over(self) -> None:
        """Before a run restarts from step 0 in OUT: drop incomplete checkpoints and the metrics of steps that
        no checkpoint holds; everything else (the info-gap and judge caches) is kept."""
        for name in NAMES:
            if _trainer_state(os.path.join(self.out, name)) is None:
                shutil.rmtree(os.path.join(self.out, name), ignore_errors=True)
        self.truncate_metrics(0)

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

    def check_writable(self) -> None:
        """SystemExit with the reason when OUT cannot hold a run: a file in its place, a folder that cannot be
        created, or one where a probe file cannot be written and read back (read-only, full, no permission)."""
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise SystemExit(f"--out {self.out} is a file; pass a folder for the run")
        probe = os.path.join(self.out, f".write_probe.{os.getpid()}")
        try:
            os.makedirs(self.out, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"\0" * 65536)
                f.flush()
                os.fsync(f.fileno())
            os.remove(probe)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.remove(probe)
            raise SystemExit(f"--out {self.out} cannot be written ({e.strerror or e}): nothing was trained; "
                             f"pass a writable folder with free space") from None

    def check_space(self, checkpoint_bytes: int) -> None:
        """SystemExit when OUT's disk has less free space than two checkpoints (the swap holds the new one
        beside the old) of `checkpoint_bytes`, before any work is spent."""
        free = shutil.disk_usage(self.out).free
        if free < 2 * checkpoint_bytes:
            raise SystemExit(f"--out {self.out}: {free / 2**30:.2f} GiB free, a checkpoint needs "
                             f"{checkpoint_bytes / 2**30:.2f} GiB and the swap holds two: free space first")

    def save(self, save_model, state: dict) -> str:
        """Atomic: `save_model(folder)` and trainer.pt (LAST) into ckpt.tmp, then the swap. Returns OUT/ckpt.
        A write that fails (disk full: OSError, or torch's RuntimeError "enforce fail ... failed writing")
        leaves the previous checkpoint the newest complete one, removes the partial ckpt.tmp and raises
        CheckpointError with the reason."""
        final, tmp, _ = (os.path.join(self.out, n) for n in NAMES)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            save_model(tmp)
            torch.save(state, os.path.join(tmp, "trainer.pt.part"))
        except (OSError, RuntimeError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            kept = self.latest()
            raise CheckpointError(f"writing the checkpoint of step {state.get('step')} failed "
                                  f"({str(e).splitlines()[0][:200]}; {shutil.disk_usage(self.out).free / 2**20:.0f} MiB "
                                  f"free in {self.out}); " + (f"the checkpoint of step {kept[1]['step']} is kept: "
                                  f"free space, then --resume" if kept else "no earlier checkpoint exists")) from None
        os.replace(os.path.join(tmp, "trainer.pt.part"), os.path.join(tmp, "trainer.pt"))
        swap_in(tmp, final)
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
        write_whole(self.metrics, "".join(rows))

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


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _read_lock(path: str) -> dict | None:
    """The lock's holder: {"host", "pid", "start"}; a lock of the older format (a bare PID) as this host's."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    try:
        holder = json.loads(text) if text else None
    except ValueError:
        return None
    if isinstance(holder, int):
        return {"host": socket.gethostname(), "pid": holder, "start": None}
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _holder_alive(holder: dict, written: float | None = None) -> bool:
    """Is the run that wrote the lock still running? Another host's: assumed so (it cannot be checked). A
    lock without a start time (the older format) is stale when its PID's process started after the lock
    was `written` (a reused PID)."""
    if holder.get("host") != socket.gethostname():
        return True
    if not _alive(holder["pid"]):
        return False
    if holder.get("start") is not None:
        return holder["start"] == _start_time(holder["pid"])
    started = _start_epoch(holder["pid"])
    return started is None or written is None or started <= written + 1.0


def _start_epoch(pid: int) -> float | None:
    """The process's start as a Unix time (boot time + its start ticks), None where unknown."""
    ticks = _start_time(pid)
    try:
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + int(ticks) / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, TypeError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # someone else's process: alive
        return True
    return True


def write_whole(path: str, text: str) -> None:
    """`path` holds `text` whole, or still what it held before: written beside it, then renamed over it."""
    with writing_whole(path) as f:
        f.write(text)


@contextlib.contextmanager
def writing_whole(path: str, binary: bool = False):
    """A file to stream `path`'s new content into (text as UTF-8, or `binary`): written beside it as
    `path`.tmp, renamed over `path` when the block ends, removed if the block raises. So `path` holds
    the whole new content or what it held before, never a part."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8") as f:
            yield f
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def swap_in(new: str, final: str) -> None:
    """Folder `new` becomes `final`: the old `final` is moved to `final`.old first and removed last, so a kill
    at any instant leaves a complete folder (`final`, or `final`.old beside `new`)."""
    old = final + ".old"
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    _swap_window()
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def _swap_window() -> None:
    """Between the two renames of the swap. Tests widen it (LFPC_SWAP_DELAY seconds) to kill a run there."""
    delay = float(os.environ.get("LFPC_SWAP_DELAY", "0"))
    if delay > 0:
        import time
        open(os.path.join(os.environ.get("LFPC_SWAP_MARK", "."), "in_swap"), "w").close()
        time.sleep(delay)

"""Grading answers: math with `math-verify` under a hard timeout, multiple choice by letter.

Math. The answer is extracted from the model's text by fixed rules (the parser is
`dail.answers`, shared with the landmarks), in order:
1. the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced;
2. otherwise the last final-answer line: `#### 42`, `The answer is ...`, `Final answer: ...`;
3. otherwise there is no answer and the sample is wrong.
The extracted answer and the gold answer are compared with
`math_verify.verify(parse(gold), parse(pred))`, gold first (verify is not symmetric). If
math-verify says no, an exact match of normalized strings is the last chance (it catches
plain-text answers like `Paris` that math-verify cannot parse).

Why a separate process. A model can write an answer that sympy cannot finish, e.g.
`\\boxed{9^{9^{9^{9}}}}` (measured: `verify` never returns). math-verify's own timeout uses
`signal.alarm`, which only works on the main thread of the main interpreter. So its timeouts
are switched off (`parsing_timeout=None`, `timeout_seconds=None`) and every comparison runs
in a worker process instead; a worker gets at most `timeout` seconds per sample, then it is
killed, a fresh one takes its place and the sample counts as wrong. Nothing in the caller
uses signals, so `grade_many` works from any thread.

Layout: the caller starts one grading process (`python -c`, so it never re-imports the
caller's `__main__`, as multiprocessing's spawn and forkserver would), lazily, on first use.
It imports math-verify once and forks its workers from that clean single-threaded state, so
replacing a killed worker costs milliseconds, not the ~0.5 s import. It lives until the caller
exits. A batch travels to it in one message, so grading thousands of samples costs one round
trip plus the comparisons, spread over up to 4 workers.

Multiple choice (GPQA-style). `prompts.choice_problem` shuffles the options with a seed, writes
them under letters A, B, C, ... and returns the problem text and the gold letter; the grader
extracts the chosen letter by the same rules as above (boxed first, then a final-answer line)
and compares letters. No sympy is involved, so this runs in the calling process.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as _wait_conns
from pathlib import Path
from typing import Any

from dail.answers import Extracted, boxes, final_answers, trim_line_answer

__all__ = ["Extracted", "extract_answer", "normalize", "grade_many", 
           "extract_choice"]



# ----------------------------------------------------------------------------- extraction

def extract_answer(text: str) -> Extracted | None:
    """The graded answer in `text`: last \\boxed{}, else the last final-answer line, else None."""
    found = boxes(text)
    if found and found[-1].answer.strip():
        return found[-1]
    finals = final_answers(text)
    if not finals or not finals[-1].answer:
        return None
    return finals[-1]


_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def normalize(s: str) -> str:
    """A canonical string form for the exact-match fallback (and the fast path)."""
    s = s.strip()
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:left|right|displaystyle|,|;|!|\s)", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("{,}", ",")
    s = s.replace("$", "").replace("\\%", "%").strip()
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # "x = 5" -> "5"
    s = s.rstrip(".").strip()
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    s = re.sub(r"\s+", " ", s)
    return s.lower()


# ----------------------------------------------------------------------------- math-verify (worker side)

def _verify(pred: str, gold: str) -> bool:
    """Runs in a worker process: math-verify with its own (signal-based) timeouts switched off."""
    from math_verify import parse, verify

    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
    if not gold_parsed:
        gold_parsed = parse(gold, parsing_timeout=None)
    pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=None)
    if gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None):
        return True
    return False


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies (a grading batch can run
    for a minute, and a killed caller must not leave it burning CPU). Elsewhere the grading
    process polls its parent instead (`_Pool.run`)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _worker_main(conn: Any, parent: int) -> None:
    _die_with_parent(parent)
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # the "timeout is disabled" warning
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        i, pred, gold = msg
        try:
            ok = _verify(pred, gold)
        except Exception:  # noqa: BLE001 - any failure to parse or compare means "not verified"
            ok = False
        conn.send((i, ok))


# ----------------------------------------------------------------------------- the pool (grading process)

class _Worker:
    def __init__(self, ctx: Any) -> None:
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, os.getpid()), daemon=True, name="dail-grader")
        self.proc.start()
        child.close()
        self.conn = parent
        self.task: int | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.join(timeout=5)
        finally:
            self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
            self.proc.join(timeout=1)
        except (OSError, ValueError):
            pass
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        self.conn.close()


class _Pool:
    """Worker processes that each grade one sample at a time under an outer deadline."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.workers: list[_Worker] = []
        self.replaced = 0  # workers killed for running past the timeout or dying (for tests/logs)
        self.parent = os.getppid()

    def _ensure(self, size: int) -> None:
        self.workers = [w for w in self.workers if w.proc.is_alive()]
        while len(self.workers) < size:
            self.workers.append(_Worker(self.ctx))

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self.replaced += 1
        self.workers[self.workers.index(w)] = _Worker(self.ctx)

    def run(self, tasks: list[tuple[int, str, str]], timeout: float, size: int) -> tuple[dict[int, bool], list[int]]:
        """(grade per task index, the indices that ran past `timeout`)."""
        results: dict[int, bool] = {}
        timed_out: list[int] = []
        self._ensure(size)
        queue = deque(tasks)
        while queue or any(w.task is not None for w in self.workers):
            for w in list(self.workers):
                if w.task is None and queue:
                    i, pred, gold = queue.popleft()
                    try:
                        w.conn.send((i, pred, gold))
                    except (OSError, ValueError):  # the worker died while idle
                        self._replace(w)
                        queue.appendleft((i, pred, gold))
                        continue
                    w.task, w.deadline = i, time.monotonic() + timeout
            busy = [w for w in self.workers if w.task is not None]
            if not busy:
                continue
            if os.getppid() != self.parent:  # the caller died (no PR_SET_PDEATHSIG here): stop now
                self.close()
                os._exit(1)
            wait_s = min(0.5, max(0.0, min(w.deadline for w in busy) - time.monotonic()))
            ready = set(_wait_conns([w.conn for w in busy], timeout=wait_s))
            now = time.monotonic()
            for w in busy:
                if w.conn in ready:
                    try:
                        i, ok = w.conn.recv()
                        results[i] = bool(ok)
                        w.task = None
                    except (EOFError, OSError):  # the worker crashed on this sample
                        results[w.task] = False
                        self._replace(w)
                elif now >= w.deadline:  # ran past the timeout: wrong, and a fresh worker
                    results[w.task] = False
                    timed_out.append(w.task)
                    self._replace(w)
        return results, timed_out

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        self.workers = []


def _serve(read_fd: int, write_fd: int, parent: int) -> None:
    """Main loop of the grading process: run batches from the parent through a _Pool."""
    _die_with_parent(parent)
    import math_verify  # noqa: F401 - imported once here (not at the top: the caller never needs it), so
    #                    forked workers start warm

    conn_in, conn_out = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    pool = _Pool(multiprocessing.get_context("fork"))  # this process is single-threaded: fork is safe
    try:
        while True:
            try:
                msg = conn_in.recv()
            except (EOFError, OSError):  # the parent went away
                return
            if msg is None:
                return
            tasks, timeout, size = msg
            results, timed_out = pool.run(tasks, timeout, size)
            conn_out.send((results, timed_out, pool.replaced))
    finally:
        pool.close()


class _Manager:
    """The parent's handle on the grading process (started lazily, shared by all threads).

    The grading process is a fresh interpreter started with `python -c`, so it never
    re-imports the caller's `__main__` (which multiprocessing's spawn and forkserver do, and
    which fails for scripts read from stdin or re-runs unguarded scripts). It imports
    math-verify once and forks its workers from that clean, single-threaded state.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.replaced = 0  # workers killed for running past the timeout or crashing (tests, logs)

    def _start(self) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[1])  # so `dail` imports however the parent found it
        env["PYTHONPATH"] = os.pathsep.join([src] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        code = "import sys; from dail.grading import _serve; _serve(*map(int, sys.argv[1:]))"
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(to_child_r), str(from_child_w), str(os.getpid())],
                                     pass_fds=(to_child_r, from_child_w), env=env, stdin=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self.send_conn = Connection(to_child_w, readable=False)
        self.recv_conn = Connection(from_child_r, writable=False)

    def run(self, tasks: list[tuple[int, str, str]], timeout: float, size: int) -> tuple[dict[int, bool], list[int]]:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            try:
                self.send_conn.send((tasks, timeout, size))
                while not self.recv_conn.poll(1.0):
                    if self.proc.poll() is not None:
                        raise EOFError
                results, timed_out, self.replaced = self.recv_conn.recv()
            except (EOFError, OSError):
                code = self.proc.poll()
                self.proc = None
                raise RuntimeError(f"the grading process exited unexpectedly (exit code {code}); see its "
                                   "error output above") from None
            return results, timed_out

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            self.send_conn.send(None)
            self.proc.wait(timeout=2)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.proc = None


_POOL = _Manager()
atexit.register(_POOL.close)


def _pool_size() -> int:
    return max(1, min(4, os.cpu_count() or 1))


# ----------------------------------------------------------------------------- public API

def grade_many(preds: list[str], golds: list[str], timeout: float, kind: str = "math",
               workers: int | None = None, timed_out: list[int] | None = None) -> list[bool]:
    """Grade model outputs against gold answers; one bool per pred.

    preds: the model's full texts (the answer is extracted here). golds: gold answers (math) or
    gold letters (kind="choice"). Each math comparison gets at most `timeout` seconds in a
    worker process; past that it counts as wrong, and its index is appended to `timed_out` if
    given (a run where many answers timed out is not a clean result). Safe to call from any thread.
    """
    if len(preds) != len(golds):
        raise ValueError(f"grade_many: {len(preds)} preds but {len(golds)} golds")
    if kind == "choice":
        return [extract_choice(p) == str(g).strip().upper() for p, g in zip(preds, golds)]
    if kind != "math":
        raise ValueError(f"grade_many: unknown kind {kind!r} (expected math|choice)")
    out = [False] * len(preds)
    tasks = []
    for i, (pred, gold) in enumerate(zip(preds, golds)):
        ex = extract_answer(pred)
        if ex is None or gold is None:
            continue
        gold = str(gold)
        if normalize(ex.answer) == normalize(gold):  # fast path and the exact-match fallback
            out[i] = True
        else:
            tasks.append((i, ex.answer, gold))
    if tasks:
        results, late = _POOL.run(tasks, timeout, workers or _pool_size())
        for i, ok in results.items():
            out[i] = ok
        if timed_out is not None:
            timed_out.extend(late)
    return out


# ----------------------------------------------------------------------------- multiple choice

_LETTER = re.compile(r"^\(?\s*(?:\\text\{\s*)?([A-J])\s*\}?\s*\)?(?:[.:)\s]|$)")


def extract_choice(text: str) -> str | None:
    """The chosen letter: from the last \\boxed{}, else the last final-answer line."""
    ex = extract_answer(text)
    if ex is None:
        m = None
        for m in re.finditer(r"\banswer\s*[:：]\s*(\S[^\n]*)", text, re.IGNORECASE):
            pass
        if m is None:
            return None
        ans = trim_line_answer(m.group(1))
    else:
        ans = ex.answer.strip()
    m = _LETTER.match(ans.strip())
    return m.group(1) if m else None

"""One worker, one queue: predictions run one at a time, in the order they were asked for.

The model is one network on a small machine; two predictions at once would
only slow each other down. So every request becomes a :class:`Job` in a FIFO
queue served by one worker thread: a second request while one runs waits its
turn (its position is shown), it is never dropped. A queued job can be
cancelled at once; a running one stops at its next tile read
(``progress.Cancelled``). Finished jobs are kept, with their files, until
:data:`KEEP_FINISHED` newer ones have finished.

Clients follow a job by long polling: :meth:`JobQueue.wait` returns as soon
as the job's ``version`` passes the one the client has seen (every state or
progress change bumps it), or after the timeout.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import traceback
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calcinosis.model.errors import CalcinosisError

from .progress import Cancelled

log = logging.getLogger(__name__)

#: Jobs waiting at most; one more is refused (HTTP 429) rather than piling up.
MAX_QUEUED = 64
#: Finished jobs (and their files) kept for the page.
KEEP_FINISHED = 200

STATES = ("queued", "running", "done", "error", "cancelled")
FINISHED = frozenset({"done", "error", "cancelled"})


class QueueFull(Exception):
    """More than :data:`MAX_QUEUED` jobs are waiting."""


@dataclass
class Job:
    """One prediction: what it is, where it stands, and its result once done."""

    kind: str  # "image" or "slide"
    name: str
    folder: Path
    work: Callable[[Job], dict[str, Any]] = field(repr=False)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    state: str = "queued"
    progress: float = 0.0
    message: str = "waiting for the model"
    error: str | None = None
    result: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    version: int = 0
    #: Slide jobs: the slide's relative path and the region asked for.
    slide: str | None = None
    region: list[int] | None = None
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _queue: JobQueue | None = field(default=None, repr=False)

    def report(self, fraction: float, message: str) -> None:
        """Progress from the worker (0..1 and a few words); wakes the pollers."""
        q = self._queue
        if q is None:
            return
        with q._cond:
            self.progress = max(self.progress, min(1.0, max(0.0, float(fraction))))
            self.message = message
            self.version += 1
            q._cond.notify_all()

    def public(self, position: int | None = None) -> dict[str, Any]:
        """What the page sees of the job (JSON-ready)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "name": self.name,
            "state": self.state,
            "progress": round(self.progress, 4),
            "message": self.message,
            "error": self.error,
            "position": position,
            "version": self.version,
            "slide": self.slide,
            "region": self.region,
            "seconds": None
            if self.started is None
            else round((self.finished or time.time()) - self.started, 3),
            "result": self.result,
        }


class JobQueue:
    """FIFO of jobs with one worker thread; see the module docstring."""

    def __init__(self, max_queued: int = MAX_QUEUED, keep_finished: int = KEEP_FINISHED) -> None:
        self.max_queued = max_queued
        self.keep_finished = keep_finished
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._finished: deque[str] = deque()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="calcinosis-worker", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ client side

    def submit(self, job: Job) -> Job:
        with self._cond:
            if len(self._waiting) >= self.max_queued:
                raise QueueFull(
                    f"{len(self._waiting)} predictions are already waiting; wait for some to "
                    "finish (or cancel them) and try again"
                )
            job._queue = self
            self._jobs[job.id] = job
            self._waiting.append(job)
            job.version += 1
            self._cond.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def position(self, job: Job) -> int | None:
        """1 for the next job to run, 2 after it, ...; None unless queued."""
        with self._cond:
            for i, j in enumerate(self._waiting):
                if j is job:
                    return i + 1
        return None

    def snapshot(self, job: Job) -> dict[str, Any]:
        with self._cond:
            return job.public(self.position(job))

    def jobs(self) -> list[Job]:
        with self._cond:
            return list(self._jobs.values())

    def cancel(self, job: Job) -> None:
        """Cancel a queued job now, or ask a running one to stop at its next tile."""
        with self._cond:
            if job.state in FINISHED:
                return
            job.cancel.set()
            if job.state == "queued":
                try:
                    self._waiting.remove(job)
                except ValueError:
                    pass
                self._finish(job, "cancelled", "cancelled before it started")
            else:
                job.message = "cancelling…"
                job.version += 1
            self._cond.notify_all()

    def wait(self, job: Job, since: int, timeout: float) -> None:
        """Return when ``job.version > since``, or after ``timeout`` seconds."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while job.version <= since and not self._stop:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            for job in self._waiting:
                job.cancel.set()
            self._cond.notify_all()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ worker side

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                job = self._waiting.popleft()
                job.state = "running"
                job.started = time.time()
                job.message = "started"
                job.version += 1
                self._cond.notify_all()
            state, message, result, error = "done", "done", None, None
            try:
                result = job.work(job)
                if job.cancel.is_set():
                    state, message, result = "cancelled", "cancelled", None
            except Cancelled:
                state, message = "cancelled", "cancelled while it ran"
            except (CalcinosisError, OSError, ValueError) as exc:
                state, message, error = "error", "failed", str(exc) or type(exc).__name__
            except Exception as exc:  # noqa: BLE001 - one broken job must not stop the server
                traceback.print_exc()
                state, message = "error", "failed"
                error = f"internal error: {type(exc).__name__}: {exc}"
            with self._cond:
                job.result = result
                job.error = error
                self._finish(job, state, message)
                self._cond.notify_all()

    def _finish(self, job: Job, state: str, message: str) -> None:
        """Mark a job finished and forget the oldest finished ones (lock held)."""
        # The work closure holds the job's input (a decoded upload can be hundreds
        # of MB); a finished job keeps only its result and files.
        job.work = _finished_work
        job.state = state
        job.message = message
        job.finished = time.time()
        if state == "done":
            job.progress = 1.0
        job.version += 1
        self._finished.append(job.id)
        while len(self._finished) > self.keep_finished:
            old = self._jobs.pop(self._finished.popleft(), None)
            if old is not None:
                shutil.rmtree(old.folder, ignore_errors=True)


def _finished_work(job: Job) -> dict[str, Any]:
    raise RuntimeError(f"job {job.id} has already run")

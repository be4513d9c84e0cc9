"""One worker, a bounded queue and a cache: how ``ddim serve`` runs model work for many HTTP threads.

The network runs on one worker thread, one job at a time (a job is batch 1 and uses all of torch's
threads; running two at once would only make both slower and their results depend on the load).
HTTP threads hand jobs over with :meth:`Engine.run` and wait:

- a result already in the LRU cache comes back at once, without queueing;
- a job identical to one queued or running (same key) waits for that one instead of queueing again;
- a new job from a client that still has a job waiting supersedes it: the older waiter gets
  :class:`Superseded` (the page only wants its newest draft);
- when ``queue_size`` jobs are waiting, a new one is refused with :class:`QueueFull` (HTTP 503);
- after :meth:`Engine.close` every waiting job and every new one gets :class:`ShuttingDown`.

Results are keyed by everything that determines them, so two requests can never swap results.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Engine", "JobInfo", "QueueFull", "Superseded", "ShuttingDown"]


class QueueFull(RuntimeError):
    """The queue holds ``queue_size`` waiting jobs already."""


class Superseded(RuntimeError):
    """A newer request of the same client replaced this one before it started."""


class ShuttingDown(RuntimeError):
    """The engine was closed."""


@dataclass
class JobInfo:
    """How a result was obtained.

    Attributes:
        cached: it came from the cache (no work was done for this request).
        queue_seconds: time waited before the work started (0 for a cache hit).
        compute_seconds: time the work took (the original work's, for a cache hit).
        meta: what the job function returned besides its value (e.g. network calls).
    """

    cached: bool
    queue_seconds: float
    compute_seconds: float
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Job:
    key: Hashable
    fn: Callable[[], tuple[Any, dict[str, Any]]]
    submitted: float
    order: tuple[int, int] = (0, 0)
    clients: set[Hashable] = field(default_factory=set)
    waiters: int = 0
    started: float | None = None
    done: bool = False
    value: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None
    seconds: float = 0.0


class Engine:
    """A single worker thread with a bounded queue of jobs and an LRU cache of their results.

    Args:
        queue_size: most jobs waiting to start (the running one not counted); default 16.
        cache_size: most results kept (least recently used dropped first); default 256.
    """

    def __init__(self, queue_size: int = 16, cache_size: int = 256) -> None:
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"queue_size must be a positive int, got {queue_size!r}")
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0, got {cache_size!r}")
        self.queue_size = queue_size
        self.cache_size = cache_size
        self._cond = threading.Condition()
        self._pending: list[_Job] = []
        self._running: _Job | None = None
        self._cache: OrderedDict[Hashable, tuple[Any, float, dict[str, Any]]] = OrderedDict()
        self._latest: dict[Hashable, _Job] = {}  # client -> its newest job
        self._closed = False
        self._seq = 0
        #: Set by :meth:`close`: long jobs may check it between steps and stop early (raising ShuttingDown).
        self.stopping = threading.Event()
        self.stats = {"computed": 0, "hits": 0, "refused": 0, "superseded": 0}
        self._thread = threading.Thread(target=self._work, name="ddim-serve-worker", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ cache
    def cached(self, key: Hashable) -> tuple[Any, float, dict[str, Any]] | None:
        """The cached (value, compute seconds, meta) of ``key``, or None; marks it recently used."""
        with self._cond:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
            return hit

    def memo(self, key: Hashable, fn: Callable[[], tuple[Any, dict[str, Any]]]) -> Any:
        """Inside a job: the cached value of ``key``, else ``fn()`` computed here (on the worker) and cached.

        ``fn`` returns (value, meta) like a job function."""
        hit = self.cached(key)
        if hit is not None:
            return hit[0]
        tic = time.perf_counter()
        value, meta = fn()
        self._store(key, value, time.perf_counter() - tic, meta)
        return value

    def _store(self, key: Hashable, value: Any, seconds: float, meta: dict[str, Any]) -> None:
        if self.cache_size == 0:
            return
        with self._cond:
            self._cache[key] = (value, seconds, meta)
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    # ------------------------------------------------------------------ jobs
    def run(
        self,
        key: Hashable,
        fn: Callable[[], tuple[Any, dict[str, Any]]],
        *,
        client: Hashable | None = None,
        priority: int = 0,
    ) -> tuple[Any, JobInfo]:
        """The result of ``fn()`` (which returns ``(value, meta)``) for ``key``: cached, shared with an
        identical job, or computed on the worker after the jobs ahead of it. Blocks until then.

        Waiting jobs start in order of ``priority`` (lower first; default 0), then of arrival: the
        server puts drafts before edits and interpolation frames, so a slow edit never holds a draft
        back by more than the one job already running.

        Raises QueueFull, Superseded or ShuttingDown (see the module docstring), or what ``fn`` raised.
        """
        arrived = time.perf_counter()
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.stats["hits"] += 1
                return hit[0], JobInfo(True, 0.0, hit[1], dict(hit[2]))
            job = next((j for j in (self._running, *self._pending) if j is not None and j.key == key), None)
            if client is not None:  # this client's older request gives way (first: it frees its place)
                older = self._latest.get(client)
                if older is not None and older is not job:
                    older.clients.discard(client)
                    self._drop_if_unwanted(older)
            if job is None:
                if len(self._pending) >= self.queue_size:
                    self.stats["refused"] += 1
                    raise QueueFull(f"busy: {len(self._pending)} requests are queued already; retry shortly")
                self._seq += 1
                job = _Job(key, fn, arrived, (priority, self._seq))
                self._pending.append(job)
            if client is not None:
                job.clients.add(client)
                self._latest[client] = job
            job.waiters += 1
            self._cond.notify_all()
            try:
                while not job.done and (client is None or client in job.clients) and not self._closed:
                    self._cond.wait()
            finally:
                job.waiters -= 1
            if client is not None and client not in job.clients and not job.done:
                self.stats["superseded"] += 1
                raise Superseded("superseded by a newer request of the same client")
            if not job.done:
                raise ShuttingDown("the server is shutting down")
            if client is not None and self._latest.get(client) is job:
                del self._latest[client]
        if job.error is not None:
            raise job.error
        wait = (job.started or arrived) - max(arrived, job.submitted)
        return job.value, JobInfo(False, max(0.0, wait), job.seconds, dict(job.meta))

    def _drop_if_unwanted(self, job: _Job) -> None:
        """Remove a waiting job that no client wants any more (the caller holds the lock)."""
        if job in self._pending and not job.clients and job.waiters <= 1:
            # waiters <= 1: the only waiter is the superseded client itself
            self._pending.remove(job)
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = min(self._pending, key=lambda j: j.order)
                self._pending.remove(job)
                job.started = time.perf_counter()
                self._running = job
            try:
                value, meta = job.fn()
                job.value, job.meta = value, dict(meta)
            except BaseException as e:  # handed to the waiting threads, which answer the request
                job.error = e
            job.seconds = time.perf_counter() - job.started
            if job.error is None:
                self._store(job.key, job.value, job.seconds, job.meta)
            with self._cond:
                self.stats["computed"] += 1
                job.done = True
                self._running = None
                self._cond.notify_all()

    @property
    def queued(self) -> int:
        """Jobs waiting to start."""
        with self._cond:
            return len(self._pending)

    def close(self, timeout: float | None = 5.0) -> None:
        """Refuse new jobs, fail the waiting ones with :class:`ShuttingDown`, set :attr:`stopping` (a job
        that checks it stops at its next step) and wait up to ``timeout`` seconds (None: as long as it
        takes) for the running job to end."""
        self.stopping.set()
        with self._cond:
            self._closed = True
            self._pending.clear()
            self._cond.notify_all()
        self._thread.join(timeout)

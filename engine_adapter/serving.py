"""The engine on the wall clock, driven by a thread of its own: the serving loop.

HTTP threads ``submit`` requests and read their tokens from a ``TokenStream``; the loop
thread alone touches the engine. Between iterations it takes in new requests and aborts
(a client that left), asks the policy for the coming iteration's decision (the same policy
objects as the env and ``lpenv-eval``) and runs it. Nothing is lost on the way: a request
the engine refuses gets its error back at ``submit``; an abort frees the request's KV blocks
(``Scheduler.abort``); if an iteration raises, every open stream ends with that error and
the loop stops, so no client waits forever.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engine_adapter.decision import Decision, SchedulerView
from engine_adapter.engine import Engine
from engine_adapter.errors import RequestError
from engine_adapter.plan import IterationReport
from engine_adapter.serving_metrics import ServingMetrics
from lpenv.metrics import RequestRecord

log = logging.getLogger("lpenv.serve")

# How long the loop sleeps when requests are queued but the policy starts nothing and nothing
# runs (a policy waiting for more arrivals): it decides again after this or at an arrival.
IDLE_DECIDE_S = 0.005
# How long an idle loop sleeps between looks at a stop requested from a signal handler.
STOP_POLL_S = 0.2


@dataclass(frozen=True)
class StreamEnd:
    """The last item of a stream: ``reason`` is ``length`` (all tokens sent), ``abort``, or
    ``error`` (with ``message``)."""

    reason: str
    message: str = ""


class TokenStream:
    """One request's output tokens as the loop emits them, then a ``StreamEnd``."""

    def __init__(self, request_id: str, prompt_tokens: int, max_tokens: int) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self._items: queue.Queue = queue.Queue()

    def get(self, timeout: float | None = None) -> int | StreamEnd | None:
        """The next token id or the end; None if none came within ``timeout``."""
        try:
            return self._items.get(timeout=timeout)
        except queue.Empty:
            return None

    def _put(self, item: int | StreamEnd) -> None:
        self._items.put(item)


@dataclass(eq=False)  # (found in the inbox by identity)
class _Submission:
    prompt: list[int]
    max_tokens: int
    arrival: float
    done: threading.Event
    stream: TokenStream | None = None
    error: str | None = None  # the engine refused it (bad input)
    stopped: str | None = None  # the loop stopped before it ran


class ServingLoop:
    """Runs ``engine`` (on a ``WallClock``) with ``decide``: ``run`` in the calling thread, or
    ``start`` in a daemon thread.

    ``decide``: the policy (a ``SchedulerView`` in, a ``Decision`` out). ``metrics``: where
    finished requests and iterations are counted (``GET /metrics``)."""

    def __init__(self, engine: Engine, decide: Callable[[SchedulerView], Decision],
                 metrics: ServingMetrics) -> None:
        self.engine = engine
        self.decide = decide
        self.metrics = metrics
        # Held around the metrics and the streams. An iteration runs without it: ``exposition``
        # reads the engine's queue lengths as they are at that moment.
        self.lock = threading.Lock()
        self._wake = threading.Condition(threading.Lock())
        self._inbox: list[_Submission] = []
        self._aborts: set[str] = set()
        self._streams: dict[str, TokenStream] = {}
        self._records: dict[str, RequestRecord] = {}
        self._stop = False
        self.error: str | None = None  # why the loop stopped, if an iteration failed
        self._running = False
        self._thread: threading.Thread | None = None

    # ---- what HTTP threads call --------------------------------------------------------------
    def start(self) -> ServingLoop:
        """Run the loop in a thread of its own (tests, embedding). ``lpenv-serve`` runs it in
        the main thread instead (``run``): here PyTorch's OpenMP workers run a thread's
        matmuls about 3x slower than the main thread's (``scripts/bench_serve.py``)."""
        self._thread = threading.Thread(target=self.run, name="lpenv-serving-loop",
                                        daemon=True)
        self._running = True  # (healthy from now: the thread may take a moment to begin)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the iteration under way, end every open stream (``abort``) and stop."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        self.join(timeout)

    def request_stop(self) -> None:
        """Stop after the iteration under way, as ``stop`` does, without taking a lock or
        waiting: safe from a signal handler (``lpenv-serve`` on SIGINT and SIGTERM), where
        taking the loop's own lock could deadlock."""
        self._stop = True

    def join(self, timeout: float | None = None) -> None:
        """Wait for the loop thread (``start``) to end."""
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def healthy(self) -> bool:
        return self._running and self.error is None

    def submit(self, prompt: Sequence[int], max_tokens: int, timeout: float = 60.0
               ) -> TokenStream:
        """Queue a request (arriving now); its stream, or the engine's ``RequestError`` (bad
        input; nothing was queued). Waits for the loop to take it in: at most one
        iteration."""
        sub = _Submission(list(prompt), max_tokens, self.engine.clock.now(), threading.Event())
        with self._wake:
            if self._stop or self.error is not None:
                why = f": {self.error}" if self.error else ""
                raise RuntimeError(f"the server is not running{why}")
            self._inbox.append(sub)
            self._wake.notify()
        if not sub.done.wait(timeout):
            with self._wake:
                if sub in self._inbox:  # (still there: withdrawn, it will never run)
                    self._inbox.remove(sub)
                    raise RuntimeError(
                        f"the serving loop did not take the request in {timeout:g} s")
            # (the loop took it in meanwhile: its answer is at most a failed iteration away)
            if not sub.done.wait(timeout):
                raise RuntimeError("the serving loop took the request in and went silent")
        if sub.stopped is not None:
            raise RuntimeError(sub.stopped)
        if sub.error is not None:
            raise RequestError(sub.error)
        assert sub.stream is not None
        return sub.stream

    def abort(self, request_id: str) -> None:
        """Stop a request whose client left; its KV blocks are freed at the next iteration's
        start (or when its prefill batch's last stage ends)."""
        with self._wake:
            self._aborts.add(request_id)
            self._wake.notify()

    def exposition(self) -> str:
        """``GET /metrics``: the counters and the engine's state now, under one lock (queue
        lengths read while an iteration may run: a snapshot, never a torn value)."""
        with self.lock:
            s, blocks = self.engine.scheduler, self.engine.blocks
            return self.metrics.exposition({
                "lpenv_requests_waiting": (len(s.waiting), "Requests waiting for a prefill "
                                           "batch."),
                "lpenv_requests_running": (len(self._streams) - len(s.waiting), "Requests "
                                           "prefilling or decoding."),
                "lpenv_prefill_batches_in_flight": (len(s.batches), "Layered prefill batches "
                                                    "between their first and last stage."),
                "lpenv_kv_blocks_free": (blocks.num_free, "Free KV cache blocks."),
                "lpenv_kv_blocks": (blocks.num_blocks, "KV cache blocks in all."),
            })

    # ---- the loop thread ---------------------------------------------------------------------
    def run(self) -> None:
        """Serve in the calling thread until ``stop`` (or an iteration fails, or Ctrl-C);
        then end every open stream."""
        self._running = True
        try:
            while self._next():
                pass
        except Exception as exc:  # an iteration failed: nobody may wait for it forever
            log.exception("the serving loop stopped")
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._running = False
            self._close()

    def _close(self) -> None:
        with self._wake:
            self._stop = True
            pending, self._inbox = self._inbox, []
        for sub in pending:
            sub.stopped = f"the server stopped{': ' + self.error if self.error else ''}"
            sub.done.set()
        with self.lock:
            end = StreamEnd("error", self.error) if self.error else StreamEnd("abort")
            for stream in self._streams.values():
                stream._put(end)
            self._streams.clear()

    def _next(self) -> bool:
        """Take in arrivals and aborts, then run one iteration; False when stopped."""
        engine = self.engine
        with self._wake:
            while not (self._stop or self._inbox or self._aborts or engine.has_unfinished()):
                self._wake.wait(STOP_POLL_S)  # (request_stop sets the flag without the lock)
            if self._stop:
                return False
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, set()
        try:
            with self.lock:
                for sub in inbox:
                    self._take(sub)
                for rid in aborts:
                    self._drop(rid)
        finally:  # (an error or Ctrl-C midway: the ones not taken in are answered by _close)
            with self._wake:
                self._inbox[:0] = [sub for sub in inbox if not sub.done.is_set()]
        if not engine.has_unfinished():
            return True
        view = engine.decision_view()
        decision = self.decide(view) if view is not None else None
        report = engine.step(decision)
        if report is None:  # the policy waits and nothing runs: decide again soon
            with self._wake:
                if not (self._stop or self._inbox or self._aborts):
                    self._wake.wait(IDLE_DECIDE_S)
            return True
        with self.lock:
            self._account(report)
        return True

    def _take(self, sub: _Submission) -> None:
        try:
            rid = self.engine.add_request(sub.prompt, sub.max_tokens, arrival_time=sub.arrival)
        except RequestError as exc:
            sub.error = str(exc)
            self.metrics.ended_early("rejected")
        else:
            sub.stream = self._streams[rid] = TokenStream(rid, len(sub.prompt), sub.max_tokens)
            self._records[rid] = RequestRecord(rid, sub.arrival, len(sub.prompt),
                                               sub.max_tokens)
        sub.done.set()

    def _drop(self, rid: str) -> None:
        stream = self._streams.pop(rid, None)
        if stream is None:  # finished (or never known) before the abort came
            return
        self.engine.abort(rid)
        del self._records[rid]
        self.metrics.ended_early("aborted")
        stream._put(StreamEnd("abort"))

    def _account(self, report: IterationReport) -> None:
        self.metrics.iteration(report)
        for ev in report.events:
            stream = self._streams.get(ev.request_id)
            if stream is not None:
                self._records[ev.request_id].token_times.append(ev.time)
                stream._put(ev.token_id)
        for rid in report.finished:
            stream = self._streams.pop(rid, None)
            if stream is not None:
                self.metrics.finished(self._records.pop(rid))
                stream._put(StreamEnd("length"))

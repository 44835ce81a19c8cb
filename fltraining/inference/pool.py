"""Where inference work runs: a bounded thread pool with a deadline, and a cache of ready sessions."""

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor

import onnxruntime

from fltraining.errors import ServiceUnavailable

RETRY_AFTER_SECONDS = 1


class InferencePool:
    """Runs jobs on `threads` threads; refuses (503) past `queue` waiting jobs and stops a job past `timeout`."""

    def __init__(self, threads: int, queue: int, timeout: float) -> None:
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="inference")
        self._limit = threads + queue
        self._timeout = timeout
        self._active = 0  # jobs submitted and not finished (a stopped job counts until its thread lets go)

    @property
    def active(self) -> int:
        """Jobs running or waiting."""
        return self._active

    async def run[T](self, job: Callable[[onnxruntime.RunOptions], T]) -> T:
        """Run `job` off the event loop; it passes the RunOptions to every `session.run` so it can be stopped."""
        if self._active >= self._limit:
            raise ServiceUnavailable("Inference is busy; retry shortly.", RETRY_AFTER_SECONDS)
        run_options = onnxruntime.RunOptions()
        run_options.log_severity_level = 3
        future = asyncio.get_running_loop().run_in_executor(self._executor, job, run_options)
        self._active += 1
        future.add_done_callback(self._finished)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self._timeout)
        except TimeoutError:
            run_options.terminate = True  # onnxruntime checks this between kernels: the thread is freed soon
            future.add_done_callback(lambda done: done.exception())  # the stopped run's error is expected
            raise ServiceUnavailable(
                f"Inference took longer than {self._timeout:g} s and was stopped; retry later or send less input.",
                RETRY_AFTER_SECONDS,
            ) from None

    def _finished(self, _: "asyncio.Future[object]") -> None:
        self._active -= 1

    def close(self) -> None:
        """Stop taking jobs; running ones finish on their own."""
        self._executor.shutdown(wait=False, cancel_futures=True)


class SessionCache:
    """The most recently used sessions and SWAG moments, by key (a model's weights are immutable per file id)."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._items: OrderedDict[Hashable, object] = OrderedDict()
        # Guards the dictionary only: entries are built outside it, and a duplicate build just replaces its twin.
        self._lock = threading.Lock()

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def get(self, key: Hashable) -> object | None:
        """The entry for `key`, marked as recently used, or None."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key: Hashable, value: object) -> None:
        """Keep `value`, dropping the least recently used entry past capacity."""
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)

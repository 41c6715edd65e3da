"""Continuous batching: one thread owns the decoding engine and runs every request's sequences
together in its rows: `run()` on the thread that calls it (`codegpt serve` decodes on its main
thread), or `start()` on a thread of its own.

A request's sequences (one per prompt and sample) wait in a queue of at most `max_queue` (beyond it
the request is refused whole: `QueueFull`) until a row is free. Those admitted together are
prefilled in their rows in one forward; each joins the next decoding step, and leaves at its stop,
its length or its client's disconnect (`cancel`), freeing the row for the next. Its pieces of text
reach the request's asyncio queue as `Event`s as they are decoded, the last one with its finish
reason.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field

from codegpt.base.generate import Completion
from codegpt.base.sampling import Sampling
from codegpt.base.slots import Slot, SlotEngine
from codegpt.base.tokenizer import Tokenizer


class QueueFull(Exception):
    pass


@dataclass(frozen=True)
class Event:
    index: int  # which of the request's sequences
    text: str
    finish_reason: str | None = None  # "stop", "length", or "error" (the server failed it)
    tokens: int = 0  # tokens generated, on the last event


@dataclass(eq=False)
class Sequence:
    """One completion to decode: a prompt's ids, its sampling options and adapter (0: the base)."""

    index: int
    prompt_ids: list[int]
    sampling: Sampling
    adapter: int = 0
    min_new_tokens: int = 0
    cancelled: bool = False
    slot: Slot | None = field(default=None, repr=False)
    completion: Completion | None = field(default=None, repr=False)


class Request:
    """The sequences of one HTTP request and the queue their events arrive on."""

    def __init__(self, sequences: list[Sequence]):
        self.sequences = sequences
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()



def deliver(outbox: list[tuple[Request, Event]]) -> None:
    """Hand events from the scheduler's thread to their requests' event loops: one wake-up of
    each loop per decoding step, not one per sequence."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Request, Event]]] = {}
    for request, event in outbox:
        by_loop.setdefault(request.loop, []).append((request, event))
    for loop, events in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, events)
        except RuntimeError:  # the server's loop has closed: nobody is waiting
            pass


def _put_all(events: list[tuple[Request, Event]]) -> None:
    for request, event in events:
        request.events.put_nowait(event)


class Scheduler:
    def __init__(self, engine: SlotEngine, tokenizer: Tokenizer, max_queue: int):
        self.engine, self.tokenizer, self.max_queue = engine, tokenizer, max_queue
        self._waiting: deque[tuple[Request, Sequence]] = deque()
        self._running: dict[Slot, tuple[Request, Sequence]] = {}
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, request: Request) -> None:
        """Queue the request's sequences, or refuse them all with QueueFull."""
        with self._wake:
            if len(self._waiting) + len(request.sequences) > self.max_queue:
                raise QueueFull
            self._waiting.extend((request, sequence) for sequence in request.sequences)
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        """Stop the request's sequences (its client left): the queued never start, the running
        leave at the next step."""
        with self._wake:
            for sequence in request.sequences:
                sequence.cancelled = True
            self._waiting = deque(item for item in self._waiting if item[0] is not request)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="codegpt-decode", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop decoding (safe from a signal handler on the thread that runs it: the lock is
        reentrant)."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def run(self) -> None:
        """Decode until `close()`."""
        while True:
            with self._wake:
                while not self._waiting and not self._running and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                admitted = [self._waiting.popleft() for _ in range(min(self.engine.free_rows, len(self._waiting)))]
            try:
                self._step(admitted)
            except Exception as err:  # fail what was decoding, and keep serving
                traceback.print_exc(file=sys.stderr)
                self._fail(admitted, err)

    def _step(self, admitted: list[tuple[Request, Sequence]]) -> None:
        outbox: list[tuple[Request, Event]] = []
        joining = []
        for request, sequence in admitted:
            sequence.completion = Completion(self.tokenizer, sequence.sampling)
            try:
                self.engine.prompt_tokens(sequence.prompt_ids)
            except ValueError as err:  # this prompt alone (ids the model has no row for): the others go on
                outbox.append((request, Event(sequence.index, f"{type(err).__name__}: {err}", "error")))
                continue
            joining.append((request, sequence))
        if joining:
            added = self.engine.add_many([(sequence.prompt_ids, sequence.sampling, sequence.adapter,
                                           sequence.min_new_tokens) for _, sequence in joining])
            for slot, (request, sequence) in zip(added, joining):
                sequence.slot = slot
                self._running[slot] = (request, sequence)
        for slot, (request, sequence) in list(self._running.items()):
            if sequence.cancelled:
                self._leave(slot)
        for slot, token in self.engine.step():
            request, sequence = self._running[slot]
            piece = sequence.completion.push(token)
            if sequence.completion.done:
                self._leave(slot)
                outbox.append((request, Event(sequence.index, piece, sequence.completion.finish_reason,
                                              sequence.completion.tokens)))
            elif piece:
                outbox.append((request, Event(sequence.index, piece)))
        deliver(outbox)

    def _leave(self, slot: Slot) -> None:
        self.engine.release(slot)
        del self._running[slot]

    def _fail(self, admitted: list[tuple[Request, Sequence]], err: Exception) -> None:
        failed = list(self._running.values()) + [item for item in admitted if item[1].slot is None]
        for slot in list(self._running):
            self._leave(slot)
        deliver([(request, Event(sequence.index, f"{type(err).__name__}: {err}", "error"))
                 for request, sequence in failed])

"""The engine thread: the one thread that drives a synchronous, non-thread-safe
:class:`LLMEngine`, and the commands the event loop hands it.

::

    event loop (gRPC handlers)                       engine thread (the only one touching the engine)
      Generate ─ AddCommand ──▶ ┐                     ┌─▶ apply commands: add_request / abort
      Abort ─── AbortCommand ─▶ ├─ deque + Condition ▶┤
      cancel ── AbortCommand ─▶ ┘                     └─▶ step() ─▶ outputs, stats snapshot
      callbacks on the loop ◀── loop.call_soon_threadsafe(outputs, rejections, KV events) ──┘

The thread sleeps on the condition while it has no commands and no unfinished requests.
Readers of load figures (GetStats, heartbeats, /metrics) use the snapshot of
``engine.stats()`` it publishes after every iteration. Work that may take long and does not
need the engine's state (compiling a grammar, loading a tokenizer) is done before a command
is submitted, so that it never stalls the running batch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from engine_service.engine import EngineStats, LLMEngine, RequestOutput, SamplingParams
from engine_service.engine.kv_events import KVEvent
from engine_service.engine.kv_handoff import HandoffEvent, KVExport
from engine_service.engine.multimodal import ImageInput
from engine_service.engine.structured import GrammarSpec
from engine_service.engine.structured.backend import GrammarMatcher

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class AddCommand:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    cache_salt: str = ""
    grammar: GrammarMatcher | None = None  # compiled off this thread for ``params.structured``
    adapter: str = ""  # a LoRA adapter's name; "" for the base model
    images: list[ImageInput] = field(default_factory=list)  # the prompt's images
    # Disaggregation: export the prompt's KV from this block on (a prefill engine), or
    # import it (a decode engine); see engine_service.engine.kv_handoff.
    kv_export_skip_blocks: int | None = None
    import_kv: bool = False


@dataclass(slots=True)
class AbortCommand:
    request_id: str


@dataclass(slots=True)
class CallCommand:
    """Run ``fn(engine)`` on the engine thread; its result or exception lands in ``future``
    (LoRA adapters are registered and unregistered this way)."""

    fn: Callable[[LLMEngine], Any]
    future: asyncio.Future


def _settle(future: asyncio.Future, result: Any, error: Exception | None) -> None:
    if future.done():  # the awaiting RPC was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class EngineLoop:
    """Runs ``engine``'s step loop in one dedicated thread.

    Callers on any thread hand it commands with :meth:`add` and :meth:`abort`. It reports
    back on ``loop`` through ``loop.call_soon_threadsafe``: each step's outputs to
    ``on_outputs``, a rejected request (``add_request`` raised) to ``on_rejected``, a
    failed step to ``on_step_failed``, the engine's KV events to ``on_kv_events``, and KV
    hand-off events (reservations, prompt chunks, first tokens) to ``on_handoff``, before
    the outputs of the same step.
    """

    def __init__(
        self,
        engine: LLMEngine,
        loop: asyncio.AbstractEventLoop,
        on_outputs: Callable[[list[RequestOutput]], None],
        on_rejected: Callable[[str, Exception], None],
        on_step_failed: Callable[[Exception], None],
        on_kv_events: Callable[[list[KVEvent]], None] | None = None,
        on_handoff: Callable[[list[HandoffEvent]], None] | None = None,
    ) -> None:
        self._engine = engine
        self._on_handoff = on_handoff
        self._on_kv_events = on_kv_events
        self._loop = loop
        self._on_outputs = on_outputs
        self._on_rejected = on_rejected
        self._on_step_failed = on_step_failed
        self._commands: deque[AddCommand | AbortCommand | CallCommand] = deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        # One worker: the engine's grammar cache and tokenizer are then written by this
        # thread alone, and read by the step thread only through matchers it has compiled.
        self._compiler = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
        self.stats: EngineStats = engine.stats()
        self._max_num_seqs = engine.max_num_seqs
        # Adds handed over (event loop only), and how many of them the published stats
        # include; the two are published together so a reader never sees one without the
        # other.
        self._adds_submitted = 0
        self._published: tuple[EngineStats, int] = (self.stats, 0)
        self._adds_taken = 0  # engine thread only

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current step; requests still in the engine are dropped."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join()
        self._compiler.shutdown(wait=False, cancel_futures=True)

    async def compile_grammar(self, spec: GrammarSpec) -> GrammarMatcher:
        """A matcher for ``spec``, compiled (and, the first time, the tokenizer loaded) on
        the compile worker, never on the step thread; raises ``ValueError`` naming what is
        wrong with the spec. Hand it to :meth:`add` in ``AddCommand.grammar``."""
        return await self._loop.run_in_executor(
            self._compiler, self._engine.structured.matcher, spec
        )

    def queue_depth(self) -> int:
        """Requests waiting for a place in the running batch: the engine's waiting count at
        its last step, plus adds it has not taken in yet beyond the free places (call on the
        event loop, like :meth:`add`)."""
        stats, reflected = self._published
        unseen = self._adds_submitted - reflected
        free = max(0, self._max_num_seqs - stats.num_running)
        return stats.num_waiting + max(0, unseen - free)

    def add(self, command: AddCommand) -> None:
        self._adds_submitted += 1
        self._submit(command)

    def abort(self, request_id: str) -> None:
        self._submit(AbortCommand(request_id))

    def call(self, fn: Callable[[LLMEngine], Any]) -> asyncio.Future:
        """``fn(engine)`` on the engine thread, awaited on the event loop."""
        future = self._loop.create_future()
        self._submit(CallCommand(fn, future))
        return future

    def _submit(self, command: AddCommand | AbortCommand | CallCommand) -> None:
        with self._wakeup:
            self._commands.append(command)
            self._wakeup.notify()

    def _run(self) -> None:
        engine = self._engine
        while True:
            with self._wakeup:
                # Requests that only wait for their KV to arrive need no steps: a command
                # (the KV's arrival) wakes the thread.
                while not (
                    self._commands
                    or self._stopping
                    or (engine.has_unfinished() and not engine.only_awaiting_kv())
                ):
                    self._wakeup.wait()
                if self._stopping:
                    return
                commands = list(self._commands)
                adds_taken = self._adds_taken + sum(isinstance(c, AddCommand) for c in commands)
                self._commands.clear()
            for command in commands:
                self._apply(command)
            outputs: list[RequestOutput] = []
            if engine.has_unfinished():
                try:
                    outputs = engine.step()
                except Exception as exc:
                    # Whatever the step left half-done, its requests cannot go on: end them
                    # here, on the engine's own thread, so their blocks come back at once
                    # instead of the same failing batch being retried until aborts arrive.
                    logger.exception("engine step failed; ending the requests in flight")
                    for request_id in engine.unfinished_request_ids():
                        engine.abort(request_id)
                    engine.discard_pending_outputs()
                    self._loop.call_soon_threadsafe(self._on_step_failed, exc)
            self.stats = engine.stats()
            self._adds_taken = adds_taken
            self._published = (self.stats, adds_taken)
            if self._on_handoff is not None:
                handoff = engine.take_handoff_events()
                if handoff:
                    self._loop.call_soon_threadsafe(self._on_handoff, handoff)
            if outputs:
                self._loop.call_soon_threadsafe(self._on_outputs, outputs)
            if self._on_kv_events is not None and engine.kv_events is not None:
                events = engine.kv_events.drain()
                if events:
                    self._loop.call_soon_threadsafe(self._on_kv_events, events)

    def _apply(self, command: AddCommand | AbortCommand | CallCommand) -> None:
        if isinstance(command, AbortCommand):
            self._engine.abort(command.request_id)
            return
        if isinstance(command, CallCommand):
            try:
                result, error = command.fn(self._engine), None
            except Exception as exc:
                result, error = None, exc
            self._loop.call_soon_threadsafe(_settle, command.future, result, error)
            return
        try:
            self._engine.add_request(
                command.request_id,
                command.prompt_token_ids,
                command.params,
                command.priority,
                command.cache_salt,
                grammar=command.grammar,
                adapter=command.adapter or None,
                images=command.images,
                kv_export=None
                if command.kv_export_skip_blocks is None
                else KVExport(command.kv_export_skip_blocks),
                import_kv=command.import_kv,
            )
        except Exception as exc:
            self._loop.call_soon_threadsafe(self._on_rejected, command.request_id, exc)

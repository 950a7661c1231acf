"""What every recipe stands on: stored stage results, bounded work in flight,
patient calls to the other services, and seeds derived from the job's seed.

A recipe is plain async code that calls `ctx.stage(item, name, compute)` for
each small step. `stage` returns the stored result when there is one, so a
restarted job replays stored steps for free and recomputes only the rest; a
computed result is stored before it is returned, so nothing moves on from a
result that could be lost. Each stage name has its own bound on concurrent
computations, so a slow stage applies backpressure instead of queuing
without limit.

A service that refuses one item (INVALID_ARGUMENT, say: not a transient
failure) drops that item, not the job: `stage` stores a drop with filter
`error` and the service's message, and `each_item` (or `item`) counts it.
The job fails only when more than its `max_error_fraction` of items errored.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import structlog

from autodidact.coordinator.concurrency import AimdLimit, Slot
from autodidact.coordinator.store import JobStore
from autodidact.errors import AutodidactError, DeadlineExceeded, FailedPrecondition, Unavailable
from autodidact.runtime.metrics import STAGE_CONCURRENCY_LIMIT, STAGE_DECISIONS
from autodidact.runtime.neighbours import is_transient, rpc_error_text

if TYPE_CHECKING:
    # The async stubs exist only in the mypy-protobuf .pyi files: a stub built on an aio channel is one, and its calls
    # return awaitables, so they are named for the type checker alone (annotations are strings at run time).
    from autodidact.v1.critic_pb2_grpc import CriticServiceAsyncStub
    from autodidact.v1.dedup_pb2_grpc import DedupServiceAsyncStub
    from autodidact.v1.generator_pb2_grpc import GeneratorServiceAsyncStub
    from autodidact.v1.scorer_pb2_grpc import ScorerServiceAsyncStub
    from autodidact.v1.tool_executor_pb2_grpc import ToolExecutorServiceAsyncStub

log = structlog.get_logger("autodidact.recipes")
T = TypeVar("T")

# The filter of an item a service refused.
ERROR_FILTER = "error"
DEFAULT_MAX_ERROR_FRACTION = 0.1
MAX_ERROR_MESSAGES = 5  # how many the manifest quotes

# Refusals that say "too many calls now": the server's bound on calls in progress
# (RESOURCE_EXHAUSTED), a backend's HTTP 429 or a proxy shedding load (UNAVAILABLE).
OVERLOAD_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})
# A call refused for overload while its stage's limit comes down retries after a
# pause drawn up to this: it then waits in line for a slot under the lower limit,
# so the pause only keeps the refused calls from retrying in step.
OVERLOAD_RETRY_SECONDS = 0.05

# The stage slot the running computation holds, set by JobContext.stage: `call`
# reports to that stage's limit and lends the slot back while a refused call waits.
_stage_slot: contextvars.ContextVar[Slot | None] = contextvars.ContextVar("stage_slot", default=None)


class ServiceRefused(AutodidactError):
    """A service answered a non-transient error: waiting will not help."""


class ItemFailed(AutodidactError):
    """A stage of one item errored (now or in a stored result): the item is
    dropped with filter `error` and its work stops here."""


class TooManyErrors(FailedPrecondition):
    """More than the job's max_error_fraction of its items errored."""


def derive_seed(job_seed: int, *parts: object) -> int:
    """A uint32 seed for one sample, stable across runs and restarts."""
    digest = hashlib.blake2b("/".join(map(str, (job_seed, *parts))).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big")


def derive_rng(job_seed: int, *parts: object) -> random.Random:
    return random.Random(derive_seed(job_seed, *parts))


@dataclass(frozen=True)
class Decision:
    """Why a stage kept or dropped an item: the lineage users read."""

    kept: bool
    filter: str = ""  # the filter that dropped it; empty when kept
    score: float | None = None
    reason: str = ""
    model: str = ""
    template_version: str = ""
    seed: int | None = None


@dataclass(frozen=True)
class StageResult:
    data: dict[str, Any] = field(default_factory=dict)
    decision: Decision | None = None

    def to_json(self) -> dict[str, Any]:
        # vars(), not asdict(): a decision holds only plain values, and asdict's deep copy was a third of a stored stage's cost.
        return {"data": self.data, "decision": None if self.decision is None else dict(vars(self.decision))}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> StageResult:
        decision = value.get("decision")
        return cls(data=value["data"], decision=None if decision is None else Decision(**decision))


@dataclass
class Services:
    """Stubs of the services recipes call."""

    generator: GeneratorServiceAsyncStub
    dedup: DedupServiceAsyncStub
    scorer: ScorerServiceAsyncStub
    tool_executor: ToolExecutorServiceAsyncStub
    critic: CriticServiceAsyncStub
    # How long to wait out a service that is down before failing the job.
    patience_seconds: float = 600.0


# The job-level value where JobContext.each_item stores the job's plan
# ({"dataset_items": n}); the job manager reads it for the "x of y" of progress.
PLAN_KEY = "plan"


def ready(result: StageResult) -> Callable[[], Awaitable[StageResult]]:
    """A stage whose result is already known (a pure decision), for ctx.stage."""

    async def compute() -> StageResult:
        return result

    return compute


def _replayed(result: StageResult) -> StageResult:
    """A stored result, as `stage` returns it: an item that errored there stops there again."""
    if result.decision is not None and result.decision.filter == ERROR_FILTER:
        raise ItemFailed(result.decision.reason)
    return result


class JobContext:
    def __init__(
        self,
        job_id: str,
        seed: int,
        store: JobStore,
        services: Services,
        max_in_flight: int,
        on_change: Callable[[], None],
        max_error_fraction: float = DEFAULT_MAX_ERROR_FRACTION,
        fresh: bool = False,
        key: str = "",
        adaptive: bool = True,
    ) -> None:
        # The job's id names things the job makes (a dedup namespace, item ids); its key is
        # where the store keeps it ("<tenant>/<job_id>": ids are per tenant). Tests without
        # tenants give only the id.
        self.job_id = job_id
        self.key = key or job_id
        self.seed = seed
        self.store = store
        self.services = services
        self.max_in_flight = max_in_flight
        # Each stage's limit adapts between 1 and max_in_flight; not adaptive, it stays at
        # max_in_flight (a fixed bound: benchmarks compare the two).
        self.adaptive = adaptive
        self.limits: dict[str, AimdLimit] = {}
        self._on_change = on_change
        self.max_error_fraction = max_error_fraction
        self.items = 0  # items run through `item` (each_item's included)
        self.errors: list[str] = []  # messages of those that errored
        # The job had no stored result when this run began: `stage` then computes
        # without first asking the store (nothing there to replay), which halves
        # a fresh job's store round trips. A resumed job reads before computing.
        self.fresh = fresh

    async def stage(self, item_id: str, stage: str, compute: Callable[[], Awaitable[StageResult]]) -> StageResult:
        if not self.fresh and (stored := await self.stored(item_id, stage)) is not None:
            return _replayed(stored)
        try:
            async with self.limited(stage):
                result = await compute()
        except ServiceRefused as exc:
            raise await self.drop_refused([item_id], stage, exc) from exc
        if not await self.record(item_id, stage, result):
            # The key was stored first by another computation of it (a recipe asked
            # twice in a fresh job): the stored result stands, as on a replay.
            stored = await self.stored(item_id, stage)
            assert stored is not None, "a result the store refused as a duplicate is there"
            return _replayed(stored)
        return result

    @contextlib.asynccontextmanager
    async def limited(self, stage: str) -> AsyncIterator[None]:
        """Holds a slot of `stage`'s limit meanwhile: the service calls made inside
        (`call`) raise or lower it. `stage` takes one per item; a batched stage
        (replay.py) one per batch call."""
        async with self._limit(stage).slot() as slot:
            token = _stage_slot.set(slot)
            try:
                yield
            finally:
                _stage_slot.reset(token)

    def _limit(self, stage: str) -> AimdLimit:
        limit = self.limits.get(stage)
        if limit is None:
            gauge = STAGE_CONCURRENCY_LIMIT.labels(stage)
            floor = 1 if self.adaptive else self.max_in_flight
            limit = self.limits[stage] = AimdLimit(self.max_in_flight, floor=floor, on_change=gauge.set)
        return limit

    async def job_value(self, key: str, compute: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """A value of the whole job (not of an item), computed once and stored:
        a resumed job reads the stored one."""
        stored = await self.store.get_value(self.key, key)
        if stored is not None:
            return stored
        value = await compute()
        await self.store.put_value(self.key, key, value)
        return value

    async def drop_refused(self, item_ids: list[str], stage: str, exc: Exception) -> ItemFailed:
        """Records an `error` drop at `stage` for each item a service refused
        (one item, or every item of a refused batch call) that has no result
        there yet; returns the ItemFailed for the caller to raise. One read,
        and the drops written together (one commit for a whole batch)."""
        stored = await self.stored_many(item_ids, stage)
        dropped = StageResult({"error": str(exc)}, Decision(False, ERROR_FILTER, reason=str(exc)))
        await asyncio.gather(*(self.record(item_id, stage, dropped) for item_id in dict.fromkeys(item_ids) if item_id not in stored))
        return ItemFailed(f"{', '.join(item_ids[:3])}{' …' if len(item_ids) > 3 else ''} at {stage}: {exc}")

    async def item(self, work: Awaitable[bool]) -> bool:
        """One dataset item's work; an item that errored is dropped (False)
        and counted against the job's error budget."""
        self.items += 1
        try:
            return await work
        except (ItemFailed, ServiceRefused) as exc:
            self.errors.append(str(exc))
            log.warning("item dropped: a service refused it", error=str(exc))
            return False

    def _over_budget(self, items: int) -> bool:
        return bool(self.errors) and len(self.errors) > self.max_error_fraction * items

    def check_error_budget(self, items: int | None = None) -> None:
        """Raises TooManyErrors when more than max_error_fraction of `items`
        (default: the items run so far) errored."""
        items = self.items if items is None else items
        if self._over_budget(items):
            raise TooManyErrors(
                f"{len(self.errors)} of {items} items errored, more than max_error_fraction {self.max_error_fraction:g}; "
                f"first: {self.errors[0]}"
            )

    async def each_item(self, count: int, work: Callable[[int], Awaitable[bool]]) -> list[bool]:
        """Runs work(index) for `count` dataset items, at most max_in_flight at
        once, after storing the job's plan (its dataset size, for progress).
        Stops starting items once the error budget is certainly spent.

        max_in_flight workers take the items in index order, so a job of a
        million items holds max_in_flight coroutines, not a million. An error
        that is not an item's own (a service gone for good) stops the other
        workers and reaches the caller."""
        await self.store.put_value(self.key, PLAN_KEY, {"dataset_items": count})
        kept = [False] * count
        indexes = iter(range(count))  # shared: each index is taken by one worker

        async def worker() -> None:
            for index in indexes:
                if self._over_budget(count):
                    return  # the job fails below; no use starting more work
                kept[index] = await self.item(work(index))

        workers = [asyncio.create_task(worker()) for _ in range(max(1, min(self.max_in_flight, count)))]
        try:
            await asyncio.gather(*workers)
        except BaseException:
            for task in workers:
                task.cancel()
            raise
        self.check_error_budget(count)
        return kept

    async def record(self, item_id: str, stage: str, result: StageResult) -> bool:
        """Stores a result computed outside `stage` (several items decided by one
        call); False when the key already had one (which then stands)."""
        decision = result.decision
        written = await self.store.put_result(
            self.key,
            item_id,
            stage,
            result.to_json(),
            kept=None if decision is None else decision.kept,
            filter_="" if decision is None else decision.filter,
        )
        if written:
            if decision is not None:
                STAGE_DECISIONS.labels(stage, "kept" if decision.kept else decision.filter).inc()
            self._on_change()
        return written

    async def stored(self, item_id: str, stage: str) -> StageResult | None:
        value = await self.store.get_result(self.key, item_id, stage)
        return None if value is None else StageResult.from_json(value)

    async def stored_many(self, item_ids: Sequence[str], stage: str) -> dict[str, StageResult]:
        """{item_id: result} of the items stored at `stage`, in one read."""
        found = await self.store.get_results(self.key, item_ids, stage)
        return {item_id: StageResult.from_json(value) for item_id, value in found.items()}

    async def call(self, rpc: Callable[[], Awaitable[T]], what: str) -> T:
        """Calls another service, waiting out transient failures (a restart,
        a model still loading) with backoff for up to the patience period.

        Under a stage (inside `stage`'s computation) the call reports to the
        stage's limit: an answer raises it, an overload refusal lowers it, and
        the refused call then retries within milliseconds, once a slot under
        the lowered limit is free. Backoff (0.5 s doubling to 10 s) is for what
        a lower limit cannot cure: the limit at its floor, or a timeout."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.services.patience_seconds
        slot = _stage_slot.get()
        delay = 0.5
        while True:
            decreases_at_start = slot.limit.decreases if slot is not None else 0
            try:
                result = await rpc()
            except grpc.aio.AioRpcError as exc:
                if not is_transient(exc):
                    raise ServiceRefused(f"{what}: {rpc_error_text(exc)}") from exc
                soon = slot is not None and exc.code() in OVERLOAD_CODES and slot.limit.overloaded(decreases_at_start)
                pause = random.uniform(0, OVERLOAD_RETRY_SECONDS) if soon else delay
                if loop.time() + pause > give_up_at:
                    error = Unavailable if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED else DeadlineExceeded
                    raise error(f"{what}: {rpc_error_text(exc)} (gave up after {self.services.patience_seconds:g}s)") from exc
                if soon:
                    assert slot is not None
                    log.debug("service overloaded; retrying under a lower limit", what=what, code=exc.code().name, limit=slot.limit.limit)
                    await slot.lend_for(pause)
                    continue
                log.warning("service not answering; retrying", what=what, code=exc.code().name, retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            else:
                if slot is not None:
                    slot.limit.succeeded()
                return result

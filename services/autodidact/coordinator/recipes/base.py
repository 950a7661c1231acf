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

A review gate (JobSpec.review) puts people on the items the filters were
unsure about. A stage whose deciding score lies within the band of its
threshold records a kept decision naming REVIEW_FILTER (`held`), so the item
goes on through the recipe; before its final decision the recipe asks
`review`, which waits for the item's decision: a person's (SubmitReviews)
or, at the job's review deadline, its policy's. A waiting item gives its
each_item slot back, so the rest of the job goes on.

Whoever decides writes a write-once job value (`decide_review`), on any
replica; the first decision stands. Only the job's holder copies it into the
item's results (REVIEW_STAGE): a job's results have one writer, which keeps
their cursors in commit order (postgres_store.py). The decision is in the
store before anyone is told, so a crash loses none: the resumed job replays
to the same `review` and finds it there.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import structlog

from autodidact.coordinator.concurrency import AimdLimit, Slot
from autodidact.coordinator.store import JobStore
from autodidact.errors import AutodidactError, DeadlineExceeded, FailedPrecondition, Unavailable
from autodidact.runtime.metrics import STAGE_CONCURRENCY_LIMIT, STAGE_DECISIONS
from autodidact.runtime.neighbours import is_transient, rpc_error_text
from autodidact.v1 import common_pb2

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

# Review gates: a kept decision naming REVIEW_FILTER holds its item for review; the
# decision about it is stored at REVIEW_STAGE; REVIEW_KEY (a job-level value) says when
# the job first waited for one, which its deadline counts from.
REVIEW_FILTER = "review"
REVIEW_STAGE = "review"
REVIEW_KEY = "review"
# Each item's decision, as whoever made it wrote it: the job value "review/<item id>".
REVIEW_DECISION_PREFIX = "review/"
# How often a job waiting for reviews reads the store for decisions (made on any replica).
REVIEW_POLL_SECONDS = 1.0
# The job-level value of what the job's runs spent (tokens, seconds), rewritten at most this often.
USAGE_KEY = "usage"
USAGE_FLUSH_SECONDS = 5.0

# The each_item slots the running item holds, which `review` gives back while it waits.
_item_slots: contextvars.ContextVar[asyncio.Semaphore | None] = contextvars.ContextVar("item_slots", default=None)

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
    # Who decided: "" for a filter, "human" for a person's review, "deadline" for a review deadline's policy.
    decided_by: str = ""
    reviewer: str = ""  # with "human": who
    note: str = ""  # with "human": why


@dataclass(frozen=True)
class ReviewGate:
    """JobSpec.review, resolved: which scores are held for people, and until when."""

    band: float
    deadline_seconds: float
    keep_at_deadline: bool

    def at_deadline(self) -> Decision:
        unreviewed = "nobody reviewed it by the job's review deadline; the job's policy"
        if self.keep_at_deadline:
            return Decision(True, reason=f"{unreviewed} keeps it", decided_by="deadline")
        return Decision(False, "review_deadline", reason=f"{unreviewed} drops it", decided_by="deadline")


def review_key(item_id: str) -> str:
    return REVIEW_DECISION_PREFIX + item_id


async def decide_reviews(store: JobStore, key: str, decisions: dict[str, Decision]) -> dict[str, tuple[Decision, bool]]:
    """Stores each item's decision unless one was made first; {item: (the decision that
    stands, True when it is the one given here)}. Write-once values: a person on one replica
    and the deadline on another cannot both win. A token tells ours from an equal one."""
    tokens = {item_id: uuid.uuid4().hex for item_id in decisions}
    for item_id, decision in decisions.items():
        await store.put_value(key, review_key(item_id), {"decision": dict(vars(decision)), "token": tokens[item_id]})
    stood = await store.get_values(key, [review_key(item_id) for item_id in decisions])
    return {
        item_id: (Decision(**stood[review_key(item_id)]["decision"]), stood[review_key(item_id)]["token"] == tokens[item_id])
        for item_id in decisions
    }


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
        review: ReviewGate | None = None,
        usage: dict[str, Any] | None = None,
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
        self.review_gate = review
        self._awaiting_review: dict[str, asyncio.Future[Decision]] = {}
        self._review_poller: asyncio.Task[None] | None = None
        # What earlier runs spent (the stored USAGE_KEY value), and this run's tokens and start.
        self._usage_before = {"prompt_tokens": 0, "completion_tokens": 0, "run_seconds": 0.0, **(usage or {})}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._started = time.monotonic()
        self._usage_due = self._started + USAGE_FLUSH_SECONDS

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

        Items start in index order, each taking one of max_in_flight slots, so a
        job of a million items holds max_in_flight coroutines, not a million; an
        item waiting for a review (`review`) gives its slot back meanwhile. An
        error that is not an item's own (a service gone for good) stops the other
        items and reaches the caller."""
        await self.store.put_value(self.key, PLAN_KEY, {"dataset_items": count})
        kept = [False] * count
        slots = asyncio.Semaphore(max(1, self.max_in_flight))
        running: set[asyncio.Task[None]] = set()
        failures: list[BaseException] = []

        async def one(index: int) -> None:
            _item_slots.set(slots)
            try:
                kept[index] = await self.item(work(index))
            finally:
                slots.release()

        def finished(task: asyncio.Task[None]) -> None:
            running.discard(task)
            if not task.cancelled() and (error := task.exception()) is not None and not failures:
                failures.append(error)
                for other in running:
                    other.cancel()

        try:
            for index in range(count):
                await slots.acquire()
                if failures or self._over_budget(count):
                    slots.release()
                    break  # the job fails below; no use starting more work
                task = asyncio.create_task(one(index))
                running.add(task)
                task.add_done_callback(finished)
            await asyncio.gather(*running, return_exceptions=True)
        except BaseException:
            for task in running:
                task.cancel()
            raise
        if failures:
            raise failures[0]
        self.check_error_budget(count)
        return kept

    def held(self, result: StageResult, distance: float, threshold: float) -> StageResult:
        """`result` as its stage records it. With a review gate, a decision whose score lies
        within the band of its threshold (`distance` from it) holds the item for review:
        kept, naming REVIEW_FILTER, so the item goes on through the recipe, with the
        filter's own verdict in its reason and under data["review_hold"] (ListReviews shows it)."""
        decision = result.decision
        gate = self.review_gate
        if gate is None or decision is None or decision.filter == ERROR_FILTER or not math.isfinite(distance) or abs(distance) > gate.band:
            return result
        verdict = "keep it" if decision.kept else f"drop it ({decision.filter})"
        reason = f"held for review (within {gate.band:g} of {threshold:g}); alone, the filter would {verdict}: {decision.reason}"
        hold = {"proposed_kept": decision.kept, "filter": decision.filter, "threshold": threshold, "reason": decision.reason}
        return StageResult({**result.data, "review_hold": hold}, replace(decision, kept=True, filter=REVIEW_FILTER, reason=reason))

    async def review(self, item_id: str) -> Decision:
        """The decision about an item `held` for review: a person's, or at the job's review
        deadline its policy's. Waits without holding the item's each_item slot."""
        return (await self.reviews([item_id]))[0]

    async def reviews(self, item_ids: Sequence[str]) -> list[Decision]:
        """`review` of several items of one dataset item (a document's calls), in order:
        its each_item slot is given back once for all of them."""
        decided = await self._decided(item_ids)
        waiting: dict[str, asyncio.Future[Decision]] = {}
        for item_id in item_ids:
            if item_id not in decided and item_id not in waiting:
                future = self._awaiting_review.get(item_id)
                if future is None:
                    future = self._awaiting_review[item_id] = asyncio.get_running_loop().create_future()
                waiting[item_id] = future
        if waiting:
            if self._review_poller is None or self._review_poller.done():
                self._review_poller = asyncio.create_task(self._poll_reviews(), name=f"reviews of {self.key}")
            slots = _item_slots.get()
            if slots is not None:
                slots.release()
            try:
                await asyncio.gather(*(asyncio.shield(future) for future in waiting.values()))
            except asyncio.CancelledError:
                for item_id, future in waiting.items():  # nobody waits for them any more: the poller lets them go
                    if not future.done() and self._awaiting_review.get(item_id) is future:
                        del self._awaiting_review[item_id]
                raise
            finally:
                if slots is not None:
                    await slots.acquire()
            decided |= {item_id: future.result() for item_id, future in waiting.items()}
        return [decided[item_id] for item_id in item_ids]

    async def _decided(self, item_ids: Sequence[str]) -> dict[str, Decision]:
        """The items already decided: in their results, or as a decision value not yet copied there."""
        decided = {item_id: r.decision for item_id, r in (await self.stored_many(item_ids, REVIEW_STAGE)).items() if r.decision}
        return decided | await self._copy_decisions([item_id for item_id in item_ids if item_id not in decided])

    async def _copy_decisions(self, item_ids: Sequence[str]) -> dict[str, Decision]:
        """The decision values of those of `item_ids` someone decided, each copied into the item's
        results (its lineage): the holder alone writes them there. One read for all of them."""
        copied = {}
        for key, value in (await self.store.get_values(self.key, [review_key(item_id) for item_id in item_ids])).items():
            item_id = key.removeprefix(REVIEW_DECISION_PREFIX)
            copied[item_id] = Decision(**value["decision"])
            await self.record(item_id, REVIEW_STAGE, StageResult(decision=copied[item_id]))
        return copied

    async def _settle(self, decisions: dict[str, Decision]) -> dict[str, Decision]:
        """Decides each item by `decisions` unless someone decided it first, and copies the
        decision that stands into the item's results; {item: the decision that stands}."""
        stood = {item_id: decision for item_id, (decision, _) in (await decide_reviews(self.store, self.key, decisions)).items()}
        for item_id, decision in stood.items():
            await self.record(item_id, REVIEW_STAGE, StageResult(decision=decision))
        return stood

    async def _poll_reviews(self) -> None:
        """Hands each waiting item its decision once one is stored (by any replica), and at
        the deadline decides the rest by the job's policy. One read per poll for all of them."""
        assert self.review_gate is not None, "only a job with a review gate holds items"

        async def opened() -> dict[str, Any]:
            return {"opened_at": time.time()}

        try:
            deadline = (await self.job_value(REVIEW_KEY, opened))["opened_at"] + self.review_gate.deadline_seconds
            while self._awaiting_review:
                for item_id, decision in (await self._copy_decisions(list(self._awaiting_review))).items():
                    self._hand_review(item_id, decision)
                if self._awaiting_review and time.time() >= deadline:
                    unreviewed = dict.fromkeys(self._awaiting_review, self.review_gate.at_deadline())
                    for item_id, decision in (await self._settle(unreviewed)).items():
                        self._hand_review(item_id, decision)
                await asyncio.sleep(min(REVIEW_POLL_SECONDS, max(0.01, deadline - time.time())))
        except Exception as exc:  # the store gone: every waiting item's work fails with it
            for future in self._awaiting_review.values():
                if not future.done():
                    future.set_exception(exc)
            self._awaiting_review.clear()
            raise

    def _hand_review(self, item_id: str, decision: Decision) -> None:
        future = self._awaiting_review.pop(item_id, None)
        if future is not None and not future.done():
            future.set_result(decision)

    async def close_review(self, item_id: str, decision: Decision) -> Decision:
        """Ends the review of a held item the job no longer needs (past its target, errored):
        `decision` decides it unless someone decided first; returns the one that stands."""
        return (await self._settle({item_id: decision}))[item_id]

    def close(self) -> None:
        """Stops the review poll: the run is over (finished, failed, cancelled, or its lease lost)."""
        if self._review_poller is not None:
            self._review_poller.cancel()

    def usage(self) -> dict[str, Any]:
        """What the job's runs spent, this one's so far included (the USAGE_KEY value)."""
        before = self._usage_before
        return {
            "prompt_tokens": before["prompt_tokens"] + self.prompt_tokens,
            "completion_tokens": before["completion_tokens"] + self.completion_tokens,
            "run_seconds": round(before["run_seconds"] + time.monotonic() - self._started, 3),
        }

    async def flush_usage(self) -> None:
        """Stores usage() (values are write-once: the old one goes first; a crash between
        the two loses the figure, never the job's data)."""
        self._usage_due = time.monotonic() + USAGE_FLUSH_SECONDS
        await self.store.delete_value(self.key, USAGE_KEY)
        await self.store.put_value(self.key, USAGE_KEY, self.usage())

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
            if time.monotonic() >= self._usage_due:
                await self.flush_usage()
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
                usage = getattr(result, "usage", None)
                if isinstance(usage, common_pb2.Usage):  # a generation: its tokens are the job's cost
                    self.prompt_tokens += usage.prompt_tokens
                    self.completion_tokens += usage.completion_tokens
                return result

"""How many computations a recipe stage keeps in flight: a limit that adapts
to what the service behind the stage can take (AIMD, as TCP finds its window).

A fixed bound is wrong one way or the other. Above what the service takes,
the surplus is refused (RESOURCE_EXHAUSTED from the server's bound on calls
or a backend's HTTP 429, UNAVAILABLE from a proxy shedding load) and each
refused call backs off for seconds while the service has room again. Below
it, the service idles. What it takes depends on
its size and on the other jobs sharing it, so the limit is found at run time:

- it starts at the job's `max_in_flight` (what a fixed bound would be) and
  never goes above it, nor below its floor (1);
- a call refused for overload multiplies it by `decrease` (multiplicative
  decrease), once per round trip: refusals of calls that started before the
  last decrease are answered by that decrease already (they were sent under
  the old limit), so a burst of refusals lowers it once, not to 1;
- each success adds 1/limit (additive increase): one slot more per limit's
  worth of successes, one per round trip while the limit is full;
- after it reached its floor (the service was down, not merely full), each
  success adds a whole slot until the next refusal (TCP's slow start), so a
  restarted service gets its concurrency back in a few round trips, not in
  `max_in_flight` of them.

The window is a float and `limit` (the slots issued) its integer part, so a
decrease by 0.9 and an increase by 1/limit both move it. Lowering it never
takes a slot from its holder: slots are not re-issued until fewer than the
new limit are held. JobContext (recipes/base.py) holds a slot per stage
computation and reports its calls' answers and refusals here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable

# The multiplicative decrease. Not TCP's 1/2: a service's bound is hard (no
# queue behind it: the call over it is refused at once), so every decrease
# below the bound idles capacity until the additive increase climbs back, one
# slot per round trip. Halved from one over a bound of 16, the limit spends
# eight round trips below it; at 0.9 it lands on the bound and keeps the
# service full (benchmarks/adaptive_concurrency.py, bound 16: 0.86 of the best
# fixed limit's throughput at 1/2, 0.91 at 3/4, 1.05 at 0.9). The price is
# more probing refusals (1.52 calls per item against a bound of 4, 1.18 at
# 1/2), each answered at once, and a slower descent from a start far too high,
# during which the refused calls retry within milliseconds and the service
# stays full. Netflix's concurrency-limits AIMD uses 0.9 too.
DECREASE = 0.9


class AimdLimit:
    """A concurrency limit that adapts between 1 and `max_limit` (see the module).

    `floor=max_limit` makes it fixed: it then never moves, and `overloaded`
    always says to wait (what a plain semaphore and backoff did)."""

    def __init__(
        self,
        max_limit: int,
        *,
        floor: int = 1,
        decrease: float = DECREASE,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        if not 1 <= floor <= max_limit:
            raise ValueError(f"need 1 <= floor <= max_limit, got floor {floor}, max_limit {max_limit}")
        if not 0 < decrease < 1:
            raise ValueError(f"decrease must be in (0, 1), got {decrease}")
        self.max_limit = max_limit
        self.floor = floor
        self._decrease = decrease
        self._window = float(max_limit)
        self._on_change = on_change
        self.in_flight = 0
        # Counts decreases: a call notes it when it starts, and its refusal lowers
        # the limit only if no decrease happened since (one per round trip).
        self.decreases = 0
        self._slow_start = False
        self._waiters: deque[asyncio.Future[None]] = deque()
        if on_change is not None:
            on_change(self.limit)

    @property
    def limit(self) -> int:
        """The slots issued now."""
        return max(self.floor, int(self._window))

    async def acquire(self) -> None:
        """Waits for a slot, first come first served."""
        if self.in_flight < self.limit and not self._waiters:
            self.in_flight += 1
            return
        granted = asyncio.get_running_loop().create_future()
        self._waiters.append(granted)
        try:
            await granted  # `_wake` counted the slot as ours before granting it
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release()  # granted just as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(granted)
            raise

    def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_flight < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():  # skips one whose task was cancelled
                self.in_flight += 1
                waiter.set_result(None)

    def succeeded(self) -> None:
        """A call under this limit was answered: the service had room.

        Counted only while the limit is in use (every slot held, the caller's
        included): a limit nobody reaches is not tested by the answers, and
        growing it anyway (a job's last items, a stage that waits on another)
        would let the next burst start far above what the service takes."""
        if self.in_flight < self.limit:
            return
        before = self.limit
        self._window = min(float(self.max_limit), self._window + (1.0 if self._slow_start else 1.0 / self.limit))
        self._changed(before)

    def overloaded(self, decreases_at_start: int) -> bool:
        """A call under this limit was refused for overload. `decreases_at_start`
        is `decreases` when the call started.

        True when the limit answers this refusal (lowered now, or by an earlier
        refusal of the same round trip): retrying soon is right, since the retry
        waits for a slot under the lower limit. False when it cannot go lower:
        more concurrency is not what is wrong, and the caller should wait."""
        if decreases_at_start != self.decreases:
            return True
        if self._window <= self.floor:
            return False
        before = self.limit
        self._window = max(float(self.floor), self._window * self._decrease)
        self.decreases += 1
        self._slow_start = self._window <= self.floor
        self._changed(before)
        return True

    def _changed(self, before: int) -> None:
        if self.limit == before:
            return
        if self.limit > before:
            self._wake()
        if self._on_change is not None:
            self._on_change(self.limit)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[Slot]:
        """Holds a slot for the body (a stage's computation)."""
        held = Slot(self)
        await held.take()
        try:
            yield held
        finally:
            held.give_back()


class Slot:
    """One slot of an AimdLimit, held by one computation, which may lend it
    back while a refused call of it waits to retry."""

    def __init__(self, limit: AimdLimit) -> None:
        self.limit = limit
        self._held = False
        # Concurrent calls of one computation share its slot: one at a time lends it.
        self._lending = asyncio.Lock()

    async def take(self) -> None:
        await self.limit.acquire()
        self._held = True

    def give_back(self) -> None:
        # Not held when cancelled while re-taking it after `lend_for`: nothing to give back then.
        if self._held:
            self._held = False
            self.limit.release()

    async def lend_for(self, seconds: float) -> None:
        """Gives the slot back for `seconds`, then waits to hold one again: a
        refused call waits in line under the lowered limit instead of keeping
        a slot the limit no longer has. Awaited inside the slot's block (as
        JobContext.call does), so the block never ends while it is lent."""
        async with self._lending:
            self.give_back()
            await asyncio.sleep(seconds)
            await self.take()

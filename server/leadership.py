"""The coordinator's side of leading models in ``learnledger learn``: try, hand over, give up.

Each tick (``server.learn``) it takes the group's census (``server.election.LockSession``),
lets ``server.balancer.Balancer`` decide, hands models over through the worker pool
(``server.worker_pool.WorkerPool.hand_over``, after their current turn) and releases
their locks only once no turn of theirs can still commit here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID

if TYPE_CHECKING:  # imported where used: ``learnledger --help`` need not load psycopg or jax
    from server.balancer import Balancer
    from server.election import LockSession
    from server.worker_pool import WorkerPool

log = logging.getLogger("learnledger.learn")


class Portfolio(Protocol):
    """What leading needs to know of the models to learn (``server.learn._Portfolio``)."""

    def ready(self) -> bool:
        """Whether every model found is compiled: able to take any over at once."""
        ...

    def models(self) -> frozenset[UUID]:
        """Every model found so far (compiled or not)."""
        ...

    def warmed(self) -> set[UUID]:
        """The models whose step is compiled (or failed to compile): the ones worth competing for."""
        ...


class Leadership:
    """The coordinator's side of leading: which locks to try, hand over, and give up.

    Not thread-safe (the lock session is not): only the coordinating thread calls it.
    """

    def __init__(self, locks: LockSession, pool: WorkerPool, balancer: Balancer, out: Callable[[dict[str, Any]], None]):
        self.locks = locks
        self.pool = pool
        self.balancer = balancer
        self.out = out
        self.order: dict[UUID, None] = {}  # the models led here, oldest acquisition first
        self.handing: set[UUID] = set()  # handed over, lock kept until their turn ends
        self.standing_by: set[UUID] = set()
        self._group: tuple[int, int] | None = None

    def tick(self, portfolio: Portfolio, now: float) -> None:
        """Balance, hand over and acquire, after this tick's census of the group."""
        if not self.locks.joined and portfolio.ready():
            self.locks.join()
        models = portfolio.models()
        self.balancer.observe(self.locks.census(models), models, now)
        self._announce_group()
        leading = [m for m in self.order if m not in self.handing]
        for model_id in self.balancer.to_hand_over(leading):
            self.handing.add(model_id)
            self.pool.hand_over(model_id)
        self._release_handed_over(now)
        candidates = portfolio.warmed() - self.pool.busy()
        if candidates:
            self._acquire(self.balancer.to_try(candidates, len(self.order) - len(self.handing), now))

    def lost(self) -> None:
        """The session broke: the server freed every lock, so another process may lead
        these models already. Stop all, then compete again."""
        for model_id in self.pool.revoke_all():
            log.warning("lost the lock of model %s; waiting to be elected again", model_id)
            self.out({"event": "lost", "model_id": str(model_id)})
        self.order.clear()
        self.handing.clear()
        self.standing_by.clear()
        self.locks.acknowledge()

    def _acquire(self, tried: set[UUID]) -> None:
        for model_id in self.locks.try_acquire(tried):
            self.pool.add(model_id)
            self.order[model_id] = None
            self.standing_by.discard(model_id)
        for model_id in tried - self.locks.held - self.standing_by:
            self.standing_by.add(model_id)
            self.out({"event": "standby", "model_id": str(model_id)})

    def _release_handed_over(self, now: float) -> None:
        # Only once the model's last turn here ended (committed or not): its successor
        # must never find its lock free while this process could still commit.
        busy = self.pool.busy()
        for model_id in sorted(self.handing - busy):
            self.out({"event": "handed_over", "model_id": str(model_id)})
            self.locks.release(model_id)
            self.balancer.handed_over(model_id, now)
            self.handing.discard(model_id)
            self.order.pop(model_id, None)

    def _announce_group(self) -> None:
        census, share = self.balancer.census, self.balancer.share
        group = (len(census.members), share) if census is not None and share is not None else None
        if group is not None and group != self._group:
            self.out({"event": "group", "members": group[0], "share": group[1]})
        self._group = group

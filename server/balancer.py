"""How ``learn`` processes split a group's models: the census of who is alive and leads what, and the policy.

Each ``learn`` process of a group (same schema, same ``--models``) holds a *shared*
advisory lock on the group's key (``server.election.LockSession.join``), so ``pg_locks``
shows who is alive and who leads what (``LockSession.census``) with nothing but
PostgreSQL, and a member that dies leaves the census together with its models.
``Balancer`` turns a census into this tick's moves: a process leading more than its fair
share (⌈models / members⌉) hands the newest of its models over, a few at a time, while a
peer below its share has room; one at or above its share leaves free models to those
peers, unless nobody took them for ``orphan_grace_s``.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from uuid import UUID


@dataclass(frozen=True)
class Census:
    """Who is alive in a learner group and who leads which of its models, at one moment."""

    me: int  # this process's lock session (its backend pid)
    members: frozenset[int]  # the sessions holding the group's shared lock
    holders: dict[UUID, int] = field(default_factory=dict)  # model -> session leading it

    def loads(self) -> Counter[int]:
        """How many of the models each session leads."""
        return Counter(self.holders.values())


def fair_share(models: int, members: int) -> int:
    """⌈models / members⌉: the most models one of ``members`` processes should lead."""
    return -(-models // max(members, 1))


class Balancer:
    """Each tick, which models a ``learn`` process tries to lead and which it hands over.

    Pure policy over the ``Census`` the coordinator takes every tick (no I/O). Without
    a census, or before this process joined its group, it competes for every model as
    learners always did. As a member it keeps to its fair share:

    - below it: it tries free models, at most as many as it is short of its share (and
      some held ones, to stand by for them);
    - at or above it: it leaves free models to the peers below theirs, except orphans,
      free for ``orphan_grace_s`` (a peer's death frees its models *and* its place in the
      census, so the survivors are below their new share and take them at once);
    - above it: it hands over its newest models, at most ``shed_per_tick`` at a time and
      only as many as the peers below their share have room for (less the free models
      already waiting for them), and does not try a handed-over model again for
      ``cooldown_s``. Only shedding above the share, and only into room, is what keeps
      two processes from passing models back and forth.
    """

    def __init__(
        self,
        *,
        acquire_per_tick: int,
        shed_per_tick: int,
        orphan_grace_s: float,
        cooldown_s: float,
        rng: random.Random | None = None,
    ):
        self.acquire_per_tick = acquire_per_tick
        self.shed_per_tick = shed_per_tick
        self.orphan_grace_s = orphan_grace_s
        self.cooldown_s = cooldown_s
        self.rng = rng or random.Random()
        self.census: Census | None = None
        self.share: int | None = None  # None: not balancing (no census, or not a member)
        self._free_since: dict[UUID, float] = {}
        self._cooling: dict[UUID, float] = {}

    def observe(self, census: Census | None, models: Collection[UUID], now: float) -> None:
        """Take this tick's census of the group's ``models`` (None: there is none)."""
        if census is not None and self.census is not None and len(census.members) < len(self.census.members):
            # A peer left (or died): the models left to it are nobody's now, take them at once.
            self._cooling.clear()
        self.census = census
        self._cooling = {m: until for m, until in self._cooling.items() if until > now}
        if census is None or census.me not in census.members:
            self.share = None
            if census is None:
                self._free_since = {}  # unknown: nothing counts as orphaned until seen free again
                return
        else:
            self.share = fair_share(len(models), len(census.members))
        self._free_since = {m: self._free_since.get(m, now) for m in models if m not in census.holders}

    def to_try(self, candidates: Collection[UUID], leading: int, now: float) -> set[UUID]:
        """The locks to try now, among ``candidates`` (compiled, not led here), when leading ``leading``."""
        allowed = [m for m in candidates if m not in self._cooling]
        census, share = self.census, self.share
        if census is None or share is None:
            return self._sample(allowed, self.acquire_per_tick)
        free = [m for m in allowed if m not in census.holders]
        if leading >= share:
            orphans = [m for m in free if now - self._free_since.get(m, now) >= self.orphan_grace_s]
            return self._sample(orphans, self.acquire_per_tick)
        picked = self._sample(free, min(self.acquire_per_tick, share - leading))
        held = [m for m in allowed if m in census.holders]
        return picked | self._sample(held, self.acquire_per_tick - len(picked))

    def to_hand_over(self, leading: Sequence[UUID]) -> list[UUID]:
        """The models to hand over now, from ``leading`` (oldest first): the newest ones."""
        census, share = self.census, self.share
        if census is None or share is None or len(leading) <= share:
            return []
        loads = census.loads()
        room = sum(max(0, share - loads[pid]) for pid in census.members if pid != census.me)
        count = min(len(leading) - share, room - len(self._free_since), self.shed_per_tick)
        return list(leading[len(leading) - count :]) if count > 0 else []

    def handed_over(self, model_id: UUID, now: float) -> None:
        """``model_id``'s lock was released for a peer: leave it to them for ``cooldown_s``."""
        self._cooling[model_id] = now + self.cooldown_s

    def _sample(self, models: list[UUID], k: int) -> set[UUID]:
        # In random order: processes that start together then split the portfolio
        # instead of the first to compile taking all of it.
        return set(self.rng.sample(sorted(models), max(0, min(k, len(models)))))

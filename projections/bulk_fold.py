"""Bulk replay: a model's history verified with large reads and many update steps per jitted call.

``Replayer.verify`` folds one update at a time: a typed read of each page of predictions
(pydantic, aggregate objects), one ``make_batch`` and one jitted dispatch per update. This
module folds the same recorded decisions faster, and bit-identically:

- **Reads**: the log is read forward once, in ranges of ``PAGE_ROWS`` positions
  (``LedgerRecorder.select_rows``), from the model's registration on; rows are decoded
  straight from their orjson bytes (no pydantic, no aggregates) and the features of
  ``PAGE_EXAMPLES`` examples become one padded numpy array.
- **Compute**: every recorded batch is padded to ``spec.batch_size`` rows, so all batches
  of a model have one shape, and runs of consecutive ``UpdateApplied`` events are folded
  by ``jax.lax.scan`` over the *same* jitted ``update_step``, many steps per call; the scan
  returns the state after every step so that every recorded digest is still checked.
- **Safety net**: ARCHITECTURE.md (invariant 4) records that a scan and a per-step loop
  can differ by a few ulps. The scan here keeps every output of the step live (see
  ``_scan_fold``), and the tests prove digest equality for every learner kind; but should
  a scanned digest ever differ from the recorded one, that step is recomputed with the
  per-step function from the (digest-verified, so bit-exact) previous state before
  anything is reported. The report is therefore always the one ``Replayer.verify`` gives.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import jax
import numpy as np
import orjson

from domain.errors import VersionNotFoundError
from domain.ledger import Ledger
from domain.model import STATE_KEEPING_EVENTS, Model
from domain.prediction import DEFAULT_LABELED_TOPIC, LABELED_TOPIC, MADE_TOPIC, PREDICTION_TOPIC
from domain.spec import LearnerSpec
from projections.digest import state_digest, state_from_bytes, state_to_bytes
from projections.learners import Batch, Learner, LearnerState, Metrics, make_batch, make_learner
from projections.rebaseline import refit
from projections.replay import (
    Divergence,
    FoldedState,
    ReplayError,
    SafetyAuditor,
    UnknownEventError,
    VerifyReport,
    _recorded_digest,  # the replay's own list of digest-carrying events, kept in step
)
from projections.store import LedgerRecorder

# Most steps one scan call folds. Chunks are padded up to a power of two (at least
# MIN_CHUNK_STEPS), so a spec compiles at most log2(128 / 8) + 1 = 5 scan shapes.
MAX_CHUNK_STEPS = 128
MIN_CHUNK_STEPS = 8
# Examples stacked per page of updates, and log positions read per query (~2 per example:
# Made + Labeled). ~20k rows of ~400 bytes: ~8 MB a page.
PAGE_EXAMPLES = 16_384
PAGE_ROWS = 20_000
PREDICTION_EVENT_PREFIX = PREDICTION_TOPIC + "."
# Read the next range of the log on a second thread while a range is decoded.
READ_AHEAD = True
# Used examples kept for batches that name them again (a replay buffer); older ones are
# re-read through the typed path.
USED_CACHE = 1 << 18

ScanFold = Callable[[LearnerState, Batch], tuple[LearnerState, tuple[LearnerState, Metrics]]]
# (first, last) -> rows (notification_id, originator_id, originator_version, topic, state)
ReadRows = Callable[[int, int], Sequence[tuple[int, UUID, int, str, bytes]]]


@dataclass
class BulkFoldStats:
    """Where a bulk fold spent its time, and which path each update step took."""

    updates: int = 0
    examples: int = 0
    scanned_steps: int = 0
    stepwise_steps: int = 0
    read_s: float = 0.0
    decode_s: float = 0.0
    fold_s: float = 0.0
    digest_s: float = 0.0


@dataclass(frozen=True)
class FoldedDigest:
    """The replayed digest of one version, next to the one the log recorded (if any)."""

    version: int
    event: str
    recorded: str | None
    digest: str


def verify_fast(
    ledger: Ledger,
    model_id: UUID,
    *,
    snapshot_interval: int | None = None,
    stats: BulkFoldStats | None = None,
    max_chunk_steps: int = MAX_CHUNK_STEPS,
    read_rows: ReadRows | None = None,
) -> VerifyReport:
    """Replay a model from genesis and compare every recorded digest: ``Replayer.verify``, faster.

    Args:
        ledger: the ledger holding the model's log.
        model_id: the model's aggregate id.
        snapshot_interval: when given (and the ledger runs on PostgreSQL), cache a
            parameter snapshot at every version divisible by it, as ``Replayer`` does.
        stats: filled with timings and step counts when given.
        max_chunk_steps: most update steps folded per jitted call.
        read_rows: reads the raw rows of a range of log positions; default
            ``LedgerRecorder.select_rows`` (another reader of the same rows, e.g. a
            binary-mode cursor, gives the same result faster).

    Returns:
        The same ``VerifyReport`` ``Replayer(ledger).verify(model_id)`` returns: the count
        of versions checked and updates replayed, and the first divergence, if any.
    """
    from projections.platform import platform_differences

    head = ledger.get_model_by_id(model_id)
    report = VerifyReport(model=head.name, versions_checked=0, updates_replayed=0)
    report.platform_differences = platform_differences(head.platform)
    folder = _BulkFolder(ledger, head, stats or BulkFoldStats(), max_chunk_steps, snapshot_interval, read_rows)
    events = ledger.get_model_events(model_id)
    # Models with a stateful safety policy also have every gate verdict, replay choice
    # and drift detection re-derived, from the states before and after each event.
    auditor = SafetyAuditor(ledger, head, folder.learner) if head.spec.policy.stateful else None
    before: LearnerState | None = None
    try:
        for index, (event, folded, state) in enumerate(folder.fold(events)):
            report.versions_checked += 1
            if isinstance(event, Model.UpdateApplied):
                report.updates_replayed += 1
            if folded.recorded is not None and folded.recorded != folded.digest:
                report.divergence = Divergence(folded.version, folded.event, folded.recorded, folded.digest)
                return report
            problem = auditor.check(events, index, before, state) if auditor is not None else None
            if problem is not None:
                report.divergence = Divergence(folded.version, folded.event, "", problem)
                return report
            before = state
    except ReplayError as exc:
        report.divergence = Divergence(report.versions_checked + 1, "ReplayError", "", str(exc))
    finally:
        folder.close()
    return report


def state_at_fast(ledger: Ledger, model_id: UUID, version: int | None = None) -> FoldedState:
    """``Replayer.state_at`` with bounded reads: the newest snapshot ≤ V, then only the events after it.

    ``Replayer.state_at`` reads every event of the model up to V and then drops the ones
    the snapshot covers, so its cost grows with the history (bench/time_travel.py); here
    the log is asked only for the events after the snapshot, and they are folded with
    the scan. Recorded digests are checked on the way, as ``Replayer.state_at`` does.

    Args:
        ledger: the ledger holding the model's log.
        model_id: the model's aggregate id.
        version: the version wanted (default: the head).

    Returns:
        The state at ``version`` and its digest.

    Raises:
        VersionNotFoundError: no such version.
        ReplayError: a replayed digest differs from the recorded one, or the log cannot be folded.
    """
    head = ledger.get_model_by_id(model_id)
    target = head.version if version is None else version
    if not 1 <= target <= head.version:
        raise VersionNotFoundError(f"model {head.name!r} has versions 1 to {head.version}, not {target}")
    # Few updates follow a snapshot: their examples come by id, not by a pass over the log.
    folder = _BulkFolder(ledger, head, BulkFoldStats(), MAX_CHUNK_STEPS, None, None, sequential=False)
    start: LearnerState | None = None
    after = 0
    if folder.store is not None:
        snap = folder.store.get_snapshot(model_id, target)
        if snap is not None:
            restored = state_from_bytes(folder.learner.init(), snap.state)
            if state_digest(restored) == snap.digest:
                start, after = restored, snap.version
    if after == target and start is not None:
        return FoldedState(model_id, target, start, state_digest(start))
    events = list(ledger.events.get(model_id, gt=after, lte=target))
    last: tuple[FoldedDigest, LearnerState] | None = None
    for _, folded, state in folder.fold(events, start, lambda v: state_at_fast(ledger, model_id, v).state):
        if folded.recorded is not None and folded.recorded != folded.digest:
            raise ReplayError(
                f"version {folded.version} ({folded.event}): replayed digest {folded.digest} "
                f"differs from recorded {folded.recorded}"
            )
        last = folded, state
    assert last is not None
    return FoldedState(model_id, last[0].version, last[1], last[0].digest)


def replayed_digests(
    ledger: Ledger,
    model_id: UUID,
    *,
    stats: BulkFoldStats | None = None,
    max_chunk_steps: int = MAX_CHUNK_STEPS,
    read_rows: ReadRows | None = None,
) -> list[FoldedDigest]:
    """The bulk fold's digest at every version of a model, oldest first.

    Args:
        ledger: the ledger holding the model's log.
        model_id: the model's aggregate id.
        stats: filled with timings and step counts when given.
        max_chunk_steps: most update steps folded per jitted call.
        read_rows: reads the raw rows of a range of log positions; default
            ``LedgerRecorder.select_rows`` (another reader of the same rows, e.g. a
            binary-mode cursor, gives the same result faster).

    Returns:
        One ``FoldedDigest`` per version.

    Raises:
        ReplayError: the log cannot be folded (e.g. a batch names a missing prediction).
    """
    head = ledger.get_model_by_id(model_id)
    folder = _BulkFolder(ledger, head, stats or BulkFoldStats(), max_chunk_steps, None, read_rows)
    try:
        return [folded for _, folded, _ in folder.fold(ledger.get_model_events(model_id))]
    finally:
        folder.close()


@functools.lru_cache(maxsize=256)
def _scan_fold(spec: LearnerSpec) -> ScanFold:
    update_step = make_learner(spec).update_step

    @jax.jit
    def fold(state: LearnerState, batches: Batch) -> tuple[LearnerState, tuple[LearnerState, Metrics]]:
        def body(carry: LearnerState, batch: Batch) -> tuple[LearnerState, tuple[LearnerState, Metrics]]:
            new_state, metrics = update_step(carry, batch)
            # The metrics are returned though nobody reads them: with them dead, XLA fused
            # the rest of the step differently and a linear learner at batch 32 drifted by
            # a few ulps from the per-step function. Every output live keeps the scan
            # body the same computation as the step the live learner ran.
            return new_state, (new_state, metrics)

        return jax.lax.scan(body, state, batches)

    return fold


class _BulkFolder:
    """One bulk fold of one model's events."""

    def __init__(
        self,
        ledger: Ledger,
        head: Model,
        stats: BulkFoldStats,
        max_chunk_steps: int,
        snapshot_interval: int | None,
        read_rows: ReadRows | None,
        sequential: bool = True,
    ):
        self.ledger = ledger
        self.head = head
        self.spec: LearnerSpec = head.spec
        self.learner: Learner = make_learner(head.spec)
        self.stats = stats
        self.max_chunk_steps = max(1, max_chunk_steps)
        recorder: Any = ledger.recorder
        self.store: LedgerRecorder | None = recorder if isinstance(recorder, LedgerRecorder) else None
        self.snapshot_interval = snapshot_interval if self.store is not None else None
        mapper: Any = ledger.mapper
        self.examples: _TypedExamples | _LogExamples = _TypedExamples(ledger, stats)
        # Raw orjson decoding is only the stored format when nothing wraps the bytes.
        if sequential and self.store is not None and not mapper.compressor and not mapper.cipher:
            reader = read_rows or self.store.select_rows
            self.examples = _LogExamples(ledger, self.store, head.id, reader, stats)
        self.diverged = False

    def close(self) -> None:
        """Release the reader (its read-ahead thread)."""
        if isinstance(self.examples, _LogExamples):
            self.examples.close()

    def fold(
        self,
        events: Sequence[Any],
        state: LearnerState | None = None,
        resolve: Callable[[int], LearnerState] | None = None,
    ) -> Iterator[tuple[Any, FoldedDigest, LearnerState]]:
        """Yield each event with its replayed digest; the same rules as ``Replayer._fold``.

        Args:
            events: the model's events, in version order.
            state: the state before the first event (None: the first is ``Registered``).
            resolve: the state at an earlier version a rollback names that this fold
                did not pass (a fold that starts from a snapshot).
        """
        targets = {e.to_version for e in events if isinstance(e, (Model.RolledBack, Model.RolloutAborted))}
        kept: dict[int, LearnerState] = {}
        i = 0
        while i < len(events):
            event = events[i]
            version = event.originator_version
            match event:
                case Model.UpdateApplied():
                    if state is None:
                        raise ReplayError(f"version {version}: an update before registration")
                    j, taken = i, 0
                    while j < len(events) and taken < PAGE_EXAMPLES and isinstance(events[j], Model.UpdateApplied):
                        taken += len(_batch_ids(events[j]))
                        j += 1
                    page = self._fold_page(state, events[i:j])
                    for update, (digest, after) in zip(events[i:j], page, strict=False):
                        state = after
                        yield update, self._emit(update, digest, after, targets, kept), after
                    i = j
                    continue
                case Model.Registered():
                    state = self.learner.init()
                case Model.Rebaselined(prediction_ids=ids, epochs=epochs):
                    x, y = self._examples(ids)
                    state = refit(self.spec, self.learner, x, y, epochs)
                case Model.RolledBack(to_version=target) | Model.RolloutAborted(to_version=target):
                    # The target's state was kept when the fold passed it: no second fold
                    # from genesis, which is what Replayer.verify does per rollback.
                    if target in kept:
                        state = kept[target]
                    elif resolve is not None:
                        state = resolve(target)
                    else:
                        raise ReplayError(f"version {version}: rollback to version {target}, which precedes nothing")
                case _ if isinstance(event, STATE_KEEPING_EVENTS):
                    pass
                case _:
                    raise UnknownEventError(f"version {version}: no fold rule for {type(event).__name__}")
            assert state is not None
            yield event, self._emit(event, state_digest(state), state, targets, kept), state
            i += 1

    def _emit(
        self, event: Any, digest: str, state: LearnerState, targets: set[int], kept: dict[int, LearnerState]
    ) -> FoldedDigest:
        version = event.originator_version
        if version in targets:
            kept[version] = state
        if self.snapshot_interval and self.store is not None and version % self.snapshot_interval == 0:
            self.store.put_snapshot(self.head.id, version, digest, state_to_bytes(state))
        return FoldedDigest(version, type(event).__name__, _recorded_digest(event), digest)

    def _fold_page(self, state: LearnerState, updates: Sequence[Any]) -> Iterator[tuple[str, LearnerState]]:
        """Fold a run of updates, yielding (digest, state) after each; raise at a bad batch."""
        batches, error = self._read_batches(updates)
        n = batches.x.shape[0]
        stats = self.stats
        fold = _scan_fold(self.spec)
        pos = 0
        while pos < n:
            if self.diverged:
                # Past a real divergence every recorded digest differs: scanning a chunk
                # per step would only waste work, so the rest goes step by step.
                batch = Batch(batches.x[pos], batches.y[pos], batches.mask[pos])
                state, _ = self.learner.update_step(state, batch)
                stats.stepwise_steps += 1
                yield state_digest(state), state
                pos += 1
                continue
            size = min(self.max_chunk_steps, n - pos)
            bucket = min(self.max_chunk_steps, max(MIN_CHUNK_STEPS, 1 << (size - 1).bit_length()))
            started = time.perf_counter()
            x, y, mask = (_padded(np.asarray(a)[pos : pos + size], bucket) for a in batches)
            chunk = Batch(x, y, mask)  # type: ignore[arg-type]
            _, (outs, _) = fold(state, chunk)
            steps, ints, floats = (np.asarray(a) for a in outs)
            stats.fold_s += time.perf_counter() - started
            stats.scanned_steps += size
            previous = state
            for k in range(size):
                started = time.perf_counter()
                state = LearnerState(np.asarray(steps[k]), ints[k], floats[k])  # type: ignore[arg-type]
                digest = state_digest(state)
                stats.digest_s += time.perf_counter() - started
                if digest != updates[pos + k].digest:
                    # Recompute with the per-step function from the previous state (its
                    # digest matched, so its bytes are exact) before reporting anything.
                    batch = Batch(batches.x[pos + k], batches.y[pos + k], batches.mask[pos + k])
                    state, _ = self.learner.update_step(previous, batch)
                    digest = state_digest(state)
                    stats.scanned_steps -= size - k
                    stats.stepwise_steps += 1
                    self.diverged = digest != updates[pos + k].digest
                    yield digest, state
                    pos += k + 1
                    break
                yield digest, state
                previous = state
            else:
                pos += size
        if error is not None:
            raise error

    def _read_batches(self, updates: Sequence[Any]) -> tuple[Batch, ReplayError | None]:
        """The recorded batches of ``updates``, stacked [n, batch_size, ...], as ``make_batch`` pads them.

        Stops before the first update whose batch cannot be built and returns its error
        (the same message ``examples_for`` raises) for the caller to raise in its turn.
        """
        facts = self.examples.take([pid for update in updates for pid in _batch_ids(update)])
        started = time.perf_counter()
        rows: list[Any] = []
        labels: list[float] = []
        good = 0
        error: ReplayError | None = None
        for update in updates:
            error = self._append_examples(_batch_ids(update), facts, rows, labels)
            if error is not None:
                break
            good += 1
        counts = np.fromiter((len(_batch_ids(u)) for u in updates[:good]), np.int64, good)
        batches = _stack(self.spec, counts, rows, labels)
        self.stats.decode_s += time.perf_counter() - started
        self.stats.updates += good
        self.stats.examples += len(rows)
        return batches, error

    def _append_examples(
        self, ids: Sequence[UUID], facts: dict[int, Fact], rows: list[Any], labels: list[float]
    ) -> ReplayError | None:
        """Append the examples of one batch, or return (appending nothing) ``examples_for``'s error."""
        mark = len(rows)
        model_id = self.head.id
        for pid in ids:
            fact = facts.get(pid.int)
            if fact is None or fact[2] is None:
                error = ReplayError(f"update batch names prediction {pid}, which is missing or unlabeled")
            elif fact[0] != model_id:
                error = ReplayError(f"update batch names prediction {pid} of another model")
            elif not fact[3]:
                error = ReplayError(f"update batch names prediction {pid}, whose label was late")
            else:
                rows.append(fact[1])
                labels.append(fact[2])
                continue
            del rows[mark:], labels[mark:]
            return error
        return None

    def _examples(self, ids: Sequence[UUID]) -> tuple[np.ndarray, np.ndarray]:
        """``examples_for`` through the bulk reader: features [k, n_features] and labels [k], float64."""
        rows: list[Any] = []
        labels: list[float] = []
        error = self._append_examples(ids, self.examples.take(ids), rows, labels)
        if error is not None:
            raise error
        x = np.asarray(rows, dtype=np.float64).reshape(len(rows), self.spec.n_features)
        return x, np.asarray(labels, dtype=np.float64)


# [model id, features, label, in_window] of one prediction, as the Prediction aggregate
# would hold them; a list so the label can be filled in when its event is read.
Fact = list[Any]


class _TypedExamples:
    """Examples through ``Ledger.get_predictions``: any recorder, any mapper, one query per page."""

    def __init__(self, ledger: Ledger, stats: BulkFoldStats):
        self.ledger = ledger
        self.stats = stats

    def take(self, ids: Sequence[UUID]) -> dict[int, Fact]:
        """Facts of the given predictions by ``UUID.int``; absent ones are missing from the log."""
        started = time.perf_counter()
        found = self.ledger.get_predictions(ids)
        self.stats.read_s += time.perf_counter() - started
        return {pid.int: [p.model_id, p.features, p.label, p.in_window] for pid, p in found.items()}


class _LogExamples:
    """One model's labeled examples, read forward through the log in large position ranges.

    Batches are recorded in log order and name predictions labeled before them, so one
    pass over the log, from the model's registration on, meets every example just
    before an update needs it. Range reads on the notification id are sequential for
    PostgreSQL; reading the same rows by id (``WHERE originator_id = ANY(...)``) costs an
    index probe each and measured ~4x slower. Rows are decoded from their orjson bytes
    with the ``Prediction`` aggregate's rules (``Made`` sets the facts; the first label,
    observed or default, counts). Anything unusual (an id not met, a prediction event
    this decoder does not know, an upcast event) goes to the typed path, so the facts
    are always what ``Ledger.get_predictions`` would give.
    """

    def __init__(
        self, ledger: Ledger, store: LedgerRecorder, model_id: UUID, read_rows: ReadRows, stats: BulkFoldStats
    ):
        self.typed = _TypedExamples(ledger, stats)
        self.read_rows = read_rows
        self.stats = stats
        self.model_id = model_id
        self.next = store.select_notification_id(model_id, 1) or 1
        self.end = int(store.max_notification_id() or 0)
        self.page_rows = PAGE_ROWS
        self.reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bulk-fold-read")
        self.ahead: Future[Sequence[tuple[int, UUID, int, str, bytes]]] | None = None
        # Keyed by UUID.int: UUID.__hash__ and __eq__ are Python code, ~1 µs a lookup,
        # and every example costs several lookups.
        self.pending: dict[int, Fact] = {}
        # Facts already used, newest last: a replay buffer trains on recent examples again.
        self.used: dict[int, Fact] = {}
        self.doubtful: set[int] = set()
        # Every Made row of this model carries this exact byte string (orjson, no spaces):
        # other models' rows are skipped without being parsed.
        self.key = b'"model_id":"' + str(model_id).encode() + b'"'

    def take(self, ids: Sequence[UUID]) -> dict[int, Fact]:
        """Facts of the given predictions by ``UUID.int``; absent ones are missing from the log."""
        out: dict[int, Fact] = {}
        missing = self._collect(ids, out)
        while missing and self.next <= self.end:
            self._read_page()
            missing = self._collect(missing, out)
        if missing:
            # Not met in one pass (used twice, of another model, labeled late in an odd
            # order, upcast): the typed path decides, exactly as Replayer would.
            out.update(self.typed.take(missing))
        return out

    def _collect(self, ids: Sequence[UUID], out: dict[int, Fact]) -> list[UUID]:
        missing = []
        pending, used, doubtful = self.pending, self.used, self.doubtful
        for pid in ids:
            key = pid.int
            fact = pending.get(key)
            if fact is not None and fact[2] is not None and key not in doubtful:
                # Moved to the bounded ``used`` cache: memory stays bounded by the examples
                # not learned yet plus USED_CACHE, however long the history.
                out[key] = used[key] = pending.pop(key)
                if len(used) > USED_CACHE:
                    del used[next(iter(used))]
            elif key in used:
                out[key] = used[key]
            else:
                missing.append(pid)
        return missing

    def close(self) -> None:
        """Stop reading ahead."""
        if self.ahead is not None:
            self.ahead.cancel()
            self.ahead = None
        self.reader.shutdown(wait=False, cancel_futures=True)

    def _read_page(self) -> None:
        started = time.perf_counter()
        first, last = self.next, self.next + self.page_rows - 1
        rows = self.ahead.result() if self.ahead is not None else self.read_rows(first, last)
        self.next += self.page_rows
        # Read the next range while this one is decoded and folded: PostgreSQL's side of
        # the read (and the socket) then overlaps this process's work. Rows are only
        # ever read forward, so a read-ahead is wasted at most once, at the end.
        self.ahead = None
        if READ_AHEAD and self.next <= self.end:
            self.ahead = self.reader.submit(self.read_rows, self.next, self.next + self.page_rows - 1)
        read = time.perf_counter()
        self.stats.read_s += read - started
        pending, key, loads = self.pending, self.key, orjson.loads
        for _, uuid, _, topic, state in rows:
            pid = uuid.int
            if topic == MADE_TOPIC:
                if key in state:
                    data = loads(state)
                    if "class_version" in data:
                        self.doubtful.add(pid)
                    pending[pid] = [self.model_id, data["features"], None, None]
            elif topic in (LABELED_TOPIC, DEFAULT_LABELED_TOPIC):
                fact = pending.get(pid)
                if fact is not None and fact[2] is None:
                    data = loads(state)
                    if "class_version" in data:
                        self.doubtful.add(pid)
                    fact[2] = float(data["label"])
                    fact[3] = True if topic == DEFAULT_LABELED_TOPIC else bool(data["in_window"])
            elif topic.startswith(PREDICTION_EVENT_PREFIX):
                self.doubtful.add(pid)
        self.stats.decode_s += time.perf_counter() - read


def _stack(spec: LearnerSpec, counts: np.ndarray, rows: list[Any], labels: list[float]) -> Batch:
    """Stack the updates' rows into padded [n, batch_size, ...] arrays, bit-equal to ``make_batch``'s."""
    n, size = len(counts), spec.batch_size
    # float64 first, then float32: the same two roundings examples_for + make_batch apply.
    x = np.asarray(rows, dtype=np.float64).reshape(len(rows), spec.n_features).astype(np.float32)
    y = np.asarray(labels, dtype=np.float64).astype(np.float32)
    if (counts > size).any() or not _valid(spec, x, y):
        # Let make_batch raise its own error for the first bad batch, in order.
        offsets = np.concatenate([[0], np.cumsum(counts)])
        for k in range(n):
            make_batch(spec, x[offsets[k] : offsets[k + 1]], y[offsets[k] : offsets[k + 1]])
    which = np.repeat(np.arange(n), counts)
    slot = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    xs = np.zeros((n, size, spec.n_features), np.float32)
    ys = np.zeros((n, size), np.float32)
    ms = np.zeros((n, size), np.float32)
    xs[which, slot], ys[which, slot], ms[which, slot] = x, y, 1.0
    return Batch(xs, ys, ms)  # type: ignore[arg-type]


def _valid(spec: LearnerSpec, x: np.ndarray, y: np.ndarray) -> bool:
    # make_batch's checks, on a whole page at once.
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return False
    if spec.head == "binary":
        return bool(((y == 0.0) | (y == 1.0)).all())
    if spec.head == "multiclass":
        return bool(((y == np.round(y)) & (y >= 0) & (y < spec.n_classes)).all())
    return True


def _padded(a: np.ndarray, rows: int) -> np.ndarray:
    # Padding steps are all-mask-zero batches; their outputs are never read.
    if a.shape[0] == rows:
        return a
    out = np.zeros((rows, *a.shape[1:]), a.dtype)
    out[: a.shape[0]] = a
    return out


def _batch_ids(update: Any) -> tuple[UUID, ...]:
    # What the step trained on, in order: the new examples, then any replayed ones.
    return (*update.prediction_ids, *getattr(update, "replayed_ids", ()))

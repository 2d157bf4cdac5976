"""Bulk replay: a model's history verified with large reads and many update steps per jitted call.

``Replayer.verify`` folds one update at a time: a typed read of each page of predictions
(pydantic, aggregate objects), one ``make_batch`` and one jitted dispatch per update. This
module folds the same recorded decisions faster, and bit-identically:

- **Reads**: the log is read forward once, in ranges of ``PAGE_ROWS`` positions, from the
  model's registration on. PostgreSQL cuts each range down to the model's facts
  (``LedgerRecorder.select_example_page``: ids as raw bytes, the features' JSON text,
  label values, one string each), so a range becomes arrays with a few C-level parses
  and no Python per row; examples live in a ring of numpy arrays found by prediction id
  (``projections.id_keys.IdIndex``), and a run of updates gathers its ``PAGE_EXAMPLES``
  examples with one fancy index. The model's own ``UpdateApplied`` rows are decoded
  straight from orjson, their id lists cut out as bytes and decoded for the whole
  history at once (``_recorded_updates``), unless its safety policy needs the typed
  events for the audit.
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
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import jax
import numpy as np
import orjson
import simdjson
from eventsourcing.persistence import StoredEvent
from eventsourcing.utils import get_topic

from domain.errors import VersionNotFoundError
from domain.ledger import Ledger
from domain.model import STATE_KEEPING_EVENTS, Model
from domain.prediction import Prediction
from domain.spec import LearnerSpec
from projections.digest import stacked_digests, state_digest, state_from_bytes, state_to_bytes
from projections.id_keys import JSON_ITEM_LENGTH, IdIndex, IdSet, ids_from_bytes, ids_from_json_items, ids_from_text
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
from projections.store import ExamplePage, LedgerRecorder

# Most steps one scan call folds. Chunks are padded up to a power of two (at least
# MIN_CHUNK_STEPS), so a spec compiles at most log2(128 / 8) + 1 = 5 scan shapes.
MAX_CHUNK_STEPS = 128
MIN_CHUNK_STEPS = 8
# Examples stacked per page of updates, and log positions read per query (~2 per example:
# Made + Labeled). ~20k rows of ~400 bytes: ~8 MB a page.
PAGE_EXAMPLES = 16_384
PAGE_ROWS = 20_000
# Ranges of the log read at once (each on its own connection) while one is decoded: two
# keep PostgreSQL's cut-out running on the second core most of the time.
READ_AHEAD = 2
# A full-history verify holds more ranges read ahead of the decoder, up to about
# READ_AHEAD_BYTES of them: while this process decodes the model's own history (~0.4 s
# for 1M examples) PostgreSQL goes on reading instead of stopping after two ranges.
READ_AHEAD_BYTES = 64 << 20
MAX_HELD_RANGES = 16
# The examples kept in memory: the newest RING_ROWS read (fewer for wide feature vectors,
# at most RING_BYTES of features), enough for labels delayed by hundreds of thousands of
# predictions and for replay buffers; a batch naming an older one takes the typed path.
RING_ROWS = 1 << 19
RING_BYTES = 256 << 20
UPDATE_APPLIED_TOPIC = get_topic(Model.UpdateApplied)

ScanFold = Callable[[LearnerState, Batch], tuple[LearnerState, tuple[LearnerState, Metrics]]]


@dataclass
class BulkFoldStats:
    """Where a bulk fold spent its time, and which path each update step took."""

    updates: int = 0
    examples: int = 0
    scanned_steps: int = 0
    stepwise_steps: int = 0
    # Runs of updates whose examples came as arrays from the ring, and runs that took
    # the example-by-example path (something unusual, or no PostgreSQL).
    gathered_runs: int = 0
    example_runs: int = 0
    # Gathered runs whose ids were the next labels in log order (no index lookup).
    label_order_runs: int = 0
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


@dataclass(frozen=True)
class RecordedUpdate:
    """A ``Model.UpdateApplied`` read straight from its orjson bytes: what the fold needs of it.

    The ids the step trained on (its new examples, then any replayed ones) are kept as an
    ``[n, 2]`` ``uint64`` array (``projections.id_keys``), cut out of the row's bytes and
    decoded for the whole history at once: as ``UUID`` objects they were most of the time
    it took to read a model's history, and as strings still ~20 % of the replay's own
    time on a million examples. ``stored`` is kept so that the typed event (and the typed
    decoder's verdict on a malformed row) is one call away.
    """

    originator_version: int
    digest: str
    ids: np.ndarray
    stored: StoredEvent


UPDATE_EVENTS = (Model.UpdateApplied, RecordedUpdate)


def verify_fast(
    ledger: Ledger,
    model_id: UUID,
    *,
    snapshot_interval: int | None = None,
    stats: BulkFoldStats | None = None,
    max_chunk_steps: int = MAX_CHUNK_STEPS,
) -> VerifyReport:
    """Replay a model from genesis and compare every recorded digest: ``Replayer.verify``, faster.

    Args:
        ledger: the ledger holding the model's log.
        model_id: the model's aggregate id.
        snapshot_interval: when given (and the ledger runs on PostgreSQL), cache a
            parameter snapshot at every version divisible by it, as ``Replayer`` does.
        stats: filled with timings and step counts when given.
        max_chunk_steps: most update steps folded per jitted call.

    Returns:
        The same ``VerifyReport`` ``Replayer(ledger).verify(model_id)`` returns: the count
        of versions checked and updates replayed, and the first divergence, if any.
    """
    from projections.platform import platform_differences

    # The log's first ranges are read while the model's own history is.
    reads = _range_reads(ledger, model_id)
    try:
        head, decode_events = _model_history(ledger, model_id)
    except BaseException:
        if reads is not None:
            reads.close()
        raise
    report = VerifyReport(model=head.name, versions_checked=0, updates_replayed=0)
    report.platform_differences = platform_differences(head.platform)
    folder = _BulkFolder(ledger, head, stats or BulkFoldStats(), max_chunk_steps, snapshot_interval, reads=reads)
    if reads is not None:
        reads.read_whole_log(head.spec.n_features)  # further ahead, while the history decodes
    try:
        events = decode_events()  # while the folder's first reads run
        # Models with a stateful safety policy also have every gate verdict, replay choice
        # and drift detection re-derived, from the states before and after each event.
        auditor = SafetyAuditor(ledger, head, folder.learner) if head.spec.policy.stateful else None
    except BaseException:
        folder.close()
        raise
    before: LearnerState | None = None
    try:
        for index, (event, folded, state) in enumerate(folder.fold(events)):
            report.versions_checked += 1
            if isinstance(event, UPDATE_EVENTS):
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
    folder = _BulkFolder(ledger, head, BulkFoldStats(), MAX_CHUNK_STEPS, None, sequential=False)
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
) -> list[FoldedDigest]:
    """The bulk fold's digest at every version of a model, oldest first.

    Args:
        ledger: the ledger holding the model's log.
        model_id: the model's aggregate id.
        stats: filled with timings and step counts when given.
        max_chunk_steps: most update steps folded per jitted call.

    Returns:
        One ``FoldedDigest`` per version.

    Raises:
        ReplayError: the log cannot be folded (e.g. a batch names a missing prediction).
    """
    head, decode_events = _model_history(ledger, model_id)
    folder = _BulkFolder(ledger, head, stats or BulkFoldStats(), max_chunk_steps, None)
    try:
        return [folded for _, folded, _ in folder.fold(decode_events())]
    finally:
        folder.close()


def _model_history(ledger: Ledger, model_id: UUID) -> tuple[Model, Callable[[], list[Any]]]:
    """The model (as far as replay needs it), and a call that decodes its events, oldest first.

    With the PostgreSQL recorder and plain orjson rows, ``UpdateApplied`` events come back
    as ``RecordedUpdate`` and the head is the registered model (name, spec, platform are
    fixed at registration), so the history is not decoded twice; the caller decodes the
    events once the example reader has started reading the log. A stateful safety
    policy gets the typed events and the full head: its audit reads both.
    """
    recorder = _plain_recorder(ledger)
    if recorder is None:
        return ledger.get_model_by_id(model_id), lambda: ledger.get_model_events(model_id)
    mapper: Any = ledger.mapper
    stored = recorder.select_aggregate_events(model_id)
    if not stored:
        return ledger.get_model_by_id(model_id), list  # raises the ledger's not-found error
    registered = mapper.to_domain_event(stored[0])
    if not isinstance(registered, Model.Registered) or registered.spec.policy.stateful:
        return ledger.get_model_by_id(model_id), lambda: [mapper.to_domain_event(e) for e in stored]
    head = registered.mutate(None)
    assert isinstance(head, Model)

    def events() -> list[Any]:
        rows = stored[1:]
        updates = iter(_recorded_updates([row for row in rows if row.topic == UPDATE_APPLIED_TOPIC]))
        out: list[Any] = [registered]
        for row in rows:
            update = next(updates) if row.topic == UPDATE_APPLIED_TOPIC else None
            out.append(update if update is not None else mapper.to_domain_event(row))
        return out

    return head, events


def _plain_recorder(ledger: Ledger) -> LedgerRecorder | None:
    """The ledger's PostgreSQL recorder when its rows are plain orjson (no compressor, no
    cipher), the only form the raw readers here may decode; None otherwise."""
    recorder: Any = ledger.recorder
    mapper: Any = ledger.mapper
    if not isinstance(recorder, LedgerRecorder) or mapper.compressor or mapper.cipher:
        return None
    return recorder


def _recorded_updates(rows: Sequence[StoredEvent]) -> list[RecordedUpdate | None]:
    """``UpdateApplied`` rows as ``RecordedUpdate``s, None for each row only the typed decoder should judge.

    Every row's id lists are cut out of its bytes (``_cut_update``) and all of them are
    decoded in one call; should that fail, row by row, so that one odd row costs only
    itself the typed path.
    """
    cuts = [_cut_update(row.state) for row in rows]
    texts = [text for cut in cuts if cut is not None for text in cut[1:] if text]
    every = ids_from_json_items(b",".join(texts))
    out: list[RecordedUpdate | None] = []
    at = 0
    for row, cut in zip(rows, cuts, strict=True):
        if cut is None:
            out.append(None)
            continue
        digest, trained, replayed = cut
        if every is not None:
            n = (len(trained) + 1) // JSON_ITEM_LENGTH + (len(replayed) + 1) // JSON_ITEM_LENGTH
            ids: np.ndarray | None = every[at : at + n]
            at += n
        else:
            ids = ids_from_json_items(b",".join(text for text in (trained, replayed) if text))
        out.append(None if ids is None else RecordedUpdate(row.originator_version, digest, ids, row))
    return out


_ID_LISTS = (b'"prediction_ids":', b'"replayed_ids":')


def _cut_update(state: bytes) -> tuple[str, bytes, bytes] | None:
    """An ``UpdateApplied`` row's digest and the items of its two id lists; None unless that is certain.

    The lists are cut out as bytes (their items are decoded for many rows at once) and
    the rest of the row is parsed. Exactness: the row must be orjson's own canonical
    form (what is parsed, re-encoded, gives the same bytes back), in which a key named
    ``prediction_ids`` is always written ``"prediction_ids":``; each list's key occurs
    once in the whole row, and the parsed object holds it at the top level (emptied by
    the cut), so the cut was of the top-level list. A row without ``replayed_ids`` has
    none, as the typed event defaults.
    """
    spans: list[tuple[int, int] | None] = []
    for key in _ID_LISTS:
        at = state.find(key)
        if at < 0:
            spans.append(None)
            continue
        if state.find(key, at + 1) >= 0 or state[at + len(key) : at + len(key) + 1] != b"[":
            return None
        start = at + len(key) + 1
        end = state.find(b"]", start)
        if end < 0:
            return None
        spans.append((start, end))
    trained_span, replayed_span = spans
    if trained_span is None:
        return None
    cuts = sorted(span for span in spans if span is not None)
    if len(cuts) == 2 and cuts[0][1] >= cuts[1][0]:
        return None  # one list inside the other
    pieces, last = [], 0
    for start, end in cuts:
        pieces.append(state[last:start])
        last = end
    pieces.append(state[last:])
    rest = b"".join(pieces)
    try:
        data = orjson.loads(rest)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or orjson.dumps(data) != rest or "class_version" in data:
        return None
    digest = data.get("digest")
    if data.get("prediction_ids") != [] or data.get("replayed_ids", []) != [] or not isinstance(digest, str):
        return None
    trained = state[slice(*trained_span)]
    replayed = state[slice(*replayed_span)] if replayed_span is not None else b""
    # Whole items only, so that in the joined text of many rows each row's items stay its own.
    if any(text and (len(text) + 1) % JSON_ITEM_LENGTH for text in (trained, replayed)):
        return None
    return digest, trained, replayed


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
        sequential: bool = True,
        reads: _RangeReads | None = None,
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
        self.snapshotted: set[int] | None = None
        mapper: Any = ledger.mapper
        self.mapper = mapper
        self.examples: _TypedExamples | _PagedExamples = _TypedExamples(ledger, stats)
        if sequential and reads is None:
            reads = _range_reads(ledger, head.id)
        if reads is not None:
            self.examples = _PagedExamples(ledger, reads, self.spec.n_features, stats)
        self.diverged = False

    def close(self) -> None:
        """Release the reader (its read-ahead thread)."""
        if isinstance(self.examples, _PagedExamples):
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
                case Model.UpdateApplied() | RecordedUpdate():
                    if state is None:
                        raise ReplayError(f"version {version}: an update before registration")
                    j, taken = i, 0
                    while j < len(events) and taken < PAGE_EXAMPLES and isinstance(events[j], UPDATE_EVENTS):
                        taken += _batch_size(events[j])
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
            if self.snapshotted is None:
                # Usually the learner cached them all already: one query instead of a
                # no-op insert (a round trip and the state's bytes) per snapshot.
                self.snapshotted = self.store.snapshot_versions(self.head.id)
            if version not in self.snapshotted:
                self.store.put_snapshot(self.head.id, version, digest, state_to_bytes(state))
        if isinstance(event, RecordedUpdate):
            return FoldedDigest(version, "UpdateApplied", event.digest, digest)
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
            steps, ints, floats = (np.asarray(a)[:size] for a in outs)
            stats.fold_s += time.perf_counter() - started
            stats.scanned_steps += size
            started = time.perf_counter()
            digests = stacked_digests([steps, ints, floats])  # LearnerState's leaves, in order
            stats.digest_s += time.perf_counter() - started
            previous = state
            for k in range(size):
                state = LearnerState(np.asarray(steps[k]), ints[k], floats[k])  # type: ignore[arg-type]
                digest = digests[k]
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
        counts = np.fromiter(map(_batch_size, updates), np.int64, len(updates))
        if isinstance(self.examples, _PagedExamples):
            if all(isinstance(update, RecordedUpdate) for update in updates):
                ids: np.ndarray | None = np.concatenate([update.ids for update in updates])
            else:
                ids = ids_from_text([key for update in updates for key in _batch_keys(update)])
            gathered = self.examples.gather(ids) if ids is not None else None
            if gathered is not None:
                started = time.perf_counter()
                batches = _stack(self.spec, counts, *gathered)
                self.stats.decode_s += time.perf_counter() - started
                self.stats.updates += len(updates)
                self.stats.examples += int(counts.sum())
                self.stats.gathered_runs += 1
                return batches, None
        # Something is unusual (missing, unlabeled, late, of another model, evicted,
        # upcast): example by example, with the typed events and the typed reader's word.
        self.stats.example_runs += 1
        per_update = [_batch_keys(self._typed(update)) for update in updates]
        facts = self.examples.take([key for batch in per_update for key in batch])
        started = time.perf_counter()
        rows: list[Any] = []
        labels: list[float] = []
        good = 0
        error: ReplayError | None = None
        for batch in per_update:
            error = self._append_examples(batch, facts, rows, labels)
            if error is not None:
                break
            good += 1
        batches = _stack(self.spec, counts[:good], np.asarray(rows, np.float64), np.asarray(labels, np.float64))
        self.stats.decode_s += time.perf_counter() - started
        self.stats.updates += good
        self.stats.examples += len(rows)
        return batches, error

    def _typed(self, update: Any) -> Any:
        # The typed decoder validates every id (and raises on a malformed row, as the
        # typed read of the model's events did before RecordedUpdate existed).
        return self.mapper.to_domain_event(update.stored) if isinstance(update, RecordedUpdate) else update

    def _append_examples(
        self, keys: Sequence[str], facts: dict[str, Fact], rows: list[Any], labels: list[float]
    ) -> ReplayError | None:
        """Append the examples of one batch, or return (appending nothing) ``examples_for``'s error."""
        mark = len(rows)
        model_id = self.head.id
        for key in keys:
            fact = facts.get(key)
            if fact is None or fact[2] is None:
                error = ReplayError(f"update batch names prediction {key}, which is missing or unlabeled")
            elif fact[0] != model_id:
                error = ReplayError(f"update batch names prediction {key} of another model")
            elif not fact[3]:
                error = ReplayError(f"update batch names prediction {key}, whose label was late")
            else:
                rows.append(fact[1])
                labels.append(fact[2])
                continue
            del rows[mark:], labels[mark:]
            return error
        return None

    def _examples(self, ids: Sequence[UUID]) -> tuple[np.ndarray, np.ndarray]:
        """``examples_for`` through the bulk reader: features [k, n_features] and labels [k], float64."""
        keys = [str(pid) for pid in ids]
        rows: list[Any] = []
        labels: list[float] = []
        error = self._append_examples(keys, self.examples.take(keys), rows, labels)
        if error is not None:
            raise error
        x = np.asarray(rows, dtype=np.float64).reshape(len(rows), self.spec.n_features)
        return x, np.asarray(labels, dtype=np.float64)


# [model id, features, label, in_window] of one prediction, as the Prediction aggregate
# would hold them.
Fact = list[Any]


class _TypedExamples:
    """Examples through ``Ledger.get_predictions``: any recorder, any mapper, one query per page."""

    def __init__(self, ledger: Ledger, stats: BulkFoldStats):
        self.ledger = ledger
        self.stats = stats

    def take(self, keys: Sequence[str]) -> dict[str, Fact]:
        """Facts of the given predictions by id text; absent ones are missing from the log."""
        started = time.perf_counter()
        ids = []
        for key in keys:
            try:
                ids.append(UUID(key))
            except ValueError:
                continue  # not an id at all: missing
        found = self.ledger.get_predictions(ids)
        self.stats.read_s += time.perf_counter() - started
        return {str(pid): [p.model_id, p.features, p.label, p.in_window] for pid, p in found.items()}


class _RangeReads:
    """One model's facts, range after range of the log from its registration on, read ahead.

    PostgreSQL's side of a read (the cut-out runs there) overlaps this process's work:
    ``READ_AHEAD`` ranges are in flight, each on its own connection, from construction
    on, so ``verify_fast`` starts them before it reads the model's own history.
    """

    def __init__(self, store: LedgerRecorder, model_id: UUID):
        self.store = store
        self.model_id = model_id
        # Every Made/Labeled/DefaultLabeled row of this model carries this exact byte
        # string (orjson, no spaces): PostgreSQL skips other models' rows by it.
        self.key = b'"model_id":"' + str(model_id).encode() + b'"'
        self.next = store.select_notification_id(model_id, 1) or 1
        self.end = int(store.max_notification_id() or 0)
        self.page_rows = PAGE_ROWS
        self.pool = ThreadPoolExecutor(max_workers=max(1, READ_AHEAD), thread_name_prefix="bulk-fold-read")
        self.ahead: deque[Future[ExamplePage]] = deque()
        self.held = max(1, READ_AHEAD)  # ranges submitted ahead of the reader
        self.submitted = self.next
        self._read_ahead()

    def read_whole_log(self, n_features: int) -> None:
        """Hold up to about ``READ_AHEAD_BYTES`` of ranges read ahead: the whole log will be read.

        Still ``READ_AHEAD`` queries at a time; only a full-history verify asks for this,
        so that a time travel reads no further than it needs.
        """
        # A range's facts are mostly feature text: ~20 bytes a value, one Made row in two.
        range_bytes = self.page_rows // 2 * (20 * max(1, n_features) + 40)
        self.held = max(1, READ_AHEAD, min(MAX_HELD_RANGES, READ_AHEAD_BYTES // range_bytes))
        self._read_ahead()

    @property
    def done(self) -> bool:
        """Whether every range up to the log's end (when reading began) was read."""
        return self.next > self.end

    def read(self) -> ExamplePage:
        """The next range's facts (waiting for its read-ahead)."""
        first = self.next
        # Ranges are only ever read forward, so a read-ahead is wasted at most at the end.
        page = (
            self.ahead.popleft().result()
            if self.ahead
            else self.store.select_example_page(first, first + self.page_rows - 1, self.key)
        )
        self.next += self.page_rows
        self._read_ahead()
        return page

    def close(self) -> None:
        """Stop reading ahead."""
        for future in self.ahead:
            future.cancel()
        self.ahead.clear()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _read_ahead(self) -> None:
        self.submitted = max(self.submitted, self.next)
        while len(self.ahead) < self.held and self.submitted <= self.end:
            first = self.submitted
            last = first + self.page_rows - 1
            self.ahead.append(self.pool.submit(self.store.select_example_page, first, last, self.key))
            self.submitted += self.page_rows


def _range_reads(ledger: Ledger, model_id: UUID) -> _RangeReads | None:
    """Range reads for the paged example reader, when it applies to this ledger; None otherwise.

    Cutting facts out of the orjson text is only right when the bytes are plain orjson
    and no stored prediction event needs upcasting.
    """
    recorder = _plain_recorder(ledger)
    if recorder is None or not _prediction_events_are_v1():
        return None
    return _RangeReads(recorder, model_id)


class _PagedExamples:
    """One model's labeled examples, read forward through the log a range at a time, kept in arrays.

    Batches are recorded in log order and name predictions labeled before them, so one
    pass over the log, from the model's registration on, meets every example just before
    an update needs it. Range reads on the notification id are sequential for PostgreSQL;
    reading the same rows by id costs an index probe each and measured ~4x slower.
    PostgreSQL cuts each range down to the model's facts (``select_example_page``), which
    become arrays with one parse each; the ``Prediction`` aggregate's rules apply (``Made``
    sets the facts; the first label, observed or default, counts). Examples sit in a ring
    of ``capacity`` rows: row ``g`` (the g-th ``Made`` read) at ``g % capacity`` while it is
    among the newest ``capacity``. Anything unusual (an id not met, evicted, a prediction
    event this reader does not know, an upcast row) makes ``gather`` decline, and ``take``
    sends those ids to the typed path, so the facts are always what
    ``Ledger.get_predictions`` would give.
    """

    def __init__(self, ledger: Ledger, reads: _RangeReads, n_features: int, stats: BulkFoldStats):
        self.typed = _TypedExamples(ledger, stats)
        self.reads = reads
        self.stats = stats
        self.model_id = reads.model_id
        self.n_features = n_features
        self.capacity = max(2 * PAGE_ROWS, min(RING_ROWS, RING_BYTES // (8 * max(1, n_features))))
        self.features = np.zeros((self.capacity, n_features), np.float64)
        self.labels = np.full(self.capacity, np.nan)
        self.in_window = np.zeros(self.capacity, bool)
        self.rows = 0
        self.index = IdIndex()
        self.doubtful = IdSet()
        # The in-window labels in the order they were logged, with their examples' row
        # numbers: the learner trains on labels as they arrive, so an update's ids are
        # usually the next ones here, and one comparison replaces an index lookup.
        self.label_order: deque[tuple[np.ndarray, np.ndarray]] = deque()
        self.label_cursor = 0  # into the first chunk of label_order

    def gather(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Features [k, n_features] and labels [k] (float64) of these predictions (``[k, 2]`` id array), or None.

        None means some prediction is not a plain labeled, in-window example of this
        model in the ring (missing, unlabeled, late, evicted, doubtful): the caller
        takes the example-by-example path, which reports exactly what is wrong.
        """
        at = self._in_label_order(ids)
        if at is None:
            at = self._locate(ids)
            if at is not None:
                self._resume_label_order_after(at)
        if at is None or self.doubtful.contains(ids).any():
            return None
        if not self.in_window[at].all():
            return None
        return self.features[at], self.labels[at]

    def take(self, keys: Sequence[str]) -> dict[str, Fact]:
        """Facts of the given predictions by id text; absent ones are missing from the log."""
        out: dict[str, Fact] = {}
        ids = ids_from_text(keys)
        if ids is None:
            return self.typed.take(keys)
        self._locate(ids)  # reads ahead as far as the log goes when something is not met
        g = self.index.lookup(ids)
        at = g % self.capacity
        ok = self._in_ring(g) & ~self.doubtful.contains(ids) & ~np.isnan(self.labels[at])
        missing = [key for key, good in zip(keys, ok.tolist(), strict=True) if not good]
        for k in np.flatnonzero(ok).tolist():
            row = at[k]
            features = tuple(self.features[row].tolist())
            out[keys[k]] = [self.model_id, features, float(self.labels[row]), bool(self.in_window[row])]
        if missing:
            # Not met in one pass (of another model, labeled late in an odd order, evicted,
            # upcast): the typed path decides, exactly as Replayer would.
            out.update(self.typed.take(missing))
        return out

    def close(self) -> None:
        """Stop reading ahead."""
        self.reads.close()

    def _locate(self, ids: np.ndarray) -> np.ndarray | None:
        """Ring positions of labeled examples for ``ids``, reading forward until all are met; None if not."""
        # Read on until the run's last example is met: its label is usually the newest,
        # so all the others are met too and each id is looked up once, not once per range.
        while len(ids) and not self.reads.done:
            g_last = int(self.index.lookup(ids[-1:])[0])
            if g_last >= 0 and not np.isnan(self.labels[g_last % self.capacity]):
                break  # met and labeled
            self._read_page()
        g = self.index.lookup(ids)
        while True:
            if ((g >= 0) & ~self._in_ring(g)).any():
                return None  # evicted: more reading cannot bring it back
            at = g % self.capacity
            unmet = np.flatnonzero((g < 0) | np.isnan(self.labels[at]))
            if unmet.size == 0:
                return at
            if self.reads.done:
                return None
            self._read_page()
            # Only the ids not met yet can have changed (a row once stored keeps its number).
            g[unmet] = self.index.lookup(ids[unmet])

    def _in_label_order(self, ids: np.ndarray) -> np.ndarray | None:
        """Ring positions of ``ids`` when they are the next labels in log order (each met); None if not."""
        while self._labels_ahead() < len(ids) and not self.reads.done:
            self._read_page()
        expected, g = self._next_labels(len(ids))
        if not np.array_equal(expected, ids) or not self._in_ring(g).all():
            return None
        self._advance_label_order(len(ids))
        self.stats.label_order_runs += 1
        return g % self.capacity

    def _resume_label_order_after(self, at: np.ndarray) -> None:
        # After a run not in label order (a skipped label, a shuffled batch, a replay
        # buffer's picks), go on after the furthest of the next labels the run used:
        # looked for within twice its length, so that a run whose labels are nowhere
        # near costs little.
        _, g = self._next_labels(2 * len(at))
        used = np.flatnonzero(np.isin(g % self.capacity, at))
        if used.size:
            self._advance_label_order(int(used[-1]) + 1)

    def _next_labels(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        # The (at most) n labels after the cursor: their ids and their examples' row numbers.
        ids, rows, at = [np.zeros((0, 2), np.uint64)], [np.zeros(0, np.int64)], self.label_cursor
        for chunk_ids, chunk_rows in self.label_order:
            if n <= 0:
                break
            ids.append(chunk_ids[at : at + n])
            rows.append(chunk_rows[at : at + n])
            n, at = n - len(ids[-1]), 0
        return np.concatenate(ids), np.concatenate(rows)

    def _labels_ahead(self) -> int:
        return sum(len(chunk_ids) for chunk_ids, _ in self.label_order) - self.label_cursor

    def _advance_label_order(self, n: int) -> None:
        self.label_cursor += n
        while self.label_order and self.label_cursor >= len(self.label_order[0][0]):
            self.label_cursor -= len(self.label_order.popleft()[0])

    def _oldest(self) -> int:
        # Row g sits at g % capacity while it is among the newest `capacity` rows read.
        return max(0, self.rows - self.capacity)

    def _in_ring(self, g: np.ndarray) -> np.ndarray:
        # Which row numbers (-1: never met) are still in the ring.
        return g >= self._oldest()

    def _read_page(self) -> None:
        started = time.perf_counter()
        page = self.reads.read()
        read = time.perf_counter()
        self.stats.read_s += read - started
        self._add_made(page)
        self._add_labels(page)
        self.stats.decode_s += time.perf_counter() - read

    def _add_made(self, page: ExamplePage) -> None:
        if not page.made_ids:
            return
        ids = ids_from_bytes(page.made_ids)
        x = None if page.unusual else _parse_features(page.features or b"", len(ids), self.n_features)
        if x is None:
            self.doubtful.add(ids)
            return
        n, first = len(ids), self.rows
        # Rows first .. first + n - 1 go to the ring in at most two slices (at its end
        # and, wrapping, at its start): slice copies, not a fancy index per row.
        for src in range(0, n, self.capacity):
            part = x[src : src + self.capacity]
            start = (first + src) % self.capacity
            head = min(len(part), self.capacity - start)
            for ring, rows in ((slice(start, start + head), part[:head]), (slice(0, len(part) - head), part[head:])):
                self.features[ring] = rows
                self.labels[ring] = np.nan
                self.in_window[ring] = False
        self.index.add(ids, first)
        self.rows += n
        # Forget ids whose rows were overwritten, so the index stays bounded too.
        self.index.forget_before(self._oldest())

    def _add_labels(self, page: ExamplePage) -> None:
        if not page.label_ids or not page.label_kinds:
            return
        ids = ids_from_bytes(page.label_ids)
        letters = np.frombuffer(page.label_kinds.encode(), np.uint8)
        if len(letters) != len(ids):
            raise ReplayError(f"a range read gave {len(ids)} label ids and {len(letters)} kinds")
        other = letters == ord("O")
        if other.any():
            self.doubtful.add(ids[other])
            ids, letters = ids[~other], letters[~other]
        values = None if page.unusual else _parse_values(page.labels or b"", len(ids))
        if values is None:
            self.doubtful.add(ids)
            return
        g = self.index.lookup(ids)
        known = np.flatnonzero(self._in_ring(g))
        if known.size == 0:
            return
        # The first label of a prediction counts: its first row here, and only if no
        # earlier range labeled it.
        _, first = np.unique(g[known], return_index=True)
        rows = known[np.sort(first)]
        at = g[rows] % self.capacity
        fresh = np.isnan(self.labels[at])
        rows, at = rows[fresh], at[fresh]
        self.labels[at] = values[rows]
        in_window = letters[rows] != ord("l")
        self.in_window[at] = in_window
        rows = rows[in_window]
        self.label_order.append((ids[rows], g[rows]))
        # Forget labels whose examples left the ring, so the order stays bounded too.
        oldest = self._oldest()
        while self.label_order and (len(self.label_order[0][1]) == 0 or self.label_order[0][1].max() < oldest):
            self.label_cursor = max(0, self.label_cursor - len(self.label_order.popleft()[0]))


def _parse_features(text: bytes, rows: int, n_features: int) -> np.ndarray | None:
    """``rows`` feature vectors from ``1.0,2.0;3.0,4.0`` text, float64; None unless each has ``n_features``."""
    # With the number characters deleted, what is left must be exactly the separators of
    # `rows` rows of `n_features` values: n_features - 1 commas and a semicolon per row,
    # minus the last. One C-level pass checks both the characters (null, a string, a
    # nested value leave something else behind) and every row's length.
    if text.translate(None, DIGIT_BYTES) != _separators(rows, n_features):
        return None
    values = _json_numbers(b"[" + text.replace(b";", b",") + b"]")
    if values is None or len(values) != rows * n_features:
        return None  # not JSON numbers, or an empty value between separators
    return values.reshape(rows, n_features)


def _separators(rows: int, n_features: int) -> bytes:
    # The separators of `rows` rows of `n_features` values (the feature text minus its numbers).
    return ((b"," * (n_features - 1) + b";") * rows)[:-1]


def _parse_values(text: bytes, rows: int) -> np.ndarray | None:
    """``rows`` numbers from ``1.0,0.0`` text, float64; None if the text is anything else."""
    if text.translate(None, NUMBER_BYTES):
        return None
    values = _json_numbers(b"[" + text + b"]")
    if values is None or len(values) != rows:
        return None
    return values


def _json_numbers(array: bytes) -> np.ndarray | None:
    """A JSON array of numbers as float64, each as the typed decoder reads it; None if it is not one.

    The typed decoder is orjson, then float64: a number's value is correctly rounded, and
    an integer is converted as an integer (``-0`` is 0, not -0.0).

    simdjson converts the numbers straight into a buffer of doubles (correctly rounded,
    as orjson and ``float`` are), without a Python float per value: ~2.7x faster than
    ``orjson.loads`` then ``np.fromiter``, and feature text is most of a replay's
    decoding. The callers have already checked that the text holds only number
    characters and separators, so nested arrays (which ``as_buffer`` would flatten)
    cannot occur.
    """
    try:
        doc = simdjson.Parser().parse(array)
        if not isinstance(doc, simdjson.Array):
            return None
        return np.frombuffer(doc.as_buffer(of_type="d"), np.float64)
    except (ValueError, TypeError, RuntimeError):
        # Not JSON, an element that is not a number, or an integer past 64 bits (simdjson
        # raises RuntimeError for that one).
        return None


# What a JSON number is made of, and a list of them.
DIGIT_BYTES = b"0123456789+-.eE"
NUMBER_BYTES = DIGIT_BYTES + b","


def _prediction_events_are_v1() -> bool:
    # A class at version > 1 would need its stored rows upcast, which only the typed
    # decoder does. While all are at 1 nothing is ever upcast: a stored row that carries
    # a class_version (written by a newer release) decodes to the same fields, the key
    # dropped, so the cut-out needs no check for it.
    return all(
        getattr(cls, "class_version", 1) == 1
        for cls in (Prediction.Made, Prediction.Labeled, Prediction.DefaultLabeled)
    )


def _stack(spec: LearnerSpec, counts: np.ndarray, rows: np.ndarray, labels: np.ndarray) -> Batch:
    """Stack the updates' rows (float64) into padded [n, batch_size, ...] arrays, bit-equal to ``make_batch``'s."""
    n, size = len(counts), spec.batch_size
    # float64 first, then float32: the same two roundings examples_for + make_batch apply.
    x = rows.reshape(len(rows), spec.n_features).astype(np.float32)
    y = labels.astype(np.float32)
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


def _batch_keys(update: Any) -> tuple[str, ...]:
    # What a typed update trained on, in order: the new examples, then any replayed
    # ones; as id text, what both example readers take.
    return tuple(str(pid) for pid in (*update.prediction_ids, *getattr(update, "replayed_ids", ())))


def _batch_size(update: Any) -> int:
    # How many examples an update trained on.
    if isinstance(update, RecordedUpdate):
        return len(update.ids)
    return len(update.prediction_ids) + len(getattr(update, "replayed_ids", ()))

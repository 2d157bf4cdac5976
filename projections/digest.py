"""Content digest and compact binary (de)serialisation of a learner's state PyTree."""

from __future__ import annotations

import hashlib
import math
import struct
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orjson

from projections.learners import LearnerState

# 8-byte magic: format name and version, so a foreign or future blob fails loudly.
_MAGIC = b"LSTATE\x00\x01"
_HEADER_LEN = struct.Struct("<I")
# Leaf payloads start on 16-byte boundaries so np.frombuffer views are aligned.
_ALIGN = 16


def state_leaves(state: LearnerState) -> list[np.ndarray]:
    """Every leaf of the state as a numpy array, in ``jax.tree_util.tree_leaves`` order.

    Args:
        state: a learner state.

    Returns:
        One numpy array per leaf.
    """
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(state)]


def state_digest(state: LearnerState) -> str:
    """A content hash of the state: equal digests mean bit-identical leaves.

    Each leaf contributes its dtype string (little-endian, e.g. ``<f4``), its shape and
    its raw C-order bytes, length-prefixed so that no two different states can frame to
    the same byte stream. The tree's class names are deliberately left out, so an
    optax upgrade that renames a state class does not change the digest.

    Args:
        state: a learner state.

    Returns:
        ``"sha256:"`` followed by 64 hex digits.
    """
    return _digest_arrays([_canonical(leaf) for leaf in state_leaves(state)])


def stacked_digests(leaves: list[np.ndarray]) -> list[str]:
    """``state_digest`` of each of ``n`` states given leaf by leaf stacked on a leading axis.

    ``leaves[j][k]`` is leaf ``j`` of state ``k`` (what a ``lax.scan`` returns for the
    state after every step). The framing (leaf count, each leaf's dtype and shape) is the
    same for every state, so it is built once, and each state's whole byte stream is one
    row of a ``uint8`` matrix: one ``sha256`` call per state instead of a dozen small
    updates and a ``tobytes`` copy per leaf.

    Args:
        leaves: the stacked leaves, in ``jax.tree_util.tree_leaves`` order, all of the
            same length ``n``.

    Returns:
        ``n`` digests, equal to ``state_digest`` of each state.
    """
    arrays = [_canonical(leaf) for leaf in leaves]
    n = len(arrays[0]) if arrays else 0
    if any(len(arr) != n for arr in arrays):
        raise ValueError("stacked leaves differ in length")
    if n == 0:
        return []
    columns = [_repeated(struct.pack("<Q", len(arrays)), n)]
    for arr in arrays:
        nbytes = arr.itemsize * math.prod(arr.shape[1:])
        columns.append(_repeated(_leaf_frame(arr.dtype, arr.shape[1:], nbytes), n))
        columns.append(np.ascontiguousarray(arr).reshape(n, -1).view(np.uint8).reshape(n, nbytes))
    rows = np.concatenate(columns, axis=1)
    return ["sha256:" + hashlib.sha256(row.data).hexdigest() for row in rows]


def state_to_bytes(state: LearnerState) -> bytes:
    """Serialise a state to a compact, deterministic binary blob.

    Layout: 8-byte magic, little-endian uint32 header length, an orjson header
    ``{"digest", "leaves": [{"dtype", "shape", "offset", "nbytes"}]}``, zero padding to
    a 16-byte boundary, then each leaf's raw C-order bytes (offsets are relative to the
    start of that payload, each 16-byte aligned).

    Args:
        state: a learner state.

    Returns:
        The blob; equal states give equal bytes.
    """
    arrays = [_canonical(leaf) for leaf in state_leaves(state)]
    entries: list[dict[str, Any]] = []
    offset = 0
    for arr in arrays:
        entries.append({"dtype": arr.dtype.str, "shape": list(arr.shape), "offset": offset, "nbytes": arr.nbytes})
        offset = _aligned(offset + arr.nbytes)
    header = orjson.dumps({"digest": _digest_arrays(arrays), "leaves": entries})
    head = _MAGIC + _HEADER_LEN.pack(len(header)) + header
    payload = bytearray(_aligned(len(head)) - len(head))
    base = len(payload)
    for arr, entry in zip(arrays, entries, strict=True):
        payload.extend(bytes(base + entry["offset"] - len(payload)))
        payload.extend(arr.tobytes())
    return head + bytes(payload)


def state_from_bytes(template: LearnerState, data: bytes) -> LearnerState:
    """Rebuild a state from ``state_to_bytes`` output against a template's structure.

    Args:
        template: a state of the same spec (e.g. ``learner.init()``); only its tree
            structure, dtypes and shapes are used.
        data: bytes produced by ``state_to_bytes``.

    Returns:
        The state, with ``jnp`` array leaves.

    Raises:
        ValueError: if the blob is malformed or corrupted, or any leaf's count, dtype
            or shape differs from the template's (a state of another spec).
    """
    # Immutable bytes (a no-op for bytes): the device arrays may alias this buffer on CPU,
    # so a caller's later write to a bytearray or memoryview must not reach the state.
    data = bytes(data)
    template_leaves, treedef = jax.tree_util.tree_flatten(template)
    header, payload_start = _read_header(data)
    entries = header["leaves"]
    if len(entries) != len(template_leaves):
        raise ValueError(
            f"state has {len(entries)} leaves but the template has {len(template_leaves)}: "
            "it was written for a different learner spec"
        )
    arrays: list[np.ndarray] = []
    for i, (entry, leaf) in enumerate(zip(entries, template_leaves, strict=True)):
        want_dtype = np.dtype(leaf.dtype).newbyteorder("<")
        want_shape = tuple(int(d) for d in np.shape(leaf))
        try:
            dtype = np.dtype(entry["dtype"])
            shape = tuple(int(d) for d in entry["shape"])
            start = payload_start + int(entry["offset"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"state leaf {i} has a malformed header entry: {exc}") from None
        if dtype != want_dtype or shape != want_shape:
            raise ValueError(
                f"state leaf {i} is {dtype.str}{list(shape)} but the template expects "
                f"{want_dtype.str}{list(want_shape)}: it was written for a different learner spec"
            )
        count = math.prod(shape)
        if start < payload_start or start + count * dtype.itemsize > len(data):
            raise ValueError(f"state leaf {i} lies outside the data: the blob is truncated")
        arrays.append(np.frombuffer(data, dtype=dtype, count=count, offset=start).reshape(shape))
    if _digest_arrays(arrays) != header["digest"]:
        raise ValueError("state bytes do not match their recorded digest: the blob is corrupted")
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a) for a in arrays])


def _canonical(leaf: np.ndarray) -> np.ndarray:
    # Fix byte order and memory layout so the bytes depend only on the values.
    # (np.ascontiguousarray would turn a 0-d leaf into shape [1].)
    arr = np.asarray(leaf)
    return np.asarray(arr, dtype=arr.dtype.newbyteorder("<"), order="C")


def _digest_arrays(arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    h.update(struct.pack("<Q", len(arrays)))
    for arr in arrays:
        h.update(_leaf_frame(arr.dtype, arr.shape, arr.nbytes))
        h.update(arr.tobytes())
    return "sha256:" + h.hexdigest()


def _leaf_frame(dtype: np.dtype, shape: tuple[int, ...], nbytes: int) -> bytes:
    # What precedes a leaf's bytes in a digest: the lengths, then its dtype and shape.
    meta = f"{dtype.str}|{','.join(str(d) for d in shape)}".encode()
    return struct.pack("<IQ", len(meta), nbytes) + meta


def _repeated(data: bytes, n: int) -> np.ndarray:
    # The same bytes as n rows of a uint8 matrix (a broadcast view, nothing copied).
    return np.broadcast_to(np.frombuffer(data, np.uint8), (n, len(data)))


def _read_header(data: bytes) -> tuple[dict[str, Any], int]:
    prefix = len(_MAGIC) + _HEADER_LEN.size
    if len(data) < prefix or not data.startswith(_MAGIC):
        raise ValueError("not a learner state blob (bad magic or too short)")
    (header_len,) = _HEADER_LEN.unpack_from(data, len(_MAGIC))
    if prefix + header_len > len(data):
        raise ValueError("learner state blob is truncated inside its header")
    try:
        header = orjson.loads(data[prefix : prefix + header_len])
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"learner state header is not valid JSON: {exc}") from None
    if (
        not isinstance(header, dict)
        or not isinstance(header.get("leaves"), list)
        or not isinstance(header.get("digest"), str)
    ):
        raise ValueError("learner state header lacks 'leaves' or 'digest'")
    if not all(isinstance(e, dict) for e in header["leaves"]):
        raise ValueError("learner state header has a malformed leaf entry")
    return header, _aligned(prefix + header_len)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN

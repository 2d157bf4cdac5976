"""The bulk replay's parse of the feature text PostgreSQL cuts out of ``Made`` rows."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from projections.bulk_fold import _json_numbers, _parse_features, _parse_values


def _text(x: np.ndarray) -> bytes:
    # What select_example_page sends: each row's array without brackets, ';' between rows.
    return b";".join(orjson.dumps(row.tolist())[1:-1] for row in x)


@given(
    arrays(
        np.float64,
        st.tuples(st.integers(1, 12), st.integers(1, 6)),
        elements=st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=True),
    )
)
def test_features_parse_back_bit_for_bit(x: np.ndarray) -> None:
    # Given any finite float64 rows, written as orjson writes them
    # When the text is parsed
    parsed = _parse_features(_text(x), *x.shape)
    # Then every value has the same bits (-0.0 and subnormals included)
    assert parsed is not None
    assert parsed.tobytes() == x.tobytes()


@pytest.mark.parametrize(
    ("text", "rows", "n_features"),
    [
        (b"1.0,2.0;3.0", 2, 2),  # a short row
        (b"1.0,2.0,5.0;3.0", 2, 2),  # a long row and a short one: the count alone would pass
        (b"1.0,2.0;3.0,4.0", 3, 2),  # fewer rows than Made ids
        (b"1.0,null;3.0,4.0", 2, 2),  # a null
        (b'1.0,"2.0";3.0,4.0', 2, 2),  # a string
        (b"1.0,[2.0];3.0,4.0", 2, 2),  # a nested array
        (b"1.0,;3.0,4.0", 2, 2),  # an empty value
        (b"1.0,2.0;3.0,4.0;", 2, 2),  # a trailing separator
        (b"1.0,2.0;3.0,4-0", 2, 2),  # number characters that are no number
        (b"1.0,true;3.0,4.0", 2, 2),  # a boolean
        (b"", 1, 1),  # nothing at all
    ],
)
def test_anything_but_rows_of_numbers_is_refused(text: bytes, rows: int, n_features: int) -> None:
    # Given feature text that is not `rows` rows of `n_features` numbers
    # Then the parse declines (the replay then takes the typed path)
    assert _parse_features(text, rows, n_features) is None


def test_label_values_parse_and_refuse() -> None:
    # Label values: numbers only, and exactly as many as asked for
    assert _parse_values(b"1.0,0.0,-0.0", 3) is not None
    assert _parse_values(b"1.0,0.0", 3) is None
    assert _parse_values(b"1.0,null", 2) is None


# A JSON number of any form: sign, integer part, fraction and exponent, with up to 40
# digits (past 17, the correctly rounded decimal-to-double conversion needs its slow path).
json_numbers = st.from_regex(r"\A-?(0|[1-9][0-9]{0,39})(\.[0-9]{1,40})?([eE][+-]?[0-9]{1,3})?\Z")


@given(st.lists(json_numbers, min_size=1, max_size=8))
def test_json_numbers_read_as_the_typed_decoder_reads_them(texts: list[str]) -> None:
    # Given numbers in any JSON spelling (integers, exponents, long mantissas, underflow)
    array = ("[" + ",".join(texts) + "]").encode()
    # When the array is read into doubles
    values = _json_numbers(array)
    # Then each has the bits of what the typed path reads (orjson, then float64:
    # "-0" is the integer 0 there), or, only for a number no double or 64-bit integer
    # holds, the whole array is declined and left to the typed path
    if values is not None:
        expected = np.array([float(v) for v in orjson.loads(array)], np.float64)
        assert values.tobytes() == expected.tobytes()
    else:
        assert any(not np.isfinite(float(t)) or _is_integer_past_64_bits(t) for t in texts)


def test_json_numbers_decline_what_is_not_an_array_of_numbers() -> None:
    for bad in (
        b"1.0",  # not an array
        b'{"a":1.0}',
        b"[1.0,null]",
        b'[1.0,"2"]',
        b"[true]",
        b"[1.0,",  # not JSON
        b"[1e400]",  # past the largest double
        b"[100000000000000000000]",  # an integer past 64 bits
    ):
        assert _json_numbers(bad) is None, bad


def _is_integer_past_64_bits(text: str) -> bool:
    return "." not in text and "e" not in text.lower() and abs(int(text)) >= 2**63

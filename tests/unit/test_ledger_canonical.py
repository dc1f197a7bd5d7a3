"""The hand-assembled canonical posting bytes equal the reference json.dumps form, always."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from services.ledger import domain as d

_text = st.text(min_size=1, max_size=20)
_entry = st.builds(d.Entry, _text, _text, st.sampled_from([d.DEBIT, d.CREDIT]),
                   st.integers(1, 10**38 - 1))
_when = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                     timezones=st.just(UTC))
_metadata = st.dictionaries(_text, st.one_of(_text, st.integers(), st.none()), max_size=4)


@given(kind=st.sampled_from(sorted(d.POSTING_KINDS)), posting_id=_text,
       entries=st.lists(_entry, min_size=1, max_size=6), effective_at=_when,
       metadata=_metadata, refs=st.lists(_text, max_size=3),
       group=st.none() | _text, timeout=st.none() | _when)
def test_fast_bytes_equal_reference(kind, posting_id, entries, effective_at, metadata, refs,
                                    group, timeout) -> None:
    result = d.Result(command_id=posting_id, kind=kind, accepted=True, entries=tuple(entries),
                      effective_at=effective_at + timedelta(microseconds=1), metadata=metadata,
                      refs=tuple(refs), settlement_group=group, timeout_at=timeout)
    reference = json.dumps(d._canonical_posting_doc(result), sort_keys=True,
                           separators=(",", ":"), ensure_ascii=True).encode()
    assert d.canonical_posting_bytes(result) == reference

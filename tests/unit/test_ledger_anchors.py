"""Anchors for ``harbour verify --anchors``: what files are accepted and what is refused."""

from __future__ import annotations

import json

import pytest

from services.ledger.verify import Anchor, read_anchors


def test_reads_the_anchor_command_output_and_client_receipts_alike() -> None:
    digest = "ab" * 32
    receipt = {"command_id": "p1", "command_type": "post", "posting_id": "p1", "partition": 3,
               "sequence": 41, "hash": digest, "duplicate": False}  # a PostingAccepted payload
    lines = [json.dumps(Anchor(0, 7, bytes(32)).to_json()), "", json.dumps(receipt)]
    assert read_anchors(lines) == [Anchor(0, 7, bytes(32)), Anchor(3, 41, bytes.fromhex(digest))]


@pytest.mark.parametrize(("line", "reason"), [
    ("not json", "line 2"),
    ('{"partition": 0, "sequence": 1}', "without 'hash'"),
    ('{"partition": "0", "sequence": 1, "hash": "00"}', "integer partition"),
    ('{"partition": 0, "sequence": 1, "hash": "zz"}', "line 2"),
    ('[1, 2, 3]', "line 2"),
])
def test_a_bad_line_is_refused_with_its_number(line: str, reason: str) -> None:
    good = json.dumps(Anchor(0, 1, bytes(32)).to_json())
    with pytest.raises(ValueError, match=reason):
        read_anchors([good, line])

"""Pure parts of the deposits service layer: configuration, record keys, queue wake-ups."""

from __future__ import annotations

from datetime import UTC, datetime, time

import pytest

from services.deposits import accounts as acc
from services.deposits import calendar as cal
from services.deposits import domain as dm
from services.deposits.service import _ledger_record_key, _parties, _queues_to_wake
from services.deposits.settings import DEFAULT_CONFIG, DepositsSettings
from shared.events import deposits as ev
from shared.events.topics import (
    DEPOSITS_COMMANDS,
    DEPOSITS_EVENTS,
    DEPOSITS_GROUP,
    DEPOSITS_LEDGER_RESULTS,
    LEDGER_COMMANDS,
)
from tests.integration.deposits.harness import WINDOWED

U = "8a562c67-ca16-48ba-b074-65581be6f011"


def test_defaults_are_the_declared_topics_and_the_default_calendar(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("COMMANDS_TOPIC", "EVENTS_TOPIC", "GROUP_ID", "CONFIG_JSON", "CONFIG_FILE"):
        monkeypatch.delenv(f"HARBOUR_DEPOSITS_{name}", raising=False)
    s = DepositsSettings()
    assert (s.commands_topic, s.events_topic, s.ledger_commands_topic, s.ledger_results_topic,
            s.group_id) == (DEPOSITS_COMMANDS, DEPOSITS_EVENTS, LEDGER_COMMANDS,
                            DEPOSITS_LEDGER_RESULTS, DEPOSITS_GROUP)
    config = s.deposits_config()
    assert config == DEFAULT_CONFIG
    hkd = config.rules("HKD")
    assert hkd is not None and hkd.settlement_mode == "rtgs"
    assert hkd.window == cal.SettlementWindow(opens_at=time(8, 30), closes_at=time(18, 30))
    cnh = config.rules("CNH")
    assert cnh is not None and (cnh.settlement_mode, cnh.window) == ("wcbdc", None)


def test_the_configuration_comes_from_the_environment_as_json(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARBOUR_DEPOSITS_CONFIG_JSON", WINDOWED.model_dump_json())
    monkeypatch.setenv("HARBOUR_DEPOSITS_EVENTS_TOPIC", "deposits.events.test")
    s = DepositsSettings()
    assert s.deposits_config() == WINDOWED
    assert s.events_topic == "deposits.events.test"


def test_set_up_commands_share_their_streams_key_and_postings_follow_the_ledger() -> None:
    onboarding = acc.onboarding_requests("HSBCHKHH", DEFAULT_CONFIG.currencies["HKD"])
    keys = {_ledger_record_key(b"HSBCHKHH", r) for r in onboarding}
    assert keys == {b"HSBCHKHH"}  # one partition: assets before the accounts that hold them
    burn = acc.ledger_request("burn", f"td:{U}:burn", acc.burn_pending(
        U, "E", "HSBCHKHH", "alice", "HKD", 100, 2, 60))
    assert _ledger_record_key(b"x", burn) == acc.wallet_account("HSBCHKHH", "HKD",
                                                                "alice").encode()
    commit = acc.ledger_request("commit", f"td:{U}:commit", acc.commit_group(U))
    assert _ledger_record_key(b"x", commit) == acc.settlement_group(U).encode()


def _transfer(status: dm.TransferStatus, queued: bool) -> dm.Transfer:
    instruction = ev.TransferInstruction(
        uetr=U, end_to_end_id="E", payer_participant="HSBCHKHH", payer_wallet="alice",
        payee_participant="HASEHKHH", payee_wallet="bob", currency="HKD", amount="1.00")
    return dm.Transfer(instruction=instruction, status=status, route="interbank", mode="rtgs",
                       queued_since=datetime(2026, 1, 5, tzinfo=UTC) if queued else None)


def test_queues_wake_when_a_head_leaves_or_a_settlement_account_is_credited() -> None:
    queued = _transfer(dm.TransferStatus.QUEUED, True)
    left = _transfer(dm.TransferStatus.INTERBANK_REQUESTED, True)
    assert _queues_to_wake(queued, left, []) == {"HSBCHKHH:HKD"}
    assert _queues_to_wake(queued, queued, []) == frozenset()
    settled = ev.TransferSettled(uetr=U, end_to_end_id="E", route="interbank",
                                 settled_at=datetime(2026, 1, 5, tzinfo=UTC), posting_id="p")
    done = _transfer(dm.TransferStatus.SETTLED, False)
    assert _queues_to_wake(left, done, [settled]) == {"HASEHKHH:HKD"}
    funded = ev.SettlementAccountFunded(funding_id="F1", participant_id="HSBCHKHH",
                                        currency="HKD", amount="1.00", posting_id="td:fund:F1")
    assert _queues_to_wake(None, None, [funded]) == {"HSBCHKHH:HKD"}


def test_a_decision_names_its_parties_so_its_context_is_one_query() -> None:
    t = _transfer(dm.TransferStatus.QUEUED, True)
    banks, wallets, queue = _parties(t) or (None, None, None)
    assert banks == {"HSBCHKHH", "HASEHKHH"}
    assert wallets == {("HSBCHKHH", "alice"), ("HASEHKHH", "bob")}
    assert queue == ("HSBCHKHH:HKD", U)
    assert _parties(dm.Tick()) is None  # unknown until the stream is read

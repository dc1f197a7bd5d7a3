"""Deposits service settings (``HARBOUR_DEPOSITS_*``) and the default per-currency configuration.

Topics, group and timings come from the environment so that a deployment (or a test) can point the
service at its own topics. The per-currency rules (settlement mode, asset, calendar, window,
timeouts; TD-6, X-5) are configuration too: ``HARBOUR_DEPOSITS_CONFIG_JSON`` (a
:class:`~services.deposits.calendar.DepositsConfig` as JSON) or ``HARBOUR_DEPOSITS_CONFIG_FILE``
(a path to the same JSON) replace :data:`DEFAULT_CONFIG` as a whole.

The defaults follow DOMAIN.md 1.1: HKD and USD settle their interbank leg in CHATS (``rtgs``, the
EnsembleTX pilot), CHATS hours 08:30-18:30 Hong Kong time on Hong Kong business days [S]; CNH
settles in tokenised central-bank money (``wcbdc``, the Ensemble target), 24/7. The holiday list
is the Hong Kong general holidays of 2026 as gazetted [V]: ops must load each year's list (and
check it against HKICL's CHATS calendar) before relying on it.
"""

from __future__ import annotations

from datetime import date, time
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.events.topics import (
    DEPOSITS_COMMANDS,
    DEPOSITS_EVENTS,
    DEPOSITS_GROUP,
    DEPOSITS_LEDGER_RESULTS,
    LEDGER_COMMANDS,
)

from .calendar import BusinessCalendar, CurrencyRules, DepositsConfig, SettlementWindow

__all__ = ["DEFAULT_CONFIG", "DepositsSettings"]

HK_HOLIDAYS_2026 = frozenset({
    date(2026, 1, 1), date(2026, 2, 17), date(2026, 2, 18), date(2026, 2, 19),
    date(2026, 4, 3), date(2026, 4, 4), date(2026, 4, 6), date(2026, 4, 7), date(2026, 5, 1),
    date(2026, 5, 25), date(2026, 6, 19), date(2026, 7, 1), date(2026, 9, 26),
    date(2026, 10, 1), date(2026, 10, 19), date(2026, 12, 25), date(2026, 12, 26),
})
_HK = BusinessCalendar(timezone="Asia/Hong_Kong", holidays=HK_HOLIDAYS_2026)
_CHATS = SettlementWindow(opens_at=time(8, 30), closes_at=time(18, 30))

DEFAULT_CONFIG = DepositsConfig(currencies={
    "HKD": CurrencyRules(currency="HKD", scale=2, settlement_mode="rtgs",
                         settlement_asset="RTGS.HKD", calendar=_HK, window=_CHATS),
    "USD": CurrencyRules(currency="USD", scale=2, settlement_mode="rtgs",
                         settlement_asset="RTGS.USD", calendar=_HK, window=_CHATS),
    "CNH": CurrencyRules(currency="CNH", scale=2, settlement_mode="wcbdc",
                         settlement_asset="WCBDC.CNH", calendar=_HK, window=None),
})


class DepositsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HARBOUR_DEPOSITS_", extra="ignore", frozen=True)

    commands_topic: str = DEPOSITS_COMMANDS
    events_topic: str = DEPOSITS_EVENTS
    ledger_commands_topic: str = LEDGER_COMMANDS
    ledger_results_topic: str = DEPOSITS_LEDGER_RESULTS
    """The reply topic named in every ledger command (the ledger answers there)."""
    group_id: str = DEPOSITS_GROUP
    """Consumer group of the service's consumer; its dead letters go to ``<group>.dlq``."""
    batch_wait_ms: int = Field(5, ge=1)
    """How long a poll waits for records (FastStream sleeps as long again after an empty one:
    at most this much latency added to a record that arrives while the service is idle)."""
    max_batch: int = Field(500, ge=1)
    """Records per batch at most (services/deposits/router.py): decided in order, recorded in
    one transaction. Batches are whatever arrived since the last one, so they stay small when
    the load is light and latency does not wait for them to fill."""
    max_attempts: int = Field(5, ge=1)
    """Tries of a failing record before it is dead-lettered (errors that may be transient; a
    database outage is waited out, never dead-lettered)."""
    tick_interval_s: float = Field(1.0, gt=0)
    """How often the scheduler looks for due wake-ups (windows opening, deadlines)."""
    queue_retry_interval_s: float = Field(5.0, gt=0)
    """How often the head of every non-empty settlement queue is retried regardless (TD-5)."""
    relay_linger_ms: int = Field(0, ge=0)
    """Producer linger of the outbox relay: every saga step waits for one publish, so batching
    delay is paid up to four times per transfer."""
    relay_batch: int = Field(500, ge=1)
    relay_poll_s: float = Field(0.5, gt=0)
    pool_size: int = Field(10, ge=2)
    state_cache: int = Field(20_000, ge=0)
    """Decided stream states kept in memory (only newer events are read from the store)."""
    metrics_port: int = Field(9102, ge=0, le=65535)
    """Prometheus ``/metrics`` (services/deposits/metrics.py) on this port; 0: none."""
    metrics_refresh_s: float = Field(5.0, gt=0)
    """How often the settlement-queue gauges are read from the database."""
    config_json: str | None = None
    config_file: Path | None = None

    def deposits_config(self) -> DepositsConfig:
        """The per-currency rules: the JSON or file given, else :data:`DEFAULT_CONFIG`."""
        if self.config_json:
            return DepositsConfig.model_validate_json(self.config_json)
        if self.config_file is not None:
            return DepositsConfig.model_validate_json(self.config_file.read_text())
        return DEFAULT_CONFIG

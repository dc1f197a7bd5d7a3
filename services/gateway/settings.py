"""Gateway settings (``HARBOUR_GATEWAY_*``).

================================================  =========  ======================================
variable                                          default    meaning
================================================  =========  ======================================
``HARBOUR_GATEWAY_HOST``                          127.0.0.1  listen address (``0.0.0.0`` in a
                                                             container)
``HARBOUR_GATEWAY_PORT``                          18080      listen port
``HARBOUR_GATEWAY_MAX_BODY_BYTES``                16384      larger request bodies get 413
``HARBOUR_GATEWAY_RATE_PER_S``                    200        token refill per API key and second
``HARBOUR_GATEWAY_RATE_BURST``                    400        bucket size per API key
``HARBOUR_GATEWAY_COMMANDS_TOPIC``                deposits.  where deposit commands are published
                                                  commands
``HARBOUR_GATEWAY_PUBLISH_TIMEOUT_S``             10         broker confirmation wait, then 503
``HARBOUR_GATEWAY_IDEMPOTENCY_RETENTION_H``       168        Idempotency-Key rows kept this long
``HARBOUR_GATEWAY_PUBLIC_DOCS``                   true       serve /docs and /openapi.json without
                                                             a key (no data in them)
================================================  =========  ======================================

The rate limit is a token bucket in each gateway process: with N instances behind a load
balancer a key may get up to N times the rate.
"""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.events.topics import DEPOSITS_COMMANDS

DEFAULT_PORT = 18080


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HARBOUR_GATEWAY_", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(DEFAULT_PORT, ge=1, le=65535)
    max_body_bytes: int = Field(16 * 1024, ge=256, le=1024 * 1024)
    rate_per_s: float = Field(200.0, gt=0)
    rate_burst: int = Field(400, ge=1)
    commands_topic: str = DEPOSITS_COMMANDS
    publish_timeout_s: float = Field(10.0, gt=0)
    idempotency_retention_h: int = Field(168, ge=1)
    public_docs: bool = True
    pool_min_size: int = Field(2, ge=1)
    pool_max_size: int = Field(20, ge=1)

    @property
    def stale_claim_s(self) -> float:
        """After this long an unfinished Idempotency-Key claim may be taken over by a retry:
        longer than any request can hold it (publish timeout plus database time)."""
        return self.publish_timeout_s + 5.0


class GatewayClientSettings(BaseSettings):
    """What the ``harbour`` client commands need: ``HARBOUR_GATEWAY_URL`` and
    ``HARBOUR_API_KEY`` (never a command-line option: it would land in shell history)."""

    model_config = SettingsConfigDict(env_prefix="HARBOUR_", extra="ignore", frozen=True)

    gateway_url: str = f"http://127.0.0.1:{DEFAULT_PORT}"
    api_key: SecretStr | None = None
    gateway_timeout_s: float = Field(30.0, gt=0)

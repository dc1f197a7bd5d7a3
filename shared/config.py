"""Settings from the environment (``HARBOUR_`` prefix), one class per concern.

Nothing here connects to anything: settings are plain data, read when a composition root asks.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class _HarbourSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HARBOUR_", extra="ignore", frozen=True)


class KafkaSettings(_HarbourSettings):
    """Where the Kafka cluster is and how clients identify themselves."""

    kafka_bootstrap: str = Field("127.0.0.1:19092", description="host:port[,host:port...]")
    client_id: str = "harbour"


class PostgresSettings(_HarbourSettings):
    """The PostgreSQL database that holds the ledger and every service's own schema."""

    database_url: str = Field(
        "postgresql://postgres@127.0.0.1:15432/harbour",
        description="postgresql:// URL; secrets come from the environment, never code",
    )
    pool_min_size: int = 2
    pool_max_size: int = 10


class StackSettings(_HarbourSettings):
    """The local stack that ``make up`` and the test fixtures start when nothing else is given."""

    home: Path = Field(Path(".harbour"), description="state directory of the local stack")
    kafka_port: int = 19092
    kafka_controller_port: int = 19093
    postgres_port: int = 15432
    kafka_version: str = "4.4.0"
    cache_dir: Path = Field(
        Path.home() / ".cache" / "harbour",
        description="where Maven copies the Kafka jars; outside the repository",
    )
    kafka_heap: str = "1g"

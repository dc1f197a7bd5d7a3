"""Topic administration: create the declared topics idempotently."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from shared.events.topics import TopicSpec


async def ensure_topics(bootstrap: str, specs: Iterable[TopicSpec]) -> list[str]:
    """Create every topic in ``specs`` that does not exist yet; return the names created.

    Existing topics are left as they are (partitions are never shrunk; growing them is an
    operator's decision because it moves keys between partitions).
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        if not missing:
            return []
        new = [NewTopic(s.name, s.partitions, 1, topic_configs=s.config()) for s in missing]
        # Another process may create one between list and create: the goal is met all the same.
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics(new, timeout_ms=30000)
        return [s.name for s in missing]
    finally:
        await admin.close()

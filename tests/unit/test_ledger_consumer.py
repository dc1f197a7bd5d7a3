"""The ledger writer loop's reliance on aiokafka internals, checked against the installed one."""

from __future__ import annotations

import inspect

from aiokafka import AIOKafkaConsumer
from aiokafka.consumer.fetcher import Fetcher


def test_the_fetcher_builds_each_request_from_the_settings_the_loop_changes() -> None:
    # WriterLoop._fetch_settings switches fetch_min_bytes / fetch_max_wait_ms between fetches by
    # setting the fetcher's attributes. If aiokafka renamed them, the switch would do nothing
    # and nobody would notice: the writer would just fetch less efficiently.
    built = inspect.getsource(Fetcher._get_actions_per_node)
    assert "self._fetch_min_bytes" in built and "self._fetch_max_wait_ms" in built
    init = inspect.getsource(Fetcher.__init__)
    assert "self._fetch_min_bytes = fetch_min_bytes" in init
    assert "self._fetch_max_wait_ms = fetch_max_wait_ms" in init
    assert "self._fetcher = Fetcher(" in inspect.getsource(AIOKafkaConsumer.start)


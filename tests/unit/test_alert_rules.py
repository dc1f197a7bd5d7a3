"""The shipped Prometheus alert rules (deploy/prometheus/alerts.yml) name only metrics that the
services serve: a renamed metric must not silence an alert without anyone noticing."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from prometheus_client import REGISTRY, CollectorRegistry

import shared.messaging.dlq  # noqa: F401  (registers the dead-letter counters)
from services.deposits.metrics import DepositsMetrics
from services.ledger.metrics import WriterMetrics
from shared.store.outbox import RelayStats

_DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
_NAME = re.compile(r"\b(harbour_[a-z_]+)")


_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def _served(*registries: CollectorRegistry) -> set[str]:
    """Every series name the registries can expose, as a scrape shows them (counters as
    ``_total``, histograms as ``_bucket``/``_sum``/``_count``), labelled ones that have no
    series yet (a partition not assigned so far) included."""
    names: set[str] = set()
    for registry in registries:
        for family in registry.collect():
            names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ()))
            names.update(sample.name for sample in family.samples)
    return names


def _served_by_harbour() -> set[str]:
    ledger = WriterMetrics()
    ledger.watch_relay(RelayStats())
    deposits = DepositsMetrics()

    class _Scheduler:
        ticks = 0
        retries = 0

    deposits.watch(scheduler=_Scheduler(), relay=RelayStats())
    return _served(ledger.registry, deposits.registry, REGISTRY)


def test_every_alert_names_served_metrics() -> None:
    rules = yaml.safe_load((_DEPLOY / "alerts.yml").read_text())
    served = _served_by_harbour()
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert len(alerts) >= 10
    for rule in alerts:
        names = set(_NAME.findall(rule["expr"]))
        assert names, rule["alert"]
        assert names <= served, (rule["alert"], sorted(names - served))


def test_prometheus_scrapes_every_service_and_loads_the_rules() -> None:
    config = yaml.safe_load((_DEPLOY / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for c in job["static_configs"]
               for t in c["targets"]}
    assert targets == {"ledger:9101", "deposits:9102", "gateway:18080"}
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]

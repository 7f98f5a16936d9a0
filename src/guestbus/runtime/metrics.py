"""Metric children looked up once per label set, for the per-request paths."""

from __future__ import annotations

from typing import Any

from prometheus_client.metrics import MetricWrapperBase


class Children:
    """``metric.labels(*values)``, remembered: ``labels()`` takes a lock and builds its key on
    every call, which a guest RPC or host command paid several times over. Only for metrics
    whose label values come from a small fixed set (methods, outcomes, link kinds)."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: MetricWrapperBase) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child

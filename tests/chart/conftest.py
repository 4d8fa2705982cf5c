"""Render the chart with the real Helm SDK (helm-python-sdk), offline."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import helm_python as helm
import pytest
import yaml
from chart_harness import CHART, Render


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture
def render(chart: helm.Chart) -> Render:
    """Values in, the rendered objects out (NOTES.txt and empty documents left out)."""

    def _render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        rendered = chart.render(
            values or {}, name="radixserve", namespace="radixserve-system", is_install=True
        )
        objects = []
        for path, text in sorted(rendered.items()):
            if path.endswith("NOTES.txt"):
                continue
            objects += [doc for doc in yaml.safe_load_all(text) if doc]
        return objects

    return _render

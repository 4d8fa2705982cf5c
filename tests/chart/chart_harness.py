"""Names shared by the chart tests (a module of its own: every tests/ folder has a conftest)."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

CHART = pathlib.Path(__file__).resolve().parents[2] / "charts" / "radixserve"

Render = Callable[..., list[dict[str, Any]]]

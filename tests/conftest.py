"""Shared test settings: tests under tests/integration are marked `integration`, those under
tests/e2e `e2e`."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.path):
            item.add_marker(pytest.mark.integration)
        if "tests/e2e" in str(item.path):
            item.add_marker(pytest.mark.e2e)

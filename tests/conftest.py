"""Shared fixtures. Helpers of one area keep their own fixtures in their test modules."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def odd_tmp(tmp_path: Path) -> Path:
    """A temp folder whose path holds a space and non-ASCII characters (é, 日本)."""
    p = tmp_path / "my data é 日本"
    p.mkdir()
    return p

"""Shared fixtures. Helpers of one area keep their own fixtures in their test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# a report section that fails raises in tests (a bug there was shown as "values edgemap does not write"); the
# tests of hand-edited values turn it off
os.environ["EDGEMAP_REPORT_STRICT"] = "1"


@pytest.fixture
def odd_tmp(tmp_path: Path) -> Path:
    """A temp folder whose path holds a space and non-ASCII characters (é, 日本)."""
    p = tmp_path / "my data é 日本"
    p.mkdir()
    return p

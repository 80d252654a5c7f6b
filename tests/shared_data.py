"""Where the tests find the real data nobody here made: ``../shared/data`` beside the checkout (never copied in)."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CAPTURES = DATA / "iot-sentinel" / "captures"
DOMAINS = DATA / "supplychain-domains" / "device_domains.csv"

needs_data = pytest.mark.skipif(not CAPTURES.is_dir(), reason=f"../shared/data is not beside the checkout ({DATA})")

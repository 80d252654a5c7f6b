"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest

from tests.dns_helpers import Dnsmasq


@pytest.fixture
def upstream(tmp_path):
    server = Dnsmasq(tmp_path)
    server.start()
    yield server
    server.stop()

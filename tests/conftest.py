"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

from tests.dns_helpers import Dnsmasq

# Property tests check behaviour, not speed: on a loaded CI machine a single example can take far longer than
# hypothesis's 200 ms default deadline, which made them fail for timing alone. Speed is for benchmarks/.
settings.register_profile("iotgw", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("iotgw")


@pytest.fixture
def upstream(tmp_path):
    server = Dnsmasq(tmp_path)
    server.start()
    yield server
    server.stop()

"""A factory fixture that serves an engine on 127.0.0.1:0 and cleans up after."""
from __future__ import annotations

import pytest

from tests.service.served import TENANTS, TOKEN, ServiceStarter  # noqa: F401  (tests import them here)


@pytest.fixture
def make_service():
    # A short health poll, so tests see an engine's death quickly.
    starter = ServiceStarter("chat-test", health_poll_interval=0.02)
    yield starter.start
    starter.stop_all()

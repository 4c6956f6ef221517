"""Fixtures that start real Celery workers on the real brokers."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

from tests.integration._workers import BROKERS

if TYPE_CHECKING:
    from celery import Celery


@pytest.fixture(params=sorted(BROKERS))
def broker(request: pytest.FixtureRequest) -> str:
    """Each broker the tests run on."""
    return BROKERS[str(request.param)]


@pytest.fixture
def queue() -> str:
    """A queue of this test's own, so leftovers of other tests never reach it."""
    return f"warden-test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def send(broker: str, queue: str) -> Iterator[Callable[..., None]]:
    """Send tasks of the test app to this test's queue."""
    from celery import Celery

    app = Celery("warden_testapp_client", broker=broker)
    app.conf.broker_connection_retry_on_startup = True

    def _send(name: str, count: int = 1, *args: object) -> None:
        with app.producer_or_acquire() as producer:
            for _ in range(count):
                app.send_task(name, args=args, queue=queue, producer=producer)

    yield _send
    app.close()


@pytest.fixture
def client() -> Iterator[Celery]:
    """A client app on Redis, to send tasks by name to a test's worker."""
    from celery import Celery

    app = Celery("warden_test_client", broker=BROKERS["redis"])
    app.conf.broker_connection_retry_on_startup = True
    yield app
    app.close()

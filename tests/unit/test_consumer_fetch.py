"""Portal input is fetched with a short broker wait: while a consumer handles a record, its next
fetch leaves that partition out, and a record that then arrives there waits for that fetch to
return (aiokafka's default: up to 500 ms, the tail of login's latency). Other topics keep the
default (fewer idle fetches)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from shared.consumer import Route
from shared.runtime import FETCH_MAX_WAIT_MS, Service
from shared.schemas import Payload
from shared.settings import PlatformSettings
from shared.store import ServiceStore
from shared.topics import LOGIN_CHECKS, PASSWORD_UPDATED, PORTAL_INPUTS, RECOVERY_RESETS


async def _nothing(ctx: Any, data: Any) -> None:
    return None


ROUTES = {"ec.clave.test.v1": Route(Payload, _nothing)}


def fetch_waits(settings: PlatformSettings) -> dict[str, int]:
    """Each topic's fetch wait, as its lane's consumer was built (PASSWORD_UPDATED on a lane of
    its own, portal input on the main lane)."""
    service = Service("test", ServiceStore(settings.mongodb_uri, "clave_unit_fetch"), settings)
    for topic in PORTAL_INPUTS:
        service.consume(topic, ROUTES, hot=topic in (LOGIN_CHECKS, RECOVERY_RESETS))
    service.consume(PASSWORD_UPDATED, ROUTES, lane="internal")
    service.subscribe()
    return {
        topic: subscriber._connection_args["fetch_max_wait_ms"]
        for topic, subscriber in zip(service._consumed_topics, service._subscribers, strict=True)
    }


def test_a_lane_with_portal_input_shares_its_short_wait() -> None:
    settings = PlatformSettings(clave_env="development")
    service = Service("test", ServiceStore(settings.mongodb_uri, "clave_unit_fetch"), settings)
    service.consume(PASSWORD_UPDATED, ROUTES)
    service.consume(LOGIN_CHECKS, ROUTES)
    service.subscribe()
    assert [s._connection_args["fetch_max_wait_ms"] for s in service._subscribers] == [50, 50]


def test_portal_inputs_wait_briefly_at_the_broker_and_other_topics_the_default() -> None:
    waits = fetch_waits(PlatformSettings(clave_env="development"))
    assert {t: waits[t] for t in PORTAL_INPUTS} == {t: 50 for t in PORTAL_INPUTS}
    assert waits[PASSWORD_UPDATED] == FETCH_MAX_WAIT_MS == 500


def test_the_wait_is_a_setting_and_holds_with_several_workers() -> None:
    settings = PlatformSettings(clave_env="development", portal_fetch_max_wait_ms=20, consumer_workers=3)
    waits = fetch_waits(settings)
    assert {t: waits[t] for t in PORTAL_INPUTS} == {t: 20 for t in PORTAL_INPUTS}


@pytest.mark.parametrize("value", [0, 5, 501])
def test_a_wait_that_would_busy_loop_or_undo_the_point_is_refused(value: int) -> None:
    with pytest.raises(ValidationError, match="portal_fetch_max_wait_ms"):
        PlatformSettings(clave_env="development", portal_fetch_max_wait_ms=value)


def test_no_consumers_is_refused() -> None:
    with pytest.raises(ValidationError, match="consumer_workers"):
        PlatformSettings(clave_env="development", consumer_workers=0)

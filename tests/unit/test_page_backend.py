"""The page's backend on the real `clave_portal` client (no broker: answers are fed to the
client as Clave would send them): the login answer keeps `must_change`, which the client's
bool `check_credentials` cannot carry."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from clave_page.backend import LoginAnswer
from clave_page.portal_backend import PortalBackend
from clave_portal import events as ev

from tests.unit.test_portal_client import answer_the_login, client, parsed


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        ({"status": "valid", "reasons": [], "must_change": False}, LoginAnswer(valid=True, must_change=False)),
        ({"status": "valid", "reasons": [], "must_change": True}, LoginAnswer(valid=True, must_change=True)),
        ({"status": "invalid", "reasons": ["key_invalid"], "must_change": False}, LoginAnswer(valid=False)),
        # An older Clave that does not send the field: a plain right key.
        ({"status": "valid", "reasons": []}, LoginAnswer(valid=True, must_change=False)),
    ],
)
async def test_the_page_backend_answers_the_full_login_result(result: dict[str, Any], expected: LoginAnswer) -> None:
    c, producer = client()
    backend = PortalBackend(c)
    task = asyncio.create_task(backend.login("1710034065", "abc", "2001:db8::1"))
    await answer_the_login(c, producer, result)
    assert await asyncio.wait_for(task, 2) == expected
    topic, key, event = parsed(producer.sent[0])
    assert (topic, key) == (ev.LOGIN_CHECKS, "1710034065")
    assert event["data"]["client_ip"] == "2001:db8::1"

"""Notifier rules: retry policy, SMTP error classes, recovery links and Message-IDs."""

from __future__ import annotations

import email
import email.policy
import re
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.notifier.domain import (
    RetryPolicy,
    State,
    is_permanent,
    mail_time,
    message_id,
    notification_id,
    recovery_link,
    unlock_minutes,
)

NOW = datetime(2025, 3, 9, 12, 0, tzinfo=UTC)


# ------------------------------------------------------------------ retry policy


def test_default_backoff_sequence_doubles_then_caps() -> None:
    policy = RetryPolicy()
    delays = [policy.next_delay(n) for n in range(1, 10)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_next_delay_for_zero_attempts_is_initial() -> None:
    assert RetryPolicy(initial=2.0).next_delay(0) == 2.0


@given(
    st.floats(min_value=0.01, max_value=10),
    st.floats(min_value=0.01, max_value=600),
    st.integers(min_value=1, max_value=60),
)
def test_backoff_monotonic_and_capped(initial: float, maximum: float, attempts: int) -> None:
    policy = RetryPolicy(max_attempts=100, initial=initial, maximum=maximum)
    d = policy.next_delay(attempts)
    assert 0 < d <= maximum
    assert policy.next_delay(attempts + 1) >= d
    if d < maximum:
        assert policy.next_delay(attempts + 1) == pytest.approx(min(2 * d, maximum))


def test_backoff_capped_for_very_many_attempts() -> None:
    policy = RetryPolicy(max_attempts=5000)
    assert policy.next_delay(2000) == policy.maximum
    state, when = policy.after_failure(2000, permanent=False, now=NOW)
    assert state == State.PENDING and when == NOW + timedelta(seconds=policy.maximum)


def test_after_failure_retries_with_backoff_until_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=4, initial=1.0, maximum=30.0)
    schedule = [policy.after_failure(n, permanent=False, now=NOW) for n in range(1, 5)]
    assert schedule[:3] == [
        (State.PENDING, NOW + timedelta(seconds=1)),
        (State.PENDING, NOW + timedelta(seconds=2)),
        (State.PENDING, NOW + timedelta(seconds=4)),
    ]
    assert schedule[3] == (State.FAILED, None)
    assert policy.after_failure(99, permanent=False, now=NOW) == (State.FAILED, None)


def test_permanent_failure_gives_up_at_once() -> None:
    assert RetryPolicy().after_failure(1, permanent=True, now=NOW) == (State.FAILED, None)


def test_default_policy_gives_up_after_eight_attempts() -> None:
    policy = RetryPolicy()
    states = [policy.after_failure(n, permanent=False, now=NOW)[0] for n in range(1, 9)]
    assert states == [State.PENDING] * 7 + [State.FAILED]
    total_wait = sum(policy.next_delay(n) for n in range(1, 8))
    assert total_wait == pytest.approx(0.5 + 1 + 2 + 4 + 8 + 16 + 30)


@pytest.mark.parametrize("code", [500, 501, 550, 552, 553, 554, 599])
def test_5xx_is_permanent(code: int) -> None:
    assert is_permanent(code)


@pytest.mark.parametrize("code", [None, 250, 400, 421, 450, 451, 452, 499, 600, 0])
def test_4xx_and_connection_errors_are_temporary(code: int | None) -> None:
    assert not is_permanent(code)


# ------------------------------------------------------------------ recovery link

unsafe_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)


@given(unsafe_text, unsafe_text)
def test_recovery_link_round_trips_any_values(request_id: str, token: str) -> None:
    link = recovery_link("https://portal.example.gob.ec/", request_id, token)
    parts = urlsplit(link)
    assert parts.scheme == "https"
    assert parts.netloc == "portal.example.gob.ec"
    assert parts.path == "/recuperar"
    assert parts.fragment == ""
    assert parse_qs(parts.query, keep_blank_values=True, strict_parsing=True) == {
        "request_id": [request_id],
        "token": [token],
    }
    assert not re.search(r"[\s<>\"#]", link)


def test_recovery_link_escapes_special_characters() -> None:
    link = recovery_link("https://p.example", "req&token=evil#x", "a+b/c=d?e f%")
    assert "&token=evil" not in link
    assert "#" not in link
    q = parse_qs(urlsplit(link).query)
    assert q == {"request_id": ["req&token=evil#x"], "token": ["a+b/c=d?e f%"]}


@pytest.mark.parametrize(
    ("base", "expected_prefix"),
    [
        ("https://p.example", "https://p.example/recuperar?"),
        ("https://p.example/", "https://p.example/recuperar?"),
        ("https://p.example//", "https://p.example/recuperar?"),
        ("https://p.example/iess/", "https://p.example/iess/recuperar?"),
    ],
)
def test_recovery_link_base_url(base: str, expected_prefix: str) -> None:
    assert recovery_link(base, "r1", "t1").startswith(expected_prefix)


# ------------------------------------------------------------------ ids


def test_notification_id() -> None:
    assert notification_id("evt-1", "recovery_link") != notification_id("evt-1", "password_changed")
    assert notification_id("evt-1", "k") != notification_id("evt-2", "k")


@given(st.text(min_size=1, max_size=80))
def test_message_id_deterministic_and_rfc5322_shaped(nid: str) -> None:
    mid = message_id(nid)
    assert mid == message_id(nid)
    assert re.fullmatch(r"<[0-9a-f]{32}@clave>", mid)


@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
def test_message_id_distinct_for_distinct_notifications(a: str, b: str) -> None:
    if a != b:
        assert message_id(a) != message_id(b)


def test_message_id_parses_as_header_without_defects() -> None:
    mid = message_id(notification_id("2f1c7d2e-1111-4222-8333-944445555666", "recovery_link"))
    msg = email.message_from_string(f"Message-ID: {mid}\n\nbody\n", policy=email.policy.default)
    header = msg["Message-ID"]
    assert str(header) == mid
    assert not header.defects


# ------------------------------------------------------------------ what a mail states


def test_a_mail_states_a_moment_to_the_minute_in_utc() -> None:
    assert mail_time(NOW + timedelta(seconds=59)) == "2025-03-09 12:00 UTC"


@pytest.mark.parametrize(
    ("left", "told"), [(timedelta(minutes=15), 15), (timedelta(minutes=15, seconds=59), 15), (timedelta(seconds=5), 1)]
)
def test_a_locked_out_owner_is_told_whole_minutes_never_zero(left: timedelta, told: int) -> None:
    assert unlock_minutes(NOW, NOW + left) == told

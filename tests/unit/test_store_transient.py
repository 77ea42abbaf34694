"""Which store errors are an outage (retried with a back-off) and which belong to the item
(shared.store.is_transient). A client bulkWrite wraps what stopped it in a
ClientBulkWriteException (code 65, no labels): a store restart in the middle of one was once
taken for a fault of the item, and a mail the SMTP server had accepted was failed for good
(fault suite, store stopped 10 s)."""

from __future__ import annotations

from typing import Any

import pytest
from pymongo.errors import AutoReconnect, ClientBulkWriteException, DuplicateKeyError, NetworkTimeout, OperationFailure

from shared.loops import is_outage
from shared.store import is_transient


def bulk_error(**details: Any) -> ClientBulkWriteException:
    return ClientBulkWriteException(
        {"error": None, "writeErrors": [], "writeConcernErrors": [], "anySuccessful": False, **details}, verbose=True
    )


@pytest.mark.parametrize(
    "cause",
    [AutoReconnect("connection closed"), NetworkTimeout("timed out"), OperationFailure("shutting down", 91)],
    ids=["connection lost", "timeout", "shutdown in progress"],
)
def test_a_bulk_write_stopped_by_the_store_going_away_is_an_outage(cause: Exception) -> None:
    exc = bulk_error(error=cause)
    assert is_transient(exc) and is_outage(exc)


def test_a_bulk_write_whose_command_failed_with_a_retryable_reply_is_an_outage() -> None:
    assert is_transient(bulk_error(error={"ok": 0, "code": 11600, "errmsg": "interrupted at shutdown"}))
    labelled = {"ok": 0, "code": 251, "errorLabels": ["TransientTransactionError"]}
    assert is_transient(bulk_error(error=labelled))


def test_a_bulk_write_refused_for_its_own_content_is_not_an_outage() -> None:
    duplicate = bulk_error(writeErrors=[{"idx": 0, "code": 11000, "errmsg": "E11000 duplicate key"}])
    assert not is_transient(duplicate) and not is_outage(duplicate)
    assert not is_transient(bulk_error(error={"ok": 0, "code": 2, "errmsg": "bad value"}))
    assert not is_transient(bulk_error())  # nothing says retry: the item's


def test_write_errors_that_all_say_retry_are_an_outage_and_a_mix_is_not() -> None:
    assert is_transient(bulk_error(writeErrors=[{"idx": 0, "code": 91, "errmsg": "shutdown"}]))
    mixed = [{"idx": 0, "code": 91, "errmsg": "shutdown"}, {"idx": 1, "code": 11000, "errmsg": "dup"}]
    assert not is_transient(bulk_error(writeErrors=mixed))


def test_the_plain_errors_keep_their_meaning() -> None:
    assert is_transient(AutoReconnect("gone"))
    assert is_transient(OperationFailure("write conflict", 112))
    assert not is_transient(DuplicateKeyError("dup", 11000))
    assert not is_transient(OperationFailure("bad value", 2))

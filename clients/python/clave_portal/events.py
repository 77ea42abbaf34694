"""Topic names, event types and CloudEvents 1.0 envelopes (structured JSON mode), as the
contract states them (docs/asyncapi.yaml). Names are only ever added to."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any, Final

CONTENT_TYPE: Final = "application/cloudevents+json; charset=UTF-8"

# Topics the portal writes.
RECOVERY_REQUESTS: Final = "recovery.requests"  # keyed by national ID
RECOVERY_RESETS: Final = "recovery.resets"  # keyed by request_id
LOGIN_CHECKS: Final = "login.checks"  # keyed by national ID
CONTACT_UPDATES: Final = "account.contact_updates"  # keyed by national ID
# Topics the portal reads.
RECOVERY_OUTCOMES: Final = "recovery.outcomes"  # keyed by request_id
LOGIN_RESULTS: Final = "login.results"  # keyed by check_id
ACCOUNT_KEY_CHANGED: Final = "account.key_changed"  # keyed by national ID
CONTACT_RESULTS: Final = "account.contact_results"  # keyed by update_id

RECOVERY_REQUESTED: Final = "ec.clave.recovery.requested.v1"
RESET_SUBMITTED: Final = "ec.clave.reset.submitted.v1"
RECOVERY_OUTCOME: Final = "ec.clave.recovery.outcome.v1"
LOGIN_CHECK_REQUESTED: Final = "ec.clave.login.check_requested.v1"
LOGIN_RESULT: Final = "ec.clave.login.result.v1"
ACCOUNT_KEY_CHANGED_TYPE: Final = "ec.clave.account.key_changed.v1"
CONTACT_UPDATE_REQUESTED: Final = "ec.clave.account.contact_update_requested.v1"
CONTACT_RESULT: Final = "ec.clave.account.contact_result.v1"


def cloud_event(event_type: str, data: dict[str, Any], *, source: str, correlationid: str) -> dict[str, Any]:
    """A CloudEvents 1.0 event: a fresh id, the time now (UTC), and `correlationid` (the
    request_id or check_id the answer will carry)."""
    return {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": source,
        "type": event_type,
        "time": datetime.now(UTC).isoformat(),
        "datacontenttype": "application/json",
        "correlationid": correlationid,
        "data": data,
    }


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()

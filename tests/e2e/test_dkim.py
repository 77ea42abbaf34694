"""Mail that lands in the inbox: every message the notifier sends carries a DKIM signature
that dkimpy's verifier accepts against the record the local stack publishes (as DNS would
serve it: $VAR_DIR/dkim/<selector>._domainkey.<domain>.txt, see deploy/local/dkim_key.py)."""

from __future__ import annotations

import os
from pathlib import Path

import dkim
import pytest

from tests.e2e.conftest import World
from tools.mail import body_text
from tools.testdata import new_key

pytestmark = pytest.mark.e2e


def published() -> dict[str, bytes]:
    folder = Path(os.environ.get("VAR_DIR", "var")) / "dkim"
    return {p.name.removesuffix(".txt"): p.read_bytes().strip() for p in folder.glob("*.txt")}


def lookup(records: dict[str, bytes]):  # type: ignore[no-untyped-def]
    def txt(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name.decode().rstrip("."))

    return txt


async def test_recovery_and_key_changed_mails_verify_against_the_published_key(world: World) -> None:
    records = published()
    assert records, "the stack publishes its DKIM record in $VAR_DIR/dkim/"
    c = await world.citizen()
    rid = await world.request(c)
    _, token = await world.recovery_mail(rid)
    await world.portal.submit_reset(rid, new_key(), token=token)
    assert (await world.portal.wait_outcome(rid, "reset"))["status"] == "completed"
    await world.mailbox.wait_for(lambda m: c.email in str(m["To"]) and "recuperar?" not in body_text(m))

    files = [path for path, m in world.mailbox.messages() if c.email in str(m["To"])]
    assert len(files) == 2  # the link, then "your key was changed"
    for path in files:
        raw = path.read_bytes()  # exactly what the SMTP server received (after the catcher's envelope lines)
        assert b"\nDKIM-Signature:" in raw
        assert dkim.verify(raw, dnsfunc=lookup(records)), path.name
        # The signature covers the body and the headers that matter: a changed link fails.
        assert not dkim.verify(raw.replace(b"recuperar", b"recuperaR"), dnsfunc=lookup(records)) or (
            b"recuperar" not in raw
        )
        assert not dkim.verify(raw.replace(b"\nSubject: ", b"\nSubject: RE: ", 1), dnsfunc=lookup(records))

"""Local SMTP capture server: every accepted message becomes one `.eml` file.

    .venv/bin/python deploy/local/mailcatcher.py      (deploy/local/stack.py starts it)

Environment: SMTP_HOST / SMTP_PORT (listen address, default 127.0.0.1:1025), MAIL_DIR
(default var/mail), VAR_DIR (default var; fault flags live in VAR_DIR/run).

Files are named `<UTC timestamp>-<pid>-<counter>.eml` (sortable by arrival) and appear
atomically: the message is written to a hidden temporary name in MAIL_DIR, flushed,
then renamed, so a reader never sees half a message.  Two headers are prepended to
what the client sent: `X-Envelope-From` and `X-Envelope-To` (the SMTP envelope, which
can differ from the From/To headers).

Fault injection, checked on every RCPT and at the end of every DATA:
  VAR_DIR/run/smtp-tempfail exists -> 451 4.3.0 Temporary failure (injected)
  VAR_DIR/run/smtp-permfail exists -> 550 5.7.1 Rejected (injected)
(tempfail wins when both exist).  Remove the file to return to normal.

Logs one line per message (envelope, subject, file; never the body, which holds the
recovery link and code) to stderr; the stack redirects it to VAR_DIR/log/mailcatcher.log.
SIGTERM / SIGINT close the listener and exit 0.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import itertools
import logging
import os
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

log = logging.getLogger("mailcatcher")

TEMPFAIL = "451 4.3.0 Temporary failure (injected)"
PERMFAIL = "550 5.7.1 Rejected (injected)"


class CaptureHandler:
    def __init__(self, mail_dir: Path, run_dir: Path) -> None:
        self.mail_dir = mail_dir
        self.tempfail_flag = run_dir / "smtp-tempfail"
        self.permfail_flag = run_dir / "smtp-permfail"
        self.counter = itertools.count(1)

    def injected_failure(self) -> str | None:
        if self.tempfail_flag.exists():
            return TEMPFAIL
        if self.permfail_flag.exists():
            return PERMFAIL
        return None

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        failure = self.injected_failure()
        if failure:
            log.info("RCPT %s from %s refused: %s", address, session.peer, failure)
            return failure
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        failure = self.injected_failure()
        if failure:
            log.info("DATA from %s refused: %s", session.peer, failure)
            return failure
        content = envelope.original_content or b""
        header = (
            f"X-Envelope-From: <{envelope.mail_from}>\r\n"
            f"X-Envelope-To: {', '.join(f'<{r}>' for r in envelope.rcpt_tos)}\r\n"
        ).encode()
        try:
            path = self.store(header + content)
        except OSError as exc:
            log.error("cannot store message: %s", exc)
            return "451 4.3.0 Local error in processing (cannot store message)"
        log.info(
            "accepted from=<%s> to=%s subject=%r size=%d file=%s",
            envelope.mail_from,
            envelope.rcpt_tos,
            subject_of(content),
            len(content),
            path.name,
        )
        return "250 2.0.0 OK: queued as " + path.stem

    def store(self, data: bytes) -> Path:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        name = f"{stamp}-{os.getpid()}-{next(self.counter):06d}"
        final = self.mail_dir / f"{name}.eml"
        tmp = self.mail_dir / f".{name}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        return final


def subject_of(content: bytes) -> str:
    try:
        headers = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(content)
        return str(headers.get("Subject", ""))
    except Exception:  # a malformed message is still captured; its subject is just unknown
        return "?"


async def serve(host: str, port: int, mail_dir: Path, run_dir: Path) -> None:
    handler = CaptureHandler(mail_dir, run_dir)
    loop = asyncio.get_running_loop()

    def factory() -> Any:
        return SMTP(
            handler,
            hostname="clave-mailcatcher",  # avoids a (possibly slow) reverse DNS lookup
            ident="Clave local mail catcher",
            enable_SMTPUTF8=True,
            decode_data=False,
        )

    server = await loop.create_server(factory, host=host, port=port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("listening on %s:%d, writing to %s, fault flags in %s", host, port, mail_dir, run_dir)
    await stop.wait()
    log.info("stopping")
    server.close()
    await server.wait_closed()


def main() -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # aiosmtpd logs every command at INFO (including peer addresses); keep ours only.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    host = os.environ.get("SMTP_HOST", "127.0.0.1")
    port = int(os.environ.get("SMTP_PORT", "1025"))
    var_dir = Path(os.environ.get("VAR_DIR", "var"))
    mail_dir = Path(os.environ.get("MAIL_DIR", str(var_dir / "mail")))
    run_dir = var_dir / "run"
    mail_dir.mkdir(parents=True, exist_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(host, port, mail_dir, run_dir))
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

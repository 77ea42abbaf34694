"""The workbench's one reader of the mail catcher's folder (`MAIL_DIR`, one .eml per message).

The catcher writes each message under a hidden name and renames it, so a file appears whole
and never changes: `Mailbox` reads each file once, the first time a scan lists it, and
indexes it (recovery mail by request, other mail by recipient). A scan lists the folder and
parses only the new files, so thousands of mails cost nothing per wait.

Two ways to use it, with the same calls:
- without a poller (e2e tests, demo): each wait scans, then re-scans every `poll_s`;
- `start()` (or `async with`): one background poller scans every `poll_s` and wakes all
  waiters when mail arrives (bench and fault suite: many waiters, one reader).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import email.utils
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from tools.waits import Changes, deadline_of, until


def body_text(msg: EmailMessage) -> str:
    part = msg.get_body(preferencelist=("plain",))
    return part.get_content() if part is not None else ""  # type: ignore[no-any-return]


def extract_link(msg: EmailMessage) -> tuple[str, str, str]:
    """(link, request_id, token) from a recovery e-mail."""
    return _link_in(body_text(msg))


def _link_in(body: str) -> tuple[str, str, str]:
    match = re.search(r"https?://\S+recuperar\?\S+", body)
    if match is None:
        raise ValueError("no recovery link in the e-mail")
    link = match.group(0).rstrip(".)>")
    query = parse_qs(urlsplit(link).query)
    try:
        return link, query["request_id"][0], query["token"][0]
    except KeyError as exc:
        raise ValueError(f"the recovery link has no {exc.args[0]}") from None


def extract_code(msg: EmailMessage) -> str:
    match = re.search(r"\b(\d{6})\b", body_text(msg))
    if match is None:
        raise ValueError("no 6-digit code in the e-mail")
    return match.group(1)


@dataclass(frozen=True)
class Mail:
    """One captured message, parsed once."""

    path: Path
    message: EmailMessage
    body: str  # the plain-text part
    captured: float  # wall clock (epoch s): the file's mtime, when the catcher stored it
    seen: float  # monotonic: when this reader first read it
    seen_utc: str
    to: str  # the To header as written
    recipients: frozenset[str]  # lower-case addresses: To, Cc and the SMTP envelope's
    subject: str
    message_id: str
    request_id: str | None  # a recovery e-mail's, from its link; None for any other mail
    token: str | None


def _read(path: Path) -> Mail:
    with path.open("rb") as fh:
        msg: EmailMessage = email.message_from_binary_file(fh, policy=email.policy.default)  # type: ignore[assignment]
    body = body_text(msg)
    request_id: str | None = None
    token: str | None = None
    if "recuperar?" in body:
        try:
            _, request_id, token = _link_in(body)
        except ValueError:  # a broken link: not a recovery e-mail this reader can index
            pass
    headers = [str(v) for name in ("To", "Cc", "X-Envelope-To") for v in msg.get_all(name) or []]
    return Mail(
        path=path,
        message=msg,
        body=body,
        captured=path.stat().st_mtime,
        seen=time.monotonic(),
        seen_utc=datetime.now(UTC).isoformat(timespec="milliseconds"),
        to=str(msg["To"] or ""),
        recipients=frozenset(addr.lower() for _, addr in email.utils.getaddresses(headers) if addr),
        subject=str(msg["Subject"] or ""),
        message_id=str(msg["Message-ID"] or ""),
        request_id=request_id,
        token=token,
    )


class Mailbox:
    """The mail catcher's folder, read incrementally and indexed."""

    def __init__(self, mail_dir: str | Path, *, ignore_existing: bool = False, poll_s: float = 0.1) -> None:
        self.dir = Path(mail_dir)
        self.poll_s = poll_s
        self.mails: list[Mail] = []  # in arrival order (the catcher's names sort so)
        self.by_request: dict[str, list[Mail]] = {}  # recovery e-mails by request_id
        self.by_recipient: dict[str, list[Mail]] = {}  # every mail, by lower-case address
        self.notices: dict[str, list[Mail]] = {}  # mail without a recovery link, by recipient
        self._listed: set[str] = set()  # file names read (or ignored)
        self._changes = Changes()
        self._task: asyncio.Task[None] | None = None
        if ignore_existing:
            self.ignore_existing()

    def ignore_existing(self) -> None:
        """Leave out every message already in the folder (an earlier run's)."""
        self._listed.update(self._names())

    def _names(self) -> list[str]:
        try:
            with os.scandir(self.dir) as entries:
                # Hidden names are the catcher's files still being written.
                return [e.name for e in entries if e.name.endswith(".eml") and not e.name.startswith(".")]
        except FileNotFoundError:  # nothing captured yet
            return []

    def scan(self) -> list[Mail]:
        """Read the messages that appeared since the last scan; wake the waiters if any did."""
        new = []
        for name in sorted(set(self._names()) - self._listed):
            self._listed.add(name)
            new.append(self._add(_read(self.dir / name)))
        if new:
            self._changes.notify()
        return new

    def _add(self, mail: Mail) -> Mail:
        self.mails.append(mail)
        for address in mail.recipients:
            self.by_recipient.setdefault(address, []).append(mail)
            if mail.request_id is None:
                self.notices.setdefault(address, []).append(mail)
        if mail.request_id is not None:
            self.by_request.setdefault(mail.request_id, []).append(mail)
        return mail

    # ---- the background poller

    async def start(self) -> None:
        self.scan()
        self._task = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def __aenter__(self) -> Mailbox:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _poll(self) -> None:
        try:
            while True:
                self.scan()
                await asyncio.sleep(self.poll_s)  # a folder has no push: listed again every poll_s
        finally:
            self._changes.notify()  # waiters see at once that it stopped

    def _refresh(self) -> None:
        """Before a waiter's check: scan if no poller does; a dead poller fails the waiter now."""
        if self._task is None:
            self.scan()
        elif self._task.done():
            self._task.result()  # raises what stopped it
            raise RuntimeError("the mail poller stopped")

    # ---- reading and waiting

    def messages(self) -> list[tuple[Path, EmailMessage]]:
        """(file, message) of every mail so far, in arrival order."""
        self._refresh()
        return [(m.path, m.message) for m in self.mails]

    def to(self, address: str) -> list[EmailMessage]:
        """Every message so far to `address` (To, Cc or the SMTP envelope; any case)."""
        self._refresh()
        return [m.message for m in self.by_recipient.get(address.lower(), [])]

    def snapshot(self) -> set[Path]:
        """The messages here now, to leave out of a later `wait_for(..., after=...)`."""
        self._refresh()
        return {m.path for m in self.mails}

    async def wait_until(
        self,
        condition: Callable[[], bool],
        *,
        timeout: float | None = 60.0,
        deadline: float | None = None,
        what: str = "a condition on the mail",
    ) -> None:
        """Until `condition()` holds (re-checked whenever mail arrives), or the deadline."""
        poll_s = 1.0 if self._task is not None else self.poll_s
        await until(
            condition, self._changes, deadline_of(timeout, deadline), what, refresh=self._refresh, poll_s=poll_s
        )

    async def wait_for(
        self,
        predicate: Callable[[EmailMessage], bool],
        timeout: float = 60.0,
        count: int = 1,
        after: set[Path] | None = None,
    ) -> list[EmailMessage]:
        """At least `count` messages matching `predicate` (leaving out those in `after`), all of
        them in arrival order. `predicate` should depend on the message alone."""
        found: list[EmailMessage] = []
        checked = 0  # a message never changes: each is tested once (`predicate` may scan too)

        def enough() -> bool:
            nonlocal checked
            fresh = self.mails[checked:]
            checked += len(fresh)
            found.extend(m.message for m in fresh if (after is None or m.path not in after) and predicate(m.message))
            return len(found) >= count

        try:
            await self.wait_until(enough, timeout=timeout)
        except TimeoutError:
            raise TimeoutError(f"{len(found)}/{count} matching e-mails within {timeout}s") from None
        return found

    async def recovery_mail(
        self, request_id: str, *, timeout: float | None = 60.0, deadline: float | None = None
    ) -> Mail:
        """The first recovery e-mail for `request_id`."""
        await self.wait_until(
            lambda: request_id in self.by_request,
            timeout=timeout,
            deadline=deadline,
            what=f"a recovery e-mail for {request_id}",
        )
        return self.by_request[request_id][0]

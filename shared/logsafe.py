"""FastStream's log lines, kept to what happened and stripped of what a record could have put in.

FastStream logs a handler's exception as `<Type>: <message>` with its traceback, an acknowledgement
that failed as `repr(error)`, a consume loop that died with its traceback. An exception's message
(and its args, and the last line of a traceback) may quote the input it choked on: a national ID,
a security answer, a key. Logs must never hold a secret (tests/e2e/test_zz_secrets_scan.py), and
with no logger at all (`logger=None`) a failing consume loop went unseen.

So the broker logs through `BrokerLogger` into the `clave.broker` logger, whose `SafeRecords`
filter rewrites every record to: FastStream's own text where it is one of the fixed messages
known to carry no input (else a stand-in), the exception's class and where it was raised (never
its message, args or traceback), and the topic/partition/offset of the record being handled.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, Protocol

from shared.loops import describe

LOGGER_NAME = "clave.broker"
POSITION = "clave_position"  # LogRecord attribute: (topic, partition, offset) of the record handled

_NAME = r"[\w.\-]+"
# FastStream 0.7's own messages that hold no input: fixed texts with topic names, task names and
# group member ids interpolated (ours or the library's, never a record's). A message is kept only
# as far as one of these matches it (`Failed to create topic x: <error>` keeps the topic only).
KNOWN = tuple(
    re.compile(pattern)
    for pattern in (
        r"Received$",
        r"Processed$",
        rf"`{_NAME}` waiting for messages$",
        r"Kafka error occurred$",
        r"There is no suitable compression library available\.",
        rf"callback for {_NAME} is being executed\.\.\.$",
        rf"{_NAME} raised an exception, retrying\.\.\.",
        rf"{_NAME} raised an exception and won't be restarted\.$",
        rf"Consumer {_NAME} assigned to partitions: \((TopicPartition\(topic='{_NAME}', partition=\d+\)(, )?)*\)$",
        rf"Consumer in group {_NAME} has (had )?no partition assignments",
        r"Auto create topics is disabled\.",
        r"Topic creation is skipped in consumer-only mode\.",
        rf"Failed to create topic {_NAME}",
    )
)
WITHHELD = "(FastStream message withheld: it may quote input)"
# FastStream's warnings about what make_broker chose on purpose: not logged.
CHOSEN = frozenset({"Auto create topics is disabled. Make sure the topics exist."})
_TOPICS = re.compile(r"[\w.\-]+(,[\w.\-]+)*")
_MESSAGE_ID = re.compile(r"(\d+)-\d+")  # FastStream's Kafka message id: "<offset>-<timestamp>"


def event(text: str, exc: BaseException | None) -> str:
    """What happened, in FastStream's words where they carry no input."""
    if exc is not None:  # first: a text made of the exception is never matched against KNOWN
        name = exc.__class__.__name__
        if text == name or text.startswith(f"{name}: "):
            return "handler raised"  # CriticalLogMiddleware: f"{type}: {exc}"
        if text == repr(exc):
            return "acknowledgement failed"  # AcknowledgementMiddleware: repr(error)
    first_line = text.split("\n", 1)[0]
    for pattern in KNOWN:
        m = pattern.match(first_line)
        if m:
            return m.group(0)
    return WITHHELD if exc is None else "error"


def position_of(record: logging.LogRecord) -> tuple[str | None, int | None, int | None]:
    """(topic, partition, offset) of the Kafka record being handled, as far as known: from the
    message FastStream's context holds (`BrokerLogger`), else from FastStream's log context."""
    given = getattr(record, POSITION, None)
    if isinstance(given, tuple) and len(given) == 3:
        topic, partition, offset = given
    else:
        topic, partition, offset = getattr(record, "topic", None), None, None
        m = _MESSAGE_ID.fullmatch(str(getattr(record, "message_id", "")))
        offset = int(m.group(1)) if m else None
    return (
        topic if isinstance(topic, str) and _TOPICS.fullmatch(topic) else None,
        partition if isinstance(partition, int) else None,
        offset if isinstance(offset, int) else None,
    )


class SafeRecords(logging.Filter):
    """Rewrites a record in place to the event, the exception's class and the position; drops
    the message text, its args, the exception (message, args, traceback) and any stack. Drops
    the record itself when it only reports a choice of make_broker's (CHOSEN)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        try:
            text = record.getMessage()
        except Exception:  # a message that does not format is not one of FastStream's own
            text = ""
        if text in CHOSEN:
            return False
        line = event(text, exc)
        if exc is not None:
            line += f": {describe(exc)}"
        names = ("topic", "partition", "offset")
        where = " ".join(f"{k}={v}" for k, v in zip(names, position_of(record), strict=True) if v is not None)
        if where:
            line += f" [{where}]"
        record.msg, record.args = line, ()
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def _position(message: Any) -> tuple[str, int, int] | None:
    raw = getattr(message, "raw_message", None)
    topic, partition, offset = (getattr(raw, k, None) for k in ("topic", "partition", "offset"))
    if isinstance(topic, str) and isinstance(partition, int) and isinstance(offset, int):
        return topic, partition, offset
    return None


class Context(Protocol):
    """FastStream's ContextRepo, as far as it is read here."""

    def get_local(self, key: str, default: Any = None) -> Any: ...


class BrokerLogger:
    """The logger FastStream is given (its LoggerProto). It logs into `clave.broker` and adds the
    position of the record being handled, which only FastStream's context knows (its log context
    has the topic and offset, not the partition): set `context` to the broker's once it exists."""

    def __init__(self, context: Context | None = None, logger: logging.Logger | None = None) -> None:
        self.context = context
        self.logger = logger or safe_logger()

    def log(
        self,
        level: int,
        msg: Any,
        /,
        *,
        exc_info: Any = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if not self.logger.isEnabledFor(level):  # FastStream logs "Received"/"Processed" per record
            return
        fields = dict(extra or {})
        position = _position(self.context.get_local("message")) if self.context is not None else None
        if position is not None:
            fields[POSITION] = position
        self.logger.log(level, msg, exc_info=exc_info, extra=fields)


def safe_logger(name: str = LOGGER_NAME) -> logging.Logger:
    """The logger `name` with a `SafeRecords` filter (once)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, SafeRecords) for f in logger.filters):
        logger.addFilter(SafeRecords())
    return logger

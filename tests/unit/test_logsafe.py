"""FastStream's log lines (shared/logsafe.py): a failing handler, a consume loop that died, a failed
acknowledgement are logged (with `logger=None` they were dropped, and a stalled consumer went
unseen), with the exception's class and the record's position, and never what the input put in
the exception's message or args."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from faststream.kafka import KafkaBroker, TestKafkaBroker

from shared.kafka import make_broker
from shared.logsafe import LOGGER_NAME, WITHHELD, BrokerLogger, SafeRecords
from shared.settings import PlatformSettings

NATIONAL_ID = "1710034065"
ANSWER = "purple-giraffe-under-the-stairs"
SECRETS = (NATIONAL_ID, ANSWER)
# The services' log format (shared.runtime.configure_logging); a Formatter prints exc_info too.
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Leaky(Exception):
    """An exception that quotes its input, as library errors do."""

    def __init__(self) -> None:
        super().__init__(f"bad record for national ID {NATIONAL_ID}", {"answer": ANSWER})


@pytest.fixture
def output() -> Iterator[io.StringIO]:
    """What `clave.broker` writes, formatted as the services format it (tracebacks included)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(FORMAT))
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(handler)
    old_level, logger.level = logger.level, logging.INFO
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def broker_with_failing_handler(broker: KafkaBroker) -> None:
    @broker.subscriber("recovery.requests", group_id="clave-test")
    async def handle(body: Any) -> None:
        try:
            raise KeyError(ANSWER)
        except KeyError as cause:
            raise Leaky from cause


async def publish(broker: KafkaBroker, logger: Any, error: type[Exception] = Leaky) -> None:
    async with TestKafkaBroker(broker) as test_broker:
        # TestKafkaBroker swaps the broker's logger for a mock: put the real one back, so that
        # FastStream's own error path (CriticalLogMiddleware) logs through it.
        broker.config.logger.logger.logger = logger
        with pytest.raises(error):
            await test_broker.publish(f'{{"national_id": "{NATIONAL_ID}"}}'.encode(), "recovery.requests", partition=3)


def our_logger(broker: KafkaBroker) -> Any:
    return broker.config.logger.params_storage.get_logger(context=broker.context)


async def test_a_handler_exception_is_logged_with_its_class_and_position_and_no_secret(output: io.StringIO) -> None:
    broker = make_broker(PlatformSettings(clave_env="development"), "test")
    broker_with_failing_handler(broker)
    await publish(broker, our_logger(broker))
    text = output.getvalue()
    [line] = text.splitlines()
    assert " ERROR clave.broker: handler raised: Leaky at tests/unit/test_logsafe.py:" in line, text
    assert line.endswith("[topic=recovery.requests partition=3 offset=0]"), text
    assert not any(secret in text for secret in SECRETS), text
    assert "Traceback" not in text and "KeyError" not in text, text


async def test_a_body_faststream_cannot_decode_is_not_quoted(output: io.StringIO) -> None:
    # pydantic's ValidationError quotes the input value: FastStream decodes the JSON body for a
    # handler that asks for bytes (the services take the raw bytes; a mistake here must not leak).
    from pydantic import ValidationError

    broker = make_broker(PlatformSettings(clave_env="development"), "test")

    @broker.subscriber("recovery.requests", group_id="clave-test")
    async def handle(body: bytes) -> None:
        raise AssertionError("not reached")

    await publish(broker, our_logger(broker), ValidationError)
    text = output.getvalue()
    assert "clave.broker: handler raised: ValidationError at " in text, text
    assert NATIONAL_ID not in text and "input_value" not in text, text


async def test_without_the_filter_the_same_line_would_carry_the_secrets() -> None:
    # What the test above guards against is real: FastStream's own text quotes the exception.
    raw = logging.getLogger("test.logsafe.raw")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(FORMAT))
    raw.addHandler(handler)
    try:
        broker = KafkaBroker(logger=BrokerLogger(logger=raw))
        broker_with_failing_handler(broker)
        await publish(broker, BrokerLogger(broker.context, raw))
    finally:
        raw.removeHandler(handler)
    assert NATIONAL_ID in stream.getvalue() and ANSWER in stream.getvalue()


async def test_a_handler_that_succeeds_logs_nothing_at_info(output: io.StringIO) -> None:
    # FastStream's "Received"/"Processed" for every record are DEBUG: no noise, no cost.
    broker = make_broker(PlatformSettings(clave_env="development"), "test")
    seen: list[bytes] = []

    @broker.subscriber("t", group_id="clave-test")
    async def handle(body: bytes) -> None:
        seen.append(body)

    async with TestKafkaBroker(broker) as test_broker:
        broker.config.logger.logger.logger = our_logger(broker)
        await test_broker.publish(b"x", "t")
    assert seen == [b"x"]
    assert output.getvalue() == ""


async def test_a_consume_loop_that_dies_is_logged_without_its_message(output: io.StringIO) -> None:
    broker = make_broker(PlatformSettings(clave_env="development"), "test")
    broker._setup_logger()  # what connecting does
    subscriber: Any = broker.subscriber("t", group_id="clave-test")
    runs = 0
    restarted = asyncio.Event()

    async def loop() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise Leaky
        restarted.set()

    subscriber.add_task(loop)
    async with asyncio.timeout(5):
        await restarted.wait()  # FastStream's supervisor restarts it, after logging
    text = output.getvalue()
    assert "ERROR clave.broker: Task-" in text, text
    assert " raised an exception, retrying...: Leaky at tests/unit/test_logsafe.py:" in text, text
    assert "FASTSTREAM_SUPERVISOR_DISABLED" not in text  # its advice, on a second line, is dropped
    assert not any(secret in text for secret in SECRETS), text
    for task in subscriber.tasks:
        task.cancel()


def record(msg: str, exc: BaseException | None = None, **extra: Any) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    rec = logging.LogRecord(LOGGER_NAME, logging.ERROR, __file__, 1, msg, (), exc_info)
    rec.__dict__.update(extra)
    return rec


def rewritten(rec: logging.LogRecord) -> str:
    assert SafeRecords().filter(rec)
    assert rec.exc_info is None and rec.exc_text is None and rec.stack_info is None
    return logging.Formatter(FORMAT).format(rec)


def test_an_acknowledgement_that_failed_is_named_without_its_repr() -> None:
    exc = Leaky()
    text = rewritten(record(repr(exc), exc, topic="t", message_id="17-1700000000000"))
    assert text.endswith("clave.broker: acknowledgement failed: Leaky [topic=t offset=17]")


def test_faststream_texts_without_input_are_kept_the_rest_withheld() -> None:
    assigned = (
        "Consumer clave-tokens-0c1d assigned to partitions: "
        "(TopicPartition(topic='recovery.resets', partition=0), TopicPartition(topic='recovery.resets', partition=4))"
    )
    assert rewritten(record(assigned, topic="recovery.resets,tokens.redeemed")).endswith(
        f"{assigned} [topic=recovery.resets,tokens.redeemed]"
    )
    # A known text keeps its known part only: the error after the topic may quote anything.
    assert rewritten(record(f"Failed to create topic t: {ANSWER}")).endswith(": Failed to create topic t")
    exc = Leaky()
    assert rewritten(record("Kafka error occurred", exc)).endswith(": Kafka error occurred: Leaky")
    for unknown in (f"Message {NATIONAL_ID} went wrong", f"Received {ANSWER}", ANSWER):
        assert rewritten(record(unknown)).endswith(f": {WITHHELD}")
        assert rewritten(record(unknown, exc)).endswith(": error: Leaky")


def test_a_topic_or_position_that_is_not_one_is_left_out() -> None:
    text = rewritten(record("Kafka error occurred", topic=f"t {NATIONAL_ID}", message_id=ANSWER))
    assert text.endswith(": Kafka error occurred")


async def test_a_subscriber_starts_without_creating_topics_or_warning_about_it(output: io.StringIO) -> None:
    # Topics are provisioned; a service's principal may not create them.
    broker = make_broker(PlatformSettings(clave_env="development"), "test")
    assert broker.config.allow_auto_create_topics is False
    broker._setup_logger()
    subscriber: Any = broker.subscriber("t", group_id="clave-test")
    await subscriber._ensure_topics()  # what a subscriber's start does first
    assert output.getvalue() == ""
    assert not SafeRecords().filter(record("Auto create topics is disabled. Make sure the topics exist."))

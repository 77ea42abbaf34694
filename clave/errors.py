"""How `clave` fails: one line saying what was wrong and what to do, and an exit code a
script can act on. The traceback only with `--debug`.

    0  done
    1  not found, or a check failed (a broken audit chain, a rejected line, a refused command)
    2  usage: a wrong option, argument, time, file or setting; nothing was done
    3  infrastructure that cannot be reached (Kafka, the store): nothing was done
    4  `audit verify` only: intact, but legacy HMAC-sealed events could not be checked
   78  unsafe settings in production (shared/settings.py)
"""

from __future__ import annotations

import re

# typer 0.29 vendors click: its exceptions, re-exported for clave/cli.py
from typer._click.exceptions import ClickException as ClickException
from typer._click.exceptions import NoArgsIsHelpError as NoArgsIsHelpError
from typer._click.exceptions import UsageError as UsageError

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


class CliError(Exception):
    """An error the user can act on; `main` prints it as one line and exits with `code`."""

    code = EXIT_FAILED

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def line(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class Failed(CliError):
    code = EXIT_FAILED


class Usage(CliError):
    code = EXIT_USAGE


class Unreachable(CliError):
    code = EXIT_UNREACHABLE


def _redacted(uri: str) -> str:
    """A connection string without its password (user:password@host)."""
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", uri)


def kafka_unreachable(bootstrap: str, exc: BaseException) -> Unreachable:
    return Unreachable(
        f"cannot reach Kafka at {bootstrap} ({exc.__class__.__name__})",
        "is the stack running? `make up` starts it (`make status` shows it); "
        "otherwise check KAFKA_BOOTSTRAP_SERVERS or KAFKA_CLIENT_PROPERTIES",
    )


def store_unreachable(uri: str, exc: BaseException) -> Unreachable:
    return Unreachable(
        f"cannot reach the store at {_redacted(uri)} ({exc.__class__.__name__})",
        "is the stack running? `make up` starts it (`make status` shows it); otherwise check MONGODB_URI",
    )


def kafka_refused(exc: BaseException) -> Failed:
    return Failed(
        f"Kafka refused this principal ({exc.__class__.__name__})",
        "give the client settings of a principal allowed to do this, e.g. "
        "KAFKA_CLIENT_PROPERTIES=var/secrets/kafka/auditor.properties for `clave audit`, "
        "operator.properties for `clave accounts`",
    )


def classify(exc: BaseException, bootstrap: str, store_uri: str) -> CliError | None:
    """The CliError an infrastructure exception means, or None for a bug (a traceback is right)."""
    from aiokafka.errors import (
        GroupAuthorizationFailedError,
        KafkaConnectionError,
        KafkaTimeoutError,
        NoBrokersAvailable,
        TopicAuthorizationFailedError,
    )
    from pymongo.errors import ConnectionFailure, OperationFailure, ServerSelectionTimeoutError

    if isinstance(exc, TopicAuthorizationFailedError | GroupAuthorizationFailedError):
        return kafka_refused(exc)
    if isinstance(exc, KafkaConnectionError | NoBrokersAvailable | KafkaTimeoutError):
        return kafka_unreachable(bootstrap, exc)
    if isinstance(exc, ServerSelectionTimeoutError | ConnectionFailure):
        return store_unreachable(store_uri, exc)
    if isinstance(exc, OperationFailure) and exc.code in (13, 18):  # Unauthorized, AuthenticationFailed
        return Failed(f"the store refused these credentials ({exc.code})", "check MONGODB_URI")
    if isinstance(exc, ConnectionRefusedError):
        return Unreachable(f"connection refused ({exc})", "is the stack running? `make up` starts it")
    return None


def usage_line(exc: UsageError) -> str:
    """A click usage error as one line: the command, what was wrong, where the help is."""
    path = exc.ctx.command_path if exc.ctx is not None else "clave"
    message = " ".join(exc.format_message().split()).rstrip(".")
    return f"{path}: {message}; see `{path} --help`"

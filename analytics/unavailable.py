"""How the analytics service's APIs answer when ClickHouse does not: one rule for all of them.

A read that the query pool refuses (:class:`QueryBusyError`) passes through, for the app's 503
``busy``; any other failure of the read is logged with its traceback and becomes the API's own
``unavailable`` error, ``ClickHouse did not answer: <what the client said>``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sinks.clickhouse.store import QueryBusyError

T = TypeVar("T")


async def answered(
    read: Awaitable[T], unavailable: Callable[[str], Exception], log: logging.Logger, what: str
) -> T:
    """The result of ``read``; a failure is logged on ``log`` as ``what`` and raised as
    ``unavailable(message)``."""
    try:
        return await read
    except QueryBusyError:  # answered 503 busy by the app
        raise
    except Exception as error:  # the client's errors have no common base worth naming
        log.exception(what)
        raise unavailable(f"ClickHouse did not answer: {error}") from error

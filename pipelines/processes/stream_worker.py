"""The ``stream-worker`` process: the conversations and users processors, transactional."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Sequence

from core.kafka_loop import EXIT_FATAL
from core.readiness import ReadyFile
from core.settings import Settings
from streams.runtime import READY_MESSAGE, ProcessorLoop, build_loops

log = logging.getLogger(__name__)


def main(settings: Settings, *, processors: Sequence[str] = ("conversations", "users")) -> int:
    """Run the loops until SIGINT/SIGTERM; returns the process exit code."""
    stop = threading.Event()
    loops, producers = build_loops(settings, stop, processors=processors)
    failures: list[BaseException] = []

    def guarded(loop: ProcessorLoop) -> None:
        try:
            loop.run()
        except BaseException as error:  # reported and turned into the exit code below
            log.critical("%s processor failed: %s", loop.config.name, error, exc_info=True)
            failures.append(error)
            stop.set()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("signal %d: finishing the current transactions and stopping", signum)
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    threads = [
        threading.Thread(target=guarded, args=(loop,), name=loop.config.name, daemon=True)
        for loop in loops
    ]
    for thread in threads:
        thread.start()
    ready_file = ReadyFile(settings.ready_file)
    while any(thread.is_alive() for thread in threads):
        if not ready_file.announced and all(loop.ready.is_set() for loop in loops):
            detail = "; ".join(f"{loop.config.name} as {loop.group_id}" for loop in loops)
            log.info("%s: %s", READY_MESSAGE, detail)
            ready_file.announce(detail)
        for thread in threads:
            thread.join(0.1)
        if failures:
            # A failed loop must not leave the other committing on its own: exit now, the
            # restart resumes both from their last committed transactions.
            ready_file.withdraw()
            logging.shutdown()
            os._exit(EXIT_FATAL)
    ready_file.withdraw()
    for transactions in producers:
        transactions.close()
    log.info("stream worker stopped")
    return EXIT_FATAL if failures else 0

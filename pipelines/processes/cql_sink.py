"""The ``cql-sink`` process: migrate the serving keyspace, then write it from Kafka."""

from __future__ import annotations

import logging
import signal
import threading

from core.kafka_loop import EXIT_FATAL, FatalError
from core.readiness import ReadyFile
from core.settings import Settings
from sinks.cql.crypto import (
    MasterKeyMismatchError,
    key_ring,
)
from sinks.cql.migrate import MigrationError, check_keyspace_name
from sinks.cql.serving import serving_keyspace
from sinks.cql.sink import EXIT_CONFIG, CqlSink, connect, migrate_with_retry

log = logging.getLogger(__name__)


def main(settings: Settings) -> int:
    """The ``imstream run cql-sink`` process: migrate, then consume until SIGTERM/SIGINT (the
    current batch is finished and committed first). Returns the exit code."""
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("signal %d: finishing the current batch and stopping", signum)
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    # The driver logs every failed reconnection attempt with a traceback; during an outage the
    # sink's own retry and progress lines say what matters.
    logging.getLogger("cassandra").setLevel(logging.ERROR)
    try:
        check_keyspace_name(settings.cql.keyspace)
        settings.master_key()
        settings.previous_master_key()
    except (MigrationError, ValueError) as error:
        log.critical("%s", error)
        return EXIT_CONFIG
    cluster, session = connect(settings, stop)
    try:
        if session is None:
            return 0
        try:
            if not migrate_with_retry(settings, session, stop):
                return 0
        except MigrationError as error:
            log.critical("cannot start: %s", error)
            return EXIT_CONFIG
        keyspace = serving_keyspace(session, settings.cql.keyspace)
        if keyspace != settings.cql.keyspace:
            log.info("keyspace %s serves (swapped in for %s)", keyspace, settings.cql.keyspace)
        keys = key_ring(session, settings)
        try:
            keys.check_master_key()
        except MasterKeyMismatchError as error:
            log.critical("cannot start: %s", error)
            return EXIT_CONFIG
        ready_file = ReadyFile(settings.ready_file)
        sink = CqlSink(settings, session, keyspace=keyspace, ready_file=ready_file, keys=keys)
        try:
            sink.run(stop)
        except FatalError as error:
            log.critical("cql sink failed: %s", error)
            return EXIT_FATAL
        finally:
            ready_file.withdraw()
        log.info("cql sink stopped")
        return 0
    finally:
        cluster.shutdown()

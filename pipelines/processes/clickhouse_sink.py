"""The ``clickhouse-sink`` process: the audit sink, the analytics API on its port, the operator
jobs and the consumer-lag sampler, in one process (they share the one chDB handle)."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from analytics.api import AnalyticsServer, AnalyticsServerError, analytics_app
from analytics.jobs import OperatorJobs
from analytics.lag import LagSampler
from analytics.operator_api import install_operator_api
from analytics.queries import Analytics
from core.connections import (
    clickhouse_client,
)
from core.kafka_loop import EXIT_FATAL, FatalError
from core.principals import staff_authenticator
from core.readiness import ReadyFile
from core.settings import Settings
from pipelines.processes import consumer_groups
from schemas.topics import topic_catalog
from sinks.clickhouse.schema import SchemaNameError
from sinks.clickhouse.sink import (
    EXIT_UNAVAILABLE,
    ClickHouseSink,
    analytics_tls,
)
from sinks.clickhouse.store import ClickHouseStore, QueryPool, query_client_settings

log = logging.getLogger(__name__)


def main(settings: Settings) -> int:
    """The sink process: the audit loop and the analytics endpoint until SIGTERM/SIGINT; returns
    the exit code."""
    catalog = topic_catalog(settings)
    where = settings.clickhouse.url or f"chDB at {settings.chdb_path}"
    try:
        authenticator = staff_authenticator(settings)
    except ValueError as error:
        log.error("%s", error)
        return EXIT_UNAVAILABLE
    sinks = settings.sinks
    budget = query_client_settings(
        sinks.analytics_query_timeout_seconds, sinks.analytics_query_max_threads
    )
    try:
        queries = QueryPool(
            [
                clickhouse_client(settings, query_settings=budget)
                for _ in range(sinks.analytics_query_workers)
            ],
            max_waiting=sinks.analytics_query_queue,
        )
        store = ClickHouseStore(
            clickhouse_client(settings), settings.clickhouse.database, queries=queries
        )
    except SchemaNameError as error:
        log.error("%s", error)
        return EXIT_UNAVAILABLE
    except Exception as error:  # reported as what the operator should check
        log.error(
            "cannot open ClickHouse (%s): %s — check IM_CLICKHOUSE__URL and that the server is "
            "up, or that no other process holds the chDB path (chDB allows one per process)",
            where,
            error,
        )
        return EXIT_UNAVAILABLE
    stop = threading.Event()
    ready_file = ReadyFile(settings.ready_file)
    try:
        sink = ClickHouseSink(
            settings, store, stop, catalog=catalog, ready_file=ready_file, freeze_heap=True
        )
        analytics = Analytics(store)
        app = analytics_app(
            analytics,
            authenticator=authenticator,
            max_body_bytes=sinks.analytics_max_body_bytes,
            healthy=lambda: sink.running,
        )
        jobs = OperatorJobs(settings, store, catalog, live_sink=sink)
        install_operator_api(app, jobs)
        server = AnalyticsServer(
            app, sinks.analytics_host, sinks.analytics_port, tls=analytics_tls(settings)
        )
    except (AnalyticsServerError, ValueError) as error:
        log.error("%s", error)
        store.close()
        return EXIT_UNAVAILABLE

    def request_stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: flushing the current batch and stopping", signum)
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    # Consumer-group lag into ClickHouse for the dashboards; a failed sample only logs.
    sampler = LagSampler(settings, store, consumer_groups)

    def started() -> None:
        server.start()
        sampler.start()

    code = 0
    try:
        sink.run(on_started=started)
    except FatalError as error:
        log.critical("clickhouse sink failed: %s", error)
        code = EXIT_FATAL
    except AnalyticsServerError as error:
        log.error("%s", error)
        code = EXIT_UNAVAILABLE
    except Exception:  # a bug: say so with the traceback; the supervisor restarts the process
        log.critical("clickhouse sink failed", exc_info=True)
        code = EXIT_FATAL
    finally:
        ready_file.withdraw()
        jobs.stop_all()
        sampler.stop()
        server.stop()
        store.close()
    log.info("clickhouse sink stopped")
    return code

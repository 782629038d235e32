"""The ``push-sink`` process: APNs/FCM notifications for offline devices."""

from __future__ import annotations

import asyncio
import logging
import signal

from core.kafka_loop import EXIT_FATAL, FatalError
from core.readiness import ReadyFile
from core.settings import Settings
from sinks.push.errors import PushConfigError
from sinks.push.reliability import PushDispatcher
from sinks.push.sink import EXIT_CONFIG, PushSink

log = logging.getLogger(__name__)


def main(settings: Settings) -> int:
    """The ``imstream run push-sink`` process; returns the exit code."""

    async def main() -> int:
        try:
            dispatcher = PushDispatcher.from_settings(settings.push)
        except PushConfigError as error:
            log.critical("cannot start: %s", error)
            return EXIT_CONFIG
        if not dispatcher.providers:
            log.warning(
                "no push provider is configured (IM_PUSH__APNS_KEY_PATH, "
                "IM_PUSH__FCM_CREDENTIALS_PATH): every job is recorded as skipped"
            )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def request_stop(signum: int) -> None:
            log.info("signal %d: finishing the open jobs and stopping", signum)
            stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, request_stop, signum)
        ready_file = ReadyFile(settings.ready_file)
        try:
            await PushSink(settings, dispatcher, ready_file=ready_file).run(stop)
        except FatalError as error:
            log.critical("push sink failed: %s", error)
            return EXIT_FATAL
        finally:
            ready_file.withdraw()
            await dispatcher.close()
        log.info("push sink stopped")
        return 0

    return asyncio.run(main())

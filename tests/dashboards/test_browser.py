"""The dashboards in a real browser: ``imstream demo`` drives traffic through the system as
``imstream up`` runs it (every process kind, real Kafka, Cassandra and chDB, the push sink on the
fake APNs and FCM), one poison record is dead-lettered by the stream stage, and headless
Chromium (Debian's package; ``make browser`` installs it) loads the ClickHouse sink's
``/dashboards`` pages: every panel of both dashboards must render a chart with data, and a
screenshot of each is kept in ``.imstream/test-artifacts/``."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time
import urllib.parse
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from dashboards.definitions import load_dashboards
from schemas.topics import topic_catalog
from tests.ingress.support import unique
from tests.pipelines.support import Running, run_small_demo
from tests.sinks.clickhouse_support import Outgoing, produce
from tests.sinks.staff_support import staff_headers, staff_token

pytestmark = pytest.mark.stack

ARTIFACTS = Path(__file__).resolve().parents[2] / ".imstream" / "test-artifacts"
#: How long the sinks may take to hold what the demo sent (and a lag sample to be taken).
WITHIN = 60.0
WINDOW_SIZE = "1480,900"


def chromium() -> str:
    found = shutil.which("chromium")
    assert found, "headless Chromium is missing: run `make browser` (apt-get install chromium)"
    return found


def run_chromium(profile: Path, *arguments: str) -> str:
    """Headless Chromium on its own profile; its stdout (the DOM with ``--dump-dom``)."""
    done = subprocess.run(
        [
            chromium(),
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--window-size={WINDOW_SIZE}",
            "--virtual-time-budget=10000",
            *arguments,
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def panel_data(system: Running, dashboard: str, window: dict[str, str]) -> list[dict[str, Any]]:
    url = (
        f"http://127.0.0.1:{system.analytics_port}/dashboards/{dashboard}/data?"
        + urllib.parse.urlencode(window)
    )
    response = httpx.get(url, headers=staff_headers(), timeout=30)
    response.raise_for_status()
    panels: list[dict[str, Any]] = response.json()["panels"]
    return panels


async def run_demo(system: Running) -> None:
    code, lines, progress = await run_small_demo(system, unique("dash"), push_timeout=WITHIN)
    assert code == 0, "\n".join(lines + progress)


async def test_every_panel_renders_with_data_from_a_demo_run_in_headless_chromium(
    system: Running,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    began = datetime.now(UTC)
    await run_demo(system)
    # One record the stream stage cannot decode: dead-lettered, so that panel has data too.
    catalog = topic_catalog(system.settings)
    produce(system.settings, [Outgoing(catalog.messages_in.name, b"c-poison", b"not json")])

    window = {
        "from": (began - timedelta(seconds=60)).isoformat(),
        "to": (datetime.now(UTC) + timedelta(seconds=20)).isoformat(),
    }
    names = [dashboard.name for dashboard in load_dashboards()]
    deadline = time.monotonic() + WITHIN
    while True:
        states = {
            f"{name}/{panel['id']}": panel["status"]
            for name in names
            for panel in await asyncio.to_thread(panel_data, system, name, window)
        }
        waiting = {panel: state for panel, state in states.items() if state != "ok"}
        if not waiting or time.monotonic() > deadline:
            break
        await asyncio.sleep(1.0)
    assert not waiting, f"panels without data after {WITHIN:g} s: {waiting}"

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    for name in names:
        url = (
            f"http://127.0.0.1:{system.analytics_port}/dashboards/{name}?"
            # A browser signs in once with ?token=, which becomes a cookie (redirected away).
            + urllib.parse.urlencode({**window, "token": staff_token()})
        )
        dom = await asyncio.to_thread(run_chromium, tmp_path / "profile", "--dump-dom", url)
        sections = re.findall(r"<section [^>]*data-panel-id=.*?</section>", dom, flags=re.S)
        assert len(sections) == len(next(d for d in load_dashboards() if d.name == name).panels)
        for section in sections:
            panel = re.search(r"data-panel-id=\"([a-z0-9_]+)\"", section)
            assert panel is not None, section[:200]
            assert 'data-panel-status="ok"' in section, (name, panel.group(1), section[:600])
            if 'data-panel-kind="stat"' in section:
                assert re.search(r'data-chart="stat">[^<]*\d', section), (name, panel.group(1))
            else:  # a chart with drawn marks: lines, points or bars
                assert "<svg" in section and 'class="mark"' in section, (name, panel.group(1))

        screenshot = ARTIFACTS / (
            "dashboards.png" if name == names[0] else f"dashboards-{name}.png"
        )
        screenshot.unlink(missing_ok=True)
        await asyncio.to_thread(
            run_chromium, tmp_path / "profile", f"--screenshot={screenshot}", url
        )
        assert screenshot.stat().st_size > 10_000, "the screenshot is blank"
        if reporter is not None:
            with capsys.disabled():  # shown in the test output, pass or fail
                reporter.write_line(f"\ndashboards: screenshot of {name} saved to {screenshot}")

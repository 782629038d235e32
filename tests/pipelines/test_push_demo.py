"""Acceptance of push on the system as ``imstream up`` runs it, the push sink included and
pointed at the fake APNs and FCM: ``imstream demo`` with offline users reports the pushes sent
to them, and the push outcomes the ClickHouse sink stored are what the fakes themselves counted.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter

from tests.ingress.support import unique
from tests.pipelines.support import FakeCounts, PushFakes, Running, run_small_demo

#: How long ClickHouse may take to hold what the demo read (it read the same API).
WITHIN = 60.0


def summary_of(lines: list[str]) -> dict[str, str]:
    """The demo's summary lines as label → value (labels are padded with two spaces or more)."""
    pairs = (re.split(r"\s{2,}", line, maxsplit=1) for line in lines)
    return {pair[0]: pair[1] for pair in pairs if len(pair) == 2}


def outcomes_in_clickhouse(system: Running, tenant: str) -> Counter[tuple[str, str]]:
    """The tenant's push attempts by (provider, outcome), through the analytics API."""
    answer = system.analytics("push_outcomes_per_minute", tenant=tenant)
    counts: Counter[tuple[str, str]] = Counter()
    for row in answer["rows"]:
        counts[(row["provider"], row["outcome"])] += int(row["attempts"])
    return counts


def delta(after: FakeCounts, before: FakeCounts) -> FakeCounts:
    return FakeCounts(
        accepted=after.accepted - before.accepted,
        rejected=after.rejected - before.rejected,
        abandoned=after.abandoned - before.abandoned,
    )


async def test_the_demo_reports_pushes_to_offline_users_as_the_fakes_counted_them(
    system: Running, push_fakes: PushFakes
) -> None:
    tenant = unique("demo")
    before = push_fakes.counts()
    exit_code, lines, progress = await run_small_demo(system, tenant, push_timeout=WITHIN)
    summary = summary_of(lines)
    assert exit_code == 0, "\n".join(lines + progress)
    assert summary["lost"] == "0" and summary["duplicates seen"] == "0", lines
    assert summary["offline users"].startswith("4 "), lines

    # "N for offline recipients (apns A · fcm F; one per user and conversation per 30 s)"
    expected = re.fullmatch(
        r"(\d+) for offline recipients \(apns (\d+) · fcm (\d+); .*\)",
        summary["push jobs expected"],
    )
    assert expected is not None, summary["push jobs expected"]
    total, expected_apns, expected_fcm = (int(group) for group in expected.groups())
    assert expected_apns > 0 and expected_fcm > 0, "the seed gave one provider no pushes"
    assert total == expected_apns + expected_fcm
    # The fakes answer every request 200: every push job is one push sent, none missing.
    assert summary["push jobs planned"].startswith(f"{total} "), lines
    assert summary["pushes sent"] == str(total), lines
    assert summary["pushes missing"] == "0", lines
    assert summary["push outcomes"] == f"apns sent {expected_apns} · fcm sent {expected_fcm}"

    # ClickHouse holds, per provider, exactly what the fakes counted (the push sink writes the
    # outcomes to Kafka, the ClickHouse sink stores them; nothing else of this tenant is there).
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WITHIN
    while True:
        counted = {name: delta(now, before[name]) for name, now in push_fakes.counts().items()}
        stored = await asyncio.to_thread(outcomes_in_clickhouse, system, tenant)
        in_clickhouse = {
            provider: FakeCounts(
                accepted=stored[(provider, "sent")],
                rejected=sum(n for (p, o), n in stored.items() if p == provider and o != "sent"),
                abandoned=0,
            )
            for provider in ("apns", "fcm")
        }
        if in_clickhouse == counted or loop.time() > deadline:
            break
        await asyncio.sleep(0.5)
    assert in_clickhouse == counted, f"ClickHouse {dict(stored)}, the fakes {counted}"
    assert counted == {
        "apns": FakeCounts(accepted=expected_apns, rejected=0, abandoned=0),
        "fcm": FakeCounts(accepted=expected_fcm, rejected=0, abandoned=0),
    }

"""The CLI's tables and progress lines on a pipe: plain text a script (or a test) can split."""

from __future__ import annotations

import pytest

from pipelines.console import StatusLine, table_text


def test_a_table_on_a_pipe_is_plain_columns_two_spaces_apart() -> None:
    text = table_text(
        ("NAME", "COUNT", "NOTE"),
        [("kafka", "7", "[topic-unknown] stays as it is"), ("cassandra", "1234", "-")],
        right={"COUNT"},
    )
    assert text.splitlines() == [
        "NAME       COUNT  NOTE",
        "kafka          7  [topic-unknown] stays as it is",
        "cassandra   1234  -",
    ]
    assert "\x1b" not in text


def test_a_long_cell_on_a_pipe_stays_on_one_line() -> None:
    path = "/state/" + "very-long-directory-name/" * 20 + "kafka.log"
    lines = table_text(("SERVICE", "LOG"), [("kafka", path)]).splitlines()
    assert lines[1].split() == ["kafka", path]


def test_a_status_line_on_a_pipe_prints_an_update_every_few_seconds_and_the_final_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with StatusLine(min_interval=60.0) as line:
        line.update("step 1/3")
        line.update("step 2/3")  # within the interval: left out
        line.print("a line that stays")
        line.update("step 3/3", final=True)
    assert capsys.readouterr().err.splitlines() == [
        "step 1/3",
        "a line that stays",
        "step 3/3",
    ]

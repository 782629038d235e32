"""docs/protocol.md stays true to the frame models, the error and close codes, and the routes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from core.settings import Settings
from ingress.app import create_app
from schemas import frames as fr
from schemas.errors import CloseCode, ErrorCode

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def sections(text: str, level: str) -> dict[str, str]:
    parts = re.split(rf"^{level} (.+)$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def frame_sections(title: str) -> dict[str, str]:
    text = sections(DOC.read_text(encoding="utf-8"), "##")[title]
    return {heading.strip("`"): body for heading, body in sections(text, "###").items()}


def rows(text: str) -> list[list[str]]:
    """The cells of a section's table rows (header and separator rows left out)."""
    table = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]


def first_column(text: str) -> list[str]:
    return [cells[0].strip("`") for cells in rows(text)]


def test_every_client_frame_is_documented_in_order() -> None:
    assert list(frame_sections("Client frames")) == list(fr.CLIENT_FRAME_TYPES)
    overview = sections(DOC.read_text(encoding="utf-8"), "##")["Client frames"]
    assert first_column(overview.split("### ")[0]) == list(fr.CLIENT_FRAME_TYPES)


def test_every_server_frame_is_documented_in_order() -> None:
    assert list(frame_sections("Server frames")) == list(fr.SERVER_FRAME_TYPES)


@pytest.mark.parametrize("frame_type", fr.CLIENT_FRAME_TYPES)
def test_client_frame_fields_match_the_model(frame_type: str) -> None:
    fields = first_column(frame_sections("Client frames")[frame_type])
    assert fields == list(fr.CLIENT_FRAME_MODELS[frame_type].model_fields)


@pytest.mark.parametrize("frame_type", fr.SERVER_FRAME_TYPES)
def test_server_frame_fields_match_the_model(frame_type: str) -> None:
    fields = first_column(frame_sections("Server frames")[frame_type])
    assert fields == list(fr.SERVER_FRAME_MODELS[frame_type].model_fields)


def test_every_error_code_is_documented_with_its_status() -> None:
    table = sections(DOC.read_text(encoding="utf-8"), "##")["Error codes"]
    documented = {cells[0].strip("`"): int(cells[1]) for cells in rows(table)}
    assert documented == {code.value: code.http_status for code in ErrorCode}


def test_every_close_code_is_documented() -> None:
    table = sections(DOC.read_text(encoding="utf-8"), "##")["Close codes"]
    documented = {int(cells[0]): cells[1] for cells in rows(table)}
    # 1007 comes from the WebSocket layer (wsproto), not from the gateway's own code.
    assert set(documented) == {int(code) for code in CloseCode} | {1007}
    for code in CloseCode:
        assert documented[code] == code.name.lower().replace("_", " ")


def test_every_rest_route_is_documented(settings: Settings) -> None:
    table = sections(DOC.read_text(encoding="utf-8"), "##")["REST API"]
    documented = {(cells[0].strip("`"), cells[1].strip("`")) for cells in rows(table)}
    routes = {
        (method.upper(), path)
        for path, methods in create_app(settings).openapi()["paths"].items()
        for method in methods
    }
    assert documented == routes

"""Writes the JSON Schema of every event, record and frame into ``schemas/json/``.

The files are for people and for clients in other languages; the pydantic models stay the source
of truth, and tests/schemas/test_jsonschema.py fails when the committed files drift from them.
Regenerate with ``python -m schemas.jsonschema`` (``--check`` only compares).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from schemas.events import (
    EVENT_MODELS,
    GroupDelivery,
    InboxRecord,
    LiveDelivery,
    PushJob,
    PushOutcomeRecord,
    SyncRecord,
)
from schemas.frames import CLIENT_FRAME_MODELS, SERVER_FRAME_MODELS

#: Where the committed files live.
JSON_DIR = Path(__file__).resolve().parent / "json"
_DIALECT = "https://json-schema.org/draft/2020-12/schema"

_log = logging.getLogger(__name__)


def _render(model: type[BaseModel], relative: Path) -> str:
    schema = model.model_json_schema(mode="validation")
    if model not in EVENT_MODELS.values():
        schema = _link_events(schema, up="../" * (len(relative.parts) - 1))
    return json.dumps({"$schema": _DIALECT, **schema}, indent=2, ensure_ascii=False) + "\n"


def _link_events(schema: dict[str, Any], up: str) -> dict[str, Any]:
    """Point a frame's or record's events at the event files instead of inlining all of them."""
    files = {
        model.__name__: f"{up}events/{event_type}.json"
        for event_type, model in EVENT_MODELS.items()
    }

    def relink(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: relink(value) for key, value in node.items()}
        if isinstance(node, list):
            return [relink(value) for value in node]
        if isinstance(node, str) and node.startswith("#/$defs/"):
            return files.get(node.removeprefix("#/$defs/"), node)
        return node

    linked: dict[str, Any] = relink(schema)
    definitions: dict[str, Any] = linked.pop("$defs", {})
    kept: dict[str, Any] = {}
    pending = _local_refs(linked)
    while pending:
        name = pending.pop()
        if name not in kept:
            kept[name] = definitions[name]
            pending |= _local_refs(definitions[name])
    if kept:
        linked["$defs"] = {name: kept[name] for name in definitions if name in kept}
    return linked


def _local_refs(node: Any) -> set[str]:
    """The names of the ``$defs`` a schema fragment refers to (in refs and discriminators)."""
    if isinstance(node, dict):
        return set().union(*(_local_refs(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(_local_refs(value) for value in node))
    if isinstance(node, str) and node.startswith("#/$defs/"):
        return {node.removeprefix("#/$defs/")}
    return set()


def generate() -> dict[Path, str]:
    """Every schema file by its path relative to ``schemas/json``: one per event type, one per
    frame type and one per record that carries events (which refer to the event files)."""
    models: dict[Path, type[BaseModel]] = {}
    for event_type, event_model in EVENT_MODELS.items():
        models[Path("events") / f"{event_type}.json"] = event_model
    for frame_type, client_model in CLIENT_FRAME_MODELS.items():
        models[Path("frames") / "client" / f"{frame_type}.json"] = client_model
    for frame_type, server_model in SERVER_FRAME_MODELS.items():
        models[Path("frames") / "server" / f"{frame_type}.json"] = server_model
    models[Path("records") / "live-delivery.json"] = LiveDelivery
    models[Path("records") / "group-delivery.json"] = GroupDelivery
    models[Path("records") / "inbox.json"] = InboxRecord
    models[Path("records") / "sync.json"] = SyncRecord
    models[Path("records") / "push-job.json"] = PushJob
    models[Path("records") / "push-outcome.json"] = PushOutcomeRecord
    return {relative: _render(model, relative) for relative, model in models.items()}


def drift(root: Path = JSON_DIR) -> list[str]:
    """What differs between the files under ``root`` and the models; empty when in step."""
    expected = generate()
    present = {path.relative_to(root) for path in root.rglob("*.json")}
    problems = [f"missing: {path}" for path in sorted(expected.keys() - present)]
    problems += [f"stale (no model): {path}" for path in sorted(present - expected.keys())]
    problems += [
        f"differs: {path}"
        for path in sorted(expected.keys() & present)
        if (root / path).read_text(encoding="utf-8") != expected[path]
    ]
    return problems


def write(root: Path = JSON_DIR) -> list[Path]:
    """Write every schema file under ``root`` and delete files no model produces any more."""
    expected = generate()
    for stale in root.rglob("*.json"):
        if stale.relative_to(root) not in expected:
            stale.unlink()
    written = []
    for relative, text in expected.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="only report drift; exit 1 if any")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.check:
        problems = drift()
        for problem in problems:
            _log.error(problem)
        return 1 if problems else 0
    written = write()
    _log.info("schemas up to date in %s (%d files rewritten)", JSON_DIR, len(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The committed JSON Schema files are exactly what the models generate."""

from __future__ import annotations

import json
import posixpath
from pathlib import Path

from schemas import jsonschema
from schemas.events import EVENT_TYPES
from schemas.frames import CLIENT_FRAME_TYPES, SERVER_FRAME_TYPES


def test_committed_schemas_match_the_models() -> None:
    problems = jsonschema.drift()
    assert problems == [], "regenerate with `python -m schemas.jsonschema`:\n" + "\n".join(problems)


def test_one_file_per_event_and_frame_type() -> None:
    names = {path.as_posix() for path in jsonschema.generate()}
    assert {f"events/{t}.json" for t in EVENT_TYPES} <= names
    assert {f"frames/client/{t}.json" for t in CLIENT_FRAME_TYPES} <= names
    assert {f"frames/server/{t}.json" for t in SERVER_FRAME_TYPES} <= names
    records = {name for name in names if name.startswith("records/")}
    assert records == {
        "records/live-delivery.json",
        "records/group-delivery.json",
        "records/inbox.json",
        "records/sync.json",
        "records/push-job.json",
        "records/push-outcome.json",
    }
    assert len(names) == (
        len(EVENT_TYPES) + len(CLIENT_FRAME_TYPES) + len(SERVER_FRAME_TYPES) + len(records)
    )


def test_drift_is_detected_and_write_repairs_it(tmp_path: Path) -> None:
    jsonschema.write(tmp_path)
    assert jsonschema.drift(tmp_path) == []
    event_file = tmp_path / "events" / "message.sent.json"
    event_file.write_text(event_file.read_text().replace('"maxLength": 64', '"maxLength": 65'))
    (tmp_path / "events" / "message.vanished.json").write_text("{}")
    (tmp_path / "frames" / "client" / "ping.json").unlink()
    assert jsonschema.drift(tmp_path) == [
        "missing: frames/client/ping.json",
        "stale (no model): events/message.vanished.json",
        "differs: events/message.sent.json",
    ]
    jsonschema.write(tmp_path)
    assert jsonschema.drift(tmp_path) == []


def test_frames_refer_to_event_files_that_exist() -> None:
    files = jsonschema.generate()
    sync_page = Path("frames/server/sync_page.json")
    event_field = json.loads(files[sync_page])["$defs"]["SyncedEvent"]["properties"]["event"]
    targets = {
        posixpath.normpath(posixpath.join(sync_page.parent.as_posix(), reference))
        for reference in event_field["discriminator"]["mapping"].values()
    }
    assert targets == {f"events/{t}.json" for t in EVENT_TYPES}
    assert targets <= {path.as_posix() for path in files}


def test_records_refer_to_event_files_that_exist() -> None:
    files = jsonschema.generate()
    for name in ("live-delivery", "inbox", "sync"):
        record = Path("records") / f"{name}.json"
        schema = json.loads(files[record])
        assert "event" in schema["required"], record
        mapping = schema["properties"]["event"]["discriminator"]["mapping"]
        targets = {
            posixpath.normpath(posixpath.join(record.parent.as_posix(), reference))
            for reference in mapping.values()
        }
        assert targets == {f"events/{t}.json" for t in EVENT_TYPES}, record
    push_job = json.loads(files[Path("records/push-job.json")])
    assert "event" not in push_job["properties"]
    assert set(push_job["required"]) >= {"job_id", "user_id", "message_id", "unread_total"}
    push_outcome = json.loads(files[Path("records/push-outcome.json")])
    assert "event" not in push_outcome["properties"]
    assert set(push_outcome["required"]) >= {"job_id", "user_id", "attempt", "outcome"}


def test_type_is_required_on_the_wire() -> None:
    for relative, text in jsonschema.generate().items():
        if relative.parts[0] == "records":
            continue
        assert json.loads(text)["required"][0] == "type", relative

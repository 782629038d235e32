"""Random frames at a real gateway: it never crashes, answers each with exactly one frame (an
``error`` with a known code unless the frame happened to be valid), and keeps serving others."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import ClientConnection, connect

from schemas import frames as fr
from schemas.errors import ErrorCode
from tests.ingress.support import Gateway, JsonObject, hello, unique
from tests.schemas.samples import sample_client_frames

KNOWN_CODES = {code.value for code in ErrorCode}
#: Every client frame as plain JSON, the seeds of the near-valid frames.
SEEDS: list[JsonObject] = [
    json.loads(fr.encode_client_frame(frame)) for frame in sample_client_frames().values()
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def near_valid(draw: st.DrawFn) -> JsonObject:
    """A valid frame with one or two things changed: a field dropped, retyped or added, or the
    type swapped for another frame's (so that fields meet the wrong model)."""
    frame = dict(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 2))):
        mutation = draw(st.sampled_from(["drop", "retype", "add", "swap-type", "long"]))
        key = draw(st.sampled_from(sorted(frame))) if frame else "type"
        if mutation == "drop":
            frame.pop(key, None)
        elif mutation == "retype":
            frame[key] = draw(json_values)
        elif mutation == "add":
            frame[draw(st.text(min_size=1, max_size=10))] = draw(json_values)
        elif mutation == "swap-type":
            frame["type"] = draw(st.sampled_from([*fr.CLIENT_FRAME_TYPES, "teleport", ""]))
        else:
            frame[key] = "x" * draw(st.sampled_from([64, 65, 5_000, 40_000]))
    return frame


def frames() -> st.SearchStrategy[str | bytes]:
    return st.one_of(
        st.binary(max_size=300),
        st.text(max_size=300),
        json_values.map(json.dumps),
        near_valid().map(json.dumps),
        near_valid().map(lambda frame: json.dumps(frame).encode()),
    )


def say_hello(gateway: Gateway, socket_: ClientConnection) -> None:
    socket_.send(json.dumps(hello(gateway.settings, unique("fuzz"), "phone")))
    assert json.loads(socket_.recv(timeout=20))["type"] == "hello_ok"


def test_random_frames_get_one_known_answer_each(gateway: Gateway) -> None:
    answered: dict[str, int] = {}

    @settings(
        max_examples=600,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(frame=frames())
    def throw(fuzzed: ClientConnection, frame: str | bytes) -> None:
        fuzzed.send(frame)
        # A ping behind every frame: exactly two frames come back, its pong and one answer
        # (in either order: a valid send is answered only once Kafka acknowledged it).
        marker = f"marker-{len(answered)}"
        fuzzed.send(json.dumps({"type": "ping", "id": marker}))
        replies = [json.loads(fuzzed.recv(timeout=20)) for _ in range(2)]
        pongs = [reply for reply in replies if reply == {"type": "pong", "id": marker}]
        assert len(pongs) == 1, replies
        [answer] = [reply for reply in replies if reply is not pongs[0]]
        parsed: Any = fr.parse_server_frame(json.dumps(answer))
        if isinstance(parsed, fr.ErrorFrame):
            assert parsed.code in KNOWN_CODES
            answered[parsed.code] = answered.get(parsed.code, 0) + 1
        else:
            assert parsed.type in {
                "accepted",
                "ok",
                "pong",
                "sync_page",
                "history_page",
                "conversation_list",
                "read_by",
            }, answer
            answered[parsed.type] = answered.get(parsed.type, 0) + 1

    with (
        connect(gateway.ws, compression=None, open_timeout=20) as fuzzed,
        connect(gateway.ws, compression=None, open_timeout=20) as bystander,
    ):
        say_hello(gateway, fuzzed)
        say_hello(gateway, bystander)
        throw(fuzzed)
        assert json.loads(_ping(bystander)) == {"type": "pong", "id": "still-there"}
    assert gateway.process.poll() is None
    assert "Traceback" not in gateway.log()
    # The strategies reach deep: bad JSON, bad schemas, bad UTF-8 and valid commands alike.
    assert {"malformed-json", "schema-invalid", "invalid-utf8"} <= set(answered), answered
    assert sum(answered.values()) >= 300


def _ping(socket_: ClientConnection) -> str | bytes:
    socket_.send(json.dumps({"type": "ping", "id": "still-there"}))
    return socket_.recv(timeout=20)

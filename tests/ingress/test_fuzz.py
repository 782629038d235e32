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


#: Frames per generated example: sent back to back, then a ping; 2,000 examples make 100,000
#: frames (issue 16's bar). Hypothesis draws a batch of 50 in about 20 ms on this machine, so the
#: run costs about a minute of generation and as much of the gateway's work.
BATCH = 50
EXAMPLES = 2_000


def test_random_frames_get_one_known_answer_each(gateway: Gateway) -> None:
    """100,000 generated frames at a live gateway: each gets exactly one answer, every error a
    documented code, no traceback in the log, and another client is served throughout."""
    answered: dict[str, int] = {}
    batches = [0]
    delivered = [0]

    def check(answer: JsonObject) -> None:
        parsed: Any = fr.parse_server_frame(json.dumps(answer))
        if isinstance(parsed, fr.ErrorFrame):
            assert parsed.code in KNOWN_CODES, answer
            answered[parsed.code] = answered.get(parsed.code, 0) + 1
        else:
            assert parsed.type in ANSWER_TYPES, answer
            answered[parsed.type] = answered.get(parsed.type, 0) + 1

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(batch=st.lists(frames(), min_size=BATCH, max_size=BATCH))
    def throw(
        fuzzed: ClientConnection, bystander: ClientConnection, batch: list[str | bytes]
    ) -> None:
        for frame in batch:
            fuzzed.send(frame)
        # A ping behind the batch: its pong and one answer per frame come back, in any order
        # (a valid send is answered only once Kafka acknowledged it). A frame answered twice
        # and another not at all would leave a count off by one in a later batch: the final
        # ping below catches that too.
        marker = f"marker-{batches[0]}"
        batches[0] += 1
        fuzzed.send(json.dumps({"type": "ping", "id": marker}))
        answers: list[JsonObject] = []
        ponged = False
        while not ponged or len(answers) < len(batch):
            reply = json.loads(fuzzed.recv(timeout=20))
            if reply == {"type": "pong", "id": marker}:
                ponged = True
            elif reply.get("type") == "event":
                # A fuzzed command that happened to be valid (a conversation created with the
                # fuzzing user in it, a message sent there) is delivered live: not an answer.
                delivered[0] += 1
            else:
                answers.append(reply)
        assert len(answers) == len(batch), answers
        for answer in answers:
            check(answer)
        if batches[0] % 100 == 0:
            # Another client is served throughout (and is not idle long enough to be closed).
            assert json.loads(_ping(bystander)) == {"type": "pong", "id": "still-there"}

    with (
        connect(gateway.ws, compression=None, open_timeout=20, max_size=None) as fuzzed,
        connect(gateway.ws, compression=None, open_timeout=20) as bystander,
    ):
        say_hello(gateway, fuzzed)
        say_hello(gateway, bystander)
        throw(fuzzed, bystander)
        assert json.loads(_ping(fuzzed)) == {"type": "pong", "id": "still-there"}
        assert json.loads(_ping(bystander)) == {"type": "pong", "id": "still-there"}
    assert gateway.process.poll() is None
    assert "Traceback" not in gateway.log()
    # The strategies reach deep: bad JSON, bad schemas, bad UTF-8 and valid commands alike.
    assert {"malformed-json", "schema-invalid", "invalid-utf8", "accepted"} <= set(answered), (
        answered
    )
    assert sum(answered.values()) == BATCH * EXAMPLES, answered


#: What a valid frame is answered with.
ANSWER_TYPES = {
    "accepted",
    "ok",
    "pong",
    "sync_page",
    "history_page",
    "conversation_list",
    "read_by",
}


def _ping(socket_: ClientConnection) -> str | bytes:
    socket_.send(json.dumps({"type": "ping", "id": "still-there"}))
    return socket_.recv(timeout=20)

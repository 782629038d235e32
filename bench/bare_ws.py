"""The calibration server: a bare FastAPI WebSocket endpoint on uvicorn, ``wsproto``, no deflate.

It answers each text frame with a one-line JSON reply named after the request (``hello`` →
``hello_ok``, ``send`` → ``accepted``, ``ping`` → ``pong``) and does nothing else: no auth, no
validation, no Kafka. What imstream costs on top of it, in memory per idle connection and in
frames per second, is what the gateway adds to the WebSocket stack it stands on.

Run it alone with ``python -m bench.bare_ws --port 8765``; the benchmarks start it themselves.
"""

from __future__ import annotations

import argparse
import json

import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

# Only what the endpoint needs is imported, so that the baseline RSS is that of a tiny app.
LOOPBACK = "127.0.0.1"
WS_PATH = "/ws"
_REPLIES = {"hello": "hello_ok", "send": "accepted", "ping": "pong"}

app = FastAPI()


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.websocket(WS_PATH)
async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            request = json.loads(await websocket.receive_text())
            reply = {"type": _REPLIES.get(request.get("type"), "ok"), "id": request.get("id")}
            await websocket.send_text(json.dumps(reply))
    except WebSocketDisconnect:
        return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    arguments = parser.parse_args()
    uvicorn.run(
        app,
        host=LOOPBACK,
        port=arguments.port,
        ws="wsproto",
        ws_per_message_deflate=False,
        log_level="warning",
        access_log=False,
        backlog=4096,
    )


if __name__ == "__main__":
    main()

"""Operations: liveness and readiness (Kafka reachable, live delivery assigned) on both
listeners — a load balancer routes by the client port's ``/readyz`` — and the metrics, on the
internal listener only (``internal_router``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from ingress.deps import GatewayDep
from ingress.gateway import describe

router = APIRouter(tags=["operations"])
#: What only the internal listener serves (``IM_INGRESS__INTERNAL_PORT``).
internal_router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the process serves requests")
async def healthz(gateway: GatewayDep) -> dict[str, Any]:
    return {"status": "ok", "node_id": gateway.node_id, "connections": len(gateway.registry)}


@router.get(
    "/readyz",
    summary="Readiness: Kafka answers, live delivery is assigned, the node is not draining",
    responses={503: {"description": "Not ready; the body says what is missing"}},
)
async def readyz(gateway: GatewayDep) -> JSONResponse:
    readiness = await gateway.readiness()
    return JSONResponse(describe(readiness), status_code=200 if readiness.ready else 503)


@internal_router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
async def metrics(gateway: GatewayDep) -> Response:
    body, content_type = gateway.metrics.render()
    return Response(body, media_type=content_type)

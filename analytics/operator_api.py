"""The operator API of the process that owns ClickHouse: start and watch replays and rebuilds.

Every route needs ``Authorization: Bearer <JWT>`` from the staff issuer (``IM_STAFF_AUTH__*``,
never the clients' key) with the ``operator`` role, checked by the API's gate
(``analytics.access``) before the route runs; ``imstream replay`` and ``imstream
rebuild`` sign one from the staff secret. The operator a job records is the token's ``sub``,
never a field of the request (a body with fields of its own is refused). Errors are
``{"code", "message"}``:

* ``unauthorized`` (401): no token, or one that does not verify (a client token included);
* ``forbidden`` (403): a valid token without the ``operator`` role;
* ``job-missing`` (404); the replay's own codes (400);
* ``invalid-request`` (400): a body that does not fit its model (answered by the app's one
  handler for validation failures, ``analytics.api``).

Routes: ``POST /v1/operator/replays`` ``{"run_id", "ranges": [{"topic", "partition", "start",
"end"}], "rate"}``, ``POST /v1/operator/rebuilds`` ``{"run_id", "since"}`` (both 202 with the
job; the same run id while it runs returns the running job), ``GET /v1/operator/jobs/{id}``,
``DELETE /v1/operator/jobs/{id}`` (ask it to stop; it stops after the chunk in hand).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from analytics.access import principal_of
from analytics.jobs import Job, OperatorJobs
from core.principals import StaffRole
from core.replay import PartitionRange, ReplayError

OPERATOR_PREFIX = "/v1/operator"
_RUN_ID = re.compile(r"^[A-Za-z0-9_]{1,32}$")


class OperatorApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class _Body(BaseModel):
    #: An unknown field (an ``operator`` of the caller's choosing) is refused, not ignored.
    model_config = ConfigDict(extra="forbid")


class RangeBody(_Body):
    topic: str
    partition: int = Field(ge=0)
    start: int = Field(ge=0)
    end: int = Field(ge=0)


class ReplayBody(_Body):
    run_id: str
    ranges: list[RangeBody] = Field(min_length=1)
    rate: float | None = Field(default=None, gt=0)


class RebuildBody(_Body):
    run_id: str
    since: datetime | None = None


def _run_id(text: str) -> str:
    if not _RUN_ID.match(text):
        raise OperatorApiError(
            400, "invalid-request", f"run_id {text!r}: 1-32 letters, digits or _"
        )
    return text


def _operator(request: Request) -> str:
    """The operator's name: the ``sub`` of the staff token the gate verified, if an operator's."""
    principal = principal_of(request)
    if principal.role is not StaffRole.OPERATOR:
        raise OperatorApiError(403, "forbidden", f"the token lacks the {StaffRole.OPERATOR} role")
    return principal.subject


OperatorDep = Annotated[str, Depends(_operator)]


def operator_router(jobs: OperatorJobs) -> APIRouter:
    router = APIRouter(prefix=OPERATOR_PREFIX)

    def found(job_id: str) -> Job:
        job = jobs.get(job_id)
        if job is None:
            raise OperatorApiError(404, "job-missing", f"no job {job_id} in this process")
        return job

    @router.post("/replays", status_code=202, summary="Replay topic ranges into the audit")
    def start_replay(body: ReplayBody, who: OperatorDep) -> dict[str, Any]:
        ranges = [PartitionRange(r.topic, r.partition, r.start, r.end) for r in body.ranges]
        job = jobs.start_replay(ranges, _run_id(body.run_id), body.rate)
        # The operator who started it (a repeated start returns the running job, unchanged).
        job.arguments.setdefault("operator", who)
        return job.as_json()

    @router.post("/rebuilds", status_code=202, summary="Rebuild the audit tables, then swap")
    def start_rebuild(body: RebuildBody, who: OperatorDep) -> dict[str, Any]:
        job = jobs.start_rebuild(_run_id(body.run_id), body.since)
        job.arguments.setdefault("operator", who)
        return job.as_json()

    @router.get("/jobs/{job_id}", summary="A job's state and progress")
    def show(job_id: str, _who: OperatorDep) -> dict[str, Any]:
        return found(job_id).as_json()

    @router.delete("/jobs/{job_id}", summary="Ask a job to stop after its current chunk")
    def stop(job_id: str, _who: OperatorDep) -> dict[str, Any]:
        job = found(job_id)
        job.stop.set()
        return job.as_json()

    return router


def install_operator_api(app: FastAPI, jobs: OperatorJobs) -> None:
    """Add the operator routes and their error answers to ``app`` (an ``analytics_app``, whose
    gate authenticates every request and whose handler answers invalid bodies)."""
    app.include_router(operator_router(jobs))

    async def refused(_request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, OperatorApiError)
        return JSONResponse({"code": error.code, "message": error.message}, error.status)

    async def replay_refused(_request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, ReplayError)
        return JSONResponse({"code": error.code, "message": error.message}, 400)

    app.add_exception_handler(OperatorApiError, refused)
    app.add_exception_handler(ReplayError, replay_refused)

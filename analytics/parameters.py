"""The query parameters of the analytics service's APIs, and how a request that does not fit them
is refused.

Every route declares its query string as a pydantic model (``Annotated[Model, Query()]``) that
FastAPI validates before the route runs. What the models share is here:

- :class:`QueryModel`: an unknown parameter is refused, not ignored (``extra="forbid"``);
- :func:`once_each`: a parameter given twice is refused (FastAPI would keep the last one);
- the field types more than one API takes: :data:`Tenant`, the times :data:`From`, :data:`To`,
  :data:`Since`, :data:`Until` (``parse_time``), :func:`count`.

:func:`refusal` turns FastAPI's report on a request that does not validate into the APIs' error:
``unknown-parameter`` or ``invalid-parameter`` (400) with the parameter in ``field``, as
``{"code", "message", "field"}`` (``analytics.api`` registers the one handler). Rules that tie
parameters together or depend on what the route reads (``from`` before ``to``, a window no wider
than the query's) stay with each API and raise its own error.
"""

from __future__ import annotations

import re
from datetime import datetime
from functools import partial
from typing import Annotated, Any, Final

from fastapi import Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo

from analytics.queries import AnalyticsError, AnalyticsErrorCode, parse_time

TENANT_PATTERN: Final = re.compile(r"^[A-Za-z0-9._:@+=-]{1,64}$")
TENANT_RULE: Final = "tenant must be 1-64 characters of A-Z a-z 0-9 . _ : @ + = -"


class QueryModel(BaseModel):
    """The base of every route's query parameters."""

    #: An unknown parameter (``?sql=``) is refused with ``unknown-parameter``, not ignored.
    model_config = ConfigDict(extra="forbid")


def once_each(request: Request) -> None:
    """A dependency: refuse a parameter given more than once (``?tenant=a&tenant=b``), which
    FastAPI would otherwise read as its last value."""
    seen: set[str] = set()
    for name, _ in request.query_params.multi_items():
        if name in seen:
            raise AnalyticsError(
                AnalyticsErrorCode.INVALID_PARAMETER, f"{name} is given more than once", name
            )
        seen.add(name)


def valid_tenant(value: str | None) -> str | None:
    """A tenant id as the APIs take it: None when absent or empty; raises ValueError."""
    if not value:
        return None
    if not TENANT_PATTERN.match(value):
        raise ValueError(TENANT_RULE)
    return value


def _time(name: str, value: Any) -> datetime | None:
    return value if isinstance(value, datetime) else parse_time(value, name, ValueError)


def count(high: int, default: int) -> BeforeValidator:
    """A whole number from 1 to ``high`` (a ``limit``); empty is ``default``."""

    def parse(value: Any, info: ValidationInfo) -> Any:
        if value == "":
            return default
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = 0
        if not 1 <= number <= high:
            raise ValueError(f"{info.field_name} must be 1 to {high}")
        return number

    return BeforeValidator(parse)


def _empty_is_absent(value: Any) -> Any:
    return None if value == "" else value


#: An optional tenant: empty is none (every tenant, where the route allows it).
Tenant = Annotated[str | None, BeforeValidator(valid_tenant)]
#: Optional times, RFC 3339 with an offset, in UTC; empty is none.
From = Annotated[datetime | None, Field(alias="from"), BeforeValidator(partial(_time, "from"))]
To = Annotated[datetime | None, Field(alias="to"), BeforeValidator(partial(_time, "to"))]
Since = Annotated[datetime | None, BeforeValidator(partial(_time, "since"))]
Until = Annotated[datetime | None, BeforeValidator(partial(_time, "until"))]
#: Optional text: empty is none.
Text = Annotated[str | None, BeforeValidator(_empty_is_absent)]


def refusal(request: Request, error: RequestValidationError) -> AnalyticsError:
    """The API error for a query string that does not fit its model: the first problem, as a
    client fixes one parameter at a time."""
    problem = error.errors()[0]
    location = problem.get("loc", ())
    field = str(location[-1]) if len(location) > 1 else None
    if problem["type"] == "extra_forbidden":
        takes = ", ".join(_parameters(request)) or "no parameters"
        return AnalyticsError(
            AnalyticsErrorCode.UNKNOWN_PARAMETER,
            f"unknown parameter {field!r}; {request.url.path} takes {takes}",
            field,
        )
    # Our own rules raise ValueError; pydantic would prefix their text with "Value error, ".
    if problem["type"] == "value_error":
        message = str(problem["ctx"]["error"])
    else:
        message = f"{field}: {problem['msg']}"
    return AnalyticsError(AnalyticsErrorCode.INVALID_PARAMETER, message, field)


def _parameters(request: Request) -> list[str]:
    """The query parameters the request's route takes (its query models' aliases)."""
    route = request.scope.get("route")
    return _query_names(route.dependant) if isinstance(route, APIRoute) else []


def _query_names(dependant: Dependant) -> list[str]:
    names: list[str] = []
    for parameter in dependant.query_params:
        model = parameter.field_info.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            names.extend(info.alias or name for name, info in model.model_fields.items())
        else:
            names.append(parameter.alias)
    for dependency in dependant.dependencies:
        names.extend(_query_names(dependency))
    return names

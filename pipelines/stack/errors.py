"""Errors an operator can cause while running the local stack, each saying what to do."""

from __future__ import annotations

from enum import StrEnum

from schemas.errors import CodedError


class StackErrorCode(StrEnum):
    JAVA_MISSING = "java-missing"
    JAVA_TOO_OLD = "java-too-old"
    MAVEN_MISSING = "maven-missing"
    MAVEN_FETCH_FAILED = "maven-fetch-failed"
    PORT_IN_USE = "port-in-use"
    BAD_ADDRESS = "bad-address"
    HEALTH_CHECK_FAILED = "health-check-failed"
    CLICKHOUSE_UNAVAILABLE = "clickhouse-unavailable"


class StackError(CodedError[StackErrorCode]):
    """A stack operation failed; ``str(error)`` tells the operator what happened and what to do."""

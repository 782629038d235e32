"""Stable codes of the push sender: reasons it gives for attempts that got no provider answer,
the dead-letter codes of jobs it gives up on, and the error an operator's configuration raises.

Dashboards count these values and dead-letter headers carry them, so a value never changes
meaning once released: add new members, never rename or reuse one.
"""

from __future__ import annotations

from enum import StrEnum


class LocalReason(StrEnum):
    """The ``reason`` of an attempt the provider did not answer (its own reasons pass through)."""

    TIMEOUT = "timeout"
    """No complete answer within the request timeout; the push may or may not have gone out."""
    CONNECTION_ERROR = "connection-error"
    """No connection, or the connection broke before the answer."""
    CIRCUIT_OPEN = "circuit-open"
    """Not attempted: the provider's circuit breaker is open after consecutive failures."""
    AUTH_ERROR = "auth-error"
    """Our credentials were refused before the request (FCM's OAuth token endpoint)."""
    INVALID_RESPONSE = "invalid-response"
    """The provider answered with something that is not its documented protocol."""


class DeadLetterCode(StrEnum):
    """Why a push job was given up: the ``imstream.error.code`` header of its dead letter."""

    RETRIES_EXHAUSTED = "push-retries-exhausted"
    CIRCUIT_OPEN = "push-circuit-open"
    REJECTED = "push-rejected"
    """The provider refused the request for good (a 4xx other than an invalid token)."""
    RETRY_AFTER_TOO_LONG = "push-retry-after-too-long"
    """The provider asked us to wait longer than ``max_retry_after_seconds``."""


class PushConfigError(Exception):
    """A push provider is not configured so that it can work; the message says what to set."""

    code = "push-config"

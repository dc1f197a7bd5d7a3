"""One error hierarchy for Harbour.

Every error carries a machine-readable ``code`` (snake_case, stable, documented) and ``details``
(a JSON-able dict) so that adapters can turn it into an HTTP 4xx body, a rejection event or a dead
letter without guessing.
"""

from __future__ import annotations

from typing import Any


class HarbourError(Exception):
    """Root of every error Harbour raises on purpose."""

    code: str = "harbour_error"

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details: dict[str, Any] = details

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


class ValidationError(HarbourError):
    """Input that does not fit a contract: bad JSON, unknown type, missing field, bad amount."""

    code = "invalid_input"


class InvalidAmountError(ValidationError):
    """An amount that is not a plain decimal string within the asset's scale."""

    code = "invalid_amount"


class DomainError(HarbourError):
    """A business rule refused the command; state is unchanged."""

    code = "domain_rejected"


class ConcurrencyError(HarbourError):
    """An event-stream append lost the race for its expected version."""

    code = "concurrency_conflict"


class DuplicateError(HarbourError):
    """The message was already processed: a no-op, not a failure."""

    code = "duplicate"


class IdempotencyConflictError(HarbourError):
    """The same idempotency key came with a different request body."""

    code = "id_conflict"


class InfrastructureError(HarbourError):
    """Kafka or PostgreSQL failed; ``retryable`` says whether trying again can help."""

    code = "infrastructure"

    def __init__(self, message: str, *, retryable: bool = True, **details: Any) -> None:
        super().__init__(message, **details)
        self.retryable = retryable

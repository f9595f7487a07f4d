"""One error hierarchy for securefed; the CLI turns each into one readable line."""

from __future__ import annotations

__all__ = [
    "SecureFedError",
    "ConfigError",
    "DataError",
    "PrivacyBudgetError",
    "OptionalDependencyError",
    "ProtocolError",
    "DropoutRecoveryError",
    "IntegrityError",
    "AuditError",
]


class SecureFedError(Exception):
    """Root of every error securefed raises on purpose.

    Each subclass also inherits the builtin it is closest to, so callers that
    already catch ``ValueError`` or ``ImportError`` keep working.
    """


class ConfigError(SecureFedError, ValueError):
    """A run configuration (flag, file or argument) is invalid."""


class DataError(SecureFedError, ValueError):
    """A data set is missing, corrupt, or does not fit the task (shapes, labels, sizes)."""


class PrivacyBudgetError(SecureFedError, ValueError):
    """The requested privacy budget cannot be met with the requested training."""


class OptionalDependencyError(SecureFedError, ImportError):
    """A feature needs a package that is not installed."""


class ProtocolError(SecureFedError, RuntimeError):
    """A secure-aggregation protocol step failed; the round is not applied."""


class DropoutRecoveryError(ProtocolError):
    """Too few sites survived a round to recover the aggregate."""


class IntegrityError(ProtocolError):
    """A message, file or report failed an integrity check (tag, hash, length)."""


class AuditError(SecureFedError, ValueError):
    """A run directory cannot be audited (unreadable or malformed input)."""

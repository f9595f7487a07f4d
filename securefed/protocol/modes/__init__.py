"""The ``--secure-agg`` modes. Each is registered in :data:`securefed.plugins.SECURE_AGG`.

A new mode is one module with a :class:`~securefed.protocol.modes.base.SecureSumMode`
subclass, registered with ``securefed.plugins.SECURE_AGG.register(name, "module:Class")``,
and its test.
"""

from __future__ import annotations

from securefed.plugins import SECURE_AGG
from securefed.protocol.modes.base import (
    SecureSumMode,
    SiteProtection,
    SumCollector,
    SumOutcome,
)

__all__ = ["SecureSumMode", "SiteProtection", "SumCollector", "SumOutcome", "get_mode"]


def get_mode(name: str) -> SecureSumMode:
    """The mode ``--secure-agg name`` selects (an instance).

    Raises:
        ConfigError: For an unknown name.

    """
    return SECURE_AGG.get(name)()

"""Registries of the pluggable parts: strategies, server optimizers, secure-sum modes.

Like Opacus' accountant registry and :func:`securefed.register_model`: a built-in is listed by
name with the ``module:attribute`` that implements it, so :mod:`securefed.config` can list the
allowed names (for validation and the CLI's choices) without importing torch. Adding a
strategy is one module and one :func:`register_strategy` call (or a line in ``_BUILTIN``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from securefed.errors import ConfigError

__all__ = [
    "Registry",
    "SECURE_AGG",
    "SERVER_OPTIMIZERS",
    "STRATEGIES",
    "register_server_optimizer",
    "import_callable",
    "register_strategy",
]


class Registry:
    """Names -> implementations, loaded on first use.

    Args:
        kind: What the names are, for messages (``"strategy"``).
        flag: The option that takes them (``"--strategy"``).

    """

    def __init__(self, kind: str, flag: str) -> None:
        self.kind = kind
        self.flag = flag
        self._entries: dict[str, str | Callable[..., Any]] = {}
        self._loaded: dict[str, Any] = {}

    def register(self, name: str, target: str | Callable[..., Any]) -> None:
        """Add ``name``; ``target`` is an object or a ``"module:attribute"`` reference."""
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"{self.kind} name {name!r}: use letters, digits, - and _")
        self._entries[name] = target
        self._loaded.pop(name, None)

    def names(self) -> tuple[str, ...]:
        """Every registered name, built-ins first."""
        return tuple(self._entries)

    def get(self, name: str) -> Any:
        """The implementation registered as ``name``.

        Raises:
            ConfigError: For an unknown name.

        """
        if name not in self._entries:
            raise ConfigError(
                f"{self.flag}: unknown {self.kind} {name!r}; known: {', '.join(self._entries)}"
            )
        if name not in self._loaded:
            target = self._entries[name]
            if isinstance(target, str):
                module, _, attr = target.partition(":")
                target = getattr(importlib.import_module(module), attr)
            self._loaded[name] = target
        return self._loaded[name]


STRATEGIES = Registry("strategy", "--strategy")
SERVER_OPTIMIZERS = Registry("server optimizer", "--server-opt")
SECURE_AGG = Registry("secure aggregation mode", "--secure-agg")

for _name in ("fedavg", "fedprox", "ftl", "cfl"):
    STRATEGIES.register(_name, f"securefed.fl.strategies:{_name.upper()}")
STRATEGIES.register("teacher-student", "securefed.fl.strategies:TEACHER_STUDENT")
for _name, _cls in (("none", "FedAvg"), ("avgm", "FedAvgM"), ("adam", "FedAdam")):
    SERVER_OPTIMIZERS.register(_name, f"securefed.fl.strategies:{_cls}")
for _name, _ref in (
    ("none", "securefed.protocol.modes.plain:PlainMode"),
    ("mask", "securefed.protocol.modes.masking:MaskingMode"),
    ("he", "securefed.protocol.modes.ckks:CKKSMode"),
):
    SECURE_AGG.register(_name, _ref)


def register_strategy(name: str, target: str | Callable[..., Any]) -> None:
    """Make ``--strategy name`` available (see :class:`securefed.fl.strategies.Strategy`)."""
    STRATEGIES.register(name, target)


def register_server_optimizer(name: str, target: str | Callable[..., Any]) -> None:
    """Make ``--server-opt name`` available (a ``securefed.fl.strategies.ServerOptimizer``)."""
    SERVER_OPTIMIZERS.register(name, target)


def import_callable(ref: str, *, flag: str) -> Callable:
    """The callable ``function`` of ``module:function`` (``--model``/``--dataset`` references).

    Raises:
        ConfigError: Naming ``flag``, when the module, the attribute or a callable is missing.

    """
    import importlib

    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{flag} {ref!r}: expected module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's module's
        raise ConfigError(
            f"{flag} {ref!r}: cannot import module {module_name!r} "
            f"({type(exc).__name__}: {exc})".replace("\n", " ")
        ) from exc
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{flag} {ref!r}: module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{flag} {ref!r}: {attr!r} is a {type(obj).__name__}, not a function")
    return obj

"""A user's own data sets: loaders registered by name, or named ``module:function``.

A loader is a function called as ``loader(seed=SEED, **data_options)`` (``SEED`` is the run's
``--seed``, ``data_options`` its ``--data-option KEY=VALUE`` pairs) that returns a
:class:`~securefed.data.bundle.DatasetBundle`. The bundle validates the arrays (float32
images in [0, 1], int64 labels in ``[0, num_classes)``, matching shapes) and fingerprints them
for the privacy report, exactly as for the built-in loaders; nothing else is accepted, so no
unchecked data reaches training.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from securefed.data.bundle import DatasetBundle
from securefed.data.medmnist import MEDMNIST_CLASS_NAMES
from securefed.errors import ConfigError, DataError

__all__ = ["register_dataset", "registered_datasets", "resolve_dataset", "load_registered"]

#: Names the built-in dispatch owns; a registration may not shadow them.
_BUILTIN = ("synthetic", "synthetic-seg")

_LOADERS: dict[str, Callable[..., Any]] = {}


def register_dataset(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a loader ``f(seed=..., **options) -> DatasetBundle`` under ``name`` (a decorator).

    Example::

        @securefed.register_dataset("tiny")
        def tiny(seed=0):
            ...
            return DatasetBundle(name="tiny", train=..., val=..., test=..., num_classes=2,
                                 class_names=("no", "yes"), source="in memory")

    Args:
        name: The ``--dataset`` name (``RunConfig(dataset=name)``).

    Raises:
        ConfigError: ``name`` is empty or a built-in data set's name.

    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"register_dataset: the name must be a non-empty string (got {name!r})")
    if name in _BUILTIN or name in MEDMNIST_CLASS_NAMES:
        raise ConfigError(f"register_dataset: {name!r} is a built-in data set; choose another name")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _LOADERS[name] = fn
        return fn

    return deco


def registered_datasets() -> tuple[str, ...]:
    """Names registered with :func:`register_dataset` (and ``module:function`` ones used)."""
    return tuple(sorted(_LOADERS))


def resolve_dataset(name: str) -> bool:
    """Whether ``name`` is a user data set; a ``module:function`` name is imported and registered.

    Returns:
        True for a registered (or now registered ``module:function``) name; False for any
        other name (a built-in or MedMNIST name, left to :func:`load_dataset`).

    Raises:
        ConfigError: (naming ``--dataset``) the module cannot be imported, or the attribute is
            missing or not callable.

    """
    if name in _LOADERS:
        return True
    if ":" not in name:
        return False
    from securefed.plugins import import_callable

    _LOADERS[name] = import_callable(name, flag="--dataset")
    return True


def load_registered(name: str, *, seed: int, **options: Any) -> DatasetBundle:
    """Call the loader of ``name`` as ``loader(seed=seed, **options)`` and check its result.

    Raises:
        ConfigError: ``name`` is not registered, or the loader does not accept ``seed`` and
            these options (naming ``--dataset`` / ``--data-option``).
        DataError: The loader refused its data or built malformed splits (the message names
            ``--dataset``), or returned something other than a DatasetBundle.

    """
    if not resolve_dataset(name):
        raise ConfigError(f"--dataset {name!r}: not a registered data set")
    fn = _LOADERS[name]
    try:
        inspect.signature(fn).bind(seed=seed, **options)
    except TypeError as exc:
        raise ConfigError(
            f"--dataset {name!r}: the loader must accept seed= and the --data-option keys "
            f"({', '.join(sorted(options)) or 'none'}): {exc}"
        ) from exc
    except ValueError:  # no signature (a builtin): let the call decide
        pass
    try:
        bundle = fn(seed=seed, **options)
    except DataError as exc:
        # The loader's own code builds the splits, so a refusal from ArraySplit (NaN pixels,
        # a bad shape) would otherwise not say which data set it came from.
        raise DataError(f"--dataset {name!r}: {exc}") from exc
    if not isinstance(bundle, DatasetBundle):
        raise DataError(
            f"--dataset {name!r}: the loader returned a {type(bundle).__name__}, not a "
            "securefed DatasetBundle"
        )
    return bundle

"""Click options generated from :class:`~securefed.config.RunConfig` field metadata.

Each RunConfig field carries a :class:`~securefed.config.Flag` (option name, help, how a value
is read, choices, how its default shows); :func:`run_config_options` turns every one into the
option of ``securefed train`` and ``deploy run``, and :func:`config_from_flags` turns the parsed
values back into a RunConfig. A new setting is therefore one field. The options parse to None
when not given, so that a ``--config`` file can supply the value; ``--help`` shows the
RunConfig default instead (:class:`ShownDefaultOption`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import click

from securefed.config import Flag, NotAFlag, RunConfig, cli_metadata, flag_for
from securefed.plugins import Registry

__all__ = [
    "ShownDefaultOption",
    "config_from_flags",
    "data_options_from_flag",
    "field_option",
    "flag_fields",
    "option",
    "param_name",
    "run_config_options",
    "shown",
]

_DEFAULTS = RunConfig()
_FIELD_TYPES = {f.name: str(f.type) for f in dataclasses.fields(RunConfig)}


class ShownDefaultOption(click.Option):
    """An option whose shown default may differ from its parse-time default.

    `train`'s options parse to None so that a ``--config`` file can supply the value, so
    click's own ``show_default=True`` would show nothing: ``show_default=<RunConfig default>``
    shows that value instead, as ``[default: 3]`` (click would print a string as ``(3)``).
    Needs click >= 8.2 (``Option.get_help_extra``).
    """

    def get_help_extra(self, ctx: click.Context):  # noqa: D102
        extra = super().get_help_extra(ctx)
        value = self.show_default
        if value is not None and not isinstance(value, bool):
            extra["default"] = shown(value)
        return extra


def shown(value: Any) -> str:
    """A default as a user would type it: 'inf', '1e-05', 'none', '60,40,40,60'."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def option(*names: str, **kwargs: Any):
    """``click.option`` with :class:`ShownDefaultOption`: ``show_default=<value>`` shows it."""
    return click.option(*names, cls=ShownDefaultOption, **kwargs)


# -- value types a field's annotation does not imply ------------------------------------------
class Epsilon(click.ParamType):
    """A positive float, or ``inf`` for no DP."""

    name = "EPS|inf"

    def convert(self, value, param, ctx):  # noqa: D102
        if isinstance(value, float):
            return value
        try:
            eps = float(value)
        except ValueError:
            self.fail(f"{value!r} is not a number or 'inf'", param, ctx)
        if math.isnan(eps) or eps <= 0:
            self.fail(f"must be positive or 'inf' (got {value})", param, ctx)
        return eps

    @staticmethod
    def to_config(value: float) -> float | None:
        """RunConfig spells "no DP" as None (``null`` in a config file)."""
        return None if math.isinf(value) else value


class IntList(click.ParamType):
    """Comma-separated integers, e.g. ``60,40,40,60``."""

    name = "text"  # what --help has always shown for these options

    def __init__(self, example: str) -> None:
        self.example = example

    def convert(self, value, param, ctx):  # noqa: D102
        if isinstance(value, tuple):
            return value
        try:
            return tuple(int(b) for b in value.split(","))
        except ValueError as exc:
            # The hint is the flag as typed, unquoted, as the message has always read.
            raise click.BadParameter(
                f"comma-separated integers, e.g. {self.example}",
                param_hint=param.opts[0] if param else None,
            ) from exc


class KeyValue(click.ParamType):
    """``KEY=VALUE``; the value is read as JSON when it parses (numbers, lists)."""

    name = "KEY=VALUE"

    def convert(self, value, param, ctx):  # noqa: D102
        if isinstance(value, tuple):
            return value
        key, sep, text = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(
                f"expected KEY=VALUE (got {value!r})", param_hint=param.opts[0] if param else None
            )
        try:
            return key, json.loads(text)
        except json.JSONDecodeError:
            return key, text

    @staticmethod
    def to_config(pairs: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
        """The repeated option's pairs as one mapping (a later KEY wins)."""
        return dict(pairs)


class IntChoice(click.Choice):
    """A choice among integers (and keywords), typed as text; an integer comes back as an int.

    ``--secagg-ring-bits``: ``32`` and ``64`` are ints, ``auto`` stays a string.
    """

    def convert(self, value, param, ctx):  # noqa: D102
        chosen = super().convert(str(value), param, ctx)
        return int(chosen) if chosen.lstrip("-").isdigit() else chosen


class RingBits(click.ParamType):
    """``auto`` or a ring size k in bits (``--secagg-ring-bits``); k comes back as an int."""

    name = "ring bits"

    def get_metavar(self, param, ctx=None):  # noqa: D102
        return "[auto|8-64]"

    def convert(self, value, param, ctx):  # noqa: D102
        from securefed.config import RING_BITS_RANGE

        if value == "auto" or isinstance(value, int):
            return value
        low, high = RING_BITS_RANGE
        text = str(value).strip()
        if text.isascii() and text.isdigit() and low <= int(text) <= high:
            return int(text)
        self.fail(f"{value!r} is not auto or an integer from {low} to {high}", param, ctx)


class RegistryChoice(click.Choice):
    """A choice among a :class:`~securefed.plugins.Registry`'s names, read when used.

    So a strategy or mode registered after this module was imported is offered too.
    """

    def __init__(self, registry: Registry) -> None:
        # No super().__init__: it would assign ``choices``, which is read live here.
        self.registry = registry
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:  # noqa: D102
        return self.registry.names()


_PATH_KINDS = {"path": {}, "file": {"dir_okay": False}, "dir": {"file_okay": False}}
_SCALARS = {"int": click.INT, "float": click.FLOAT, "str": None, "bool": None}


def _base_type(field: str) -> str:
    """``int`` for ``int | None``: the annotation without its None."""
    return next(k.strip() for k in _FIELD_TYPES[field].split(" | ") if k.strip() != "None")


def _flag(field: str) -> Flag:
    meta = cli_metadata(field)
    if isinstance(meta, NotAFlag):
        raise ValueError(f"RunConfig.{field} has no option ({meta.reason})")
    return meta


def _param_type(field: str) -> click.ParamType | None:
    """The click type of ``field``'s option (None: click's plain text)."""
    meta, base = _flag(field), _base_type(field)
    if isinstance(meta.choices, Registry):
        return RegistryChoice(meta.choices)
    if meta.choices is not None:
        names = tuple(str(c) for c in meta.choices)
        return IntChoice(names) if base == "int" else click.Choice(names)
    if meta.kind in _PATH_KINDS:
        return click.Path(**_PATH_KINDS[meta.kind])
    if meta.kind == "epsilon":
        return Epsilon()
    if meta.kind == "ring-bits":
        return RingBits()
    if meta.kind == "int-list":
        return IntList(example=shown(getattr(_DEFAULTS, field)))
    if meta.kind == "key-value":
        return KeyValue()
    if meta.kind is not None:
        raise ValueError(f"RunConfig.{field}: unknown option kind {meta.kind!r}")
    if meta.min is not None:
        return click.IntRange(min=meta.min)
    return _SCALARS[base]


def param_name(field: str) -> str:
    """The click parameter name of ``field``'s option (``data_option`` for ``--data-option``)."""
    return flag_for(field).lstrip("-").replace("-", "_")


def field_option(field: str, *, deploy: bool = False):
    """The click option decorator for RunConfig ``field``, from its :class:`Flag`.

    Args:
        field: A RunConfig field name.
        deploy: Shape it for ``deploy run``: hidden when the deployment refuses it (it still
            parses, so the refusal is the deployment's one-line message), and with the
            choices and help the deployment offers.

    """
    meta, base = _flag(field), _base_type(field)
    flag = flag_for(field)
    kwargs: dict[str, Any] = {"default": None, "help": meta.help, "type": _param_type(field)}
    default = getattr(_DEFAULTS, field)
    if base == "bool" and not meta.off:
        kwargs["is_flag"] = True  # switches the setting on; nothing to show as a default
    elif base == "bool":
        flag = f"{flag}/{meta.off}"
        kwargs["show_default"] = meta.shown or (flag_for(field) if default else meta.off)
    else:
        kwargs["show_default"] = meta.shown or shown(default)
    if meta.flag_value is not None:
        kwargs.update(is_flag=False, flag_value=meta.flag_value)
    if meta.kind == "key-value":
        kwargs.update(multiple=True, metavar="KEY=VALUE")
    if deploy:
        kwargs["hidden"] = not meta.deploy
        if meta.deploy_choices is not None:
            kwargs["metavar"] = "[" + "|".join(meta.deploy_choices) + "]"
        if meta.deploy_help is not None:
            kwargs["help"] = meta.deploy_help
    return option(flag, param_name(field), **kwargs)


def flag_fields() -> list[str]:
    """RunConfig fields that have an option, in declaration order."""
    return [
        f.name
        for f in dataclasses.fields(RunConfig)
        if not isinstance(cli_metadata(f.name), NotAFlag)
    ]


def run_config_options(
    *, deploy: bool = False, after: Mapping[str, Sequence[Callable]] | None = None
):
    """A decorator adding one option per RunConfig field, in the fields' order.

    Args:
        deploy: Shape them for ``deploy run`` (see :func:`field_option`).
        after: Hand-written option decorators to list right after a field's option
            (``--no-dp`` after ``--dp-epsilon``).

    """
    decorators: list[Callable] = []
    for field in flag_fields():
        decorators.append(field_option(field, deploy=deploy))
        decorators.extend((after or {}).get(field, ()))

    def apply(f):
        for decorator in reversed(decorators):  # click lists the last-applied option first
            f = decorator(f)
        return f

    return apply


_FIELD_OF_PARAM = {param_name(f): f for f in flag_fields()}


def data_options_from_flag(data_option: tuple) -> dict[str, Any] | None:
    """``--data-option``'s parsed pairs as loader options (None when none was given).

    For commands that take the option without a RunConfig (``securefed pretrain``), so that
    they read it exactly as ``train`` does.
    """
    return KeyValue.to_config(data_option) if data_option else None


def config_from_flags(
    config_file: str | None,
    no_dp: bool,
    data_option: tuple,
    flags: Mapping[str, Any],
    base: RunConfig | None = None,
) -> RunConfig:
    """A RunConfig from ``--config`` and the generated options' values (train and deploy run).

    Args:
        config_file: ``--config``: a JSON file whose settings the flags override.
        no_dp: ``--no-dp`` (same as ``--dp-epsilon inf``).
        data_option: ``--data-option``'s parsed pairs.
        flags: The other generated options' values, by parameter name; None: not given.
        base: What the flags change when no ``--config`` is given (a resumed run's
            configuration); default: RunConfig's defaults.

    """
    if config_file:
        base = RunConfig.from_json(config_file)
    elif base is None:
        base = RunConfig()
    changes = {}
    for param, value in {**flags, param_name("data_options"): data_option}.items():
        if value is None or value == ():  # not given (a repeatable option gives ())
            continue
        field = _FIELD_OF_PARAM[param]
        to_config = getattr(_param_type(field), "to_config", None)
        changes[field] = to_config(value) if to_config else value
    if no_dp:
        changes["dp_epsilon"] = None
    return base.replace(**changes)

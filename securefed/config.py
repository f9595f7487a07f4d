"""One validated run configuration, built from CLI flags or a JSON file."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securefed.errors import ConfigError

__all__ = ["RunConfig", "ACCOUNTANTS", "SECURE_AGG_MODES", "DEVICES"]

ACCOUNTANTS = ("prv", "rdp", "gdp")
SECURE_AGG_MODES = ("none", "mask", "he")
DEVICES = ("auto", "cpu", "cuda")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a federated run; ``config.json`` is this, resolved.

    Defaults are the product's recommended settings: a user who passes only a data set
    and ``dp_epsilon`` should get a good model (the README quotes what they reach).

    Attributes:
        dataset: ``synthetic`` or a MedMNIST name (``NAME.npz`` in ``data_dir``).
        data_dir: Folder holding MedMNIST ``.npz`` files (default: ``~/.medmnist``).
        data: Path of an image-folder tree; overrides ``dataset``.
        model: Registered model name (see ``securefed.models.available_models``).
        clients: Number of sites.
        partition: ``iid``, ``dirichlet:ALPHA`` or ``by-label:K``.
        rounds: Federated rounds.
        local_epochs: Local epochs per round (each an expected pass over the site's data).
        batch_size: Expected batch size; with DP, Poisson sampling at ``q = 1/ceil(n/B)``.
        lr: Local learning rate (SGD with momentum).
        momentum: Local SGD momentum.
        client_fraction: Fraction of sites sampled each round.
        dp_epsilon: Target epsilon per site over the whole run; ``None`` disables DP.
        dp_delta: Target delta; ``None`` derives ``min(1e-5, 1/(10 n_min))``.
        max_grad_norm: Per-sample gradient clipping bound C.
        accountant: ``prv`` (default), ``rdp`` or ``gdp``.
        secure_agg: ``none``, ``mask`` (pairwise masking) or ``he`` (CKKS).
        secagg_threshold: Shamir threshold t (``None``: a 2/3 majority of a neighbourhood).
        secagg_neighbors: SecAgg+ neighbours per site (``None``: all other sites).
        secagg_ring_bits: Fixed-point ring Z_(2^k), k = 32 or 64.
        secagg_clip: Largest |value| the fixed-point encoder accepts per coordinate of the
            pre-scaled update ``n_i * u_i``; larger values are clipped and counted.
        he_poly_modulus_degree: CKKS ring degree N (slots = N/2).
        he_coeff_mod_bit_sizes: CKKS coefficient moduli, in bits.
        he_scale_bits: CKKS scale 2^bits.
        dropout_clients: Simulated dropouts per round: a count K >= 1, or a rate in (0, 1).
        dropout_phase: ``after`` (drop after uploading, recovered by the protocol) or
            ``before`` (drop before uploading; the site's update is left out).
        seed: Seeds data generation, partitioning, model init, sampling and DP noise.
        device: ``auto``, ``cpu`` or ``cuda``.
        conv_acc_tol: Convergence: a round is stable when its accuracy changes by strictly less.
        conv_loss_tol: Convergence: ... and its loss changes by strictly less than this.
        conv_patience: Convergence: consecutive stable rounds needed.

    """

    dataset: str = "synthetic"
    data_dir: str | None = None
    data: str | None = None
    model: str = "cnn"
    clients: int = 3
    partition: str = "iid"
    rounds: int = 10
    local_epochs: int = 2
    batch_size: int = 256
    lr: float = 2.0
    momentum: float = 0.5
    client_fraction: float = 1.0
    dp_epsilon: float | None = 8.0
    dp_delta: float | None = None
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    secure_agg: str = "none"
    secagg_threshold: int | None = None
    secagg_neighbors: int | None = None
    secagg_ring_bits: int = 64
    secagg_clip: float = 1e6
    he_poly_modulus_degree: int = 8192
    he_coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 40, 60)
    he_scale_bits: int = 40
    dropout_clients: float = 0.0
    dropout_phase: str = "after"
    seed: int = 0
    device: str = "auto"
    conv_acc_tol: float = 0.005
    conv_loss_tol: float = 0.01
    conv_patience: int = 3

    def __post_init__(self) -> None:
        _check(self.clients >= 1, f"`clients` must be at least 1 (got {self.clients}).")
        _check(self.rounds >= 1, f"`rounds` must be at least 1 (got {self.rounds}).")
        _check(
            self.local_epochs >= 1, f"`local_epochs` must be at least 1 (got {self.local_epochs})."
        )
        _check(self.batch_size >= 1, f"`batch_size` must be at least 1 (got {self.batch_size}).")
        _check(math.isfinite(self.lr) and self.lr > 0, f"`lr` must be positive (got {self.lr}).")
        _check(0 <= self.momentum < 1, f"`momentum` must be in [0, 1) (got {self.momentum}).")
        _check(
            0 < self.client_fraction <= 1,
            f"`client_fraction` must be in (0, 1] (got {self.client_fraction}).",
        )
        if self.dp_epsilon is not None:
            _check(
                math.isfinite(self.dp_epsilon) and self.dp_epsilon > 0,
                f"`dp_epsilon` must be positive and finite, or None for no DP "
                f"(got {self.dp_epsilon}).",
            )
        if self.dp_delta is not None:
            _check(0 < self.dp_delta < 1, f"`dp_delta` must be in (0, 1) (got {self.dp_delta}).")
        _check(
            math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0,
            f"`max_grad_norm` must be positive (got {self.max_grad_norm}).",
        )
        _check(
            self.accountant in ACCOUNTANTS,
            f"`accountant` must be one of {', '.join(ACCOUNTANTS)} (got {self.accountant!r}).",
        )
        _check(
            self.secure_agg in SECURE_AGG_MODES,
            f"`secure_agg` must be one of {', '.join(SECURE_AGG_MODES)} (got {self.secure_agg!r}).",
        )
        _check(
            self.device in DEVICES,
            f"`device` must be one of {', '.join(DEVICES)} (got {self.device!r}).",
        )
        _check(
            self.secagg_ring_bits in (32, 64),
            f"`secagg_ring_bits` must be 32 or 64 (got {self.secagg_ring_bits}).",
        )
        _check(self.secagg_clip > 0, f"`secagg_clip` must be positive (got {self.secagg_clip}).")
        _check(
            self.dropout_clients >= 0
            and (self.dropout_clients < 1 or float(self.dropout_clients).is_integer()),
            "`dropout_clients` must be a whole count >= 1 or a rate in [0, 1) "
            f"(got {self.dropout_clients}).",
        )
        _check(
            self.dropout_phase in ("after", "before"),
            f"`dropout_phase` must be 'after' or 'before' (got {self.dropout_phase!r}).",
        )
        object.__setattr__(self, "he_coeff_mod_bit_sizes", tuple(self.he_coeff_mod_bit_sizes))
        _check(self.conv_patience >= 1, "`conv_patience` must be at least 1.")
        _check(self.conv_acc_tol >= 0 and self.conv_loss_tol >= 0, "tolerances must be >= 0.")

    @property
    def dp_enabled(self) -> bool:
        """Whether local training is DP-SGD."""
        return self.dp_epsilon is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (``dp_epsilon`` None means no DP)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build from a dict, rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown configuration keys: {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> RunConfig:
        """Read a configuration file written as JSON (e.g. a previous run's ``config.json``)."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read configuration ({exc})") from exc
        if isinstance(data, dict) and "run" in data:
            data = data["run"]
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a configuration must be a JSON object")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

"""One hospital's side of a deployed run: its own data, its DP-SGD training, its evaluation.

The same code paths as the in-process runtime (:mod:`securefed.fl.simulation`): the shard
(:func:`site_splits`), the privacy plan (:func:`plan_site_privacy`), the local update
(:func:`local_update`), the model registry and the task's metrics. A site process is
short-lived (Flower starts one per message), so everything is rebuilt from the run
configuration, the node configuration and the message.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from securefed.config import RunConfig
from securefed.data.dataset import ArraySplit, load_dataset
from securefed.dp.ledger import PrivacyEvent, PrivacyLedger
from securefed.dp.signing import SiteSigner, site_claim
from securefed.dp.trainer import DPPlan, SiteTrainer
from securefed.errors import (
    ConfigError,
    DataError,
    IntegrityError,
    PrivacyBudgetError,
    ProtocolError,
)
from securefed.fl.params import ParamLayout
from securefed.fl.simulation import (
    local_update,
    model_spec,
    plan_site_privacy,
    resolve_device,
    site_splits,
    task_for,
    training_dataset,
)
from securefed.models import build_model

log = logging.getLogger("securefed.site")

__all__ = [
    "NodeSettings",
    "DeployedSite",
    "deployed_claim",
    "weights_to_bytes",
    "weights_from_bytes",
]


@dataclass(frozen=True)
class NodeSettings:
    """What a hospital's SuperNode says about itself (Flower ``--node-config``).

    Attributes:
        site_id: This site's id in the federation, 0..N-1 (its Shamir index is id + 1).
        dataset: Data set name or loader (default: the run's).
        data_dir: Folder of the data set (default: the run's).
        data: A data folder or file (default: the run's).
        shard: Take shard ``site_id`` of ``clients`` shards of the data, exactly as the
            in-process runtime would: for trials where every site reads one shared data set.
            Off (the default), the site's whole training split is its private data.
        device: ``cpu``, ``cuda`` or ``auto`` (default: the run's).
        he_key: This site's CKKS secret-context file (``ckks-<id>.secret`` from
            ``securefed deploy he-keys``) for ``--secure-agg he``; the ``.public`` file
            beside it is sent to the server.
        max_epsilon: The hospital's own privacy policy: refuse any run whose target epsilon
            is above it, or that is not DP at all. The run configuration comes from the
            server; this is the site's check on it.
        max_delta: Refuse any run whose delta bound (``--dp-delta``, default 1e-5) is above
            it. The site always lowers delta to at most ``1/(10 n)`` for its own size.
        disclose_size: Allow this site's training-set size to be written into the run's
            files; a run that asks for sizes (``--disclose-site-sizes``) is refused otherwise.
        signing_key: This site's Ed25519 key file: it signs the site's privacy claim every
            round, so the run's report cannot be rewritten in its name. Required for DP runs.
        allow_reproducible_noise: Accept runs with ``reproducible_noise`` (DP noise derived
            from the run's seed, which the server and every site know). Off by default: such
            a run's epsilon does not hold against them, so a site must opt in.

    """

    site_id: int
    dataset: str | None = None
    data_dir: str | None = None
    data: str | None = None
    shard: bool = False
    device: str | None = None
    he_key: str | None = None
    max_epsilon: float | None = None
    max_delta: float | None = None
    disclose_size: bool = False
    signing_key: str | None = None
    allow_reproducible_noise: bool = False

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeSettings:
        """Read Flower's node config (keys ``site-id``, ``dataset``, ``data-dir``, ...).

        Raises:
            ConfigError: If ``site-id`` is missing or not a non-negative integer, or a key
                is unknown (a typo would otherwise silently fall back to a default).

        """
        known = {
            "site-id",
            "dataset",
            "data-dir",
            "data",
            "shard",
            "device",
            "he-key",
            "max-epsilon",
            "max-delta",
            "disclose-size",
            "signing-key",
            "allow-reproducible-noise",
        }
        unknown = sorted(set(node_config) - known)
        if unknown:
            raise ConfigError(f"node config: unknown keys {unknown}; known: {sorted(known)}")
        raw = node_config.get("site-id")
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
            raise ConfigError(f"node config: `site-id` must be an integer >= 0 (got {raw!r})")

        allow = node_config.get("allow-reproducible-noise", False)
        if not isinstance(allow, bool):
            raise ConfigError(
                f"node config: `allow-reproducible-noise` must be true or false (got {allow!r})"
            )

        def text(key: str) -> str | None:
            value = node_config.get(key)
            return None if value in (None, "") else str(value)

        return cls(
            site_id=raw,
            dataset=text("dataset"),
            data_dir=text("data-dir"),
            data=text("data"),
            shard=bool(node_config.get("shard", False)),
            device=text("device"),
            he_key=text("he-key"),
            max_epsilon=_positive(node_config.get("max-epsilon"), "max-epsilon"),
            max_delta=_positive(node_config.get("max-delta"), "max-delta"),
            disclose_size=bool(node_config.get("disclose-size", False)),
            signing_key=text("signing-key"),
            allow_reproducible_noise=allow,
        )

    def check_policy(self, config: RunConfig) -> None:
        """Refuse a run the hospital's policy does not allow.

        The site pins its own parameters: a run from the server that is looser than the
        site's policy (a larger epsilon or delta, or sizes the site keeps private) is refused.

        Raises:
            PrivacyBudgetError: If the run breaks the site's policy.

        """
        if config.disclose_site_sizes and not self.disclose_size:
            raise PrivacyBudgetError(
                f"site {self.site_id}: the run asks sites to disclose their training-set size; "
                "this site keeps it private (node config disclose-size=false)"
            )
        from securefed.dp.accounting import run_delta_bound

        run_delta = run_delta_bound(config.dp_delta)
        if self.max_delta is not None and config.dp_enabled and run_delta > self.max_delta:
            raise PrivacyBudgetError(
                f"site {self.site_id}: the run allows delta={run_delta:g}, above this site's "
                f"policy max-delta={self.max_delta:g}"
            )
        if config.reproducible_noise and not self.allow_reproducible_noise:
            raise PrivacyBudgetError(
                f"site {self.site_id}: the run asks for reproducible DP noise (derived from its "
                "seed, so its epsilon does not hold against whoever knows it); this site's "
                "node config does not set allow-reproducible-noise"
            )
        if self.max_epsilon is None:
            return
        eps = config.dp_epsilon
        if eps is None or eps > self.max_epsilon:
            raise PrivacyBudgetError(
                f"site {self.site_id}: the run targets epsilon={eps if eps is not None else 'inf'}"
                f", above this site's policy max-epsilon={self.max_epsilon:g}"
            )

    def signer(self) -> SiteSigner:
        """This site's claim-signing key.

        Raises:
            ConfigError: If no key is configured, or the file is unreadable or too open.

        """
        if self.signing_key is None:
            raise ConfigError(
                f"site {self.site_id}: a DP run needs this site's signing key "
                "(securefed deploy site --signing-key FILE; node config `signing-key`)"
            )
        try:
            return SiteSigner.load(self.signing_key)
        except (OSError, ValueError, IntegrityError) as exc:
            raise ConfigError(f"site {self.site_id}: signing key: {exc}") from exc

    def he_contexts(self) -> tuple[bytes, bytes]:
        """This site's CKKS (secret, public) contexts, read from ``he-key`` and its twin.

        Raises:
            ConfigError: If no key is configured or a file is missing or malformed.

        """
        from securefed.crypto.ckks import read_key_file

        if self.he_key is None:
            raise ConfigError(
                f"site {self.site_id}: --secure-agg he needs the CKKS key (node config `he-key`)"
            )
        secret = Path(self.he_key)
        if secret.suffix != ".secret":
            raise ConfigError(f"{secret}: expected the ckks-<id>.secret file")
        return read_key_file(secret), read_key_file(secret.with_suffix(".public"))


def _positive(value: Any, key: str) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"node config: `{key}` must be a positive number (got {value!r})")
    return float(value)


def deployed_claim(
    config: RunConfig,
    *,
    client_id: int,
    plan: DPPlan,
    events: Sequence[Mapping[str, Any]],
    epsilon: float,
    num_samples: int | None = None,
) -> dict[str, Any]:
    """The claim a deployed site signs and the server checks: one function for both sides.

    Args:
        config: The run.
        client_id: The site.
        plan: The site's DP plan.
        events: Every DP event of the site so far, in ledger order.
        epsilon: The site's epsilon over ``events``.
        num_samples: The site's size, only if it discloses it.

    """
    from securefed.dp.accounting import ADJACENCY
    from securefed.fl.run import noise_description

    entry: dict[str, Any] = {
        "client_id": client_id,
        "delta": plan.delta,
        "noise_multiplier": plan.noise_multiplier,
        "sample_rate": plan.sample_rate,
        "max_grad_norm": plan.max_grad_norm,
        "planned_steps": plan.planned_steps,
        "epsilon": epsilon,
    }
    if num_samples is not None:
        entry["num_samples"] = num_samples
    return site_claim(
        entry=entry,
        events=events,
        run=config.to_dict(),
        noise=noise_description(config)[0],
        adjacency=ADJACENCY,
        accountant=config.accountant,
    )


def weights_to_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    """A state dict as safetensors bytes (the only weight format that crosses the network)."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in state.items()})


def weights_from_bytes(data: bytes, *, what: str) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes; anything else (a pickle, a truncated file) is refused."""
    from safetensors.torch import load

    try:
        return dict(load(bytes(data)))
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise ProtocolError(f"{what}: not valid safetensors weights ({exc})") from exc


class DeployedSite:
    """A site's data, model and trainer, rebuilt in each site process.

    Args:
        config: The run configuration (from the server).
        node: What the site's own node configuration says.

    """

    def __init__(self, config: RunConfig, node: NodeSettings) -> None:
        node.check_policy(config)
        self.config = config
        self.node = node
        # Loaded first: a DP run without the site's key stops before any data is read.
        self.signer = node.signer() if config.dp_enabled else None
        self.device = resolve_device(node.device or config.device)
        self.bundle = load_dataset(
            name=node.dataset or config.dataset,
            data_dir=node.data_dir if node.data_dir is not None else config.data_dir,
            data=node.data if node.data is not None else config.data,
            seed=config.seed,
            **config.loader_options,
        )
        self.task = task_for(self.bundle, config)
        self.train, self.heldout = self._split()
        self.spec = model_spec(self.bundle, self.task, config)

    def _split(self) -> tuple[ArraySplit, ArraySplit | None]:
        if not self.node.shard:
            return self.bundle.train, self.bundle.val
        if self.node.site_id >= self.config.clients:
            raise ConfigError(
                f"node config: site-id {self.node.site_id} but the run has "
                f"{self.config.clients} sites (ids 0..{self.config.clients - 1})"
            )
        try:
            return site_splits(self.config, train=self.bundle.train, val=self.bundle.val)[
                self.node.site_id
            ]
        except DataError as exc:
            raise DataError(f"{self.bundle.source}: {exc}") from exc

    def describe(self) -> dict[str, Any]:
        """What the site tells the server at set-up: the model shape, no records.

        Its training-set size only if the site's policy allows it and the run asks for it.
        """
        out = {
            "site_id": self.node.site_id,
            "num_heldout": len(self.heldout) if self.heldout is not None else 0,
            "dataset": self.bundle.name,
            # Keyed by the site's own secret: the server can tell that the data did not
            # change between sessions, but cannot test a guess of the data against it.
            "fingerprint": (
                self.signer.keyed_digest(self.bundle.fingerprint, purpose="data-fingerprint")
                if self.signer is not None
                else self.bundle.fingerprint
            ),
            "task": self.task.name,
            "spec": {
                "in_channels": self.spec.in_channels,
                "num_classes": self.spec.num_classes,
                "spatial_dims": self.spec.spatial_dims,
                "image_shape": list(self.spec.image_shape),
            },
        }
        if self.config.disclose_site_sizes and self.node.disclose_size:
            out["num_samples"] = len(self.train)
        if self.signer is not None:
            out["signing_key"] = self.signer.public_key_hex
        return out

    def model(self, weights: bytes, *, layout_keys: Sequence[str]) -> tuple[Any, ParamLayout]:
        """The global model from the server's weights, frozen as the run says.

        Raises:
            ProtocolError: If the weights or the trainable-parameter list do not fit the model.

        """
        from securefed.models.transfer import freeze

        built = build_model(name=self.config.model, spec=self.spec)
        model = built.module.to(self.device)
        state = weights_from_bytes(weights, what="the global weights")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ProtocolError(f"the global weights do not fit the model ({first})") from exc
        spec = self.config.effective_freeze
        if spec != "none":
            freeze(model, spec=spec, head_prefixes=built.head_prefixes)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        layout = ParamLayout(model.state_dict(), keys=trainable if spec != "none" else None)
        if list(layout.keys) != list(layout_keys):
            raise ProtocolError(
                "the server's list of aggregated parameters differs from this site's model"
            )
        return model, layout

    def fit(
        self,
        *,
        weights: bytes,
        layout_keys: Sequence[str],
        round_index: int,
        history: Sequence[Mapping[str, Any]],
    ) -> dict[str, Any]:
        """Train one round with DP-SGD; return the vector to aggregate and the accounting.

        Args:
            weights: The global weights (safetensors).
            layout_keys: Parameters the server aggregates, in order.
            round_index: 1-based round.
            history: This site's DP events of earlier rounds, so the accountant carries on.

        """
        model, layout = self.model(weights, layout_keys=layout_keys)
        ledger = PrivacyLedger()
        plan = None
        if self.config.dp_enabled:
            # The site picks its own delta from its size; nothing the server sends sets it.
            plan = plan_site_privacy(self.config, num_samples=len(self.train))
        trainer = SiteTrainer(
            client_id=self.node.site_id,
            dataset=training_dataset(
                self.config,
                train=self.train,
                spatial_dims=self.bundle.spatial_dims,
                site_id=self.node.site_id,
            ),
            plan=plan,
            ledger=ledger,
            batch_size=self.config.batch_size,
            lr=self.config.lr,
            momentum=self.config.momentum,
            device=self.device,
            max_grad_norm=self.config.max_grad_norm,
            max_physical_batch_size=self.config.max_physical_batch_size,
            loss_fn=self.task.loss_fn,
        )
        try:
            earlier = [PrivacyEvent(**e) for e in history]
        except TypeError as exc:
            raise ProtocolError(f"malformed privacy history from the server ({exc})") from exc
        if any(e.round >= round_index for e in earlier):
            raise ProtocolError(f"privacy history holds events of round {round_index} or later")
        if plan is not None:
            trainer.resume_accounting(earlier)
        vec, loss, seconds, _ = local_update(
            self.config, trainer=trainer, layout=layout, model=model, round_index=round_index
        )
        new = [e.to_dict() for e in ledger.events[len(earlier) :]]
        signature = None
        if plan is not None:
            signature = self._sign(plan, [e.to_dict() for e in ledger.events], trainer.epsilon())
        # The training loss is an un-noised function of the records: it stays in the site's
        # own log.
        log.info("site %d round %d: train loss %.4f", self.node.site_id, round_index, loss)
        return {
            "vector": np.asarray(vec, dtype=np.float64),
            "events": new,
            "epsilon": trainer.epsilon() if plan is not None else None,
            "signature": signature,
            "plan": (
                {
                    "noise_multiplier": plan.noise_multiplier,
                    "sample_rate": plan.sample_rate,
                    "max_grad_norm": plan.max_grad_norm,
                    "planned_steps": plan.planned_steps,
                    "delta": plan.delta,
                    "accountant": plan.accountant,
                }
                if plan is not None
                else None
            ),
        }

    def _sign(self, plan: DPPlan, events: list[dict[str, Any]], epsilon: float) -> str:
        """Sign the claim the run's report must state for this site after this round."""
        if self.signer is None:
            raise ConfigError(f"site {self.node.site_id}: no signing key for a DP claim")
        claim = deployed_claim(
            self.config,
            client_id=self.node.site_id,
            plan=plan,
            events=events,
            epsilon=epsilon,
            num_samples=len(self.train) if self.config.disclose_site_sizes else None,
        )
        return self.signer.sign_claim(claim)

    def evaluate(self, *, weights: bytes, layout_keys: Sequence[str]) -> dict[str, Any] | None:
        """The task's metrics of the global model on this site's held-out data (None if none)."""
        if self.heldout is None:
            return None
        model, _ = self.model(weights, layout_keys=layout_keys)
        return self.task.evaluate(model=model, split=self.heldout, device=self.device)

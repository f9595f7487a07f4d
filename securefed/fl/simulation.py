"""The in-process runtime: N simulated sites and one server in a single Python process."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from securefed.config import RunConfig
from securefed.data.dataset import ArraySplit, DatasetBundle, load_dataset
from securefed.data.partition import partition, partition_like
from securefed.dp.accounting import (
    calibrate_noise,
    default_delta,
    sample_rate,
    steps_per_epoch,
)
from securefed.dp.ledger import PrivacyLedger
from securefed.dp.trainer import DPPlan, SiteTrainer
from securefed.errors import DataError, DropoutRecoveryError
from securefed.fl.aggregation import Aggregator, build_aggregator
from securefed.fl.evaluation import evaluate
from securefed.fl.params import ParamLayout
from securefed.metrics import detect_convergence
from securefed.models import BuiltModel, ModelSpec, build_model

__all__ = ["Federation", "RoundRecord", "Site", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when it is available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from securefed.errors import ConfigError

        raise ConfigError("`device` is 'cuda' but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def _seed_for(*parts: int) -> int:
    """A 63-bit seed derived from ``parts`` (SeedSequence mixes them; no folding to 32 bits)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def _aggregator_options(config: RunConfig) -> dict[str, Any]:
    if config.secure_agg == "mask":
        return {
            "threshold": config.secagg_threshold,
            "neighbors": config.secagg_neighbors,
            "ring_bits": config.secagg_ring_bits,
            "clip_range": config.secagg_clip,
        }
    if config.secure_agg == "he":
        return {
            "poly_modulus_degree": config.he_poly_modulus_degree,
            "coeff_mod_bit_sizes": tuple(config.he_coeff_mod_bit_sizes),
            "global_scale_bits": config.he_scale_bits,
        }
    return {}


@dataclass
class Site:
    """One hospital: its private training data, held-out data and local trainer."""

    client_id: int
    train: ArraySplit
    heldout: ArraySplit | None
    trainer: SiteTrainer
    epsilon_per_round: list[float] = field(default_factory=list)


@dataclass
class RoundRecord:
    """What one round produced, for ``metrics.json``."""

    data: dict[str, Any]
    applied: bool


class Federation:
    """Sets up sites, privacy plans and the aggregator for a :class:`RunConfig`, then runs rounds.

    The server side of a round only sees what the aggregator returns: a sum of the
    sites' weighted updates ``sum_i n_i u_i`` and the total weight ``sum_i n_i``.

    Args:
        config: The run configuration.
        bundle: Data, if already loaded (else loaded from ``config``).
        dropout_schedule: ``f(round, participants) -> (drop_before, drop_after)``; ``None``
            for no simulated dropouts.

    """

    def __init__(
        self,
        config: RunConfig,
        *,
        bundle: DatasetBundle | None = None,
        dropout_schedule: Callable[[int, list[int]], tuple[set[int], set[int]]] | None = None,
    ) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.bundle = bundle or load_dataset(
            name=config.dataset, data_dir=config.data_dir, data=config.data, seed=config.seed
        )
        self.dropout_schedule = dropout_schedule
        torch.manual_seed(_seed_for(config.seed, 0x30DE1))
        self.built: BuiltModel = build_model(
            name=config.model,
            spec=ModelSpec(
                in_channels=self.bundle.in_channels,
                num_classes=self.bundle.num_classes,
                spatial_dims=self.bundle.spatial_dims,
            ),
        )
        self.global_model = self.built.module.to(self.device)
        self.layout = ParamLayout(self.global_model.state_dict())
        self.ledger = PrivacyLedger()
        self.sites = self._make_sites()
        self.delta, self.plans = self._plan_privacy()
        for site in self.sites:
            site.trainer = SiteTrainer(
                client_id=site.client_id,
                dataset=site.train.to_torch(),
                plan=self.plans.get(site.client_id),
                ledger=self.ledger,
                batch_size=config.batch_size,
                lr=config.lr,
                momentum=config.momentum,
                device=self.device,
                max_grad_norm=config.max_grad_norm,
            )
        self.aggregator: Aggregator = build_aggregator(
            mode=config.secure_agg,
            n_clients=len(self.participants(1)),
            **_aggregator_options(config),
        )
        if dropout_schedule is None and config.dropout_clients > 0:
            self.dropout_schedule = self._simulated_dropouts
        self.records: list[RoundRecord] = []
        self.elapsed = 0.0

    # -- set-up ---------------------------------------------------------------------------
    def _make_sites(self) -> list[Site]:
        cfg, train = self.config, self.bundle.train
        if cfg.clients > len(train):
            raise DataError(
                f"{self.bundle.source}: {cfg.clients} sites but only {len(train)} training samples"
            )
        try:
            parts = partition(
                train.labels, spec=cfg.partition, n_sites=cfg.clients, seed=_seed_for(cfg.seed, 1)
            )
        except DataError as exc:
            raise DataError(f"{self.bundle.source}: {exc}") from exc
        site_labels = [train.labels[p] for p in parts]
        held = partition_like(
            self.bundle.val.labels, site_train_labels=site_labels, seed=_seed_for(cfg.seed, 2)
        )
        sites = []
        for cid, (p, h) in enumerate(zip(parts, held)):
            sites.append(
                Site(
                    client_id=cid,
                    train=train.subset(indices=p),
                    heldout=self.bundle.val.subset(indices=h) if len(h) else None,
                    trainer=None,  # type: ignore[arg-type]  # set once plans exist
                )
            )
        return sites

    def _plan_privacy(self) -> tuple[float | None, dict[int, DPPlan]]:
        cfg = self.config
        if not cfg.dp_enabled:
            return None, {}
        n_min = min(len(s.train) for s in self.sites)
        delta = cfg.dp_delta if cfg.dp_delta is not None else default_delta(smallest_site=n_min)
        plans = {}
        for s in self.sites:
            n = len(s.train)
            q = sample_rate(num_samples=n, batch_size=cfg.batch_size)
            # Calibrate for the worst case: the site takes part in every round. Sampling
            # by the server is not counted as amplification.
            steps = (
                cfg.rounds
                * cfg.local_epochs
                * steps_per_epoch(num_samples=n, batch_size=cfg.batch_size)
            )
            sigma = calibrate_noise(
                target_epsilon=float(cfg.dp_epsilon),
                delta=delta,
                sample_rate=q,
                steps=steps,
                accountant=cfg.accountant,
            )
            plans[s.client_id] = DPPlan(
                noise_multiplier=sigma,
                sample_rate=q,
                max_grad_norm=cfg.max_grad_norm,
                planned_steps=steps,
                delta=delta,
                accountant=cfg.accountant,
            )
        return delta, plans

    def _simulated_dropouts(self, round_index: int, chosen: list[int]) -> tuple[set[int], set[int]]:
        """``--dropout-clients``: K (or a rate of) sampled sites drop, from their own RNG.

        The draw never touches the training RNG, so a run with dropouts trains the same
        local models as one without; only the sites averaged differ.
        """
        k = self.config.dropout_clients
        count = int(k) if k >= 1 else int(round(k * len(chosen)))
        count = min(count, len(chosen))
        rng = np.random.default_rng(_seed_for(self.config.seed, 5, round_index))
        gone = {int(c) for c in rng.choice(chosen, size=count, replace=False)} if count else set()
        return (gone, set()) if self.config.dropout_phase == "before" else (set(), gone)

    # -- rounds ---------------------------------------------------------------------------
    def participants(self, round_index: int) -> list[int]:
        """Sites sampled for a round (from a generator of its own, not the training RNG)."""
        ids = [s.client_id for s in self.sites]
        k = max(1, round(self.config.client_fraction * len(ids)))
        if k >= len(ids):
            return ids
        rng = np.random.default_rng(_seed_for(self.config.seed, 3, round_index))
        return sorted(int(i) for i in rng.choice(ids, size=k, replace=False))

    def run_round(self, round_index: int) -> RoundRecord:
        """Train, aggregate and evaluate one round. A failed aggregation changes nothing."""
        cfg = self.config
        start = time.perf_counter()
        chosen = self.participants(round_index)
        global_state = {k: v.detach().clone() for k, v in self.global_model.state_dict().items()}
        global_vec = self.layout.flatten(global_state)
        inputs: dict[int, np.ndarray] = {}
        train_loss: dict[int, float] = {}
        train_seconds = 0.0
        for cid in chosen:
            site = self.sites[cid]
            local = copy.deepcopy(self.global_model)
            gen = torch.Generator(device="cpu").manual_seed(
                _seed_for(cfg.seed, 4, round_index, cid)
            )
            result = site.trainer.train_round(
                model=local, round_index=round_index, epochs=cfg.local_epochs, generator=gen
            )
            update = self.layout.flatten(result.state) - global_vec
            # Sites pre-scale by their sample count so a weighted FedAvg needs only sums.
            inputs[cid] = np.concatenate([result.num_samples * update, [float(result.num_samples)]])
            train_loss[cid] = result.mean_loss
            train_seconds += result.seconds
        drop_before, drop_after = (
            self.dropout_schedule(round_index, chosen) if self.dropout_schedule else (set(), set())
        )
        agg_start = time.perf_counter()
        error = None
        try:
            outcome = self.aggregator.aggregate(
                inputs,
                round_index=round_index,
                drop_before_upload=drop_before,
                drop_after_upload=drop_after,
            )
        except DropoutRecoveryError as exc:
            outcome, error = None, str(exc)
        agg_seconds = time.perf_counter() - agg_start
        del inputs  # the runtime is done with the sites' vectors
        if outcome is not None:
            total_weight = float(outcome.total[-1])
            new_vec = global_vec + outcome.total[:-1] / total_weight
            self.global_model.load_state_dict(
                {**global_state, **self.layout.unflatten(new_vec)}, strict=True
            )
        eval_start = time.perf_counter()
        record = self._evaluate(round_index, chosen, train_loss)
        eval_seconds = time.perf_counter() - eval_start
        seconds = time.perf_counter() - start
        self.elapsed += seconds
        protect = sum(outcome.client_seconds.values()) if outcome else 0.0
        record.update(
            {
                "seconds": seconds,
                "cumulative_seconds": self.elapsed,
                "applied": outcome is not None,
                "error": error,
                "participants": chosen,
                "survivors": list(outcome.survivors) if outcome else [],
                "dropped": sorted(set(chosen) - set(outcome.survivors)) if outcome else chosen,
                "timing": {
                    "local_training": train_seconds,
                    "protection": protect,
                    "aggregation": outcome.server_seconds if outcome else agg_seconds,
                    "evaluation": eval_seconds,
                },
                "bytes_per_client": (
                    {str(k): v for k, v in outcome.bytes_per_client.items()} if outcome else {}
                ),
                "clipped_values": outcome.clipped if outcome else 0,
            }
        )
        rec = RoundRecord(data=record, applied=outcome is not None)
        self.records.append(rec)
        return rec

    def _evaluate(
        self, round_index: int, chosen: list[int], train_loss: dict[int, float]
    ) -> dict[str, Any]:
        nc = self.bundle.num_classes
        glob = evaluate(
            model=self.global_model, split=self.bundle.test, num_classes=nc, device=self.device
        )
        clients = []
        for site in self.sites:
            eps = site.trainer.epsilon() if self.config.dp_enabled else None
            site.epsilon_per_round.append(eps if eps is not None else float("inf"))
            entry: dict[str, Any] = {
                "client_id": site.client_id,
                "participated": site.client_id in chosen,
                "num_train_samples": len(site.train),
                "train_loss": train_loss.get(site.client_id),
                "epsilon": eps,
            }
            if site.heldout is not None:
                entry.update(
                    evaluate(
                        model=self.global_model,
                        split=site.heldout,
                        num_classes=nc,
                        device=self.device,
                    )
                )
            clients.append(entry)
        return {"round": round_index, "global": glob, "clients": clients}

    # -- summaries ------------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        """``metrics.json``: per-round records, final figures and convergence."""
        rounds = [r.data for r in self.records]
        conv = detect_convergence(
            accuracies=[r["global"]["accuracy"] for r in rounds],
            losses=[r["global"]["loss"] for r in rounds],
            seconds=[r["seconds"] for r in rounds],
            acc_tol=self.config.conv_acc_tol,
            loss_tol=self.config.conv_loss_tol,
            patience=self.config.conv_patience,
        )
        best = max(rounds, key=lambda r: r["global"]["accuracy"]) if rounds else None
        return {
            "schema_version": "1.0",
            "rounds": rounds,
            "final": rounds[-1]["global"] if rounds else None,
            "best": {"round": best["round"], **best["global"]} if best else None,
            "convergence": conv,
            "convergence_criteria": {
                "acc_tol": self.config.conv_acc_tol,
                "loss_tol": self.config.conv_loss_tol,
                "patience": self.config.conv_patience,
            },
            "total_seconds": self.elapsed,
        }

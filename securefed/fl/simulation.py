"""The in-process runtime: N simulated sites and one server in a single Python process.

:class:`Federation` is the :class:`~securefed.fl.engine.RoundEngine` over a
:class:`~securefed.protocol.link.LocalLink` to one
:class:`~securefed.fl.site_runtime.SiteRuntime` per simulated site: the same messages, the
same accounting and the same secure sum as a Flower deployment, without the network.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from securefed.config import RunConfig
from securefed.crypto.roster import Roster
from securefed.data.dataset import DatasetBundle, load_dataset
from securefed.dp.empirical import CONFIDENCE, GradientCanaries
from securefed.errors import ConfigError, DataError
from securefed.fl.engine import METRICS_SCHEMA_VERSION, RoundEngine, RoundRecord
from securefed.fl.planning import seed_for, site_splits
from securefed.fl.site_runtime import SiteRuntime
from securefed.fl.teacher_student import check_unlabelled
from securefed.fl.transfer import public_split
from securefed.protocol.link import LocalLink
from securefed.protocol.wire import Stage

__all__ = ["AUDITED_SITE", "Federation", "METRICS_SCHEMA_VERSION", "RoundRecord"]

#: The site whose DP-SGD carries ``--audit-canaries``' canaries.
AUDITED_SITE = 0


def _in_process_roster(config: RunConfig, signers: Mapping[int, Any]) -> Roster:
    """The in-process federation's roster: every simulated site's identity key, and the limits.

    ``threshold`` is the run's ``--secagg-threshold`` (None: each round's 2/3 default), and
    ``min_contributors`` 2: the sites pin both, whatever a round's messages say.
    """
    from securefed.crypto.roster import federation_public_key

    return Roster(
        federation="in-process",
        sites={cid: federation_public_key(s.private_key) for cid, s in signers.items()},
        min_contributors=min(2, len(signers)),
        threshold=config.secagg_threshold,
    )


def _ckks_keys(config: RunConfig) -> tuple[bytes | None, bytes | None]:
    """One CKKS key set for the run: the secret context to every site, the public to the server.

    What a deployment distributes out of band (``securefed deploy keys``), made here.
    """
    if config.secure_agg != "he":
        return None, None
    from securefed.crypto.ckks import CKKSParams, generate_keys

    keys = generate_keys(
        params=CKKSParams(
            poly_modulus_degree=config.he_poly_modulus_degree,
            coeff_mod_bit_sizes=tuple(config.he_coeff_mod_bit_sizes),
            global_scale_bits=config.he_scale_bits,
        )
    )
    return keys.secret_context, keys.public_context


class Federation(RoundEngine):
    """Simulated sites and the server for a :class:`RunConfig`, in this process.

    Args:
        config: The run configuration.
        bundle: Data, if already loaded (else loaded from ``config``).
        dropout_schedule: ``f(round, participants) -> (drop_before, drop_after)``; ``None``
            for no simulated dropouts (or ``--dropout-clients``'s own draw).

    Attributes:
        sites: The simulated sites (each holds its shard, plan, trainer and keys).

    """

    runtime = "in-process"

    def __init__(
        self,
        config: RunConfig,
        *,
        bundle: DatasetBundle | None = None,
        dropout_schedule: Callable[[int, list[int]], tuple[set[int], set[int]]] | None = None,
    ) -> None:
        from securefed.dp.signing import SiteSigner

        bundle = bundle or load_dataset(
            name=config.dataset,
            data_dir=config.data_dir,
            data=config.data,
            seed=config.seed,
            **config.loader_options,
        )
        # Before anything is carved: one line for the data, not one per site that holds some.
        check_unlabelled(config.strategy, bundle.train, who=bundle.source)
        public_indices = None
        self.private_train = bundle.train
        if config.public_fraction > 0:
            private, public_indices = public_split(
                bundle.train, fraction=config.public_fraction, seed=config.public_seed
            )
            self.private_train = bundle.train.subset(indices=private)
        try:
            splits = site_splits(config, train=self.private_train, val=bundle.val)
        except DataError as exc:
            raise DataError(f"{bundle.source}: {exc}") from exc
        link = LocalLink({})  # the sites join it once the engine has the task and model shape
        super().__init__(
            config,
            bundle=bundle,
            link=link,
            public_indices=public_indices,
            dropout_schedule=dropout_schedule,
        )
        he_secret, he_public = _ckks_keys(config)
        # Each simulated site signs with a key of its own (os.urandom): its DP claims, and (in
        # modes that use the roster) its round keys; the roster lists their public halves.
        signers = {
            cid: SiteSigner.generate()
            for cid in range(len(splits))
            if config.dp_enabled or self.mode.uses_roster
        }
        if self.mode.uses_roster:
            self.roster = _in_process_roster(config, signers)
        #: ``--audit-canaries``: the audited site's canaries (secret coins drawn at the site).
        self.canaries = (
            GradientCanaries(count=config.audit_canaries) if config.audit_canaries else None
        )
        self.sites: list[SiteRuntime] = [
            SiteRuntime(
                config,
                client_id=cid,
                train=train,
                heldout=held,
                spec=self.spec,
                task=self.task,
                spatial_dims=bundle.spatial_dims,
                device=self.device,
                dataset_name=bundle.name,
                # The in-process operator holds every shard: the plain fingerprint hides
                # nothing from it (a deployed site keys its fingerprint).
                fingerprint=bundle.fingerprint,
                signer=signers.get(cid),
                he_secret=he_secret,
                he_public=he_public,
                roster=self.roster,
                canaries=self.canaries if cid == AUDITED_SITE else None,
            )
            for cid, (train, held) in enumerate(splits)
        ]
        link.sites = {s.client_id: s for s in self.sites}
        replies, errors = link.exchange(
            {s.client_id: (Stage.SETUP, {}) for s in self.sites}, timeout=0, group="setup"
        )
        if errors:
            sid, why = min(errors.items())
            raise ConfigError(f"site {sid}: set-up failed: {why}")
        self.adopt_sites(replies)
        if self.dropout_schedule is None and config.dropout_clients > 0:
            self.dropout_schedule = self._simulated_dropouts

    def _simulated_dropouts(self, round_index: int, chosen: list[int]) -> tuple[set[int], set[int]]:
        """``--dropout-clients``: K (or a rate of) sampled sites drop, from their own RNG.

        The draw never touches the training RNG, so a run with dropouts trains the same
        local models as one without; only the sites averaged differ.
        """
        count = min(self.config.dropouts_per_round, len(chosen))
        rng = np.random.default_rng(seed_for(self.config.seed, 5, round_index))
        gone = {int(c) for c in rng.choice(chosen, size=count, replace=False)} if count else set()
        return (gone, set()) if self.config.dropout_phase == "before" else (set(), gone)

    def empirical_audit(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """``--audit-canaries``: privacy.json's ``empirical`` block and the site's record.

        The record (each canary's secret coin and score) is what ``securefed audit
        --empirical`` recomputes eps_emp from; in-process the operator holds every site's
        data anyway, so it is written into the run folder. None without an audit.
        """
        if self.canaries is None:
            return None
        site = self.sites[AUDITED_SITE]
        assert site.plan is not None
        result = self.canaries.result(delta=site.plan.delta, confidence=CONFIDENCE)
        record = {"site": AUDITED_SITE, **self.canaries.record()}
        block = {
            **result.to_dict(),
            "site": AUDITED_SITE,
            "epsilon": site.trainer.epsilon(),
            "steps": self.canaries.steps,
            "audit_run": True,
        }
        return block, record

    def sign_empirical(self, block: dict[str, Any]) -> str:
        """The audited site's signature over its empirical result (``empirical_message``)."""
        from securefed.dp.signing import empirical_message

        signer = self.sites[AUDITED_SITE].signer
        assert signer is not None  # an audit run is a DP run: every site has its key
        return signer.sign_message(empirical_message(block))

    def set_progress(self, enabled: bool) -> None:
        """Show a bar (site, step/total) on stderr while a site's local training runs long."""
        for site in self.sites:
            site.trainer.progress = enabled

    def batch_warnings(self) -> list[str]:
        """Every simulated site's :meth:`~securefed.fl.site_runtime.SiteRuntime.batch_warnings`.

        In a deployment each site prints its own; here one operator holds every site.
        """
        return [line for site in self.sites for line in site.batch_warnings()]

    def memory_warning(self) -> str | None:
        """One line when DP-SGD's per-sample gradients will not fit in memory, else None.

        See :func:`securefed.dp.memory.memory_warning`; without DP there are none to store.
        """
        from securefed.dp.memory import memory_warning

        if not self.config.dp_enabled:
            return None
        largest = max(len(site.trainer.dataset) for site in self.sites)
        return memory_warning(
            self.models[0],
            sample_shape=tuple(self.bundle.train.images.shape[1:]),
            batch_size=min(self.config.effective_batch_size, largest),
            max_physical_batch_size=self.config.physical_batch(self.device.type),
            device=self.device,
        )

    def restore(self, ck: Any) -> int:
        """Continue from a checkpoint; the simulated sites take their histories back.

        Each simulated site holds a fresh signing key in this process, so it signs its claim
        as it stands again; the book checks each signature before it replaces the old one.
        """
        done = super().restore(ck)
        for site in self.sites:
            site.restore_events(self._history(site.client_id))
            if self.config.dp_enabled:
                self.claims.check_signature(site.client_id, site.sign_claim())
        return done

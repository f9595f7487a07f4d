"""One hospital's settings, and the site runtime they make for a deployed run.

What the site does in a round is :class:`securefed.fl.site_runtime.SiteRuntime`, the same
object the in-process runtime simulates; this module reads the hospital's node configuration
(its data, keys and privacy policy) and builds one from it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from securefed.config import RunConfig
from securefed.dp.signing import SiteSigner
from securefed.errors import ConfigError, DataError, IntegrityError, PrivacyBudgetError

_log = logging.getLogger("securefed.deploy.site")

if TYPE_CHECKING:
    from securefed.crypto.roster import Roster
    from securefed.fl.site_runtime import SiteRuntime

__all__ = ["NodeSettings", "deployed_site", "identity_proof"]


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
        disclose_size: Allow this site's training-set size and class counts to be written
            into the run's files; a run that asks for sizes (``--disclose-site-sizes``) is
            refused otherwise.
        signing_key: This site's Ed25519 key file: it signs the site's privacy claim every
            round, so the run's report cannot be rewritten in its name. Required for DP runs.
        allow_reproducible_noise: Accept runs with ``reproducible_noise`` (DP noise derived
            from the run's seed, which the server and every site know). Off by default: such
            a run's epsilon does not hold against them, so a site must opt in.
        federation_key: The federation's public key (``federation.pub``, or its 64 hex
            characters), pinned here: the site's executor runs only runs it signed, and the
            roster must be signed by it.
        roster: The federation's signed roster file (``securefed deploy roster``): the site
            ids and identity keys of every site. Required for secure aggregation.
        min_contributors: This site's own least number of contributors to any sum it helps
            reveal (>= 2); the larger of it and the roster's applies.
        insecure_no_roster: Accept a secure-aggregation run without a roster (closed test
            networks only: peers' keys and ids are then whatever the server says).
        allow_labelled_fraction: Accept runs with ``--labelled-fraction`` below 1, which make
            the site drop label maps it holds (to measure semi-supervised training). Off by
            default: a server could otherwise quietly degrade a site's training.
        keep_twin_metric: Under ``--twin-privacy local``, send nothing about this site's twin
            (its metric goes to the site's own log only), so every value the site sends stays
            within its epsilon even against a server that crafts the weights.
        allow_local_twins: Accept DP runs with ``--twin-privacy local``: this site's twin is
            then fine-tuned without DP, and its held-out metric goes to the server outside the
            site's epsilon. Off by default: the server cannot widen what leaves the site.
        privacy_unit: ``patient``: the hospital's policy is patient-level DP; a record-level
            run is refused. ``record`` (or unset) accepts either.
        group_by: Where this site's patient ids come from (``--group-by`` syntax). A site
            that reads its own data never takes the run's ``--group-by`` (a server-chosen
            pattern or path; see :func:`_load_site_data`); only a ``shard`` trial does.
        unlabelled: Read this site's NIfTI subjects without a label map as unlabelled
            training subjects (the loader's ``unlabelled`` option), for teacher-student runs.
            Only the node config sets it, never the run: which of the site's files are read,
            and as what, is the site's choice.

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
    federation_key: str | None = None
    roster: str | None = None
    min_contributors: int | None = None
    insecure_no_roster: bool = False
    privacy_unit: str | None = None
    group_by: str | None = None
    allow_labelled_fraction: bool = False
    allow_local_twins: bool = False
    keep_twin_metric: bool = False
    unlabelled: bool = False

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
            "federation-key",
            "roster",
            "min-contributors",
            "insecure-no-roster",
            "privacy-unit",
            "group-by",
            "allow-labelled-fraction",
            "allow-local-twins",
            "keep-twin-metric",
            "unlabelled",
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

        for flag in (
            "insecure-no-roster",
            "allow-labelled-fraction",
            "allow-local-twins",
            "keep-twin-metric",
            "unlabelled",
        ):
            if not isinstance(node_config.get(flag, False), bool):
                raise ConfigError(
                    f"node config: `{flag}` must be true or false (got {node_config.get(flag)!r})"
                )
        least = node_config.get("min-contributors")
        bad = isinstance(least, bool) or not isinstance(least, int) or least < 2
        if least is not None and bad:
            raise ConfigError(
                f"node config: `min-contributors` must be an integer >= 2 (got {least!r})"
            )

        def text(key: str) -> str | None:
            value = node_config.get(key)
            return None if value in (None, "") else str(value)

        unit = text("privacy-unit")
        if unit not in (None, "record", "patient"):
            raise ConfigError(
                f"node config: `privacy-unit` must be 'record' or 'patient' (got {unit!r})"
            )

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
            federation_key=text("federation-key"),
            roster=text("roster"),
            min_contributors=least,
            insecure_no_roster=bool(node_config.get("insecure-no-roster", False)),
            privacy_unit=unit,
            group_by=text("group-by"),
            allow_labelled_fraction=bool(node_config.get("allow-labelled-fraction", False)),
            allow_local_twins=bool(node_config.get("allow-local-twins", False)),
            keep_twin_metric=bool(node_config.get("keep-twin-metric", False)),
            unlabelled=bool(node_config.get("unlabelled", False)),
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
        if config.labelled_fraction < 1 and not self.allow_labelled_fraction:
            raise PrivacyBudgetError(
                f"site {self.site_id}: the run would drop the label maps of "
                f"{1 - config.labelled_fraction:.0%} of this site's training volumes "
                "(--labelled-fraction, a benchmark setting); this site's node config does not "
                "set allow-labelled-fraction"
            )
        if config.local_twins and not (self.allow_local_twins or self.keep_twin_metric):
            raise PrivacyBudgetError(
                f"site {self.site_id}: the run fine-tunes twins without DP (--twin-privacy "
                "local) and sends their held-out metric outside this site's epsilon; this "
                "site's node config sets neither allow-local-twins nor keep-twin-metric"
            )
        if self.unlabelled and config.strategy != "teacher-student":
            # Refused before any data is read: an error raised after loading would quote
            # how many unlabelled subjects the site holds.
            raise PrivacyBudgetError(
                f"site {self.site_id}: this site reads unlabelled subjects (node config "
                "unlabelled=true); only --strategy teacher-student can use them"
            )
        if self.privacy_unit == "patient" and config.privacy_unit != "patient":
            raise PrivacyBudgetError(
                f"site {self.site_id}: the run's epsilon is per record; this site's policy "
                "is patient-level DP (node config privacy-unit=patient)"
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

    def load_roster(self, signer: SiteSigner | None = None) -> Roster | None:
        """The federation's roster, verified against the pinned federation key (None if unset).

        Args:
            signer: This site's identity key; when given, the roster must list its public key
                for this site's id.

        Raises:
            ConfigError: No federation key pinned, an unreadable file, a roster not signed by
                the pinned key, this site missing from it, or listed with another key.

        """
        from securefed.crypto.roster import load_signed_roster
        from securefed.deploy.trust import load_federation_public

        if self.roster is None:
            return None
        if self.federation_key is None:
            raise ConfigError(
                f"site {self.site_id}: a roster needs the federation public key it is checked "
                "against (securefed deploy site --federation-key federation.pub)"
            )
        try:
            data = Path(self.roster).read_bytes()
        except OSError as exc:
            raise ConfigError(f"site {self.site_id}: roster {self.roster}: {exc.strerror}") from exc
        try:
            roster = load_signed_roster(
                data, federation_key=load_federation_public(self.federation_key)
            )
        except IntegrityError as exc:
            raise ConfigError(f"site {self.site_id}: roster {self.roster}: {exc}") from exc
        if self.site_id not in roster.sites:
            raise ConfigError(f"site {self.site_id}: not in the federation's roster")
        if signer is not None and roster.sites[self.site_id].hex() != signer.public_key_hex:
            raise ConfigError(
                f"site {self.site_id}: the roster lists another identity key for this site id "
                "than this site's signing key"
            )
        return roster

    def min_contributors_floor(self, roster: Roster | None) -> int:
        """The least number of contributors this site accepts: its own and the roster's."""
        own = self.min_contributors or 2
        return max(own, roster.min_contributors) if roster is not None else own

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


def _load_site_data(config: RunConfig, node: NodeSettings) -> Any:
    """The site's data set: the site's own, read with the site's own patient grouping.

    A site that reads its own data (not a ``shard`` trial) reads only what its node config
    names (``data``, ``data-dir``, ``dataset``) and groups it by its own ``group-by``: never a
    path, loader (``module:function``) or pattern from the run, which whoever configured the
    run chose. A server-chosen path would pick which of the site's files (and patients) are
    trained on and learn which guessed files exist; a server-chosen pattern could make every
    record its own "patient" (patient-level in name only) or probe file names through
    match/no-match answers. The run's loader options (image size, fractions) still apply:
    every site must build the same model. For the same reason any loader error (which may
    quote a file or folder name, hence a patient's name or record number) stays in the site's
    log; the server hears one generic line. Only a ``shard`` trial, where every site reads one
    shared data set, takes the run's data and grouping.

    Raises:
        ConfigError: A site reading its own data whose node config names none.
        DataError: The data could not be read (details in the site's log).

    """
    from securefed.data.dataset import load_dataset

    options = dict(config.loader_options)
    # Whether subjects without a label map are read (as unlabelled) is the site's choice
    # alone, like its paths: a run's option never turns it on (a shard trial, which reads
    # the run's data, needs the two to agree).
    asked = bool(options.pop("unlabelled", False))
    if node.shard and asked != node.unlabelled:
        # A shard trial reads the run's data set: it must read it the way the run does.
        raise ConfigError(
            f"site {node.site_id}: the run {'reads' if asked else 'does not read'} unlabelled "
            "subjects (--data-option unlabelled=true) and this site's node config "
            f"{'does not set' if asked else 'sets'} unlabelled=true; in a shard trial they "
            "must agree"
        )
    if node.unlabelled:
        options["unlabelled"] = True
        if not node.shard and "label_name" in options:
            # Which file is the label map decides which subjects count as labelled: with
            # unlabelled subjects accepted, a run-chosen name would relabel the site's data
            # instead of failing.
            raise ConfigError(
                f"site {node.site_id}: a site that reads unlabelled subjects takes its label "
                "map's file name from the loader's default (seg), never from the run; drop "
                "--data-option label_name"
            )
    if node.shard:
        source = {
            "name": node.dataset or config.dataset,
            "data_dir": node.data_dir if node.data_dir is not None else config.data_dir,
            "data": node.data if node.data is not None else config.data,
        }
    else:
        if node.data is None and node.dataset is None:
            raise ConfigError(
                f"site {node.site_id}: name this site's own data in its node config (data, or "
                "dataset with data-dir); a site never reads a path or loader the run names"
            )
        options.pop("group_by", None)
        source = {"name": node.dataset or "synthetic", "data_dir": node.data_dir, "data": node.data}
    if node.group_by:
        options["group_by"] = node.group_by
    if node.shard:
        return load_dataset(seed=config.seed, **source, **options)
    try:
        return load_dataset(seed=config.seed, **source, **options)
    except Exception as exc:  # noqa: BLE001 -- whatever it was, its text stays here
        _log.error("site %d: reading its data failed: %r", node.site_id, exc)
        raise DataError(
            f"site {node.site_id}: its data could not be read for this run (the reason is in "
            "the site's log)"
        ) from None


def deployed_site(config: RunConfig, node: NodeSettings) -> SiteRuntime:
    """The hospital's :class:`~securefed.fl.site_runtime.SiteRuntime` for a run of ``config``.

    The site's policy is checked first, and its signing key loaded before any data is read:
    a DP run without the key stops at once.

    Raises:
        PrivacyBudgetError: If the run breaks the site's policy.
        ConfigError: If the key or the node's settings are missing or wrong.
        DataError: If the site's data cannot be read or sharded.

    """
    # Imported here: the protocol steps of a site process need no torch.
    from securefed.fl.planning import model_spec, resolve_device, site_splits, task_for
    from securefed.fl.site_runtime import SiteRuntime
    from securefed.models.scatter import clear_feature_cache

    node.check_policy(config)
    clear_feature_cache()  # a long-lived site process: the last run's features go
    secure = config.secure_agg != "none"
    if secure and node.roster is None:
        # Both modes' defences against an active server rest on the roster (masking: signed
        # round keys; CKKS: signed contributions), so --insecure-no-roster covers plaintext
        # runs only.
        raise ConfigError(
            f"site {node.site_id}: --secure-agg {config.secure_agg} needs the federation's "
            "signed roster (securefed deploy site --roster roster.json)"
        )
    # The identity key signs DP claims, set-up proofs and the secure-sum mode's round keys or
    # ciphertexts whenever a roster is used, DP or not (the runtime sends the public key in
    # its set-up reply only for DP claims).
    signer = node.signer() if (config.dp_enabled or node.roster is not None) else None
    roster = node.load_roster(signer)
    device = resolve_device(node.device or config.device)
    bundle = _load_site_data(config, node)
    task = task_for(bundle, config)
    train, heldout = bundle.train, bundle.val
    if node.shard:
        if node.site_id >= config.clients:
            raise ConfigError(
                f"node config: site-id {node.site_id} but the run has "
                f"{config.clients} sites (ids 0..{config.clients - 1})"
            )
        try:
            train, heldout = site_splits(config, train=bundle.train, val=bundle.val)[node.site_id]
        except DataError as exc:
            raise DataError(f"{bundle.source}: {exc}") from exc
    he_secret = he_public = None
    if config.secure_agg == "he":
        he_secret, he_public = node.he_contexts()
    runtime = SiteRuntime(
        config,
        client_id=node.site_id,
        train=train,
        heldout=heldout,
        spec=model_spec(bundle, task, config),
        task=task,
        spatial_dims=bundle.spatial_dims,
        device=device,
        # A name from the site's own path could be a patient's; the server gets the node's
        # label (or none) instead.
        dataset_name=bundle.name if node.shard else (node.dataset or "site data"),
        # Keyed by the site's own secret: the server can tell that the data did not change
        # between sessions, but cannot test a guess of the data against it.
        fingerprint=(
            signer.keyed_digest(bundle.fingerprint, purpose="data-fingerprint")
            if signer is not None
            else bundle.fingerprint
        ),
        signer=signer,
        he_secret=he_secret,
        he_public=he_public,
        disclose_size=node.disclose_size,
        roster=roster,
        min_contributors=node.min_contributors_floor(roster),
        keep_twin_metric=node.keep_twin_metric,
    )
    for line in runtime.batch_warnings():
        # The site's own log only: the lines name its size.
        print(line, file=sys.stderr)
    return runtime


def identity_proof(runtime: SiteRuntime, *, run_id: int, node_id: int) -> str | None:
    """The site's set-up identity proof for this run and Flower node (None without a roster).

    Signed with the site's identity key over (federation, run id, node id, site id); the
    server checks it against the roster (:func:`securefed.deploy.trust.verify_identity`).
    """
    from securefed.deploy.trust import sign_identity

    roster, signer = runtime.roster, runtime.signer
    if roster is None or signer is None:
        return None
    return sign_identity(
        signer.private_key,  # the site's registered identity
        federation=roster.federation,
        run_id=run_id,
        node_id=node_id,
        site_id=runtime.client_id,
    )

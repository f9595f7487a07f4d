"""Site partitioning: split one data set's sample indices across simulated hospital sites."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

from securefed.errors import ConfigError, DataError

__all__ = [
    "ByGroupPartitioner",
    "ByLabelPartitioner",
    "DirichletPartitioner",
    "IIDPartitioner",
    "Partitioner",
    "available_partitioners",
    "parse_partitioner",
    "partition",
    "partition_like",
    "register_partitioner",
    "stratified_holdout",
]

# Dirichlet draws that leave a site below `min_size` are redrawn this many times before the
# request is declared infeasible. Each draw costs O(N), so the bound keeps a hopeless request
# (tiny alpha, many sites, few classes) to well under a second on MedMNIST-sized data.
DIRICHLET_MAX_TRIES = 100


class Partitioner(Protocol):
    """Splits sample indices across sites; implementations are frozen dataclasses.

    ``labels`` has shape (N,) (class labels) or (N, *spatial) (segmentation label maps); a
    partitioner whose ``needs_class_labels`` is True is only given (N,) labels. ``groups`` is
    each sample's acquisition group (hospital), or None when the data set records none.
    """

    needs_class_labels: ClassVar[bool]

    def split(
        self,
        labels: np.ndarray,
        *,
        n_sites: int,
        rng: np.random.Generator,
        min_size: int,
        groups: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        """Disjoint index arrays, one per site, covering every sample index."""
        ...


_REGISTRY: dict[str, tuple[str, Callable[[str | None], Partitioner]]] = {}


def register_partitioner(
    name: str, *, usage: str
) -> Callable[[Callable[[str | None], Partitioner]], Callable[[str | None], Partitioner]]:
    """Register a factory that builds a partitioner from the text after ``name:``.

    Args:
        name: Spec name, e.g. ``"dirichlet"``.
        usage: Spec form shown in error messages, e.g. ``"dirichlet:ALPHA"``.

    """

    def decorator(
        factory: Callable[[str | None], Partitioner],
    ) -> Callable[[str | None], Partitioner]:
        if name in _REGISTRY:
            raise ConfigError(f"Partitioner '{name}' is already registered.")
        _REGISTRY[name] = (usage, factory)
        return factory

    return decorator


def available_partitioners() -> tuple[str, ...]:
    """List the registered partitioner names (the part of a spec before ``:``)."""
    return tuple(_REGISTRY)


def parse_partitioner(spec: str) -> Partitioner:
    """Build a partitioner from a spec such as ``"iid"``, ``"dirichlet:0.5"``, ``"by-label:2"``.

    Raises:
        ConfigError: Unknown name (the message lists the known forms) or a bad argument.

    """
    name, sep, arg = spec.strip().partition(":")
    if name not in _REGISTRY:
        forms = ", ".join(usage for usage, _ in _REGISTRY.values())
        raise ConfigError(f"`partition` must be one of {forms} (got {spec!r}).")
    return _REGISTRY[name][1](arg if sep else None)


def partition(
    labels: np.ndarray,
    *,
    spec: str,
    n_sites: int,
    seed: int,
    min_size: int = 1,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Split sample indices across ``n_sites`` sites according to ``spec``.

    The result is deterministic in ``seed``; the arrays are sorted int64 indices into
    ``labels``, pairwise disjoint, their union is every index, and each holds at least
    ``min_size`` samples.

    Args:
        labels: Non-negative integer labels of the pool to split: (N,) class labels, or
            (N, *spatial) segmentation label maps (only ``iid`` and ``by-group`` accept these).
        spec: Partitioner spec (see :func:`parse_partitioner`).
        n_sites: Number of sites.
        seed: Seed of the split.
        min_size: Smallest allowed site size.
        groups: (N,) non-negative acquisition group (hospital) of each sample, or None;
            ``by-group`` needs it.

    Raises:
        ConfigError: Bad spec, ``n_sites`` or ``min_size``; a spec that needs class labels
            given label maps; ``by-group`` without groups.
        DataError: The split is infeasible (too few samples or groups, or no non-empty
            split found), or ``groups`` does not match ``labels``.

    """
    partitioner = parse_partitioner(spec)
    labels = _check_labels(labels, allow_maps=True)
    if labels.ndim > 1 and partitioner.needs_class_labels:
        raise ConfigError(
            f"`partition` {spec.strip()!r} needs per-sample class labels; use iid or by-group "
            f"for segmentation label maps."
        )
    n_samples = labels.shape[0]
    if groups is not None:
        groups = _check_groups(groups, n_samples=n_samples, name="groups")
    if isinstance(n_sites, bool) or not isinstance(n_sites, int) or n_sites < 1:
        raise ConfigError(f"`n_sites` must be a positive int (got {n_sites!r}).")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1:
        raise ConfigError(f"`min_size` must be a positive int (got {min_size!r}).")
    if n_sites * min_size > n_samples:
        raise DataError(
            f"Cannot give {n_sites} sites at least {min_size} sample(s) each from "
            f"{n_samples} samples."
        )
    parts = partitioner.split(
        labels, n_sites=n_sites, rng=np.random.default_rng(seed), min_size=min_size, groups=groups
    )
    return [np.sort(p).astype(np.int64) for p in parts]


@dataclass(frozen=True)
class IIDPartitioner:
    """Uniformly random split into sites whose sizes differ by at most one."""

    needs_class_labels: ClassVar[bool] = False

    def split(
        self,
        labels: np.ndarray,
        *,
        n_sites: int,
        rng: np.random.Generator,
        min_size: int,
        groups: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        """See :class:`Partitioner`."""
        return list(np.array_split(rng.permutation(labels.shape[0]), n_sites))


@dataclass(frozen=True)
class DirichletPartitioner:
    """Label skew: each class is split across sites by proportions drawn from Dir(alpha).

    Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
    Visual Classification" (2019). Small ``alpha`` concentrates each class on few sites
    (strong skew); large ``alpha`` approaches IID. Draws that leave a site with fewer than
    ``min_size`` samples are redrawn (at most ``DIRICHLET_MAX_TRIES`` times), which slightly
    conditions the distribution on that event.

    Attributes:
        alpha: Dirichlet concentration, > 0.

    """

    alpha: float

    needs_class_labels: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not (
            isinstance(self.alpha, numbers.Real) and np.isfinite(self.alpha) and self.alpha > 0
        ):
            raise ConfigError(f"`alpha` must be a positive number (got {self.alpha!r}).")

    def split(
        self,
        labels: np.ndarray,
        *,
        n_sites: int,
        rng: np.random.Generator,
        min_size: int,
        groups: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        """See :class:`Partitioner`."""
        by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
        for _ in range(DIRICHLET_MAX_TRIES):
            pieces: list[list[np.ndarray]] = [[] for _ in range(n_sites)]
            for members in by_class:
                counts = rng.multinomial(members.size, rng.dirichlet([self.alpha] * n_sites))
                for site, chunk in enumerate(np.split(members, np.cumsum(counts)[:-1])):
                    pieces[site].append(chunk)
            parts = [np.concatenate(p) for p in pieces]
            if min(p.size for p in parts) >= min_size:
                return parts
        raise DataError(
            f"dirichlet:{self.alpha} left a site with fewer than {min_size} sample(s) in "
            f"{DIRICHLET_MAX_TRIES} draws ({labels.size} samples, {len(by_class)} classes, "
            f"{n_sites} sites); use a larger alpha or fewer sites."
        )


@dataclass(frozen=True)
class ByLabelPartitioner:
    """Pathological non-IID: each site holds samples of ``classes_per_site`` classes only.

    After McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
    Data" (AISTATS 2017), where each client received two label-sorted shards. Here the classes
    are shuffled and dealt round-robin (site ``i`` gets positions ``i*K .. i*K+K-1`` modulo C),
    so every class is held by at least one site whenever ``n_sites * K >= C``; each class's
    samples are then split evenly at random among the sites that hold it.

    Attributes:
        classes_per_site: K, between 1 and the number of classes present.

    """

    classes_per_site: int

    needs_class_labels: ClassVar[bool] = True

    def __post_init__(self) -> None:
        k = self.classes_per_site
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"`classes_per_site` must be a positive int (got {k!r}).")

    def split(
        self,
        labels: np.ndarray,
        *,
        n_sites: int,
        rng: np.random.Generator,
        min_size: int,
        groups: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        """See :class:`Partitioner`."""
        classes = rng.permutation(np.unique(labels))
        k, c = self.classes_per_site, classes.size
        if k > c:
            raise DataError(f"by-label:{k} needs at least {k} classes in the data (found {c}).")
        if n_sites * k < c:
            raise DataError(
                f"by-label:{k} with {n_sites} sites covers at most {n_sites * k} of the {c} "
                "classes, so some samples would belong to no site; use more sites or a larger K."
            )
        holders: dict[int, list[int]] = {int(cls): [] for cls in classes}
        for site in range(n_sites):
            for j in range(k):
                holders[int(classes[(site * k + j) % c])].append(site)
        pieces: list[list[np.ndarray]] = [[] for _ in range(n_sites)]
        for cls, sites in holders.items():
            members = rng.permutation(np.flatnonzero(labels == cls))
            for site, chunk in zip(sites, np.array_split(members, len(sites)), strict=True):
                pieces[site].append(chunk)
        parts = [np.concatenate(p) for p in pieces]
        smallest = min(range(n_sites), key=lambda s: parts[s].size)
        if parts[smallest].size < min_size:
            raise DataError(
                f"by-label:{k} left site {smallest} with {parts[smallest].size} sample(s) "
                f"(minimum {min_size}): its classes have too few samples for the sites sharing "
                "them; use fewer sites or a larger K."
            )
        return parts


@dataclass(frozen=True)
class ByGroupPartitioner:
    """Natural non-IID: each site holds whole acquisition groups (hospitals, scanners).

    The distinct group ids are sorted and dealt round-robin, so site ``k`` holds groups
    ``sorted_groups[k], sorted_groups[k + n_sites], ...``. With as many sites as groups, site
    ``k`` is exactly the ``k``-th hospital, as in FLamby's natural splits. The seed plays no
    part: the split is fixed by the data.
    """

    needs_class_labels: ClassVar[bool] = False

    def split(
        self,
        labels: np.ndarray,
        *,
        n_sites: int,
        rng: np.random.Generator,
        min_size: int,
        groups: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        """See :class:`Partitioner`."""
        if groups is None:
            raise ConfigError(
                "`partition` 'by-group' needs the acquisition group (hospital) of every sample; "
                "this data set records none: use iid, dirichlet:ALPHA or by-label:K."
            )
        ids = np.unique(groups)
        if ids.size < n_sites:
            raise DataError(
                f"by-group: the data hold {ids.size} group(s), fewer than the {n_sites} sites; "
                "use at most as many sites as groups."
            )
        parts = [np.flatnonzero(np.isin(groups, ids[site::n_sites])) for site in range(n_sites)]
        smallest = min(range(n_sites), key=lambda s: parts[s].size)
        if parts[smallest].size < min_size:
            raise DataError(
                f"by-group left site {smallest} with {parts[smallest].size} sample(s) "
                f"(minimum {min_size})."
            )
        return parts


@register_partitioner("iid", usage="iid")
def _iid(arg: str | None) -> Partitioner:
    if arg is not None:
        raise ConfigError(f"`partition` 'iid' takes no argument (got 'iid:{arg}').")
    return IIDPartitioner()


@register_partitioner("dirichlet", usage="dirichlet:ALPHA")
def _dirichlet(arg: str | None) -> Partitioner:
    try:
        alpha = float(arg) if arg is not None else float("nan")
    except ValueError:
        alpha = float("nan")
    if not (np.isfinite(alpha) and alpha > 0):
        raise ConfigError(
            f"`partition` dirichlet needs a positive ALPHA, e.g. 'dirichlet:0.5' "
            f"(got 'dirichlet:{arg or ''}')."
        )
    return DirichletPartitioner(alpha=alpha)


@register_partitioner("by-label", usage="by-label:K")
def _by_label(arg: str | None) -> Partitioner:
    if arg is None or not arg.strip().isdigit() or int(arg) < 1:
        raise ConfigError(
            f"`partition` by-label needs a positive integer K, e.g. 'by-label:2' "
            f"(got 'by-label:{arg or ''}')."
        )
    return ByLabelPartitioner(classes_per_site=int(arg))


@register_partitioner("by-group", usage="by-group")
def _by_group(arg: str | None) -> Partitioner:
    if arg is not None:
        raise ConfigError(f"`partition` 'by-group' takes no argument (got 'by-group:{arg}').")
    return ByGroupPartitioner()


def partition_like(
    labels_heldout: np.ndarray,
    *,
    site_train_labels: list[np.ndarray],
    seed: int,
    heldout_groups: np.ndarray | None = None,
    site_train_groups: list[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Assign held-out samples to sites so each site's held-out mix follows its training mix.

    The held-out samples are keyed, and for every key k they are shuffled and dealt to the
    sites in proportion to the sites' training counts of k (largest-remainder rounding, so
    the counts sum exactly): site s receives about ``n_val(k) * t(s, k) / sum_s' t(s', k)``
    samples of key k. The key is, in order of precedence:

    - with groups: the acquisition group. Each held-out sample goes to a site that trains on
      its group (under ``by-group`` partitioning, *the* site), so per-site metrics measure a
      hospital on its own patients.
    - classification labels: the class. When the held-out split is stratified like the
      training pool (as in MedMNIST), a site's held-out label distribution then equals its
      training label distribution.
    - segmentation label maps without groups: one key for all, i.e. the held-out samples are
      dealt at random in proportion to the sites' training-set sizes.

    Every held-out sample goes to exactly one site, except samples whose key (class or group)
    no site trains on, which go to none. A site may receive no held-out samples at all (small
    held-out split, rare classes); callers must handle empty arrays.

    Args:
        labels_heldout: Labels of the held-out split (e.g. ``bundle.val.labels``): (M,) or
            (M, *spatial).
        site_train_labels: Training labels of each site, in site order.
        seed: Seed of the shuffle within each key.
        heldout_groups: (M,) groups of the held-out samples; given together with
            ``site_train_groups``.
        site_train_groups: Training groups of each site, in site order.

    Returns:
        One sorted int64 index array into ``labels_heldout`` per site; pairwise disjoint.

    Raises:
        ConfigError: No sites, or only one of the two group arguments.
        DataError: Malformed labels or groups.

    """
    heldout = _check_labels(labels_heldout, allow_empty=True, allow_maps=True)
    if not site_train_labels:
        raise ConfigError("`site_train_labels` must hold at least one site.")
    train = [_check_labels(t, allow_empty=True, allow_maps=True) for t in site_train_labels]
    if (heldout_groups is None) != (site_train_groups is None):
        raise ConfigError(
            "`heldout_groups` and `site_train_groups` must be given together (got only "
            f"`{'heldout_groups' if site_train_groups is None else 'site_train_groups'}`)."
        )
    if heldout_groups is not None and site_train_groups is not None:
        if len(site_train_groups) != len(train):
            raise ConfigError(
                f"`site_train_groups` must hold one array per site "
                f"(got {len(site_train_groups)} for {len(train)} sites)."
            )
        keys = _check_groups(heldout_groups, n_samples=heldout.shape[0], name="heldout_groups")
        site_keys = [
            _check_groups(g, n_samples=t.shape[0], name=f"site_train_groups[{i}]")
            for i, (g, t) in enumerate(zip(site_train_groups, train, strict=True))
        ]
    elif heldout.ndim > 1 or any(t.ndim > 1 for t in train):
        keys = np.zeros(heldout.shape[0], dtype=np.int64)
        site_keys = [np.zeros(t.shape[0], dtype=np.int64) for t in train]
    else:
        keys, site_keys = heldout, train
    return _apportion(keys, site_keys=site_keys, rng=np.random.default_rng(seed))


def _apportion(
    keys: np.ndarray, *, site_keys: list[np.ndarray], rng: np.random.Generator
) -> list[np.ndarray]:
    n_keys = int(max([keys.max(initial=-1)] + [t.max(initial=-1) for t in site_keys])) + 1
    counts = np.stack([np.bincount(t, minlength=n_keys) for t in site_keys])  # (sites, keys)
    pieces: list[list[np.ndarray]] = [[] for _ in site_keys]
    for key in range(n_keys):
        members = rng.permutation(np.flatnonzero(keys == key))
        weights = counts[:, key]
        if members.size == 0 or weights.sum() == 0:
            continue
        quota = members.size * weights / weights.sum()
        take = np.floor(quota).astype(np.int64)
        remainder = members.size - int(take.sum())
        # Hamilton apportionment; ties are broken at random so that low site indices are not
        # systematically favoured across keys.
        fraction = np.where(weights > 0, quota - take, -1.0)  # sites without k never get k
        order = np.lexsort((rng.random(weights.size), -fraction))
        take[order[:remainder]] += 1
        for site, chunk in enumerate(np.split(members, np.cumsum(take)[:-1])):
            pieces[site].append(chunk)
    return [
        np.sort(np.concatenate(p)).astype(np.int64) if p else np.empty(0, dtype=np.int64)
        for p in pieces
    ]


def stratified_holdout(
    labels: np.ndarray, *, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (kept, held_out), holding out ``fraction`` of every class.

    Each class with at least two samples gives ``round(fraction * n_c)`` samples, at least
    one and leaving at least one; single-sample classes stay in ``kept``.

    Returns:
        Sorted int64 index arrays ``(kept, held_out)``, disjoint, covering every index.

    """
    labels = _check_labels(labels)
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"`fraction` must be in (0, 1) (got {fraction!r}).")
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        if members.size >= 2:
            n_out = min(max(int(round(fraction * members.size)), 1), members.size - 1)
            held.append(members[:n_out])
    held_out = np.sort(np.concatenate(held)) if held else np.empty(0, dtype=np.int64)
    kept = np.setdiff1d(np.arange(labels.size), held_out)
    return kept.astype(np.int64), held_out.astype(np.int64)


def _check_labels(
    labels: np.ndarray, *, allow_empty: bool = False, allow_maps: bool = False
) -> np.ndarray:
    array = np.asarray(labels)
    if (array.ndim != 1 and not (allow_maps and array.ndim > 1)) or not np.issubdtype(
        array.dtype, np.integer
    ):
        expected = "(N,) or (N, *spatial)" if allow_maps else "1-D"
        raise DataError(
            f"`labels` must be a {expected} integer array "
            f"(got dtype {array.dtype}, shape {array.shape})."
        )
    if array.size == 0 and not allow_empty:
        raise DataError("`labels` is empty: there is nothing to split.")
    if array.size and int(array.min()) < 0:
        raise DataError(f"`labels` must be non-negative (got {int(array.min())}).")
    return array.astype(np.int64, copy=False)


def _check_groups(groups: np.ndarray, *, n_samples: int, name: str) -> np.ndarray:
    array = np.asarray(groups)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise DataError(
            f"`{name}` must be a 1-D integer array (got dtype {array.dtype}, shape {array.shape})."
        )
    if array.shape[0] != n_samples:
        raise DataError(
            f"`{name}` must hold one group per sample (got {array.shape[0]} for {n_samples})."
        )
    if array.size and int(array.min()) < 0:
        raise DataError(f"`{name}` must be non-negative (got {int(array.min())}).")
    return array.astype(np.int64, copy=False)

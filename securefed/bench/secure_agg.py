"""Secure-aggregation cost suite: masking vs CKKS vs plaintext by model size, sites and dropout."""

from __future__ import annotations

import dataclasses
import datetime
import gc
import hashlib
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from securefed.bench.common import environment, load_rows, write_atomic, write_rows
from securefed.crypto.graph import GRAPH_SEED_BYTES, build_graph
from securefed.crypto.prg import chunk_bytes, keystream
from securefed.crypto.secagg import (
    SecAggConfig,
    default_threshold,
    masking_keystream_bytes,
    secure_sum,
)
from securefed.errors import ConfigError, DropoutRecoveryError

__all__ = [
    "FULL_GRID",
    "MECHANISMS",
    "QUICK_GRID",
    "REQUIRED_COLUMNS",
    "SecureAggGrid",
    "run_secure_agg_bench",
    "secagg_plus_neighbors",
]

MECHANISMS = ("plain", "mask", "he")
"""Mechanisms of the suite: plaintext baseline, pairwise masking, CKKS (TenSEAL)."""

REQUIRED_COLUMNS = (
    "mechanism",
    "n_clients",
    "n_params",
    "dropout",
    "client_seconds",
    "server_seconds",
    "bytes_per_client",
    "aes_ctr_seconds",
    "tenseal_seconds",
)
"""Columns every row of ``results.json`` carries (None where a reference does not apply)."""

_DROPOUT_STAGE = "before_upload"
# Each of k summed CKKS ciphertexts (N = 8192, scale 2^40) decrypts within 5e-8 per coordinate:
# the budget stated and tested in securefed.crypto.ckks.
_CKKS_ERROR_PER_SITE = 5e-8
# Distinct random input vectors kept in memory per cell; sites beyond it reuse one of them (the
# cost of masking or encrypting does not depend on the values, only the sum check does).
_INPUT_POOL_BYTES = 512 * 2**20
_AES_REFERENCE_REPEATS = 3
_MAX_DROPOUT_DRAWS = 200
# Every repeat is a fresh deployment (fresh keys) of round 1: the SecAgg+ graph, and so the
# recoverable dropout pattern, depends on the round, and repeats must measure the same work.
_ROUND_INDEX = 1
_TARGET_MASK_PARAMS = 1_000_000
_TARGET_MASK_CLIENTS = 10
_TARGET_MASK_SECONDS = 0.5
_TARGET_THROUGHPUT_RATIO = 0.5
_TARGET_HE_RATIO = 1.25


def secagg_plus_neighbors(n_clients: int) -> int | None:
    """SecAgg+ degree for ``n_clients`` sites: ceil(2 log2 n), rounded up to even.

    Bell et al. 2020 need degree O(log n); 2 log2 n is the usual working constant. Returns None
    (complete graph) when that degree would reach n - 1 anyway.
    """
    if isinstance(n_clients, bool) or not isinstance(n_clients, int) or n_clients < 2:
        raise ConfigError(f"`n_clients` must be an integer of at least 2 (got {n_clients!r}).")
    k = math.ceil(2 * math.log2(n_clients))
    k += k % 2
    return None if k >= n_clients - 1 else k


def _int_tuple(name: str, values: Any, minimum: int) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ConfigError(f"`{name}` must be a non-empty sequence of integers (got {values!r}).")
    out = []
    for v in values:
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
            raise ConfigError(f"`{name}` values must be integers >= {minimum} (got {v!r}).")
        out.append(int(v))
    return tuple(sorted(set(out)))


@dataclass(frozen=True)
class SecureAggGrid:
    """The cells of one secure-aggregation benchmark run, validated on construction.

    Attributes:
        n_params: Model sizes (the vector sent is ``n_params + 1`` long: ``[n_i u_i, n_i]``).
        n_clients: Numbers of invited sites (>= 2).
        dropouts: Fractions of sites that drop after sharing keys and before uploading
            (``round(fraction * n)`` sites, half up), in [0, 1).
        mechanisms: Subset of :data:`MECHANISMS`.
        secagg_plus_from: Masking uses the complete graph (classic SecAgg) below this many
            sites and SecAgg+ with :func:`secagg_plus_neighbors` from it on.
        he_max_work: CKKS cells with ``n_clients * n_params`` above this are skipped (CKKS cost,
            and that of its two TenSEAL references, grows with that product).
        repeats: Most times a cell is run; the run with the least total time is kept (the
            least disturbed one on a shared machine).
        repeat_budget_seconds: No further repeat starts once a cell has used this many
            seconds, so large cells run once.
        single_core: Pin the process to one CPU core for the run (Linux only).
        seed: Seed of the simulated inputs, the dropped sites and the public SecAgg+ graph
            seed, so that reruns measure the same work.

    """

    n_params: tuple[int, ...]
    n_clients: tuple[int, ...]
    dropouts: tuple[float, ...] = (0.0, 0.2)
    mechanisms: tuple[str, ...] = MECHANISMS
    secagg_plus_from: int = 30
    he_max_work: int = 21_000_000
    repeats: int = 3
    repeat_budget_seconds: float = 10.0
    single_core: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "n_params", _int_tuple("n_params", self.n_params, 1))
        object.__setattr__(self, "n_clients", _int_tuple("n_clients", self.n_clients, 2))
        drops = self.dropouts
        if isinstance(drops, (str, bytes)) or not isinstance(drops, Sequence) or not drops:
            raise ConfigError(f"`dropouts` must be a non-empty sequence (got {drops!r}).")
        clean = []
        for d in drops:
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
                raise ConfigError(f"`dropouts` values must be fractions in [0, 1) (got {d!r}).")
            clean.append(round(float(d), 6))
        object.__setattr__(self, "dropouts", tuple(sorted(set(clean))))
        mechs = self.mechanisms
        if isinstance(mechs, str) or not isinstance(mechs, Sequence) or not mechs:
            raise ConfigError(f"`mechanisms` must be a non-empty sequence (got {mechs!r}).")
        unknown = [m for m in mechs if m not in MECHANISMS]
        if unknown:
            raise ConfigError(
                f"`mechanisms` has unknown names {unknown}; known: {', '.join(MECHANISMS)}."
            )
        object.__setattr__(self, "mechanisms", tuple(m for m in MECHANISMS if m in mechs))
        budget = self.repeat_budget_seconds
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 0:
            raise ConfigError(f"`repeat_budget_seconds` must be a number >= 0 (got {budget!r}).")
        for name in ("secagg_plus_from", "he_max_work", "repeats", "seed"):
            value = getattr(self, name)
            low = {"secagg_plus_from": 2, "repeats": 1}.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"`{name}` must be an integer >= {low} (got {value!r}).")
        if not isinstance(self.single_core, bool):
            raise ConfigError(f"`single_core` must be true or false (got {self.single_core!r}).")

    def neighbors(self, n_clients: int) -> int | None:
        """SecAgg+ degree for ``n_clients`` sites, or None for the complete graph."""
        if n_clients < self.secagg_plus_from:
            return None
        return secagg_plus_neighbors(n_clients)

    def cells(self) -> Iterator[tuple[str, int, int, float]]:
        """All (mechanism, n_clients, n_params, dropout), grouped by size for input reuse."""
        for n_params in self.n_params:
            for n_clients in self.n_clients:
                for dropout in self.dropouts:
                    for mechanism in self.mechanisms:
                        yield mechanism, n_clients, n_params, dropout

    def skip_reason(self, mechanism: str, n_clients: int, n_params: int) -> str | None:
        """Why a cell of the grid is not measured, or None if it is."""
        if mechanism == "he" and n_clients * n_params > self.he_max_work:
            return (
                f"CKKS work n_clients x n_params = {n_clients * n_params:.3g} exceeds "
                f"he_max_work = {self.he_max_work:.3g}"
            )
        return None


FULL_GRID = SecureAggGrid(
    n_params=(10_000, 100_000, 1_000_000, 7_000_000),
    n_clients=(3, 10, 30, 100),
)
"""The issue's grid: 1e4-7e6 parameters (7e6 ~ DenseNet-121), 3-100 sites, 0 % and 20 % dropout.

CKKS runs only where n_clients x n_params <= 2.1e7 (up to 7e6 x 3, 1e6 x 10, 1e5 x 100): its cost
is linear in that product, about 7 us per site-coordinate for ours plus the two TenSEAL references
on one core, so one 7e6 x 10 cell alone would take about 9 minutes. Extrapolated from the quick
grid, the full grid takes 20-30 minutes on one core of a 2-core AMD EPYC and needs about 8 GiB of
memory (the plaintext baseline stacks 100 inputs of 7e6 float64)."""

QUICK_GRID = SecureAggGrid(
    n_params=(10_000, 1_000_000),
    n_clients=(3, 10),
    he_max_work=3_000_000,
)
"""``--quick``: 1e4 and 1e6 parameters x 3 and 10 sites (includes masking at 1e6 x 10)."""


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


@contextmanager
def _pinned_to_one_core(enabled: bool) -> Iterator[int | None]:
    """Restrict this process to one CPU core for the block; yields the core or None."""
    if not enabled or not hasattr(os, "sched_setaffinity"):
        yield None
        return
    before = os.sched_getaffinity(0)
    core = min(before)
    os.sched_setaffinity(0, {core})
    try:
        yield core
    finally:
        os.sched_setaffinity(0, before)


# --------------------------------------------------------------------------------------------
# One cell
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DropoutPlan:
    dropped: tuple[int, ...]
    threshold: int | None
    neighbors: int | None
    graph_seed: bytes
    redraws: int


def _n_dropped(fraction: float, n_clients: int) -> int:
    return int(math.floor(fraction * n_clients + 0.5))


def _plan_dropout(grid: SecureAggGrid, *, n_clients: int, dropout: float) -> _DropoutPlan:
    """Choose the dropped sites (seeded) and the masking threshold that can recover them.

    The threshold is the default min(m, floor(2m/3) + 1) unless the drawn dropouts leave some
    neighbourhood with fewer surviving share holders; then it is lowered to the survivors of
    the worst neighbourhood, never below a strict majority of m (the protocol's floor). A draw
    that no majority threshold can recover, or that disconnects the SecAgg+ survivors, is
    redrawn and counted: such a round would abort (DropoutRecoveryError), not cost time.
    """
    neighbors = grid.neighbors(n_clients)
    # The graph seed is public in the protocol; fixing it only makes reruns measure one graph.
    graph_seed = hashlib.sha256(f"securefed-bench-graph/{grid.seed}/{n_clients}".encode()).digest()
    graph_seed = graph_seed[:GRAPH_SEED_BYTES]
    sites = list(range(n_clients))
    graph = build_graph(sites=sites, neighbors=neighbors, seed=graph_seed, round_index=_ROUND_INDEX)
    m = SecAggConfig(n_clients=n_clients, neighbors=neighbors).neighbourhood_size
    default = default_threshold(neighbourhood_size=m)
    n_drop = _n_dropped(dropout, n_clients)
    if n_drop >= n_clients:
        raise ConfigError(f"`dropouts` value {dropout} drops all {n_clients} sites.")
    rng = random.Random(f"securefed-bench-dropout/{grid.seed}/{n_clients}/{dropout}")
    for draw in range(_MAX_DROPOUT_DRAWS):
        dropped = tuple(sorted(rng.sample(sites, n_drop)))
        survivors = set(sites) - set(dropped)
        support = min(len(graph.neighbourhood(s) & survivors) for s in sites)
        threshold = min(default, support)
        if 2 * threshold > m and graph.is_connected(survivors):
            return _DropoutPlan(dropped, threshold, neighbors, graph_seed, draw)
    raise DropoutRecoveryError(
        f"no draw of {n_drop} dropped sites out of {n_clients} in {_MAX_DROPOUT_DRAWS} tries "
        f"is recoverable with neighbourhoods of {m}; raise `secagg_plus_from` or lower dropout."
    )


def _make_inputs(*, n_clients: int, dim: int, seed: int) -> tuple[dict[int, np.ndarray], int]:
    """Per site ``[n_i u_i, n_i]`` with u_i ~ N(0, 0.01^2) and n_i uniform in [100, 1000].

    Returns the inputs and how many distinct vectors back them (sites share vectors beyond
    ``_INPUT_POOL_BYTES``).
    """
    rng = np.random.default_rng([seed, n_clients, dim])
    distinct = max(2, min(n_clients, _INPUT_POOL_BYTES // (8 * dim)))
    pool = []
    for _ in range(distinct):
        n_i = float(rng.integers(100, 1001))
        v = rng.normal(0.0, 1e-2, size=dim)
        v *= n_i
        v[-1] = n_i
        pool.append(v)
    return {s: pool[s % distinct] for s in range(n_clients)}, distinct


def _reference_sum(
    inputs: Mapping[int, np.ndarray], survivors: Sequence[int]
) -> tuple[np.ndarray, float]:
    """Exact-order float64 sum of the survivors and the largest coordinate of sum |x_i|."""
    total = np.zeros_like(inputs[survivors[0]])
    magnitude = np.zeros_like(total)
    for s in survivors:
        total += inputs[s]
        magnitude += np.abs(inputs[s])
    return total, float(magnitude.max())


def _aes_ctr_one_call_seconds(nbytes: int) -> float:
    start = time.perf_counter()
    keystream(key=os.urandom(32), nbytes=nbytes)
    return time.perf_counter() - start


def _aes_ctr_prealloc_seconds(nbytes: int) -> float:
    """Raw ``cryptography`` AES-256-CTR into a preallocated cache-sized buffer: the best rate."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    chunk = chunk_bytes()
    zeros = bytes(chunk)
    out = bytearray(chunk + 15)  # update_into needs len(data) + block - 1 bytes
    encryptor = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(bytes(16))).encryptor()
    full, rest = divmod(nbytes, chunk)
    start = time.perf_counter()
    for _ in range(full):
        encryptor.update_into(zeros, out)
    if rest:
        encryptor.update_into(zeros[:rest], out)
    return time.perf_counter() - start


@dataclass
class _Run:
    """One aggregation round of one mechanism, as the cell row needs it."""

    total: np.ndarray
    survivors: list[int]
    client_seconds: list[float]
    bytes_sent: list[int]
    server_seconds: float
    protocol: str
    decrypt_seconds: float = 0.0
    error_bound: float | None = None
    config: SecAggConfig | None = None
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def total_seconds(self) -> float:
        return sum(self.client_seconds) + self.server_seconds + self.decrypt_seconds


def _run_plain(inputs: Mapping[int, np.ndarray], plan: _DropoutPlan) -> _Run:
    from securefed.fl.aggregation import PlainAggregator

    out = PlainAggregator().aggregate(
        inputs, round_index=_ROUND_INDEX, drop_before_upload=plan.dropped
    )
    survivors = list(out.survivors)
    return _Run(
        total=out.total,
        survivors=survivors,
        client_seconds=[out.client_seconds[s] for s in survivors],
        bytes_sent=[out.bytes_per_client[s] for s in survivors],
        server_seconds=out.server_seconds,
        protocol="plaintext (float32 upload)",
    )


def _run_mask(inputs: Mapping[int, np.ndarray], plan: _DropoutPlan, n_clients: int) -> _Run:
    config = SecAggConfig(n_clients=n_clients, threshold=plan.threshold, neighbors=plan.neighbors)
    res = secure_sum(
        inputs,
        config=config,
        round_index=_ROUND_INDEX,
        drop_before_upload=plan.dropped,
        graph_seed=plan.graph_seed,
    )
    survivors = list(res.survivors)
    return _Run(
        total=res.total,
        survivors=survivors,
        client_seconds=[res.client_seconds[s] for s in survivors],
        bytes_sent=[res.bytes_sent[s] for s in survivors],
        server_seconds=res.server_seconds,
        protocol=config.protocol,
        # Decoding a sum of n encodings is within n quanta of the true sum (fixedpoint.py).
        error_bound=len(survivors) * config.codec.quantum,
        config=config,
        fields={
            "threshold": config.threshold,
            "degree": config.degree,
            "client_cpu_seconds": statistics.fmean(res.client_cpu_seconds[s] for s in survivors),
            "mask_seconds": statistics.median(
                res.client_step_seconds[s]["mask"] for s in survivors
            ),
            "frac_bits": config.frac_bits,
            "clipped": res.clipped,
        },
    )


def _run_he(inputs: Mapping[int, np.ndarray], plan: _DropoutPlan, keys: Any) -> _Run:
    from securefed.crypto.ckks import he_sum

    res = he_sum(inputs, keys=keys, drop_before_upload=plan.dropped, round_index=_ROUND_INDEX)
    survivors = list(res.survivors)
    params = keys.params
    return _Run(
        total=res.total,
        survivors=survivors,
        client_seconds=[res.client_seconds[s] for s in survivors],
        bytes_sent=[res.bytes_per_client[s] for s in survivors],
        server_seconds=res.server_seconds,
        decrypt_seconds=res.decrypt_seconds,
        protocol=f"CKKS N={params.poly_modulus_degree} ({params.encryption})",
        error_bound=len(survivors) * _CKKS_ERROR_PER_SITE,
    )


def _measure_cell(
    grid: SecureAggGrid,
    *,
    mechanism: str,
    n_clients: int,
    n_params: int,
    dropout: float,
    inputs: Mapping[int, np.ndarray],
    distinct_inputs: int,
    plan: _DropoutPlan,
) -> dict[str, Any]:
    """Run one cell (repeated while cheap), keep the fastest run, add its references."""
    dim = n_params + 1
    cell_start = time.perf_counter()
    keys, keygen_seconds = None, None
    if mechanism == "he":
        from securefed.crypto.ckks import CKKSParams, generate_keys, raw_tenseal_reference

        start = time.perf_counter()
        keys = generate_keys(params=CKKSParams())
        keygen_seconds = time.perf_counter() - start
    best: _Run | None = None
    tenseal_raw: list[float] = []
    tenseal_ser: list[float] = []
    repeats = 0
    while repeats < grid.repeats and (
        repeats == 0 or time.perf_counter() - cell_start < grid.repeat_budget_seconds
    ):
        repeats += 1
        if mechanism == "plain":
            run = _run_plain(inputs, plan)
        elif mechanism == "mask":
            run = _run_mask(inputs, plan, n_clients)
        else:
            run = _run_he(inputs, plan, keys)
            # Interleaved with our runs so that both see the same machine load.
            vector, count = inputs[run.survivors[0]], len(run.survivors)
            tenseal_raw.append(raw_tenseal_reference(vector, n_clients=count))
            tenseal_ser.append(
                raw_tenseal_reference(vector, n_clients=count, include_serialization=True)
            )
        if best is None or run.total_seconds < best.total_seconds:
            best = run
        del run
    assert best is not None
    reference, magnitude = _reference_sum(inputs, best.survivors)
    max_abs_error = float(np.max(np.abs(best.total - reference)))
    error_bound = best.error_bound
    if error_bound is None:
        # Plaintext: each of the n - 1 float64 additions rounds by under one ulp of sum |x_i|.
        error_bound = len(best.survivors) * float(np.spacing(magnitude))
    bytes_mean = statistics.fmean(best.bytes_sent)
    he_seconds = best.total_seconds if mechanism == "he" else None
    row: dict[str, Any] = {
        "mechanism": mechanism,
        "n_clients": n_clients,
        "n_params": n_params,
        "dropout": dropout,
        "dropout_stage": _DROPOUT_STAGE,
        "n_dropped": len(plan.dropped),
        "n_survivors": len(best.survivors),
        "protocol": best.protocol,
        "neighbors": plan.neighbors if mechanism == "mask" else None,
        "degree": best.fields.get("degree"),
        "threshold": best.fields.get("threshold"),
        "dropout_redraws": plan.redraws if mechanism == "mask" else None,
        "client_seconds": statistics.fmean(best.client_seconds),
        "client_seconds_max": max(best.client_seconds),
        "client_seconds_median": statistics.median(best.client_seconds),
        "client_cpu_seconds": best.fields.get("client_cpu_seconds"),
        "server_seconds": best.server_seconds,
        "decrypt_seconds": best.decrypt_seconds if mechanism == "he" else None,
        "keygen_seconds": keygen_seconds,
        "bytes_per_client": bytes_mean,
        "bytes_per_client_max": max(best.bytes_sent),
        "expansion": bytes_mean / (4 * dim),
        "keystream_bytes": None,
        "mask_seconds": best.fields.get("mask_seconds"),
        "aes_ctr_seconds": None,
        "aes_ctr_prealloc_seconds": None,
        "mask_throughput_ratio": None,
        "mask_throughput_ratio_prealloc": None,
        "he_seconds": he_seconds,
        "tenseal_seconds": min(tenseal_raw) if tenseal_raw else None,
        "tenseal_serialized_seconds": min(tenseal_ser) if tenseal_ser else None,
        "he_ratio": he_seconds / min(tenseal_raw) if he_seconds else None,
        "he_ratio_serialized": he_seconds / min(tenseal_ser) if he_seconds else None,
        "max_abs_error": max_abs_error,
        "error_bound": error_bound,
        "sum_ok": bool(max_abs_error <= error_bound),
        "frac_bits": best.fields.get("frac_bits"),
        "clipped": best.fields.get("clipped", 0),
        "timing_repeats": repeats,
        "distinct_inputs": distinct_inputs,
    }
    if best.config is not None:
        nbytes = masking_keystream_bytes(config=best.config, dim=dim)
        one_call = min(_aes_ctr_one_call_seconds(nbytes) for _ in range(_AES_REFERENCE_REPEATS))
        prealloc = min(_aes_ctr_prealloc_seconds(nbytes) for _ in range(_AES_REFERENCE_REPEATS))
        row["keystream_bytes"] = nbytes
        row["aes_ctr_seconds"] = one_call
        row["aes_ctr_prealloc_seconds"] = prealloc
        # Same bytes, so the throughput ratio (ours / AES) is the inverse ratio of the times.
        row["mask_throughput_ratio"] = one_call / row["mask_seconds"]
        row["mask_throughput_ratio_prealloc"] = prealloc / row["mask_seconds"]
    row["cell_seconds"] = time.perf_counter() - cell_start
    return row


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _cell_key(row: Mapping[str, Any]) -> tuple[str, int, int, float]:
    return (
        str(row["mechanism"]),
        int(row["n_clients"]),
        int(row["n_params"]),
        round(float(row["dropout"]), 6),
    )


def _load_rows(path: Path) -> list[dict[str, Any]]:
    return load_rows(path, required=REQUIRED_COLUMNS, suite="secure-agg")


def _write_rows(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    write_rows(out_dir, rows)


def _update_meta(out_dir: Path, record: dict[str, Any]) -> None:
    path = out_dir / "meta.json"
    meta: dict[str, Any] = {"suite": "secure-agg", "runs": []}
    if path.exists():
        try:
            loaded = json.loads(path.read_text())
            if isinstance(loaded, dict) and isinstance(loaded.get("runs"), list):
                meta = loaded
        except (OSError, json.JSONDecodeError):
            pass
    meta["runs"].append(record)
    write_atomic(path, json.dumps(meta, indent=1) + "\n")


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _g(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _sci(n: int) -> str:
    """1000000 -> "1e6", 7000000 -> "7e6"; below 1000 or not one digit, unchanged."""
    if n < 1000:
        return str(n)
    mantissa, exponent = f"{n:.0e}".split("e")
    short = f"{mantissa}e{int(exponent)}"
    return short if float(short) == n else str(n)


def _mb(x: float) -> str:
    return f"{x / 1e6:.3g} MB" if x >= 1e5 else f"{x / 1e3:.3g} kB"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _target_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's three targets, each with both numbers it compares."""
    lines = []
    mask = [
        r
        for r in rows
        if r["mechanism"] == "mask"
        and r["n_params"] == _TARGET_MASK_PARAMS
        and r["n_clients"] == _TARGET_MASK_CLIENTS
    ]
    if not mask:
        lines.append("mask 1e6 params x 10 sites: not in this grid (run --quick or the full grid)")
    for r in sorted(mask, key=lambda r: r["dropout"]):
        where = f"mask 1e6 params x 10 sites, {r['dropout']:.0%} dropout"
        lines.append(
            f"{where}: per-site {r['client_seconds']:.3f} s mean, {r['client_seconds_max']:.3f} s "
            f"max (target < {_TARGET_MASK_SECONDS} s each, one core): "
            f"{_verdict(r['client_seconds_max'] < _TARGET_MASK_SECONDS)}"
        )
        nbytes = r["keystream_bytes"]
        ours = nbytes / r["mask_seconds"] / 1e9
        for label, key, ratio in (
            ("one-call keystream", "aes_ctr_seconds", "mask_throughput_ratio"),
            (
                "preallocated chunked AES-CTR",
                "aes_ctr_prealloc_seconds",
                "mask_throughput_ratio_prealloc",
            ),
        ):
            lines.append(
                f"{where}: masking {ours:.2f} GB/s vs cryptography {label} "
                f"{nbytes / r[key] / 1e9:.2f} GB/s over {nbytes / 1e6:.0f} MB -> ratio "
                f"{r[ratio]:.2f} (target >= {_TARGET_THROUGHPUT_RATIO}): "
                f"{_verdict(r[ratio] >= _TARGET_THROUGHPUT_RATIO)}"
            )
    he = sorted(
        (r for r in rows if r["mechanism"] == "he" and r["dropout"] == 0.0),
        key=lambda r: (r["n_params"], r["n_clients"]),
    )
    if not he:
        lines.append("he: no CKKS row at 0% dropout in this grid")
    for r in he:
        lines.append(
            f"he {_sci(r['n_params'])} params x {r['n_clients']} sites: securefed CKKS "
            f"{r['he_seconds']:.3f} s vs TenSEAL encrypt+add+decrypt {r['tenseal_seconds']:.3f} s "
            f"-> {r['he_ratio']:.2f}x (target <= {_TARGET_HE_RATIO}x): "
            f"{_verdict(r['he_ratio'] <= _TARGET_HE_RATIO)}; TenSEAL with serialization "
            f"{r['tenseal_serialized_seconds']:.3f} s -> {r['he_ratio_serialized']:.2f}x"
        )
    return lines


def _table(rows: list[dict[str, Any]], mechanism: str) -> list[str]:
    rows = sorted(
        (r for r in rows if r["mechanism"] == mechanism),
        key=lambda r: (r["n_params"], r["n_clients"], r["dropout"]),
    )
    if not rows:
        return []
    head = ["params", "sites", "dropout", "dropped"]
    if mechanism == "mask":
        head += ["protocol (k, t)"]
    head += ["client s (mean / max)", "server s"]
    if mechanism == "he":
        head += ["decrypt s"]
    head += ["bytes/site", "expansion", "max abs err"]
    if mechanism == "mask":
        head += ["mask s", "AES-CTR s (1-call / prealloc)", "throughput ratio"]
    if mechanism == "he":
        head += ["ours s", "TenSEAL s (raw / +ser.)", "ratio (raw / +ser.)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            _sci(r["n_params"]),
            str(r["n_clients"]),
            f"{r['dropout']:.0%}",
            str(r["n_dropped"]),
        ]
        if mechanism == "mask":
            k = "n-1" if r["neighbors"] is None else str(r["degree"])
            cells.append(f"{r['protocol']} ({k}, {r['threshold']})")
        cells += [
            f"{_g(r['client_seconds'])} / {_g(r['client_seconds_max'])}",
            _g(r["server_seconds"]),
        ]
        if mechanism == "he":
            cells.append(_g(r["decrypt_seconds"]))
        cells += [
            _mb(r["bytes_per_client"]),
            f"{r['expansion']:.3g}x",
            _g(r["max_abs_error"], 2) + ("" if r["sum_ok"] else " (over bound!)"),
        ]
        if mechanism == "mask":
            cells += [
                _g(r["mask_seconds"]),
                f"{_g(r['aes_ctr_seconds'])} / {_g(r['aes_ctr_prealloc_seconds'])}",
                f"{r['mask_throughput_ratio']:.2f} / {r['mask_throughput_ratio_prealloc']:.2f}",
            ]
        if mechanism == "he":
            cells += [
                _g(r["he_seconds"]),
                f"{_g(r['tenseal_seconds'])} / {_g(r['tenseal_serialized_seconds'])}",
                f"{r['he_ratio']:.2f} / {r['he_ratio_serialized']:.2f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _skipped_lines(rows: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> list[str]:
    if not skipped:
        return ["None: every cell of the requested grid was measured."]
    he = [r for r in rows if r["mechanism"] == "he" and r["he_seconds"]]
    # CKKS cost is linear in encrypted site-coordinates; extrapolate from this run's rows.
    per_unit = (
        statistics.median(
            (r["he_seconds"] + r["tenseal_seconds"] + r["tenseal_serialized_seconds"])
            / (r["n_survivors"] * (r["n_params"] + 1))
            for r in he
        )
        if he
        else None
    )
    lines = []
    for s in skipped:
        line = (
            f"- {s['mechanism']} {_sci(s['n_params'])} params x {s['n_clients']} sites, "
            f"{s['dropout']:.0%} dropout: {s['reason']}"
        )
        if s["mechanism"] == "he" and per_unit is not None:
            work = (s["n_clients"] - _n_dropped(s["dropout"], s["n_clients"])) * (s["n_params"] + 1)
            line += f" (estimated {per_unit * work / 60:.0f} min with its two TenSEAL references)"
        lines.append(line)
    return lines


def _write_summary(
    out_dir: Path,
    rows: list[dict[str, Any]],
    *,
    grid: SecureAggGrid,
    quick: bool,
    env: dict[str, Any],
    core: int | None,
    skipped: list[dict[str, Any]],
    plots: list[str],
    overrides: Mapping[str, Any],
) -> list[str]:
    targets = _target_lines(rows)
    bad = [r for r in rows if not r["sum_ok"]]
    pinned = f"pinned to CPU core {core}" if core is not None else "not pinned (unsupported or off)"
    lines = [
        "# Secure aggregation cost: masking vs CKKS vs plaintext",
        "",
        f"Command: `securefed bench secure-agg {'--quick ' if quick else ''}--out {out_dir}`"
        + (f" with grid overrides {json.dumps(overrides, default=str)}" if overrides else "")
        + "  ",
        f"Machine: {env['cpu_model']}, {env['cpu_count']} logical CPUs, "
        f"{env['memory_gib']} GiB; {env['platform']}  ",
        f"Packages: Python {env['python_version']}, numpy {env['numpy_version']}, cryptography "
        f"{env['cryptography_version']} ({env['openssl_version']}), TenSEAL "
        f"{env['tenseal_version']}, securefed {env['securefed_version']}  ",
        f"Process {pinned}; every role runs in-process and single-threaded (TenSEAL n_threads=1),"
        " so each number is the cost on one CPU core.",
        "",
        "## Targets",
        "",
        *[f"- {t}" for t in targets],
        "",
        "Sums: "
        + (
            f"all {len(rows)} rows match the plaintext sum within their error bound."
            if not bad
            else f"{len(bad)} rows exceed their error bound (see `sum_ok` in results.json)."
        ),
        "",
        "## What is measured",
        "",
        "- Each site's input is `[n_i u_i, n_i]` (n_params + 1 float64 values), u_i ~ N(0, 0.01^2)"
        " per coordinate and n_i uniform in [100, 1000], as the FL layer sends pre-scaled updates.",
        "- Dropout: `round(fraction x n)` sites (seeded draw) share their keys and then vanish"
        " before uploading, the costly recovery path of masking (the server reconstructs their"
        " mask keys and regenerates their pairwise masks). Plaintext and CKKS drop the same"
        " sites; they need no recovery step.",
        "- **client s**: wall-clock seconds inside one surviving site's protocol steps (masking:"
        " key advertisement, Shamir sharing and sealing, encoding and masking, unmasking"
        " answer; CKKS: encrypt, serialize, frame), mean and max over surviving sites. The"
        " plaintext baseline does no per-site work (0 s).",
        "- **server s**: the aggregation server's seconds (masking: collecting, reconstructing"
        " secrets, removing masks, decoding; CKKS: loading, adding and serializing"
        " ciphertexts). CKKS decryption is by the key holder, reported apart as **decrypt s**.",
        "- **bytes/site**: bytes one surviving site sends (masking: all four rounds; CKKS: its"
        " ciphertext frame; plaintext: 4 bytes per value). **expansion** = bytes/site divided by"
        " the float32 size of the same vector, 4 (n_params + 1).",
        "- **mask s**: per-site seconds of the encode-and-mask step (median over surviving"
        " sites); it produces `masking_keystream_bytes` of AES-CTR keystream ((1 + degree) masks"
        " of 8-byte words plus 8 bytes of rounding coins per value). Its references, both"
        " producing that many bytes with the `cryptography` package (best of"
        f" {_AES_REFERENCE_REPEATS}): **1-call** `securefed.crypto.prg.keystream` (one"
        " `encryptor.update` over a zero buffer), and **prealloc**, `update_into` a preallocated"
        " cache-sized buffer (the raw best case). throughput ratio = AES seconds / mask seconds;"
        " the target asks for at least 0.5.",
        "- **CKKS same work**: the survivors each encrypt their vector, the ciphertexts are"
        " added, the sum decrypted. **ours s** = sum of the survivors' client seconds + server"
        " seconds + decrypt seconds (key generation excluded). **TenSEAL raw** ="
        " `raw_tenseal_reference`: `ts.ckks_vector` of the same vector per survivor, chunk by"
        " chunk with the same parameters, `add_`, `decrypt`, timed in the same process and"
        " interleaved with ours; **+ser.** adds TenSEAL's own serialize/load on each hop."
        " Default CKKS parameters: N = 8192, moduli 60/40/40/60, scale 2^40, asymmetric.",
        f"- Each cell runs up to {grid.repeats} times, starting no repeat after"
        f" {grid.repeat_budget_seconds:g} s, and keeps its fastest run (`timing_repeats`); on a"
        " shared machine the fastest run is the least disturbed one.",
        f"- Masking uses the complete graph (classic SecAgg) below {grid.secagg_plus_from} sites"
        " and SecAgg+ from there, degree k = ceil(2 log2 n) rounded up to even (Bell et al."
        " 2020). t is the default min(m, floor(2m/3) + 1) for a neighbourhood of m = k + 1,"
        " lowered (never below a majority) when the dropped sites leave fewer holders; the"
        " `threshold` column shows it.",
        "- Inputs beyond 512 MB per cell reuse a pool of distinct vectors across sites"
        " (`distinct_inputs`); cost does not depend on the values.",
        "",
        "## Skipped cells",
        "",
        *_skipped_lines(rows, skipped),
        "",
    ]
    names = {"plain": "Plaintext baseline", "mask": "Pairwise masking", "he": "CKKS (TenSEAL)"}
    for mech in MECHANISMS:
        table = _table(rows, mech)
        if table:
            lines += [f"## {names[mech]}", "", *table, ""]
    if plots:
        lines += ["## Plots", "", *[f"![{p}]({p})" for p in plots], ""]
    write_atomic(out_dir / "summary.md", "\n".join(lines))
    return targets


def _plot(out_dir: Path, rows: list[dict[str, Any]]) -> list[str]:
    """Write client-seconds, server-seconds and bytes plots; return their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"plain": "plaintext", "mask": "masking", "he": "CKKS"}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*X"
    written = []

    def series(
        mech: str, by: str, x: str, y: str, where: Callable[[dict[str, Any]], bool]
    ) -> dict[tuple[Any, float], list[tuple[float, float]]]:
        groups: dict[tuple[Any, float], list[tuple[float, float]]] = {}
        for r in rows:
            if r["mechanism"] == mech and where(r) and r[y] and r[y] > 0:
                groups.setdefault((r[by], r["dropout"]), []).append((r[x], r[y]))
        return {k: sorted(v) for k, v in sorted(groups.items())}

    for fname, x, y, by, xlabel, ylabel, mechs in (
        ("client_seconds.png", "n_params", "client_seconds", "n_clients",
         "model parameters", "seconds per site (mean over sites, one core)", ("mask", "he")),
        ("server_seconds.png", "n_clients", "server_seconds", "n_params",
         "sites", "server seconds (one core)", MECHANISMS),
    ):  # fmt: skip
        present = [m for m in mechs if any(r["mechanism"] == m for r in rows)]
        if not present:
            continue
        groups = sorted({r[by] for r in rows})
        fig, axes = plt.subplots(1, len(present), figsize=(5 * len(present), 4), squeeze=False)
        for ax, mech in zip(axes[0], present):
            for (group, dropout), pts in series(mech, by, x, y, lambda r: True).items():
                label = f"{_sci(group)} params" if by == "n_params" else f"{group} sites"
                ax.plot(
                    *zip(*pts),
                    marker="o",
                    color=palette[groups.index(group) % len(palette)],
                    ls="-" if dropout == 0 else "--",
                    label=f"{label}, {dropout:.0%} dropout",
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(names[mech])
            ax.grid(alpha=0.3, which="both")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        written.append(fname)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    sites = sorted({r["n_clients"] for r in rows})
    for k, mech in enumerate(MECHANISMS):
        for (n_clients, _), pts in series(
            mech, "n_clients", "n_params", "bytes_per_client", lambda r: r["dropout"] == 0
        ).items():
            ax.plot(
                *zip(*pts),
                marker=markers[sites.index(n_clients) % len(markers)],
                color=palette[k],
                alpha=0.8,
                label=f"{names[mech]}, {n_clients} sites",
            )
    if ax.get_legend_handles_labels()[0]:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("model parameters")
        ax.set_ylabel("bytes sent per site (0% dropout)")
        ax.set_title("Traffic per site (plaintext = float32 upload)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "bytes_per_client.png", dpi=110)
        written.append("bytes_per_client.png")
    plt.close(fig)
    return written


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def run_secure_agg_bench(
    *,
    out_dir: Path,
    quick: bool,
    progress: bool = True,
    grid: Mapping[str, Any] | None = None,
) -> Path:
    """Run the secure-aggregation suite into ``out_dir``, resuming a previous run there.

    Each finished cell is appended to ``results.json`` (a list of rows) and ``results.csv`` at
    once; cells already there are not run again. At the end ``summary.md`` (tables, target
    checks with both numbers), PNG plots and ``meta.json`` (versions, machine, grid) are
    written from all rows.

    Args:
        out_dir: Output folder (created if missing).
        quick: Start from :data:`QUICK_GRID` instead of :data:`FULL_GRID`.
        progress: Show a progress bar and print the target lines to stdout.
        grid: Overrides of :class:`SecureAggGrid` fields, e.g. ``{"n_params": [1000]}``.

    Returns:
        The path of ``results.json``.

    Raises:
        ConfigError: Unknown or invalid ``grid`` entries.
        DataError: ``out_dir`` holds a ``results.json`` that is not a list of suite rows.

    """
    base = QUICK_GRID if quick else FULL_GRID
    overrides = dict(grid or {})
    fields = {f.name for f in dataclasses.fields(SecureAggGrid)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"`grid` has unknown keys {unknown}; known: {', '.join(sorted(fields))}.")
    spec = dataclasses.replace(base, **overrides)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "results.json"
    rows = _load_rows(results_path)
    done = {_cell_key(r) for r in rows}
    env = environment()

    todo, skipped, already = [], [], 0
    for mechanism, n_clients, n_params, dropout in spec.cells():
        reason = spec.skip_reason(mechanism, n_clients, n_params)
        key = (mechanism, n_clients, n_params, dropout)
        if reason is not None:
            skipped.append(
                {"mechanism": mechanism, "n_clients": n_clients, "n_params": n_params,
                 "dropout": dropout, "reason": reason}
            )  # fmt: skip
        elif key in done:
            already += 1
        else:
            todo.append(key)

    from tqdm import tqdm

    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    bar = tqdm(
        total=len(todo), disable=not progress, desc="secure-agg", unit="cell", file=sys.stderr
    )
    inputs_key: tuple[int, int] | None = None
    inputs: dict[int, np.ndarray] = {}
    distinct = 0
    with _pinned_to_one_core(spec.single_core) as core:
        try:
            for mechanism, n_clients, n_params, dropout in todo:
                bar.set_postfix_str(f"{mechanism} {_sci(n_params)} x {n_clients} @ {dropout:.0%}")
                if inputs_key != (n_clients, n_params):
                    inputs = {}
                    gc.collect()
                    inputs, distinct = _make_inputs(
                        n_clients=n_clients, dim=n_params + 1, seed=spec.seed
                    )
                    inputs_key = (n_clients, n_params)
                plan = _plan_dropout(spec, n_clients=n_clients, dropout=dropout)
                row = _measure_cell(
                    spec,
                    mechanism=mechanism,
                    n_clients=n_clients,
                    n_params=n_params,
                    dropout=dropout,
                    inputs=inputs,
                    distinct_inputs=distinct,
                    plan=plan,
                )
                row["single_core"] = core is not None
                row["measured_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"
                )
                row.update(env)
                rows.append(row)
                _write_rows(out_dir, rows)
                gc.collect()
                bar.update(1)
        finally:
            bar.close()
            inputs = {}
    if not rows:
        _write_rows(out_dir, rows)
    plots = _plot(out_dir, rows) if rows else []
    targets = _write_summary(
        out_dir,
        rows,
        grid=spec,
        quick=quick,
        env=env,
        core=core,
        skipped=skipped,
        plots=plots,
        overrides=overrides,
    )
    _update_meta(
        out_dir,
        {
            "started": started,
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "quick": quick,
            "grid": dataclasses.asdict(spec),
            "cells_measured": len(todo),
            "cells_already_present": already,
            "cells_skipped": skipped,
            "pinned_core": core,
            **env,
        },
    )
    if progress:
        for line in targets:
            print(line)
    return results_path

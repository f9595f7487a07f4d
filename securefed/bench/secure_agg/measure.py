"""Running one cell: each mechanism's aggregation, repeated while cheap, and its references."""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from securefed.bench.secure_agg.grid import SecureAggGrid
from securefed.bench.secure_agg.workload import ROUND_INDEX, DropoutPlan, reference_sum
from securefed.crypto.prg import chunk_bytes, keystream
from securefed.crypto.secagg import SecAggConfig, masking_keystream_bytes
from securefed.protocol.harness import he_sum, secure_sum

__all__ = ["AES_REFERENCE_REPEATS", "measure_cell", "pinned_to_one_core"]

_DROPOUT_STAGE = "before_upload"
# A flooded CKKS sum of k sites is within CKKSParams.precision(k) (about 1.6e-10 k at the
# defaults), plus float64 decoding's relative error near 1e-15 of the sum's magnitude.
_CKKS_FLOAT_RELATIVE = 1e-13
AES_REFERENCE_REPEATS = 3


@contextmanager
def pinned_to_one_core(enabled: bool) -> Iterator[int | None]:
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


def _run_plain(inputs: Mapping[int, np.ndarray], plan: DropoutPlan) -> _Run:
    """The baseline: survivors upload float32 vectors, the server adds them."""
    start = time.perf_counter()
    survivors = sorted(s for s in inputs if s not in set(plan.dropped))
    total = np.sum([np.asarray(inputs[s], dtype=np.float64) for s in survivors], axis=0)
    return _Run(
        total=total,
        survivors=survivors,
        client_seconds=[0.0 for _ in survivors],
        bytes_sent=[int(inputs[s].size * 4) for s in survivors],
        server_seconds=time.perf_counter() - start,
        protocol="plaintext (float32 upload)",
    )


def _run_mask(
    inputs: Mapping[int, np.ndarray], plan: DropoutPlan, n_clients: int, grid: SecureAggGrid
) -> _Run:
    # The ring and clip range a run of n_clients sites gets (by default RunConfig's); the
    # fractional bits follow from them and n_clients as in a run (protocol.modes.masking).
    config = SecAggConfig(
        n_clients=n_clients,
        threshold=plan.threshold,
        neighbors=plan.neighbors,
        ring_bits=grid.mask_ring_bits(n_clients),
        clip_range=grid.clip_range,
    )
    res = secure_sum(
        inputs,
        config=config,
        round_index=ROUND_INDEX,
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
            "ring_bits": config.ring_bits,
            "clip_range": config.clip_range,
            "clipped": res.clipped,
        },
    )


def _run_he(inputs: Mapping[int, np.ndarray], plan: DropoutPlan, keys: Any) -> _Run:
    res = he_sum(inputs, keys=keys, drop_before_upload=plan.dropped, round_index=ROUND_INDEX)
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
        error_bound=params.precision(len(survivors))
        + _CKKS_FLOAT_RELATIVE * max(1.0, float(np.max(np.abs(res.total)))),
    )


def measure_cell(
    grid: SecureAggGrid,
    *,
    mechanism: str,
    n_clients: int,
    n_params: int,
    dropout: float,
    inputs: Mapping[int, np.ndarray],
    distinct_inputs: int,
    plan: DropoutPlan,
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
            run = _run_mask(inputs, plan, n_clients, grid)
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
    reference, magnitude = reference_sum(inputs, best.survivors)
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
        "ring_bits": best.fields.get("ring_bits"),
        "clip_range": best.fields.get("clip_range"),
        "frac_bits": best.fields.get("frac_bits"),
        "clipped": best.fields.get("clipped", 0),
        "timing_repeats": repeats,
        "distinct_inputs": distinct_inputs,
    }
    if best.config is not None:
        nbytes = masking_keystream_bytes(config=best.config, dim=dim)
        one_call = min(_aes_ctr_one_call_seconds(nbytes) for _ in range(AES_REFERENCE_REPEATS))
        prealloc = min(_aes_ctr_prealloc_seconds(nbytes) for _ in range(AES_REFERENCE_REPEATS))
        row["keystream_bytes"] = nbytes
        row["aes_ctr_seconds"] = one_call
        row["aes_ctr_prealloc_seconds"] = prealloc
        # Same bytes, so the throughput ratio (ours / AES) is the inverse ratio of the times.
        row["mask_throughput_ratio"] = one_call / row["mask_seconds"]
        row["mask_throughput_ratio_prealloc"] = prealloc / row["mask_seconds"]
    row["cell_seconds"] = time.perf_counter() - cell_start
    return row

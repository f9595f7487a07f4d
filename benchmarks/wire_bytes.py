"""Bytes per site per round on the wire, and the FedAvg error each protection adds (issue 17).

For each model size and number of sites: what one site sends in one round under

* ``float32``: the plaintext update ``[n_i u_i, n_i]`` as float32 (4 bytes a value), the unit;
* ``mask-64``: pairwise masking as it was before issue 17 (64-bit ring, ``--secagg-clip`` 1e6);
* ``mask-auto``: pairwise masking with the defaults (``--secagg-ring-bits auto``: the fewest
  bits within its 1e-3 tolerance, packed k bits a value; 30 bits for 3 sites at ``--secagg-clip``
  1e5, 31 for 10, 32 for 20);
* ``ckks``: CKKS (TenSEAL, N = 8192, 4096 slots a ciphertext), with how full its slots are.

Masking counts every message of the round a site sends (keys, sealed shares, the masked input,
its signature over the survivor list, its unmasking shares), as the in-process link counts it;
CKKS counts the site's signed ciphertext frame. Then, on real updates (the SmallCNN trained 3
SGD steps at each site on its own synthetic images), the largest error over coordinates of the
FedAvg average under each protection against float64 plaintext FedAvg, next to the bound the
masking ring states (k q / sum n_i; q for weights of 1).

Usage (from the repository root; about 2 minutes on one core):

    python benchmarks/wire_bytes.py --out benchmarks/results/wire_bytes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from securefed.config import RunConfig
from securefed.crypto.ckks import CKKSParams, generate_keys
from securefed.crypto.packing import packed_size
from securefed.crypto.secagg import SecAggConfig
from securefed.models import ModelSpec, build_model
from securefed.protocol.harness import he_sum, secure_sum
from securefed.protocol.modes.masking import secagg_config

#: CKKS cells cost about (sites x values / 4096) encryptions: measured up to this many values.
CKKS_MAX_WORK = 3_100_000


def real_updates(sizes: list[int], *, seed: int = 0) -> dict[int, np.ndarray]:
    """``[n_i u_i..., n_i]`` per site, u_i the SmallCNN's update after 3 SGD steps there."""
    torch.manual_seed(seed)
    spec = ModelSpec(in_channels=1, num_classes=4)
    start = build_model(name="cnn", spec=spec).module.state_dict()
    out = {}
    for site, n in enumerate(sizes):
        local = build_model(name="cnn", spec=spec).module
        local.load_state_dict(start)
        opt = torch.optim.SGD(local.parameters(), lr=0.5, momentum=0.5)
        gen = torch.Generator().manual_seed(seed * 1000 + site)
        x = torch.randn(64, 1, 28, 28, generator=gen) + 0.3 * site
        y = torch.randint(0, 4, (64,), generator=gen)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(local(x), y).backward()
            opt.step()
        update = torch.cat(
            [(p.detach() - start[k]).flatten() for k, p in local.named_parameters()]
        ).double()
        out[site] = np.concatenate([n * update.numpy(), [float(n)]])
    return out


def _mask_configs(n_sites: int, threshold: int | None = None) -> dict[str, SecAggConfig]:
    before = SecAggConfig(n_clients=n_sites, threshold=threshold, ring_bits=64, clip_range=1e6)
    run = RunConfig(secure_agg="mask", clients=n_sites, secagg_threshold=threshold)
    return {"mask-64": before, "mask-auto": secagg_config(run, n_sites=n_sites)}


def bytes_row(dim: int, n_sites: int, keys: Any, rng: np.random.Generator) -> dict[str, Any]:
    """Bytes one site sends per round under each protection, for ``dim`` parameters."""
    values = dim + 1
    inputs = {s: rng.normal(0, 0.01, values) for s in range(n_sites)}
    row: dict[str, Any] = {"parameters": dim, "sites": n_sites, "float32": 4 * values}
    for name, config in _mask_configs(n_sites).items():
        res = secure_sum(inputs, config=config, round_index=1)
        row[name] = statistics.fmean(res.bytes_sent.values())
        row[f"{name}-ring"] = config.ring_bits
        row[f"{name}-masked-input"] = packed_size(values, config.ring_bits)  # values only
    slots = keys.params.slots
    chunks = math.ceil(values / slots)
    row["ckks-ciphertexts"] = chunks
    row["ckks-slots-filled"] = values / (chunks * slots)
    if n_sites * values <= CKKS_MAX_WORK:
        res = he_sum(inputs, keys=keys, round_index=1)
        row["ckks"] = statistics.fmean(res.bytes_per_client.values())
    return row


def error_row(sizes: list[int], dropped: tuple[int, ...], keys: Any) -> dict[str, Any]:
    """Max |FedAvg(protected) - FedAvg(float64 plaintext)| over coordinates, real updates."""
    inputs = real_updates(sizes)
    survivors = [s for s in inputs if s not in dropped]
    plain = np.sum([inputs[s] for s in survivors], axis=0)
    plain_avg = plain[:-1] / plain[-1]
    row: dict[str, Any] = {"sizes": sizes, "dropped": list(dropped)}
    # A dropout needs t below the round's size: the lowest strict majority.
    threshold = len(sizes) // 2 + 1 if dropped else None
    for name, config in _mask_configs(len(sizes), threshold).items():
        res = secure_sum(inputs, config=config, round_index=1, drop_before_upload=dropped)
        avg = res.total[:-1] / res.total[-1]
        row[name] = float(np.abs(avg - plain_avg).max())
        row[f"{name}-bound"] = len(survivors) * config.codec.quantum / float(plain[-1])
        row[f"{name}-quantum"] = config.codec.quantum
    res = he_sum(inputs, keys=keys, round_index=1, drop_before_upload=dropped)
    row["ckks"] = float(np.abs(res.total[:-1] / res.total[-1] - plain_avg).max())
    row["float32"] = float(
        np.abs(
            np.sum([inputs[s].astype(np.float32) for s in survivors], axis=0, dtype=np.float64)[:-1]
            / plain[-1]
            - plain_avg
        ).max()
    )
    return row


def render(bytes_rows: list[dict[str, Any]], error_rows: list[dict[str, Any]], cnn: int) -> str:
    """The markdown report (``cnn``: the SmallCNN's parameters)."""
    lines = [
        "# Bytes per site per round, and the FedAvg error they add",
        "",
        "`python benchmarks/wire_bytes.py --out benchmarks/results/wire_bytes`",
        "",
        "Bytes one site sends in one round (all its messages), and the ratio to float32 "
        "(4 bytes per value of `[n_i u_i, n_i]`). mask-64: the 64-bit ring masking used before "
        "issue 17; mask-auto: the default `--secagg-ring-bits auto`; CKKS: N = 8192, 4096 "
        "slots per ciphertext.",
        "",
        "| parameters | sites | float32 | mask-64 | mask-auto (ring) | CKKS | CKKS ciphertexts "
        "(slots filled) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in bytes_rows:
        f32 = r["float32"]
        ckks = f"{r['ckks'] / 1e6:.3f} MB ({r['ckks'] / f32:.2f}x)" if "ckks" in r else "-"
        lines.append(
            f"| {r['parameters']:,} | {r['sites']} | {f32 / 1e6:.3f} MB | "
            f"{r['mask-64'] / 1e6:.3f} MB ({r['mask-64'] / f32:.3f}x) | "
            f"{r['mask-auto'] / 1e6:.3f} MB ({r['mask-auto'] / f32:.3f}x, "
            f"{r['mask-auto-ring']}-bit) | {ckks} | "
            f"{r['ckks-ciphertexts']} ({r['ckks-slots-filled']:.2%}) |"
        )
    lines += [
        "",
        f"FedAvg average on real SmallCNN updates ({cnn:,} values + weight): largest error over "
        "coordinates against float64 plaintext FedAvg, and the bound the ring states "
        "(k q / sum n_i). float32: rounding each site's vector to float32.",
        "",
        "| site sizes | dropped | float32 | mask-64 (bound) | mask-auto (bound; q) | CKKS |",
        "|---|---|---|---|---|---|",
    ]
    for r in error_rows:
        lines.append(
            f"| {r['sizes']} | {r['dropped'] or '-'} | {r['float32']:.2g} | "
            f"{r['mask-64']:.2g} ({r['mask-64-bound']:.2g}) | "
            f"{r['mask-auto']:.2g} ({r['mask-auto-bound']:.2g}; {r['mask-auto-quantum']:.2g}) | "
            f"{r['ckks']:.2g} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    """Measure and write ``wire_bytes.md`` and ``wire_bytes.json`` under ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/wire_bytes"))
    parser.add_argument("--quick", action="store_true", help="the CNN's size and 3 sites only")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)
    keys = generate_keys(params=CKKSParams())
    cnn = build_model(name="cnn", spec=ModelSpec(in_channels=1, num_classes=4)).num_parameters
    rng = np.random.default_rng(0)
    grid = (
        [(cnn, 3)]
        if args.quick
        else [(cnn, n) for n in (3, 10, 20)] + [(1_000_000, 3), (1_000_000, 10)]
    )
    bytes_rows = [bytes_row(d, n, keys, rng) for d, n in grid]
    cases = [([800, 800, 800], ()), ([1] * 3, ())]
    if not args.quick:
        cases += [([800, 800, 800], (1,)), ([40, 75, 120, 33, 90, 60, 410, 12, 250, 800], (3,))]
    error_rows = [error_row(sizes, dropped, keys) for sizes, dropped in cases]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "wire_bytes.json").write_text(
        json.dumps({"bytes": bytes_rows, "fedavg_error": error_rows}, indent=1)
    )
    text = render(bytes_rows, error_rows, cnn)
    (args.out / "wire_bytes.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

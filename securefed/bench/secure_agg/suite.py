"""The suite's entry point: plan the cells, measure those not yet done, write the report."""

from __future__ import annotations

import dataclasses
import datetime
import gc
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from securefed.bench.common import environment
from securefed.bench.secure_agg.grid import FULL_GRID, QUICK_GRID, SecureAggGrid
from securefed.bench.secure_agg.measure import measure_cell, pinned_to_one_core
from securefed.bench.secure_agg.render import plot, sci, write_summary
from securefed.bench.secure_agg.store import cell_key, load_results, update_meta, write_results
from securefed.bench.secure_agg.workload import make_inputs, plan_dropout
from securefed.errors import ConfigError

__all__ = ["run_secure_agg_bench"]


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
        ConfigError: Unknown or invalid ``grid`` entries, or ``out_dir`` holds masking rows
            measured with another ring or clip range (they would be kept as if measured now).
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
    rows = load_results(results_path)
    _refuse_other_rings(results_path, rows, spec)
    done = {cell_key(r) for r in rows}
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
    with pinned_to_one_core(spec.single_core) as core:
        try:
            for mechanism, n_clients, n_params, dropout in todo:
                bar.set_postfix_str(f"{mechanism} {sci(n_params)} x {n_clients} @ {dropout:.0%}")
                if inputs_key != (n_clients, n_params):
                    inputs = {}
                    gc.collect()
                    inputs, distinct = make_inputs(
                        n_clients=n_clients, dim=n_params + 1, seed=spec.seed
                    )
                    inputs_key = (n_clients, n_params)
                plan = plan_dropout(spec, n_clients=n_clients, dropout=dropout)
                row = measure_cell(
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
                write_results(out_dir, rows)
                gc.collect()
                bar.update(1)
        finally:
            bar.close()
            inputs = {}
    if not rows:
        write_results(out_dir, rows)
    plots = plot(out_dir, rows) if rows else []
    targets = write_summary(
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
    update_meta(
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


# Rows written before the suite recorded its ring were measured with SecAggConfig's defaults
# of the time: the 64-bit ring at clip range 1e6.
_UNRECORDED_RING = (64, 1e6)


def _refuse_other_rings(path: Path, rows: list[dict[str, Any]], spec: SecureAggGrid) -> None:
    """Refuse to resume into masking rows of another ring or clip range than ``spec``'s."""
    other = []
    for r in rows:
        if r["mechanism"] != "mask":
            continue
        ring = r.get("ring_bits", _UNRECORDED_RING[0])
        clip = r.get("clip_range", _UNRECORDED_RING[1])
        if (ring, float(clip)) != (spec.mask_ring_bits(int(r["n_clients"])), spec.clip_range):
            other.append((ring, float(clip)))
    if other:
        ring, clip = other[0]
        raise ConfigError(
            f"{path}: {len(other)} masking rows were measured with a {ring}-bit ring at clip "
            f"range {clip:g}, not the ring_bits={spec.ring_bits} and clip range "
            f"{spec.clip_range:g} of this run; use another --out, or a grid with their "
            "ring_bits and clip_range."
        )

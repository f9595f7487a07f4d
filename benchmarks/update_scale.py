"""How long the default update bound C_u is against the model and an honest update.

For the tests' tiny configuration (``tests/conftest.py``: 3 sites, lr 0.5, the small CNN on a
240-record MedMNIST-layout file), with DP (epsilon 8) and without, prints the number of
aggregated values d, the default C_u = lr * sqrt(d), the global model's norm, each site's own
round-1 update norm (the vector it clips and protects) and the applied average update's norm
(``update_bound.update_norm`` in metrics.json). docs/poisoning.md quotes these figures.

    PYTHONPATH=. python benchmarks/update_scale.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from securefed.fl.bounds import update_clip_for
from securefed.fl.simulation import Federation
from securefed.fl.site_runtime import local_update
from tests.conftest import tiny_config, write_small_npz


def _site_norms(config) -> list[float]:
    """Each site's own round-1 update norm, before clipping (a separate federation)."""
    fed = Federation(config.replace(update_clip=1e30))
    blob = fed._blobs()[0]
    norms = []
    for site in fed.sites:
        model, layout = site.model(blob, layout_keys=list(fed.layout.keys))
        vec, *_ = local_update(
            site.config, trainer=site.trainer, layout=layout, model=model, round_index=1
        )
        weight = float(vec[-1])
        norms.append(float(np.linalg.norm(np.asarray(vec[:-1]) / weight)))
    return norms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    rounds = parser.parse_args().rounds
    with tempfile.TemporaryDirectory() as tmp:
        npz = write_small_npz(Path(tmp) / "tiny.npz")
        rows = []
        for dp in (8.0, None):
            # The small CNN docs/poisoning.md quotes (`auto` under DP is now scatter-linear).
            config = tiny_config(npz, dp_epsilon=dp, rounds=rounds, model="cnn")
            fed = Federation(config)
            w0 = fed.layout.flatten(fed.models[0].state_dict())
            clip = update_clip_for(config, w0.size)
            applied = []
            for r in range(1, rounds + 1):
                record = fed.run_round(r)
                applied.append(record.data["update_bound"]["update_norm"])
            rows.append(
                {
                    "dp_epsilon": dp,
                    "d": int(w0.size),
                    "lr": config.lr,
                    "default_update_clip": round(clip, 2),
                    "model_norm": round(float(np.linalg.norm(w0)), 2),
                    "site_update_norms_round1": [round(n, 3) for n in _site_norms(config)],
                    "applied_update_norms": [round(float(a), 3) for a in applied],
                }
            )
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""How much a better decision threshold could add to finished binary DP runs (issue 15).

The decision calibration (docs/calibration.md) moves the threshold on the logit difference
``d = logit_1 - logit_0`` after the last round, from noised statistics. This asks what a
*perfect* threshold would give the same models, to tell a threshold problem from a ranking
problem. For each run folder it rebuilds the model, undoes the calibration's offsets, and
prints the test accuracy at these thresholds on ``d``:

- ``t=0``: the uncalibrated model;
- ``applied``: what the run recorded (the calibrated model, or ``t=0`` when it was refused);
- ``LDA``: the calibration's own rule (midpoint of the clipped class means, at the run's R) computed
  without noise on the whole training split;
- ``train-bal``: the threshold that maximises balanced accuracy on the training split, no noise;
- ``test-bal``: the same fitted on the test split itself (an oracle: no method can beat it
  on balanced accuracy);
- ``LDA R=r`` (with ``--clips r ...``): the calibration's rule with clipping bound r, no noise.

The training split here is the data set's whole train split, the union of the sites' records
including the held-out parts the sites keep back, so the noise-free rows are approximate.
Not a privacy mechanism: it reads every record, for measurement only.

Usage (from the repository root):

    python benchmarks/threshold_headroom.py RUN [RUN ...] [--clips 8 16 inf]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

from securefed.config import RunConfig
from securefed.data.dataset import load_dataset
from securefed.dp.calibration import clip_of
from securefed.models import ModelSpec, build_model


def _diffs(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = torch.cat(
            [
                model(torch.as_tensor(np.array(images[i : i + 512])))
                for i in range(0, len(images), 512)
            ]
        )
    return (out[:, 1] - out[:, 0]).numpy()


def _accuracy(d: np.ndarray, y: np.ndarray, t: float) -> float:
    return float(((d > t).astype(int) == y).mean())


def _best_balanced(d: np.ndarray, y: np.ndarray) -> float:
    ts = np.unique(d)
    scores = [((d[y == 1] > t).mean() + (d[y == 0] <= t).mean()) / 2 for t in ts]
    return float(ts[int(np.argmax(scores))])


def _lda(d: np.ndarray, y: np.ndarray, clip: float) -> float:
    # The calibration clips z = d / sqrt(2) (logits minus their mean) to norm R.
    z = np.clip(d / math.sqrt(2), -clip, clip) * math.sqrt(2)
    return float((z[y == 0].mean() + z[y == 1].mean()) / 2)


def headroom(run: Path, clips: tuple[float, ...] = ()) -> dict[str, float]:
    """The test accuracies at each threshold, and the AUC, for one run folder."""
    config = json.loads((run / "config.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    data = config["resolved"]["dataset"]
    if data["num_classes"] != 2:
        raise SystemExit(f"{run}: a binary classification run is needed")
    recorded = RunConfig.from_recorded(config["run"])
    bundle = load_dataset(
        name=recorded.dataset,
        data_dir=recorded.data_dir,
        data=recorded.data,
        seed=recorded.seed,
        **recorded.loader_options,
    )
    spec = ModelSpec(
        in_channels=data["in_channels"],
        num_classes=2,
        spatial_dims=data["spatial_dims"],
        image_shape=tuple(data["image_shape"]),
    )
    model = build_model(
        name=config["resolved"]["model"]["name"],
        spec=spec,
        private=bool(config["run"].get("dp_epsilon")),
    ).module
    model.load_state_dict(load_file(str(run / "model.safetensors")))
    model.eval()
    cal = metrics["rounds"][-1].get("decision_calibration") or {}
    offsets = cal.get("offsets") or [0.0, 0.0]
    shift = offsets[1] - offsets[0]  # the calibration added it to d; undo it
    d_train = _diffs(model, bundle.train.images) - shift
    d_test = _diffs(model, bundle.test.images) - shift
    y_train, y_test = bundle.train.labels.astype(int), bundle.test.labels.astype(int)
    lda = _lda(d_train, y_train, clip_of(config["run"], model=config["resolved"]["model"]["name"]))
    row = {
        "auc": float(roc_auc_score(y_test, d_test)),
        "recorded": float(metrics["final"]["accuracy"]),
        "t=0": _accuracy(d_test, y_test, 0.0),
        "applied": _accuracy(d_test, y_test, -shift if cal.get("applied") else 0.0),
        "LDA": _accuracy(d_test, y_test, lda),
    }
    for r in clips:  # the same rule with another clipping bound R (no noise)
        row[f"LDA R={r:g}"] = _accuracy(d_test, y_test, _lda(d_train, y_train, r))
    row["train-bal"] = _accuracy(d_test, y_test, _best_balanced(d_train, y_train))
    row["test-bal"] = _accuracy(d_test, y_test, _best_balanced(d_test, y_test))
    return row


def main() -> int:
    """Print one row per run and the mean of each column."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument(
        "--clips",
        type=float,
        nargs="*",
        default=[],
        help="also the LDA rule with these clipping bounds R (inf: unclipped)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = {str(run): headroom(run, tuple(args.clips)) for run in args.runs}
    keys = list(next(iter(rows.values())))
    print("| run | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for run, row in rows.items():
        print(f"| {run} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
    means = {k: float(np.mean([r[k] for r in rows.values()])) for k in keys}
    print("| mean | " + " | ".join(f"{means[k]:.3f}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

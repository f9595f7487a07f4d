"""Plug in your own model and data set, train one round with DP, audit the run."""

import math

import numpy as np
from torch import nn

import securefed


@securefed.register_model("tiny-mlp")
def tiny_mlp(spec: securefed.ModelSpec) -> nn.Module:
    """Any nn.Module; securefed passes it through Opacus' validator like its own models."""
    inputs = spec.in_channels * math.prod(spec.image_shape)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(inputs, 16), nn.ReLU(), nn.Linear(16, spec.num_classes)
    )


@securefed.register_dataset("bright-or-dark")
def bright_or_dark(seed: int = 0) -> securefed.DatasetBundle:
    """Float32 images in [0, 1] shaped (N, C, H, W), int64 labels in [0, num_classes)."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> securefed.ArraySplit:
        labels = rng.integers(0, 2, n, dtype=np.int64)
        images = rng.uniform(0.0, 0.5, (n, 1, 8, 8)) + 0.5 * labels[:, None, None, None]
        return securefed.ArraySplit(images=images.astype(np.float32), labels=labels)

    return securefed.DatasetBundle(
        name="bright-or-dark",
        train=split(240),
        val=split(60),
        test=split(60),
        num_classes=2,
        class_names=("dark", "bright"),
        source="in memory",
    )


config = securefed.RunConfig(
    dataset="bright-or-dark",
    model="tiny-mlp",
    clients=2,
    rounds=1,
    batch_size=32,
    lr=0.5,
    dp_epsilon=8.0,
)
run_dir = securefed.train(config, out_dir="runs/api-example", progress=False)
result = securefed.audit(run_dir)
print(run_dir, "audit exit code:", result.exit_code)  # 0: every privacy claim holds
assert result.exit_code == 0

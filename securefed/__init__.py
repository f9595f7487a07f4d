"""securefed: privacy-hardened federated learning for medical imaging.

The Python API (the CLI is a thin layer over the same calls)::

    import securefed

    config = securefed.RunConfig(dataset="synthetic", rounds=2, dp_epsilon=8.0)
    run_dir = securefed.train(config, out_dir="runs/first")
    result = securefed.audit(run_dir)
    assert result.exit_code == 0, result

Own models and data sets are registered by name (:func:`register_model`,
:func:`register_dataset`) or named ``module:function`` in ``RunConfig.model`` /
``RunConfig.dataset`` (``--model`` / ``--dataset`` on the command line).

Importing securefed is cheap: torch, Opacus and the rest load on first use of an attribute.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from securefed.errors import ConfigError, DataError, SecureFedError

if TYPE_CHECKING:  # the real imports are lazy (see __getattr__)
    from pathlib import Path

    from securefed.config import RunConfig
    from securefed.data.dataset import ArraySplit, DatasetBundle
    from securefed.data.registry import register_dataset
    from securefed.dp.audit import AuditResult
    from securefed.models import ModelSpec, register_model

__version__ = "0.1.0"
__all__ = [
    "ArraySplit",
    "ConfigError",
    "DataError",
    "DatasetBundle",
    "ModelSpec",
    "RunConfig",
    "SecureFedError",
    "__version__",
    "audit",
    "register_dataset",
    "register_model",
    "train",
]

# Public name -> module that defines it; imported on first access, so `import securefed`
# (and `securefed --help`) does not pay for torch.
_LAZY = {
    "RunConfig": "securefed.config",
    "ArraySplit": "securefed.data.dataset",
    "DatasetBundle": "securefed.data.dataset",
    "register_dataset": "securefed.data.registry",
    "ModelSpec": "securefed.models",
    "register_model": "securefed.models",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'securefed' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def train(config: RunConfig, *, out_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Run ``config`` to completion and write the run folder (as ``securefed train``).

    Args:
        config: What to run (:class:`RunConfig`; its ``model`` and ``dataset`` may name
            registered or ``module:function`` models and data sets).
        out_dir: Run folder (default: ``runs/<timestamp>``).
        progress: Progress bars on stderr.

    Returns:
        The run folder: config.json, metrics.json, privacy.json, model.safetensors, summary.md.

    Raises:
        SecureFedError: Invalid configuration or data (``ConfigError``, ``DataError``, ...).

    """
    from pathlib import Path

    from securefed.run import train as run_train

    out = Path(out_dir) if out_dir is not None else None
    return run_train(config, out_dir=out, progress=progress)


def audit(
    path: str | Path,
    *,
    site_keys: dict[str, str] | None = None,
    allow_reproducible_noise: bool = False,
) -> AuditResult:
    """Re-check a run folder's privacy claims (as ``securefed audit``).

    Args:
        path: A run folder written by :func:`train`.
        site_keys: Trusted public keys ``{"<client_id>": hex}`` the report's must equal;
            None takes them from the report itself.
        allow_reproducible_noise: Accept runs with ``reproducible_noise`` (tests only).

    Returns:
        The result; ``exit_code`` is 0 (every claim holds), 1 (a claim fails) or 3 (the run
        makes no DP claim).

    Raises:
        securefed.errors.AuditError: The folder or a file in it is missing or malformed.

    """
    from securefed.dp.audit import audit_run

    return audit_run(
        path,
        site_keys=site_keys,
        site_keys_source="securefed.audit(site_keys=...)" if site_keys is not None else None,
        allow_reproducible_noise=allow_reproducible_noise,
    )

"""Checks of a run's inputs that cost milliseconds, run before anything slow starts.

:class:`~securefed.config.RunConfig` checks each setting on its own (types, ranges, and
combinations that can never work). What needs a registry or the file system is checked here:
the partition spec, the model name, the data path, the number of sites against the training
set where its size can be read without loading it (an ``.npz`` file's array headers, the
synthetic generator's sizes), an ``.npz`` file's layout, labels and classes (the loader's
own checks, on the array headers and the labels: no image is read), and the
secure-aggregation parameters. Loading a data set and
building a model take seconds to minutes; a typo should not wait for them.

The CLI calls :func:`validate_inputs` before importing the training stack, and
:func:`securefed.run.train` calls it too, so the Python API gets the same errors. Every
error is a :class:`~securefed.errors.ConfigError` or :class:`~securefed.errors.DataError`
whose one-line message names the flag.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

from securefed.config import RunConfig, flag_for
from securefed.errors import ConfigError, DataError

__all__ = ["npz_split_sizes", "validate_inputs"]


def validate_inputs(config: RunConfig) -> None:
    """Refuse ``config`` if a cheap check shows it cannot run; read no image.

    Raises:
        ConfigError: Unknown partition spec or model, or invalid secure-aggregation
            parameters for the sites sampled per round.
        DataError: The data path is missing or unreadable, an ``.npz`` file is malformed
            (as :func:`~securefed.data.medmnist.load_medmnist_npz` would say), or there are
            more sites than training samples.

    """
    _check_partition(config)
    _check_secure_agg(config)
    _check_pretrained(config)
    n_train, source = _training_size(config)
    if n_train is not None and config.clients > n_train:
        raise DataError(
            f"`--clients` (clients) is {config.clients}: {config.clients} sites but only "
            f"{n_train} training samples in {source}; every site needs at least one "
            f"(use --clients {n_train} or fewer)."
        )
    _check_model(config)  # last: the model registry imports torch


def _renamed(exc: ConfigError, **fields: str) -> ConfigError:
    """``exc``'s message with the library's field names replaced by the run's flags."""
    text = str(exc)
    for field, run_field in fields.items():
        text = text.replace(f"`{field}`", f"`{flag_for(run_field)}` ({run_field})")
    return ConfigError(text)


def _check_partition(config: RunConfig) -> None:
    from securefed.data.partition import parse_partitioner

    try:
        parse_partitioner(config.partition)
    except ConfigError as exc:
        raise _renamed(exc, partition="partition") from None


def _check_secure_agg(config: RunConfig) -> None:
    """Build the aggregator's parameters (no keys, no crypto) for the sites of one round."""
    n = config.sites_per_round
    if config.secure_agg == "mask":
        from securefed.crypto.secagg import SecAggConfig

        try:
            SecAggConfig(
                n_clients=n,
                threshold=config.secagg_threshold,
                neighbors=config.secagg_neighbors,
                ring_bits=config.resolved_ring_bits,
                clip_range=config.secagg_clip,
            )
        except ConfigError as exc:
            raise ConfigError(
                f"--secure-agg mask with {n} site(s) per round (--clients {config.clients}, "
                f"--client-fraction {config.client_fraction:g}): "
                + str(
                    _renamed(
                        exc,
                        threshold="secagg_threshold",
                        neighbors="secagg_neighbors",
                        n_clients="clients",
                    )
                )
            ) from None
    elif config.secure_agg == "he":
        from securefed.crypto.ckks import CKKSParams

        try:
            CKKSParams(
                poly_modulus_degree=config.he_poly_modulus_degree,
                coeff_mod_bit_sizes=config.he_coeff_mod_bit_sizes,
                global_scale_bits=config.he_scale_bits,
            )
        except ConfigError as exc:
            text = str(exc)
            for field, run_field in (
                ("poly_modulus_degree", "he_poly_modulus_degree"),
                ("coeff_mod_bit_sizes", "he_coeff_mod_bit_sizes"),
                ("global_scale_bits", "he_scale_bits"),
            ):
                text = re.sub(rf"`{field}(\[\d+\])?`", f"`{flag_for(run_field)}`", text)
            raise ConfigError(f"--secure-agg he: {text}") from None


def _check_pretrained(config: RunConfig) -> None:
    if config.pretrained is not None and not Path(config.pretrained).expanduser().is_file():
        raise DataError(f"`--pretrained` {config.pretrained}: no such file.")


def _check_patient_ids(config: RunConfig) -> None:
    """Patient-level DP on an ``.npz`` file needs ``--group-by`` (its ids are arrays by KEY)."""
    if config.privacy_unit == "patient" and config.group_by is None:
        raise DataError(
            "`--privacy-unit` patient needs a patient id per record, and an .npz file has them "
            "only as arrays named by --group-by KEY (train_KEY, ...; docs/patients.md)."
        )


def _check_model(config: RunConfig) -> None:
    if ":" in config.model:
        return  # a user's `module:function` factory: resolved (and checked) when it is built
    from securefed.models import available_models, models_for_task

    known = available_models()
    if config.model == "auto":
        return  # picked from the data when the model is built (securefed.models.auto_model)
    if config.model not in known:
        raise ConfigError(
            f"`--model` (model) must be one of {', '.join(known)} (got {config.model!r})."
        )
    if config.task != "auto" and config.model not in models_for_task(config.task):
        raise ConfigError(
            f"`--model` {config.model} cannot do --task {config.task}; models that can: "
            f"{', '.join(models_for_task(config.task))}."
        )


def _training_size(config: RunConfig) -> tuple[int | None, str]:
    """Training samples, when they can be known without loading (else None), and where from.

    Raises:
        DataError: The data path does not exist or cannot be read.

    """
    if config.data is not None:
        path = Path(config.data).expanduser()
        if not path.exists():
            raise DataError(
                f"`--data` {path}: no such file or folder; securefed never downloads data."
            )
        if path.is_dir():
            if not _readable(path):
                raise DataError(f"`--data` {path}: folder cannot be read (permissions).")
            return None, str(path)  # counting images means walking the tree: the loader does
        if path.suffix.lower() != ".npz":
            raise DataError(f"`--data` {path}: expected a folder of images or a .npz file.")
        label = None if config.dataset == "synthetic" else config.dataset
        return _npz_train_size(path, flag="--data", config=config, name=label)
    options = config.data_options or {}
    if config.dataset in ("synthetic", "synthetic-seg"):
        n = options.get("n_train")
        if n is None:
            n = _synthetic_default_train(config.dataset, options)
        return (n if isinstance(n, int) else None), f"{config.dataset} data"
    name = config.dataset
    if ":" in name or _registered_dataset(name):
        return None, name  # a user's loader: its size is known only once it has run
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
        raise ConfigError(
            f"`--dataset` (dataset) must be 'synthetic', 'synthetic-seg' or a MedMNIST name "
            f"such as 'pneumoniamnist' (got {name!r}); to load a path, pass it as --data."
        )
    from securefed.data.medmnist import default_data_dir

    folder = default_data_dir() if config.data_dir is None else Path(config.data_dir).expanduser()
    path = folder / f"{name}.npz"
    if not path.is_file():
        raise DataError(
            f"`--dataset` {name}: {path} not found; securefed never downloads data: put the "
            "MedMNIST .npz there, set --data-dir, or pass the file as --data."
        )
    return _npz_train_size(path, flag="--dataset", config=config, name=name)


def _registered_dataset(name: str) -> bool:
    """Whether ``name`` was registered as a user's data set (where that registry exists)."""
    try:
        from securefed.data.registry import resolve_dataset
    except ImportError:
        return False
    return bool(resolve_dataset(name))


def _readable(path: Path) -> bool:
    try:
        next(iter(path.iterdir()), None)
    except OSError:
        return False
    return True


def _synthetic_default_train(dataset: str, options: dict) -> int | None:
    if dataset == "synthetic":
        from securefed.data.synthetic import _DEFAULT_SIZES

        sizes = _DEFAULT_SIZES.get(options.get("spatial_dims", 2))
        return None if sizes is None else int(sizes[0])
    import inspect

    from securefed.data.segmentation import make_synthetic_segmentation

    default = inspect.signature(make_synthetic_segmentation).parameters["n_train"].default
    return default if isinstance(default, int) else None


def _npz_train_size(
    path: Path, *, flag: str, config: RunConfig, name: str | None
) -> tuple[int | None, str]:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise DataError(f"`{flag}` {path}: cannot be read ({exc.strerror}).") from None
    _check_patient_ids(config)
    group_by = config.group_by
    # The loader's own checks, on headers and labels. Loader options and a blank --group-by
    # are refused by load_dataset before it reads the file: left to it, so the error is its.
    if not config.data_options and (group_by is None or group_by.strip()):
        from securefed.data.medmnist import check_medmnist_npz

        check_medmnist_npz(path=path, name=name, num_classes=config.num_classes, group_by=group_by)
    sizes = npz_split_sizes(path)
    return sizes.get("train"), f"{path} (train_labels)"


def npz_split_sizes(path: str | Path) -> dict[str, int]:
    """Samples per split of a MedMNIST-layout ``.npz``, from the array headers alone.

    Reads the ``.npy`` header of each ``{split}_labels`` member (a few hundred bytes, even in
    a compressed archive); no image is decompressed and nothing is unpickled (numpy parses
    the header as a literal). Returns only the splits it could read: a malformed archive is
    left to the loader, whose errors say precisely what is wrong.
    """
    from securefed.data.medmnist import read_npy_header

    out: dict[str, int] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            for split in ("train", "val", "test"):
                member = f"{split}_labels.npy"
                if member not in names:
                    continue
                with archive.open(member) as handle:
                    header = read_npy_header(handle)
                if header is None:
                    continue
                shape, _ = header
                if shape:
                    out[split] = int(shape[0])
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return out
    return out

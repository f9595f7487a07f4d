"""Pretrained weight files: read them without unpickling, and map foreign key names to ours.

Two file formats are read:

- safetensors (any producer: securefed, timm and Hugging Face ship it);
- a torch checkpoint (``.pt``/``.pth``/``.bin``), read **only** with
  ``torch.load(..., weights_only=True)``, whose restricted unpickler builds tensors and plain
  containers and refuses every other global, so a hostile pickle fails before any of its code
  runs. A checkpoint wrapping the state dict under ``"state_dict"`` or ``"model"`` is
  unwrapped, and a ``"module."`` prefix (``DistributedDataParallel``) is stripped.

The format is told by the bytes, not the file name, so a renamed file is neither refused nor
read by the wrong parser.

Three key-naming conventions are recognised for the MONAI networks securefed builds
(``resnet18`` is MONAI's ResNet, ``densenet121`` MONAI's DenseNet121):

================  ==========================================  ===============================
convention        file keys                                   mapped to
================  ==========================================  ===============================
securefed         our model's ``state_dict`` (GroupNorm)      themselves, exactly
monai             MONAI's unfixed module (BatchNorm)          themselves; BN statistics dropped
torchvision/timm  ``denselayerN.norm1`` / ``norm.1`` ...      ``denselayerN.layers.norm1`` ...
                  ``classifier`` (DenseNet head)              ``class_layers.out``
                  ``fc``, ``layerN.M.*`` (ResNet)             themselves; BN statistics dropped
================  ==========================================  ===============================

timm's ``resnet18`` and ``densenet121`` use torchvision's names, so the two cannot be told
apart by their keys and share one convention.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from securefed.errors import ConfigError, DataError

__all__ = [
    "CONVENTIONS",
    "KeyMapping",
    "WeightFile",
    "map_keys",
    "read_weight_file",
]

#: Key-naming conventions :func:`map_keys` recognises, in the order it tries them.
CONVENTIONS = ("securefed", "monai", "torchvision/timm")

# safetensors layout: 8-byte little-endian header length, a JSON header, then raw tensor bytes.
_HEADER_LEN = struct.Struct("<Q")
# The format's own ceiling on the header (safetensors rejects larger ones); checked before
# reading it so a hostile length cannot make us allocate or parse gigabytes.
_MAX_HEADER = 100_000_000
# torch.save writes a zip archive (since torch 1.6); older files are a bare pickle stream,
# which starts with the PROTO opcode.
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80

# BatchNorm state that has no place in a GroupNorm: batch statistics, not learnt weights.
_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
# torchvision's DenseNet names a dense layer's modules directly (``norm1``; before torchvision
# 0.3, ``norm.1``); MONAI nests them in ``layers``. The same rule as MONAI's own loader
# (monai.networks.nets.densenet._load_state_dict), extended to the BN statistics we drop.
_TV_DENSELAYER = re.compile(
    r"^(.*denselayer\d+)\.(norm|relu|conv)\.?([12])\."
    r"(weight|bias|running_mean|running_var|num_batches_tracked)$"
)
_TV_HEADS = {
    "classifier.weight": "class_layers.out.weight",
    "classifier.bias": "class_layers.out.bias",
}


@dataclass(frozen=True)
class WeightFile:
    """The tensors of a weight file, as read.

    Attributes:
        tensors: Name to tensor, ``"module."`` prefix stripped.
        metadata: The safetensors header's ``__metadata__``; empty for a torch checkpoint.
        sha256: SHA-256 of the file's bytes, hex; the bytes hashed are the bytes parsed.
        file_format: ``"safetensors"`` or ``"torch"``.

    """

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    sha256: str
    file_format: str


def _parse_header(data: bytes, path: Path) -> dict[str, str]:
    if len(data) < _HEADER_LEN.size:
        raise DataError(f"{path} is not a safetensors file (only {len(data)} bytes).")
    (n,) = _HEADER_LEN.unpack_from(data)
    if n > min(_MAX_HEADER, len(data) - _HEADER_LEN.size):
        raise DataError(
            f"{path} is not a safetensors file or is truncated (header length {n} exceeds "
            f"the {len(data) - _HEADER_LEN.size} bytes after it)."
        )

    def no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
        # Two parsers could resolve a duplicated key differently; refuse ambiguity.
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise DataError(f"{path} has a duplicated key in its safetensors header.")
        return dict(pairs)

    try:
        header = json.loads(
            data[_HEADER_LEN.size : _HEADER_LEN.size + n].decode("utf-8"),
            object_pairs_hook=no_duplicates,
        )
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not a safetensors file (header is not JSON: {exc}).") from None
    if not isinstance(header, dict):
        raise DataError(f"{path} is not a safetensors file (header is not a JSON object).")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise DataError(f"{path} has safetensors metadata that is not a string-to-string map.")
    return dict(metadata)


def _looks_like_safetensors(data: bytes) -> bool:
    if len(data) < _HEADER_LEN.size + 1:
        return False
    (n,) = _HEADER_LEN.unpack_from(data)
    start = _HEADER_LEN.size
    return 0 < n <= len(data) - start and data[start : start + 1] == b"{"


def _looks_like_torch(data: bytes) -> bool:
    return data.startswith(_ZIP_MAGIC) or (len(data) >= 2 and data[0] == _PICKLE_PROTO)


def _read_safetensors(data: bytes, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors.torch import load

    metadata = _parse_header(data, path)
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError (and others)
        raise DataError(f"{path} is a corrupt safetensors file: {exc}.") from None
    return tensors, metadata


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_torch(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():
            # torch warns that protocols above 2 "might not be supported"; an unsupported
            # opcode still raises, and is reported below.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            # weights_only=True is the whole point: the restricted unpickler raises on the
            # first global that is not a tensor or plain container, before anything is called.
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (bad zip), EOFError...
        raise DataError(
            f"{path} was refused: not a weights-only torch checkpoint ({_one_line(exc)})."
        ) from None
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping):
        raise DataError(
            f"{path} holds a {type(obj).__name__}, not a state dict (name to tensor, or a "
            "checkpoint with one under 'state_dict' or 'model')."
        )
    tensors: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise DataError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor (expected a "
                "state dict, or a checkpoint with one under 'state_dict' or 'model')."
            )
        tensors[key] = value
    return tensors


def _strip_module_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DistributedDataParallel saves every key under "module."; only strip when all are, so a
    # model with a submodule really named "module" is left alone.
    prefix = "module."
    if tensors and all(k.startswith(prefix) for k in tensors):
        return {k[len(prefix) :]: v for k, v in tensors.items()}
    return tensors


#: Element types a weight file may hold: real floats (cast to the model's), and integers and
#: booleans (buffers). Complex, quantized and float8 tensors are refused: a complex tensor
#: would be cut to its real part unchecked, and the others cannot be checked for NaN.
_WEIGHT_DTYPES = frozenset(
    {
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
    }
)


def _check_tensor(t: torch.Tensor, *, key: str, path: Path) -> None:
    """Refuse anything but a dense, real, finite tensor in memory, naming the key."""
    if t.layout != torch.strided or t.is_meta or t.is_quantized or t.dtype not in _WEIGHT_DTYPES:
        kind = "meta" if t.is_meta else f"{t.layout}, {t.dtype}".replace("torch.", "")
        raise DataError(
            f"{path}: tensor {key!r} is not a dense real tensor ({kind}); weight files must "
            "hold plain float, integer or bool tensors."
        )
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise DataError(f"{path}: tensor {key!r} holds non-finite values (NaN or inf).")


def read_weight_file(path: str | Path) -> WeightFile:
    """Read a safetensors file or a weights-only torch checkpoint; never unpickle otherwise.

    Args:
        path: The file. Its format is told by its first bytes: a zip archive or a pickle
            stream is a torch checkpoint, anything else must be safetensors.

    Returns:
        The tensors (``"module."`` prefix stripped), metadata, SHA-256 and format.

    Raises:
        DataError: The file is missing or unreadable, is neither format, is corrupt or
            truncated, is a pickle that needs more than tensors (refused unexecuted), is not a
            state dict, or holds non-finite values.

    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"pretrained weights file {path} does not exist.") from None
    except OSError as exc:
        raise DataError(f"cannot read pretrained weights file {path}: {exc.strerror}.") from None
    digest = hashlib.sha256(data).hexdigest()
    if not _looks_like_safetensors(data) and _looks_like_torch(data):
        tensors, metadata, file_format = _read_torch(data, path), {}, "torch"
    else:
        # Anything else gets safetensors' checks, whose messages say what is wrong.
        (tensors, metadata), file_format = _read_safetensors(data, path), "safetensors"
    for key, t in tensors.items():
        _check_tensor(t, key=key, path=path)
    return WeightFile(
        tensors=_strip_module_prefix(dict(tensors)),
        metadata=metadata,
        sha256=digest,
        file_format=file_format,
    )


@dataclass(frozen=True)
class KeyMapping:
    """File tensors renamed to the model's keys.

    Attributes:
        convention: One of :data:`CONVENTIONS`.
        tensors: Model key to the file's tensor (shapes not checked yet).
        renamed: File key to model key, for the keys whose name changed.
        dropped: File keys with no place in the model (BatchNorm running statistics and
            batch counters, which GroupNorm does not have), sorted.
        unexpected: File keys that fit no rule and no model key, sorted (empty when the
            mapping is usable).

    """

    convention: str
    tensors: dict[str, torch.Tensor]
    renamed: dict[str, str]
    dropped: tuple[str, ...]
    unexpected: tuple[str, ...]


def _torchvision_name(key: str) -> str:
    match = _TV_DENSELAYER.match(key)
    if match:
        layer, kind, index, leaf = match.groups()
        return f"{layer}.layers.{kind}{index}.{leaf}"
    return _TV_HEADS.get(key, key)


def _bn_stat_owner(key: str) -> str | None:
    owner, _, leaf = key.rpartition(".")
    return owner if leaf in _BN_STATS else None


def map_keys(
    tensors: Mapping[str, torch.Tensor], *, model_keys: Mapping[str, object]
) -> KeyMapping:
    """Detect the file's naming convention and rename its keys to the model's.

    The conventions are tried in :data:`CONVENTIONS` order:

    - ``securefed``: every file key is a model key (a file securefed wrote); nothing changes.
    - ``monai`` / ``torchvision/timm``: keys are renamed by torchvision's rules (DenseNet's
      dense-layer modules and classifier; ResNet's names already agree with MONAI's), and
      BatchNorm statistics are dropped where the model has a GroupNorm (its ``weight`` is a
      model key). The convention is ``torchvision/timm`` when a rename was needed, else
      ``monai``; :func:`securefed.models.transfer.load_pretrained` also calls a ResNet file
      without downsample biases ``torchvision/timm``, since MONAI's ResNet has them.

    Args:
        tensors: The file's tensors.
        model_keys: The model's ``state_dict`` (only its keys are used).

    Returns:
        The mapping; its ``unexpected`` keys, if any, make the file unusable for this model.

    """
    if all(k in model_keys for k in tensors):
        return KeyMapping(
            convention="securefed", tensors=dict(tensors), renamed={}, dropped=(), unexpected=()
        )
    mapped: dict[str, torch.Tensor] = {}
    renamed: dict[str, str] = {}
    dropped: list[str] = []
    unexpected: list[str] = []
    for key, value in tensors.items():
        new = _torchvision_name(key)
        owner = _bn_stat_owner(new)
        if new not in model_keys and owner is not None and f"{owner}.weight" in model_keys:
            dropped.append(key)
            continue
        if new in mapped:
            # Two names (e.g. torchvision's and securefed's) for one tensor: say so, rather
            # than call either one a tensor the model lacks.
            first = next(k for k in tensors if k != key and _torchvision_name(k) == new)
            raise ConfigError(
                f"the weight file holds both {first!r} and {key!r}, two names for the model's "
                f"tensor {new!r}; keep one naming convention per file."
            )
        if new not in model_keys:
            unexpected.append(key)
            continue
        if new != key:
            renamed[key] = new
        mapped[new] = value
    return KeyMapping(
        convention="torchvision/timm" if renamed else "monai",
        tensors=mapped,
        renamed=renamed,
        dropped=tuple(sorted(dropped)),
        unexpected=tuple(sorted(unexpected)),
    )

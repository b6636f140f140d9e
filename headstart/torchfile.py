"""Read a legacy-format (pre-zip) PyTorch state dict with numpy and a restricted unpickler.

No torch needed. Only plain containers, float/int tensors and their storages are accepted;
any other global in the pickle is refused, so a hostile file cannot run code.
"""

from __future__ import annotations

import collections
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headstart.errors import UserError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafeCheckpoint(UserError):
    """The file holds something other than tensors and plain containers."""


@dataclass(frozen=True)
class _StorageType:
    dtype: type


@dataclass
class _Storage:
    key: str
    dtype: type
    numel: int
    data: np.ndarray | None = None


@dataclass
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def materialise(self) -> np.ndarray:
        base = self.storage.data
        if base is None:
            raise UnsafeCheckpoint(f"tensor storage {self.storage.key} has no data in the file")
        if not self.size:
            return np.array(base[self.offset], dtype=base.dtype)
        itemsize = base.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[self.offset :],
            shape=self.size,
            strides=tuple(s * itemsize for s in self.stride),
            writeable=False,
        )
        return np.array(view)  # own copy, contiguous


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    return _TensorRef(storage, int(offset), tuple(size), tuple(stride))


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, handle, storages: dict[str, _Storage]):
        super().__init__(handle)
        self.storages = storages

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise UnsafeCheckpoint(
            f"refusing to load global {module}.{name}: only tensors and plain containers "
            "are allowed in a weights file"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsafeCheckpoint(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise UnsafeCheckpoint(f"unexpected storage type {storage_type!r}")
        if key not in self.storages:
            self.storages[key] = _Storage(key, storage_type.dtype, int(numel))
        return self.storages[key]


class _PlainUnpickler(pickle.Unpickler):
    """For the header records: plain Python values only."""

    def find_class(self, module: str, name: str):
        raise UnsafeCheckpoint(f"refusing to load global {module}.{name} in the file header")


def read_state_dict(path: Path | str) -> dict[str, np.ndarray]:
    """The file's state dict as {name: numpy array}, in the file's order."""
    path = Path(path)
    with open(path, "rb") as handle:
        try:
            magic = _PlainUnpickler(handle).load()
        except (pickle.UnpicklingError, EOFError) as err:
            raise UserError(f"{path}: not a legacy PyTorch file ({err})") from None
        if magic != _LEGACY_MAGIC:
            raise UserError(
                f"{path}: not a legacy-format PyTorch file (zip-format files are not supported)"
            )
        _PlainUnpickler(handle).load()  # protocol version
        _PlainUnpickler(handle).load()  # sys info
        storages: dict[str, _Storage] = {}
        result = _RestrictedUnpickler(handle, storages).load()
        keys = _PlainUnpickler(handle).load()
        for key in keys:
            storage = storages[key]
            (numel,) = struct.unpack("<q", handle.read(8))
            count = numel * np.dtype(storage.dtype).itemsize
            raw = handle.read(count)
            if len(raw) != count:
                raise UserError(f"{path}: truncated (storage {key} is short)")
            storage.data = np.frombuffer(raw, dtype=storage.dtype)
    if not isinstance(result, dict):
        raise UnsafeCheckpoint(f"{path}: expected a state dict, found {type(result).__name__}")
    tensors = {}
    for name, value in result.items():
        if not isinstance(value, _TensorRef):
            raise UnsafeCheckpoint(f"{path}: entry {name!r} is not a tensor")
        tensors[name] = value.materialise()
    return tensors

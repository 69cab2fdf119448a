"""Reads a PyTorch `pytorch_model.bin` state dict into numpy arrays without importing torch.

A torch checkpoint (since torch 1.6) is a zip archive: `<root>/data.pkl` pickles the state dict,
each tensor pointing at raw little-endian bytes in `<root>/data/<key>`. A restricted unpickler
rebuilds the tensors as numpy views and refuses every other class, so loading a checkpoint
cannot execute code from it.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
  def __init__(self, name: str):
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple[int, ...],
                    stride: tuple[int, ...], *unused: Any) -> np.ndarray:
  item = storage.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=tuple(size), strides=tuple(s * item for s in stride))
  return np.array(view)  # own the memory, contiguous


def _rebuild_parameter(tensor: np.ndarray, *unused: Any) -> np.ndarray:
  return tensor


class _Unpickler(pickle.Unpickler):

  def __init__(self, file, archive: zipfile.ZipFile, root: str, path: str):
    super().__init__(file)
    self._archive, self._root, self._path = archive, root, path

  def find_class(self, module: str, name: str) -> Any:
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(
        f"{self._path}: refusing to load {module}.{name}; only plain tensor state dicts are read")

  def persistent_load(self, pid: Any) -> np.ndarray:
    kind, storage_type, key, _location, numel = pid
    if kind != "storage" or not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"{self._path}: unsupported storage record {pid!r}")
    raw = self._archive.read(f"{self._root}/data/{key}")
    return np.frombuffer(raw, dtype=storage_type.dtype.newbyteorder("<"), count=numel)


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  path = os.fspath(path)
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path}: not a zip-format torch checkpoint (the legacy pre-1.6 format is "
                     "not supported; re-save it with a current torch or as safetensors)")
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise ValueError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}")
    root = pickles[0][:-len("/data.pkl")]
    with archive.open(pickles[0]) as f:
      state = _Unpickler(f, archive, root, path).load()
  if not isinstance(state, dict):
    raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict")
  return {k: v for k, v in state.items() if isinstance(v, np.ndarray)}

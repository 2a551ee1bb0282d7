"""Reading the tensors of torch files without torch: a restricted unpickler.

`read_torch_file` reads `torch.save` files (the zip format and the legacy one) and TorchScript
archives; nothing from torch is imported and no class outside a short allow-list is unpickled.
"""
import collections
import io
import pickle
import zipfile
from typing import Any, Callable

import numpy as np


_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


class _StorageType:
  """Stands for `torch.FloatStorage` and friends: only its numpy dtype matters."""

  def __init__(self, name: str):
    if name == 'BFloat16Storage':
      import ml_dtypes  # a jax dependency
      self.dtype = np.dtype(ml_dtypes.bfloat16)
    else:
      self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
  """A storage named in the pickle; its bytes are read after unpickling (`_resolve`)."""

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, numel


class _Tensor:
  """`torch._utils._rebuild_tensor_v2`'s arguments, materialised by `_resolve`."""

  def __init__(self, storage: _Storage, offset: int, size, stride, *unused):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def to_numpy(self, data: np.ndarray) -> np.ndarray:
    if 0 in self.size:
      return np.zeros(self.size, data.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if self.offset < 0 or min(self.stride, default=0) < 0 or last >= len(data):
      raise ValueError('a tensor reaches outside its storage')  # as_strided does not check
    view = np.lib.stride_tricks.as_strided(data[self.offset:], self.size,
                                           [s * data.dtype.itemsize for s in self.stride])
    return np.array(view)


class _ScriptObject:
  """Any `__torch__.*` object of a TorchScript archive: keeps the state it is built with."""

  def __setstate__(self, state):
    self.state = state


def _rebuild_parameter(data, *unused):
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  return func(*args)


class _TorchUnpickler(pickle.Unpickler):
  """Unpickles `data.pkl` of torch files, allowing only the classes a state dict needs."""

  _ALLOWED = {
      ('torch._utils', '_rebuild_tensor_v2'): _Tensor,
      ('torch._utils', '_rebuild_tensor'): _Tensor,
      ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
      ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
      ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2,
      ('torch.nn.parameter', 'Parameter'): object,
      ('collections', 'OrderedDict'): collections.OrderedDict,
      ('torch.jit._pickle', 'build_intlist'): list,  # TorchScript attributes
      ('torch.jit._pickle', 'build_doublelist'): list,
      ('torch.jit._pickle', 'build_boollist'): list,
      ('torch.jit._pickle', 'build_tensorlist'): list,
      ('torch.jit._pickle', 'restore_type_tag'): lambda value, type_str: value,
      ('builtins', 'set'): set,
  }

  def find_class(self, module: str, name: str):
    if (module, name) in self._ALLOWED:
      return self._ALLOWED[module, name]
    if module == 'torch' and (name in _STORAGE_DTYPES or name == 'BFloat16Storage'):
      return _StorageType(name)
    if module.startswith('__torch__.'):
      return type(name, (_ScriptObject,), {})
    raise pickle.UnpicklingError(f'unexpected class {module}.{name} in a torch file')

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid[0] == 'storage'):
      raise pickle.UnpicklingError(f'unexpected persistent id {pid!r}')
    _, storage_type, key, _, numel = pid[:5]  # (legacy files add view metadata, unused in practice)
    return _Storage(str(key), storage_type.dtype, numel)


def _resolve(obj: Any, read_storage: Callable[[_Storage], np.ndarray]) -> Any:
  """Replaces every `_Tensor` in nested dicts / lists / script objects by a numpy array."""
  if isinstance(obj, _Tensor):
    return obj.to_numpy(read_storage(obj.storage))
  if isinstance(obj, dict):
    return type(obj)((k, _resolve(v, read_storage)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(v, read_storage) for v in obj)
  if isinstance(obj, _ScriptObject):
    return _resolve(obj.state, read_storage)
  return obj


def _flatten(tree: Any, prefix: str = '') -> dict[str, np.ndarray]:
  """{'a.b.c': array} for the arrays in nested dicts."""
  out = {}
  if isinstance(tree, dict):
    for k, v in tree.items():
      out.update(_flatten(v, f'{prefix}{k}.'))
  elif isinstance(tree, np.ndarray):
    out[prefix[:-1]] = tree
  return out


def read_torch_file(data: bytes) -> dict[str, np.ndarray]:
  """The tensors of a torch file (`torch.save`, zip or legacy format, or a TorchScript archive).

  Returns {'dotted.name': numpy array}; for TorchScript archives the names are the module
  attributes' paths. Nothing from torch is imported and no other class may be unpickled.
  """
  if zipfile.is_zipfile(io.BytesIO(data)):
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
      pkl = min((n for n in archive.namelist() if n.endswith('/data.pkl')), key=len)
      root = pkl[:-len('data.pkl')]
      byteorder = root + 'byteorder'
      big_endian = byteorder in archive.namelist() and archive.read(byteorder) == b'big'
      tree = _TorchUnpickler(io.BytesIO(archive.read(pkl))).load()

      def read_zip_storage(storage: _Storage) -> np.ndarray:
        dtype = storage.dtype.newbyteorder('>') if big_endian else storage.dtype
        return np.frombuffer(archive.read(f'{root}data/{storage.key}'), dtype).astype(storage.dtype)

      return _flatten(_resolve(tree, read_zip_storage))
  return _flatten(_read_legacy_torch_file(io.BytesIO(data)))


def _read_legacy_torch_file(f: io.BytesIO) -> Any:
  """torch.save's format before torch 1.6: pickles, then each storage as int64 count + bytes."""
  if _TorchUnpickler(f).load() != 0x1950a86a20f9469cfc6c:
    raise pickle.UnpicklingError('not a torch file')
  _TorchUnpickler(f).load()  # protocol version
  _TorchUnpickler(f).load()  # sys info
  storages: dict[str, _Storage] = {}

  class LegacyUnpickler(_TorchUnpickler):
    def persistent_load(self, pid):
      storage = super().persistent_load(pid)
      return storages.setdefault(storage.key, storage)

  tree = LegacyUnpickler(f).load()
  arrays = {}
  for key in _TorchUnpickler(f).load():
    storage = storages[str(key)]
    numel = int(np.frombuffer(f.read(8), '<i8')[0])
    arrays[str(key)] = np.frombuffer(f.read(numel * storage.dtype.itemsize), storage.dtype)
  return _resolve(tree, lambda storage: arrays[storage.key])

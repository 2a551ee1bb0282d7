"""Reading the tensors of torch files without torch: a restricted unpickler.

`read_torch_file` reads `torch.save` files (the zip format and the legacy one) and TorchScript
archives; nothing from torch is imported and no class outside a short allow-list is unpickled.

A file is untrusted input: nothing it claims is allocated before it is checked. Every tensor
must fit its storage (no more elements than the storage, strides that do not overlap, every
element inside it); every storage must hold exactly the bytes the pickle declares for it; no zip
entry is read past the size expected of it (a storage: its declared bytes; the pickle and the
rest: the file's own size, since torch stores its entries uncompressed), and all the storages
together may not declare more than `max_bytes` (by default the file's size). Anything else is a
`TorchFileError` (a ValueError) whose message is one sentence.
"""
import collections
import io
import math
import pickle
import zipfile
from typing import Any, Callable, Optional

import numpy as np


_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


class TorchFileError(ValueError):
  """A file this reader refuses; the message says why, in one sentence."""


_MAX_NODES = 1_000_000  # objects of the unpickled tree visited (a shared-reference bomb stops)


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


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


class _Tensor:
  """`torch._utils._rebuild_tensor_v2`'s arguments, materialised by `_resolve`."""

  def __init__(self, storage: _Storage, offset: int, size, stride, *unused):
    if not isinstance(storage, _Storage):
      raise TorchFileError(f'a tensor is built on {type(storage).__name__}, not a storage')
    try:
      self.size, self.stride = tuple(size), tuple(stride)
    except TypeError:
      raise TorchFileError('a tensor has a shape or strides that are not sequences') from None
    self.storage, self.offset = storage, offset

  def check(self) -> None:
    """A TorchFileError unless every element lies inside the storage, once (no overlap)."""
    size, stride, numel = self.size, self.stride, self.storage.numel
    if not all(map(_is_int, size + stride + (self.offset,))) or len(size) != len(stride) or \
        min(size + (0,)) < 0 or min(stride + (0,)) < 0 or self.offset < 0:
      raise TorchFileError(f'a tensor has an invalid shape {size}, strides {stride} or offset '
                           f'{self.offset}')
    count = math.prod(size)
    if count == 0:
      return
    if count > numel:
      raise TorchFileError(f'a tensor of shape {size} has more elements ({count}) than its '
                           f'storage ({numel})')
    reach = 1  # elements spanned by the dimensions checked so far, smallest stride first
    for s, n in sorted((s, n) for n, s in zip(size, stride) if n > 1):
      if s < reach:
        raise TorchFileError(f'a tensor of shape {size} has strides {stride} that overlap')
      reach = s * (n - 1) + reach
    if self.offset + reach > numel:
      raise TorchFileError(f'a tensor of shape {size} (strides {stride}, offset {self.offset}) '
                           f'reaches outside its storage of {numel} elements')

  def to_numpy(self, data: np.ndarray) -> np.ndarray:
    self.check()
    if len(data) != self.storage.numel:
      raise TorchFileError(f'a storage holds {len(data)} elements but declares '
                           f'{self.storage.numel}')
    if 0 in self.size:
      return np.zeros(self.size, data.dtype)
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
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == 'storage'):
      raise pickle.UnpicklingError(f'unexpected persistent id {pid!r:.100}')
    _, storage_type, key, _, numel = pid[:5]  # (legacy files add view metadata, unused in practice)
    if not isinstance(storage_type, _StorageType) or not _is_int(numel) or numel < 0:
      raise TorchFileError(f'a storage has an invalid type or element count ({numel!r:.50})')
    return _Storage(str(key), storage_type.dtype, numel)


def _resolve(obj: Any, read_storage: Callable[[_Storage], np.ndarray], budget: list) -> Any:
  """Replaces every `_Tensor` in nested dicts / lists / script objects by a numpy array.

  `budget` ([objects left to visit]) stops a small pickle whose shared references would
  make the walk exponential.
  """
  budget[0] -= 1
  if budget[0] < 0:
    raise TorchFileError(f'the pickle holds more than {_MAX_NODES} objects')
  if isinstance(obj, _Tensor):
    return obj.to_numpy(read_storage(obj.storage))
  if isinstance(obj, dict):
    return type(obj)((k, _resolve(v, read_storage, budget)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(v, read_storage, budget) for v in obj)
  if isinstance(obj, _ScriptObject):
    return _resolve(getattr(obj, 'state', None), read_storage, budget)
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


def _check_declared(tree: Any, max_bytes: int) -> None:
  """A TorchFileError unless every tensor fits its storage and the storages fit `max_bytes`."""
  storages, stack, budget = {}, [tree], _MAX_NODES
  while stack:
    obj = stack.pop()
    budget -= 1
    if budget < 0:
      raise TorchFileError(f'the pickle holds more than {_MAX_NODES} objects')
    if isinstance(obj, _Tensor):
      obj.check()
      storages[obj.storage.key] = obj.storage.numel * obj.storage.dtype.itemsize
    elif isinstance(obj, dict):
      stack.extend(obj.values())
    elif isinstance(obj, (list, tuple)):
      stack.extend(obj)
    elif isinstance(obj, _ScriptObject):
      stack.append(getattr(obj, 'state', None))
  total = sum(storages.values())
  if total > max_bytes:
    raise TorchFileError(f'its tensors declare {total} bytes of storage, more bytes than the '
                         f'{max_bytes} expected of it')


def _read_entry(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
  """The bytes of zip entry `name`, never reading more than `limit` of them."""
  try:
    info = archive.getinfo(name)
  except KeyError:
    raise TorchFileError(f'the archive has no entry {name}') from None
  if info.file_size > limit:
    raise TorchFileError(f'its entry {name} holds {info.file_size} bytes, more bytes than the '
                         f'{limit} expected of it')
  with archive.open(info) as f:
    data = f.read(limit + 1)
  if len(data) > limit:
    raise TorchFileError(f'its entry {name} holds more bytes than the {limit} expected of it')
  return data


def read_torch_file(data: bytes, *, max_bytes: Optional[int] = None) -> dict[str, np.ndarray]:
  """The tensors of a torch file (`torch.save`, zip or legacy format, or a TorchScript archive).

  Returns {'dotted.name': numpy array}; for TorchScript archives the names are the module
  attributes' paths. Nothing from torch is imported and no other class may be unpickled.
  `max_bytes` caps the storage the tensors may declare (default: the file's size). A file
  this reader refuses is a `TorchFileError` (or `pickle.UnpicklingError`), one sentence.
  """
  max_bytes = len(data) if max_bytes is None else max_bytes
  try:
    if zipfile.is_zipfile(io.BytesIO(data)):
      return _read_zip_torch_file(data, max_bytes)
    return _flatten(_read_legacy_torch_file(io.BytesIO(data), max_bytes))
  except (TorchFileError, pickle.UnpicklingError):
    raise
  except RecursionError:
    raise TorchFileError('its pickle is nested too deeply') from None
  except Exception as error:  # pylint: disable=broad-except  (whatever a hostile file causes)
    text = ' '.join(str(error).split())[:200]
    raise TorchFileError(f'it is not a torch file this reader can read '
                         f'({type(error).__name__}: {text})') from None


def _read_zip_torch_file(data: bytes, max_bytes: int) -> dict[str, np.ndarray]:
  with zipfile.ZipFile(io.BytesIO(data)) as archive:
    pickles = [n for n in archive.namelist() if n.endswith('/data.pkl')]
    if not pickles:
      raise TorchFileError('the archive has no data.pkl')
    pkl = min(pickles, key=len)
    root = pkl[:-len('data.pkl')]
    byteorder = root + 'byteorder'
    big_endian = (byteorder in archive.namelist()
                  and _read_entry(archive, byteorder, 16) == b'big')
    tree = _TorchUnpickler(io.BytesIO(_read_entry(archive, pkl, len(data)))).load()
    _check_declared(tree, max_bytes)

    def read_zip_storage(storage: _Storage) -> np.ndarray:
      size = storage.numel * storage.dtype.itemsize
      raw = _read_entry(archive, f'{root}data/{storage.key}', size)
      if len(raw) != size:
        raise TorchFileError(f'its storage {storage.key} holds {len(raw)} bytes but declares '
                             f'{size}')
      dtype = storage.dtype.newbyteorder('>') if big_endian else storage.dtype
      return np.frombuffer(raw, dtype).astype(storage.dtype)

    return _flatten(_resolve(tree, read_zip_storage, [_MAX_NODES]))


def _read_legacy_torch_file(f: io.BytesIO, max_bytes: int) -> Any:
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
  _check_declared(tree, max_bytes)
  arrays = {}
  keys = _TorchUnpickler(f).load()
  if not isinstance(keys, list):
    raise TorchFileError('its list of storages is not a list')
  for key in keys:
    if str(key) not in storages:
      raise TorchFileError(f'it stores a storage {key!r:.50} that no tensor names')
    storage = storages[str(key)]
    count = f.read(8)
    if len(count) != 8 or int(np.frombuffer(count, '<i8')[0]) != storage.numel:
      raise TorchFileError(f'its storage {key} does not hold the {storage.numel} elements '
                           f'it declares')
    size = storage.numel * storage.dtype.itemsize
    raw = f.read(size)
    if len(raw) != size:
      raise TorchFileError(f'its storage {key} holds {len(raw)} bytes but declares {size}')
    arrays[str(key)] = np.frombuffer(raw, storage.dtype)
  missing = sorted(set(storages) - set(arrays))
  if missing:
    raise TorchFileError(f'its storage {missing[0]} is missing')
  return _resolve(tree, lambda storage: arrays[storage.key], [_MAX_NODES])

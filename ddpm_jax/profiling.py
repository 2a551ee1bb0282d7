"""Where a compiled step spends its time: a `jax.profiler` trace, summarised by kind of work.

`trace(directory)` records what runs inside it (open the directory with TensorBoard's profile
plugin, or its `perfetto_trace.json.gz` at ui.perfetto.dev). `summarize` reads the trace back:
every XLA operation executed for a program (its `hlo_op`) is looked up in that program's HLO
text, whose metadata names the JAX primitive and the Flax module path that made it, and the
time is added up by pass (the network's forward pass; its backward pass, which JAX names
`transpose(jvp(...))`; everything outside the network: the loss, the random draws, clipping,
Adam and the EMA) and by kind of work (3x3 convolutions, the convolutions that compute kernel
gradients, matmuls, GroupNorm, random bits, ...). An asynchronous operation (Eigen's
convolutions on the CPU) counts from its start to its end; operations that XLA runs side by side
on the CPU's threads each count in full, so the shares are of the summed operation time.

Imports only the standard library and jax, like the benchmark that uses it.
"""
import collections
import contextlib
import dataclasses
import gzip
import json
import pathlib
import re
from typing import Iterator

import jax

_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?\s([a-z][\w\-]*)\(')
_CALLS = re.compile(r'(?:calls|to_apply|body)=%?([\w.\-]+)')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_WINDOW = re.compile(r'window=\{size=([\dx]+)')
_KERNEL_GRADIENT = 'convolution: kernel gradient'  # its window is the image, not the kernel


@dataclasses.dataclass(frozen=True)
class _Instruction:
  opcode: str
  op_name: str  # JAX's name stack: 'jit(train_step)/transpose(jvp(UNet))/down_0_block_0/...'
  windows: tuple[str, ...]  # the window sizes of the convolutions it is or calls ('3x3', ...)
  opcodes: frozenset  # its opcode and those of the computations it calls


def _instructions(hlo_text: str) -> dict[str, _Instruction]:
  """Every instruction of an HLO module's text by name, with what its called computations hold."""
  computations = collections.defaultdict(list)  # name -> [(opcode, windows, op_name)]
  raw, current = {}, None
  for line in hlo_text.splitlines():
    match = _COMPUTATION.match(line)
    if match and not line.startswith(' '):
      current = match.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, opcode = match.groups()
    windows = tuple(_WINDOW.findall(line)) if opcode == 'convolution' else ()
    op_name = _OP_NAME.search(line)
    op_name = op_name.group(1) if op_name else ''
    raw[name] = (opcode, op_name, windows, _CALLS.findall(line))
    computations[current].append((opcode, windows, op_name))
  table = {}
  for name, (opcode, op_name, windows, calls) in raw.items():
    called = [entry for computation in calls for entry in computations.get(computation, [])]
    # A fusion without metadata of its own is named by the first of its instructions with some.
    op_name = op_name or next((n for _, _, n in called if n), '')
    table[name] = _Instruction(
        opcode=opcode, op_name=op_name,
        windows=windows + tuple(w for _, ws, _ in called for w in ws),
        opcodes=frozenset([opcode] + [op for op, _, _ in called]))
  return table


def _pass(op_name: str) -> str:
  if not op_name:
    return 'unnamed'
  if 'transpose(' in op_name:
    return 'backward'
  return 'forward' if 'UNet' in op_name else 'outside the network'


def _kind(instruction: _Instruction | None, hlo_op: str) -> str:
  if instruction is None:
    return hlo_op.split('.')[0]  # a runtime operation (copy, while, ...)
  ops, name = instruction.opcodes, instruction.op_name
  if 'convolution' in ops:
    small = sorted(w for w in set(instruction.windows) if all(int(n) <= 3 for n in w.split('x')))
    return f'convolution {small[0]}' if small else _KERNEL_GRADIENT
  if 'dot' in ops:
    return 'matmul (attention, 1x1 shortcuts, time embedding)'
  if ({'xor', 'shift-right-logical'} <= ops  # threefry's rounds, fused with what uses the bits
      or 'threefry' in name or 'rng-bit-generator' in ops):
    return 'random bits'
  if re.search(r'/norm(?:\d|_out)?/', name):
    return 'GroupNorm'
  if 'jit(silu)' in name or 'logistic' in ops:
    return 'SiLU'
  if 'all-reduce' in ops:
    return 'all-reduce'
  return 'other elementwise, copies'


def _row(instruction: _Instruction | None, hlo_op: str) -> tuple[str, str]:
  """(pass, kind) of an executed operation."""
  kind = _kind(instruction, hlo_op)
  if instruction is None:
    return 'runtime', kind
  if kind == _KERNEL_GRADIENT:  # XLA names these convolutions nothing; they are backward
    return 'backward', kind
  return _pass(instruction.op_name), kind


@contextlib.contextmanager
def trace(directory: str) -> Iterator[None]:
  """Records a jax.profiler trace (with its Perfetto JSON) into `directory`."""
  with jax.profiler.trace(str(directory), create_perfetto_trace=True):
    yield


def _operation_times(events: list[dict], module: str) -> Iterator[tuple[str, float]]:
  """(hlo_op, milliseconds) of each operation of `module` executed in the trace.

  An operation's event ends when the CPU runtime has started it; one that runs asynchronously on
  the thread pool (Eigen's convolutions) finishes at its `end: <hlo_op>` event, so its time is
  from its start to that end.
  """
  started = collections.defaultdict(collections.deque)  # hlo_op -> events waiting for their end
  for event in sorted((e for e in events if e.get('ph') == 'X'), key=lambda e: e['ts']):
    args = event.get('args') or {}
    if args.get('hlo_module') == module and 'hlo_op' in args:
      started[args['hlo_op']].append(event)
    elif event['name'].startswith('end: ') and started.get(event['name'][5:]):
      start = started[event['name'][5:]].popleft()
      yield start['args']['hlo_op'], (event['ts'] + event['dur'] - start['ts']) / 1e3
  for waiting in started.values():  # no end event: the operation's own duration
    for event in waiting:
      yield event['args']['hlo_op'], event['dur'] / 1e3


def summarize(directory: str, hlo_text: str, *, calls: int) -> list[dict]:
  """The time per call of one program (its compiled `as_text()`) in the trace under `directory`,
  which ran it `calls` times: rows of pass, kind, milliseconds per call and share, largest
  first."""
  [path] = sorted(pathlib.Path(directory).glob('plugins/profile/*/perfetto_trace.json.gz'))[-1:]
  events = json.loads(gzip.decompress(path.read_bytes()))
  events = events['traceEvents'] if isinstance(events, dict) else events
  module = re.search(r'^HloModule ([\w.\-]+)', hlo_text, re.M).group(1)
  table = _instructions(hlo_text)
  totals = collections.Counter()
  for hlo_op, milliseconds in _operation_times(events, module):
    totals[_row(table.get(hlo_op), hlo_op)] += milliseconds
  total = sum(totals.values()) or 1.0
  return [dict(pass_=p, kind=k, ms_per_call=ms / calls, share=ms / total)
          for (p, k), ms in totals.most_common()]


def format_rows(rows: list[dict], limit: int = 12) -> str:
  """A small text table of `summarize`'s rows."""
  lines = [f'{"pass":<20} {"kind":<52} {"ms/call":>9} {"share":>6}']
  lines += [f'{r["pass_"]:<20} {r["kind"]:<52} {r["ms_per_call"]:>9.1f} {r["share"]:>6.1%}'
            for r in rows[:limit]]
  return '\n'.join(lines)

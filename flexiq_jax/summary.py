"""TensorBoard event files beside the JSONL metrics (`tensorboard --logdir workdirs/`).

Written with tensorboardX, which needs no TensorFlow; only process 0 writes (the metrics are
global means, the same on every host). The JSONL files stay the record the code reads back.
"""

from __future__ import annotations

import numbers

import jax


class ScalarWriter:
  """Scalars to an event file in `logdir`, opened on the first write (so a stage that logs
  nothing leaves no empty event file)."""

  def __init__(self, logdir: str):
    self.logdir = logdir
    self._writer = None

  def write(self, step: int, scalars: dict, prefix: str = "") -> None:
    if jax.process_index() != 0:
      return
    if self._writer is None:
      from tensorboardX import SummaryWriter
      self._writer = SummaryWriter(self.logdir)
    for name, value in scalars.items():
      if isinstance(value, numbers.Real) and not isinstance(value, bool):
        self._writer.add_scalar(prefix + name, float(value), int(step))
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def write_scalars(logdir: str, rows: list[tuple[int, dict]], prefix: str = "") -> None:
  """(step, {name: value}) rows to one event file in `logdir`, closed after.

  Args:
    logdir: the TensorBoard log directory.
    rows: (step, scalars) pairs; non-numeric values (and booleans) are skipped.
    prefix: prepended to every scalar's name (e.g. 'eval/').
  """
  writer = ScalarWriter(logdir)
  try:
    for step, scalars in rows:
      writer.write(step, scalars, prefix)
  finally:
    writer.close()

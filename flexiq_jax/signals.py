"""Interrupts that keep work: SIGINT, SIGTERM and SIGHUP during a run ask the training loop to
stop at the end of its current step, after saving a checkpoint there (`train.run_loop` polls
`requested()` inside `polled()`), instead of raising KeyboardInterrupt wherever Python happens
to be (inside XLA's garbage-collection callback, the first Ctrl-C was swallowed). Outside a
training loop, and for a second signal, the run stops at once.

  with signals.graceful():
    ...  # train.run_loop raises Interrupted after checkpointing at the next step
"""

from __future__ import annotations

import contextlib
import signal
import threading

HANDLED = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None),
                            getattr(signal, "SIGHUP", None)) if s is not None)

_requested: list[int] = []


class Interrupted(KeyboardInterrupt):
  """The run stopped on a signal, after checkpointing (a KeyboardInterrupt, so that code that
  stops on Ctrl-C stops on it too)."""


def requested() -> int | None:
  """The signal number received since `graceful()` began, or None.

  Returns:
    The first signal's number, or None when none has arrived.
  """
  return _requested[0] if _requested else None


def name(signum: int) -> str:
  """A signal's name, for messages.

  Args:
    signum: the signal number.

  Returns:
    The name, e.g. 'SIGTERM', or the number as a string when it names no known signal.
  """
  try:
    return signal.Signals(signum).name
  except ValueError:
    return str(signum)


_training = [0]  # depth of training loops that poll `requested()` (train.run_loop)


@contextlib.contextmanager
def polled():
  """Marks a loop that polls `requested()` after each step (train.run_loop): a signal during it
  waits for the step to end. Outside such a loop (calibration, evaluation) a signal stops at
  once: there is no step to finish and nothing to checkpoint.

  Returns:
    A context manager; such loops may nest.
  """
  _training[0] += 1
  try:
    yield
  finally:
    _training[0] -= 1


def _handler(signum, frame):
  del frame
  if _requested or not _training[0]:  # a second signal, or no training step to finish: stop now
    _requested.append(signum)
    raise Interrupted(f"{name(signum)} received; stopped at once (the last checkpoint is kept)")
  _requested.append(signum)
  print(f"\n{name(signum)} received: stopping after the current step, with a checkpoint there "
        f"(send it again to stop at once)", flush=True)


@contextlib.contextmanager
def graceful():
  """Installs the handlers for the duration (main thread only; elsewhere a no-op). The previous
  handlers are put back afterwards, and the received signals are forgotten on entry and exit.

  Returns:
    A context manager handling SIGINT, SIGTERM and SIGHUP while its block runs.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {s: signal.getsignal(s) for s in HANDLED}
  _requested.clear()
  for s in HANDLED:
    signal.signal(s, _handler)
  try:
    yield
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
    _requested.clear()


def raise_if_requested(where: str) -> None:
  """Raises Interrupted if a signal arrived (call it where stopping keeps the work done).

  Args:
    where: where the run stopped, completing the message 'stopped <where>'.

  Raises:
    Interrupted: a signal was received since `graceful()` began.
  """
  signum = requested()
  if signum is not None:
    raise Interrupted(f"{name(signum)} received; stopped {where}")

"""Progress bars (flexiq_jax/progress.py): shown on a terminal with images/s and the ETA, quiet
under FLEXIQ_NO_PROGRESS=1 and when stderr is not a terminal; the evolutionary search shows its
generation and best fitness."""

import io
import sys

import numpy as np

from flexiq_jax import progress
from flexiq_jax.select.evolutionary import evolutionary_search


class Terminal(io.StringIO):
  def isatty(self):
    return True


def as_terminal(monkeypatch) -> Terminal:
  """stderr as a terminal, with progress allowed (called in the test body: pytest's output
  capture resets sys.stderr between a fixture's setup and the test)."""
  out = Terminal()
  monkeypatch.setattr(sys, "stderr", out)
  monkeypatch.delenv("FLEXIQ_NO_PROGRESS", raising=False)
  return out


def test_quiet_when_asked_or_not_a_terminal(monkeypatch):
  as_terminal(monkeypatch)
  assert not progress.quiet()
  monkeypatch.setenv("FLEXIQ_NO_PROGRESS", "1")
  assert progress.quiet()
  monkeypatch.setenv("FLEXIQ_NO_PROGRESS", "0")
  assert not progress.quiet()
  monkeypatch.setattr(sys, "stderr", io.StringIO())  # a pipe or a log file
  assert progress.quiet()
  assert list(progress.image_batches([np.zeros((2, 1))], desc="eval")) and sys.stderr.getvalue() == ""


def test_image_batches_count_unpadded_images_with_rate_and_eta(monkeypatch):
  tty_stderr = as_terminal(monkeypatch)
  batches = [{"image": np.zeros((4, 2)), "mask": np.ones(4)},
             {"image": np.zeros((4, 2)), "mask": np.array([1.0, 1.0, 0.0, 0.0])}]
  assert list(progress.image_batches(iter(batches), desc="float eval", total_images=6)) == batches
  out = tty_stderr.getvalue()
  assert "float eval" in out and "img/s" in out and "6.00/6.00" in out, out
  assert "<00:00" in out  # the ETA column


def test_quiet_bars_print_nothing(monkeypatch):
  monkeypatch.setattr(sys, "stderr", Terminal())
  monkeypatch.setenv("FLEXIQ_NO_PROGRESS", "1")
  list(progress.image_batches([np.zeros((3, 1))], desc="calibrate", total_images=3))
  assert sys.stderr.getvalue() == ""


def test_evolutionary_search_shows_generation_and_best_fitness(monkeypatch):
  tty_stderr = as_terminal(monkeypatch)
  channels, macs = np.array([8, 8, 16]), np.array([100.0, 200.0, 400.0])
  result = evolutionary_search(np.array([0.5, 1.0]), channels, macs, lambda g: float(np.sum(g * [3, 2, 1])),
                               population=4, generations=3, seed=0)
  out = tty_stderr.getvalue()
  assert "select (evolutionary)" in out and "generation=" in out, out
  assert f"best={result.best_fitness[0]:.4g}" in out

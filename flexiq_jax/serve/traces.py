"""Seeded, bounded request-arrival traces (times in seconds from 0, sorted): Poisson with a
time-varying rate, diurnal (sinusoidal rate) and bursty (on/off Markov-modulated Poisson).
Every trace is fixed by its seed, so every policy sees the same load, and bounded: arrivals in
[0, horizon_s), at most `max_requests` of them (the first ones)."""

from __future__ import annotations

from typing import Callable

import numpy as np


def _bounded(t: np.ndarray, max_requests: int | None) -> np.ndarray:
  return t if max_requests is None else t[:int(max_requests)]


def poisson_arrivals(rate_fn: Callable[[float], float], horizon_s: float, max_rate: float, seed: int = 0,
                     max_requests: int | None = None) -> np.ndarray:
  """Arrival times in [0, horizon_s) of a Poisson process with time-varying rate `rate_fn(t)`
  <= max_rate (requests/s), by thinning.

  Args:
    rate_fn: Rate in requests/s as a function of time t (s), within [0, max_rate].
    horizon_s: Length of the trace in seconds.
    max_rate: Upper bound of the rate (the thinning envelope).
    seed: Seed of the numpy Generator.
    max_requests: Optional cap: keep only the first `max_requests` arrivals.

  Returns:
    Sorted arrival times, a float64 numpy array.

  Raises:
    ValueError: If rate_fn leaves [0, max_rate] at a drawn time.
  """
  rng = np.random.default_rng(seed)
  n = rng.poisson(max_rate * horizon_s)
  t = np.sort(rng.uniform(0.0, horizon_s, size=n))
  rates = np.array([rate_fn(x) for x in t])
  if np.any(rates > max_rate * (1 + 1e-9)) or np.any(rates < 0):
    raise ValueError("rate_fn must stay in [0, max_rate]")
  keep = rng.uniform(0.0, max_rate, size=n) < rates
  return _bounded(t[keep], max_requests)


def diurnal_rate(mean_rate: float, amplitude: float, period_s: float) -> Callable[[float], float]:
  """mean_rate - amplitude * cos(2 pi t / period): a trough at t = 0, the peak at half a period.

  Args:
    mean_rate: Mean rate in requests/s.
    amplitude: Amplitude of the oscillation, in [0, mean_rate].
    period_s: Period in seconds.

  Returns:
    The rate function t -> requests/s.

  Raises:
    ValueError: If amplitude is negative or above mean_rate.
  """
  if not 0 <= amplitude <= mean_rate:
    raise ValueError(f"need 0 <= amplitude <= mean_rate, got {amplitude}, {mean_rate}")
  return lambda t: mean_rate - amplitude * np.cos(2 * np.pi * t / period_s)


def diurnal_arrivals(mean_rate: float, amplitude: float, period_s: float, horizon_s: float, seed: int = 0,
                     max_requests: int | None = None):
  """(arrival times, rate function) of a Poisson process with the diurnal_rate.

  Args:
    mean_rate: Mean rate in requests/s.
    amplitude: Amplitude of the oscillation, in [0, mean_rate].
    period_s: Period in seconds.
    horizon_s: Length of the trace in seconds.
    seed: Seed of the numpy Generator.
    max_requests: Optional cap on the number of arrivals (the first ones are kept).

  Returns:
    Tuple (sorted arrival times as a numpy array, rate function t -> requests/s).

  Raises:
    ValueError: If amplitude is negative or above mean_rate.
  """
  rate = diurnal_rate(mean_rate, amplitude, period_s)
  return poisson_arrivals(rate, horizon_s, mean_rate + amplitude, seed, max_requests), rate


def onoff_arrivals(rate_on: float, rate_off: float, mean_on_s: float, mean_off_s: float, horizon_s: float,
                   seed: int = 0, max_requests: int | None = None):
  """(arrival times, rate function) of a bursty on/off Markov-modulated Poisson process: the rate
  alternates between `rate_off` (starting there) and `rate_on`, each period lasting an exponential
  time of mean `mean_off_s` / `mean_on_s`.

  Args:
    rate_on: Rate in requests/s during on periods, >= 0.
    rate_off: Rate in requests/s during off periods, >= 0.
    mean_on_s: Mean duration of an on period in seconds, > 0.
    mean_off_s: Mean duration of an off period in seconds, > 0.
    horizon_s: Length of the trace in seconds.
    seed: Seed of the numpy Generator.
    max_requests: Optional cap on the number of arrivals (the first ones are kept).

  Returns:
    Tuple (sorted arrival times as a numpy array, piecewise-constant rate function t -> requests/s).

  Raises:
    ValueError: If a rate is negative or a mean duration is not positive.
  """
  if min(rate_on, rate_off) < 0 or min(mean_on_s, mean_off_s) <= 0:
    raise ValueError("need rates >= 0 and mean durations > 0")
  rng = np.random.default_rng(seed)
  starts, rates, chunks = [], [], []
  t, on = 0.0, False
  while t < horizon_s:
    end = min(horizon_s, t + rng.exponential(mean_on_s if on else mean_off_s))
    rate = rate_on if on else rate_off
    starts.append(t)
    rates.append(rate)
    chunks.append(np.sort(rng.uniform(t, end, size=rng.poisson(rate * (end - t)))))
    t, on = end, not on
  starts, rates = np.asarray(starts), np.asarray(rates)
  rate_fn = lambda x: float(rates[max(0, int(np.searchsorted(starts, x, side="right")) - 1)])
  return _bounded(np.concatenate(chunks), max_requests), rate_fn

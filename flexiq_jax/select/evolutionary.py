"""Evolutionary search for per-layer lowered-channel counts, one ratio level at a time.

Genome: a count vector (L,) of integers (conventions in `budget`). Per level r, in increasing
order, the search keeps every genome inside [lower, upper] = [previous level's counts, C] (so
selections are nested) and on budget r (every crossover and mutation is followed by
`budget.repair_to_budget`: the budget is a hard constraint, never a penalty).

fitness_fn(counts (L,) int32) -> float, lower is better (e.g. KL of the quantized model to the
float model on calibration batches). It is assumed expensive, so:
  - every genome is evaluated at most once over the whole search (a cache keyed by the tuple);
  - a level gets at most population * generations evaluations: generation 0 evaluates the
    initial population, each later generation at most population - elite new children;
  - levels 0 and 1 are fixed (no channel / every channel) and never evaluated.
NaN fitness counts as +inf (worst).

One generation: the best `elite` survive; the rest of the population is replaced by children,
each from tournament selection (size `tournament`), uniform crossover with probability
`crossover_rate`, then a mutation that moves MAC budget from one layer to another (so the
repair that follows is small), repeated for about `mutation_rate` * L layer pairs (at least one).
Deterministic for a given seed (and a deterministic fitness_fn).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from flexiq_jax import cost
from flexiq_jax import progress

from flexiq_jax.select import budget
from flexiq_jax.select.ordering import DEFAULT_RTOL
from flexiq_jax.select.selectors import select_greedy_by_range, trivial_counts


@dataclasses.dataclass
class SearchResult:
  """levels (K,); counts (K, L) int32 (the best genome per level, nested);
  best_fitness (K,) float64 (NaN for the fixed levels 0 and 1);
  history: per level a dict {'best': [...], 'mean': [...]}, one entry per generation
  (population best and mean after it; empty lists for fixed levels);
  evaluations: fitness_fn calls in total; evaluations_per_level (K,) int."""
  levels: np.ndarray
  counts: np.ndarray
  best_fitness: np.ndarray
  history: list
  evaluations: int
  evaluations_per_level: np.ndarray

  def as_dict(self) -> dict:
    """JSON-friendly copy (lists and floats)."""
    return {"levels": self.levels.tolist(), "counts": self.counts.tolist(),
            "best_fitness": [float(f) for f in self.best_fitness],
            "history": [{k: [float(x) for x in v] for k, v in h.items()} for h in self.history],
            "evaluations": int(self.evaluations),
            "evaluations_per_level": self.evaluations_per_level.tolist()}


def _init_rows(init, num_levels: int, num_layers: int) -> list[np.ndarray]:
  """`init`: None, one (K, L) count array, or a sequence of them -> list of (K, L) arrays."""
  if init is None:
    return []
  arr = np.asarray(init)
  if arr.ndim == 2:
    arr = arr[None]
  if arr.ndim != 3 or arr.shape[1:] != (num_levels, num_layers):
    raise ValueError(f"init must be (K, L) = ({num_levels}, {num_layers}) counts or a stack of "
                     f"them, got shape {arr.shape}")
  return list(arr)


def evolutionary_search(levels, channels, macs, fitness_fn: Callable[[np.ndarray], float], *,
                        population: int = 16, generations: int = 10, mutation_rate: float = 0.1,
                        crossover_rate: float = 0.7, elite: int = 2, tournament: int = 3,
                        mutation_scale: float = 0.5, ranges: Sequence | None = None,
                        lowering_error: Sequence | None = None, normalize="max",
                        rtol: float = DEFAULT_RTOL, seed=0, init=None,
                        callback: Callable[[dict], None] | None = None,
                        max_attempts_factor: int = 10) -> SearchResult:
  """Searches counts (K, L) minimising fitness_fn at every level (module docstring).

  Initial population per level: the uniform solution, the greedy-by-range solution (if
  `ranges` is given; `lowering_error`, `normalize`, `rtol` as in `select_greedy_by_range`), each
  row of `init` (None, a (K, L) array or a stack of them, e.g. other selectors' results), all
  repaired into this level's bounds, then random genomes up to `population`.
  mutation_scale: a move shifts log-uniformly 1..mutation_scale * C_i channels into layer i.
  callback(info) runs after every generation with info keys level, ratio, generation, best,
  mean, best_counts, evaluations. A generation makes at most max_attempts_factor * population
  child proposals (a converged population mostly proposes known genomes, which are skipped);
  a generation with no new genome at all ends the level's search early (shorter history).

  Args:
    levels: Ratio levels (K,), strictly increasing in [0, 1].
    channels: Feature channels per lowerable layer (L,).
    macs: MACs per lowerable layer (L,).
    fitness_fn: Maps a count vector (L,) int32 to a float, lower is better; NaN counts as +inf.
    population: Genomes per generation, >= 2.
    generations: Generations per level, >= 1.
    mutation_rate: Expected fraction of layers a mutation moves budget into, in [0, 1].
    crossover_rate: Probability of uniform crossover per child, in [0, 1].
    elite: Best genomes kept unchanged per generation, in [0, population).
    tournament: Tournament size, >= 1.
    mutation_scale: Largest move as a fraction of the receiving layer's channels, > 0.
    ranges: Optional per-layer channel ranges (L arrays of (C_l,)) that seed the greedy solution.
    lowering_error: Optional per-layer channel lowering errors for the greedy solution.
    normalize: Range normalisation of the greedy solution ('max', 'mean', 'none' or a callable).
    rtol: Range tie tolerance of the greedy solution.
    seed: Seed of the search's numpy Generator.
    init: None, a (K, L) count array or a stack of them, added to every level's initial population.
    callback: Optional function called with an info dict after every generation.
    max_attempts_factor: Child proposals per generation are capped at this times `population`.

  Returns:
    A SearchResult with the best nested counts (K, L) int32, their fitness, the per-generation
    history and the evaluation counts.

  Raises:
    ValueError: If the search parameters are out of range, `init` has the wrong shape, or levels,
      channels or macs are invalid (`budget.check_problem`).
  """
  levels, channels, macs = budget.check_problem(levels, channels, macs)
  if population < 2 or generations < 1 or not 0 <= elite < population or tournament < 1:
    raise ValueError("need population >= 2, generations >= 1, 0 <= elite < population, "
                     "tournament >= 1")
  if not (0 <= mutation_rate <= 1 and 0 <= crossover_rate <= 1 and mutation_scale > 0):
    raise ValueError("mutation_rate and crossover_rate must be in [0, 1], mutation_scale > 0")
  rng = np.random.default_rng(seed)
  num_layers = channels.size
  w = cost.macs_per_channel(channels, macs)
  total = float(np.sum(macs))
  seeds = _init_rows(init, levels.size, num_layers)
  if ranges is not None:
    seeds.insert(0, select_greedy_by_range(levels, channels, macs, ranges,
                                           lowering_error=lowering_error, normalize=normalize,
                                           rtol=rtol))
  cache: dict[tuple, float] = {}

  def evaluate(genome: tuple) -> float:
    if genome not in cache:
      f = float(fitness_fn(np.asarray(genome, np.int32)))
      cache[genome] = np.inf if np.isnan(f) else f
    return cache[genome]

  def mutate(g, lower, upper):
    g = g.copy()
    for _ in range(max(1, rng.binomial(num_layers, mutation_rate))):
      gain = np.flatnonzero(g < upper)
      if gain.size == 0:
        break
      i = rng.choice(gain)
      give = np.flatnonzero((g > lower) & (np.arange(num_layers) != i))
      if give.size == 0:
        break
      j = rng.choice(give)
      max_step = max(1, int(round(mutation_scale * channels[i])))
      step = min(int(upper[i] - g[i]), int(np.exp(rng.random() * np.log(max_step + 1))))
      g[i] += step
      g[j] -= min(int(g[j] - lower[j]), max(1, int(round(step * w[i] / w[j]))))
    return g

  def tournament_pick(pop):
    # pop is sorted best first, so the smallest drawn index wins the tournament.
    return pop[int(rng.integers(0, len(pop), size=min(tournament, len(pop))).min())]

  out = np.zeros((levels.size, num_layers), np.int64)
  best_fitness = np.full(levels.size, np.nan)
  history, evals_per_level = [], np.zeros(levels.size, np.int64)
  prev = np.zeros_like(channels)
  searched = sum(trivial_counts(r, channels) is None for r in levels)
  bar = progress.bar(desc="select (evolutionary)", total=searched * generations, unit="gen")
  for k, r in enumerate(levels):
    hist = {"best": [], "mean": []}
    history.append(hist)
    fixed = trivial_counts(r, channels)
    if fixed is not None:
      out[k] = prev = fixed
      continue
    lower, upper = prev, channels
    evals_before = len(cache)

    def repair(g):
      return budget.repair_validated(g, r, w, total, lower, upper, rng)  # inputs validated above

    # Generation 0: uniform, greedy, init rows, then random genomes.
    candidates = [budget.counts_for_uniform_ratio(r, channels, macs, lower=lower)]
    candidates += [repair(np.maximum(s[k], lower)) for s in seeds]
    pool = dict.fromkeys(tuple(int(x) for x in g) for g in candidates)
    attempts = 0
    while len(pool) < population and attempts < max_attempts_factor * population:
      attempts += 1
      g = repair(lower + np.floor(rng.random(num_layers) * (upper - lower + 1)))
      pool.setdefault(tuple(int(x) for x in g), None)
    pop = list(pool)[:population]
    fits = [evaluate(g) for g in pop]

    for gen in range(generations):
      if gen > 0:
        children: dict[tuple, None] = {}
        attempts = 0
        while len(children) < population - elite and attempts < max_attempts_factor * population:
          attempts += 1
          a = np.asarray(tournament_pick(pop))
          if len(pop) > 1 and rng.random() < crossover_rate:
            b = np.asarray(tournament_pick(pop))
            a = np.where(rng.random(num_layers) < 0.5, a, b)
          child = tuple(int(x) for x in repair(mutate(a, lower, upper)))
          if child not in cache and child not in children:
            children[child] = None
        if not children:
          bar.update(generations - gen)  # the level's remaining generations are skipped
          break  # converged: proposals only revisit known genomes
        child_fits = [evaluate(g) for g in children]
        # Elites stay; children replace the rest; the best of the old rest fill any gap.
        keep = population - len(children)
        pop, fits = pop[:keep] + list(children), fits[:keep] + child_fits
      rank = np.argsort(fits, kind="stable")
      pop, fits = [pop[i] for i in rank], [fits[i] for i in rank]
      hist["best"].append(fits[0])
      hist["mean"].append(float(np.mean(fits)))
      bar.set_postfix(level=f"{r:g}", generation=gen, best=f"{fits[0]:.4g}", evaluations=len(cache))
      bar.update(1)
      if callback is not None:
        callback({"level": k, "ratio": float(r), "generation": gen, "best": fits[0],
                  "mean": float(np.mean(fits)), "best_counts": np.asarray(pop[0], np.int32),
                  "evaluations": len(cache)})
    out[k] = prev = np.asarray(pop[0], np.int64)
    best_fitness[k] = fits[0]
    evals_per_level[k] = len(cache) - evals_before
  bar.close()
  return SearchResult(levels=levels, counts=out.astype(np.int32), best_fitness=best_fitness,
                      history=history, evaluations=len(cache), evaluations_per_level=evals_per_level)

"""Each stage's options: one frozen dataclass per stage, the one home of its defaults and checks.

A field is declared with `option(default, "<config field>")`: the config field it is read from
(`Options.from_config`) and under which name it enters the stage's fingerprint. A field that
changes no result (logging, checkpoint frequency, thread counts) says so with `result_free=True`
and is left out of the fingerprint; every other field is in it. So a stage's fingerprint is
derived from its options and the fingerprint of the stage before it, never from a list kept by
hand, and a new field cannot be forgotten (tests/test_stage_options.py).

The fingerprint's form is the config's: fields of `WHOLE_SECTIONS` nest under their section
({"quant": {...}}), the others are dotted names ({"train.learning_rate": 0.1}), values as JSON
saves them. A field with `omit_when` values is left out at those values (the values that
reproduce the behaviour from before the field existed), so workdirs made then stay valid.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

from flexiq_jax import finetune as finetune_lib
from flexiq_jax import stage_cache
from flexiq_jax import select as select_lib
from flexiq_jax import train as train_lib
from flexiq_jax.calibrate.statistics import ACT_GRIDS  # signed inputs' grids (`quant.act_grid`)
from flexiq_jax.plan import ATTENTION_MODES

# Config sections a fingerprint holds as one nested value (the rest by dotted name).
WHOLE_SECTIONS = ("model", "calib", "quant", "select")
# Bumped when the saved quantized variables change structure (2: the exact-ratio fill table),
# so that an older workdir's quantize stage is redone and its finetune stage refused by name.
QVARS_FORMAT = 2
# The lowerable layers' 8-bit weight grids (`quant.weight_scale`, numerics.weight_grid).
WEIGHT_SCALES = ("max127", "max112", "joint")


def option(default: Any = None, config: str | None = None, *, result_free: bool = False, omit_when=()):
  """A field of a stage's options.

  Args:
    default: the default value (a dict default is copied per instance).
    config: the dotted config field it maps onto (None: not a config field).
    result_free: True if the value changes no result (left out of the fingerprint).
    omit_when: values at which the field is left out of the fingerprint (the behaviour from
      before the field existed).

  Returns:
    A `dataclasses.field`.
  """
  metadata = {"config": config, "result_free": result_free, "omit_when": tuple(omit_when)}
  if isinstance(default, dict):
    return dataclasses.field(default_factory=lambda: dict(default), metadata=metadata)
  return dataclasses.field(default=default, metadata=metadata)


def _plain(value):
  """The value as JSON saves it (tuples as lists, ConfigDicts as dicts)."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  return json.loads(json.dumps(value, default=str))


def _read(config, dotted: str, default):
  value = config
  for key in dotted.split("."):
    if not hasattr(value, "get") or key not in value:
      return default
    value = value[key]
  if hasattr(value, "to_dict"):
    return value.to_dict()
  return tuple(value) if isinstance(value, list) else value


def _set(out: dict, dotted: str, value) -> None:
  section = dotted.split(".")[0]
  if section in WHOLE_SECTIONS and "." in dotted:
    out.setdefault(section, {})[dotted[len(section) + 1:]] = value
  else:
    out[dotted] = value


def merge_fields(*dicts: dict) -> dict:
  """The union of fingerprint dicts (nested sections merged); a field twice must agree.

  Args:
    *dicts: fingerprint dicts, as `Options.fingerprint_fields` returns them (WHOLE_SECTIONS
      nested, other fields by dotted name).

  Returns:
    A new dict with every field of `dicts`.

  Raises:
    ValueError: a field has two different values.
  """
  out: dict = {}
  for d in dicts:
    for key, value in d.items():
      if isinstance(value, dict) and key in WHOLE_SECTIONS:
        target = out.setdefault(key, {})
        for k, v in value.items():
          if k in target and target[k] != v:
            raise ValueError(f"{key}.{k} has two values in one fingerprint: {target[k]!r} and {v!r}")
          target[k] = v
      else:
        if key in out and out[key] != value:
          raise ValueError(f"{key} has two values in one fingerprint: {out[key]!r} and {value!r}")
        out[key] = value
  return out


@dataclasses.dataclass(frozen=True)
class Options:
  """Base of the stage options: construction from a config, the fingerprint, `.get`."""

  # Fingerprint entries that are not config fields (formats of saved outputs).
  FORMAT: ClassVar[dict] = {}

  @classmethod
  def from_config(cls, config, **overrides):
    """The options that `config` (a run.py config) sets.

    Args:
      config: an `ml_collections.ConfigDict` (or nested dicts); absent fields take the defaults.
      **overrides: field values that replace the config's.

    Returns:
      The options (validated).
    """
    values = {}
    for f in dataclasses.fields(cls):
      if _is_options_type(f):
        values[f.name] = f.default_factory.from_config(config)
      elif f.metadata.get("config"):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        values[f.name] = _read(config, f.metadata["config"], default)
    values.update(overrides)
    return cls(**values)

  def get(self, name: str, default=None):
    """Attribute access with a default, as a ConfigDict section offers it."""
    return getattr(self, name, default)

  def fingerprint_fields(self) -> dict:
    """{config field: value} of every field that affects the result (nested options included)."""
    out = dict(self.FORMAT)
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, Options):
        out = merge_fields(out, value.fingerprint_fields())
        continue
      if f.metadata.get("result_free") or not f.metadata.get("config"):
        continue
      if _omitted(f, value):
        continue
      _set(out, f.metadata["config"], _plain(value))
    return out

  def omitted_names(self) -> tuple[str, ...]:
    """The config fields `fingerprint_fields` leaves out because their value is one that reads as
    absent (`omit_when`): a field added with its off value keeps the fingerprints made before it."""
    out = []
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, Options):
        out += value.omitted_names()
      elif f.metadata.get("config") and _omitted(f, value):
        out.append(f.metadata["config"])
    return tuple(out)

  @classmethod
  def config_names(cls) -> dict[str, bool]:
    """{config field: result_free} of every field (nested options included)."""
    out = {}
    for f in dataclasses.fields(cls):
      if _is_options_type(f):
        out.update(f.default_factory.config_names())
      elif f.metadata.get("config"):
        out[f.metadata["config"]] = f.metadata["result_free"]
    return out


def _omitted(f, value) -> bool:
  """Whether field `f` at `value` reads as absent in the fingerprint (its `omit_when` values)."""
  return _plain(value) in [_plain(v) for v in f.metadata.get("omit_when", ())]


def _is_options_type(f) -> bool:
  return isinstance(f.default_factory, type) and issubclass(f.default_factory, Options)


def _check_choice(name: str, value, known) -> None:
  if value not in known:
    raise ValueError(f"unknown {name} {value!r}; use one of {', '.join(map(repr, known))}")


@dataclasses.dataclass(frozen=True)
class DataOptions(Options):
  """The training data (`data.*` of the config; the eval split is the evaluation's)."""

  name: str = option("fashion_mnist", "data.name")
  data_dir: str = option("", "data.data_dir")
  train_split: str = option("train", "data.train_split")
  image_size: int = option(28, "data.image_size")
  channels: int = option(1, "data.channels")
  eval_transform: str = option("fashion_mnist", "data.eval_transform")
  augment: bool = option(False, "data.augment")
  num_threads: int = option(2, "data.num_threads", result_free=True)

  def __post_init__(self):
    if self.name == "fashion_mnist":
      _check_fmnist_split("data.train_split", self.train_split)


@dataclasses.dataclass(frozen=True)
class FloatOptions(Options):
  """Float training (stage 'float'): the model, its data and the `train.*` recipe."""

  model_name: str = option("resnet_small", "model.name")
  model_kwargs: dict = option({}, "model.kwargs")
  init_weights: str = option("", "init_weights")
  seed: int = option(0, "seed")
  data: DataOptions = dataclasses.field(default_factory=DataOptions)
  batch_size: int = option(128, "train.batch_size")
  num_epochs: float = option(2.0, "train.num_epochs")
  optimizer: str = option("sgd", "train.optimizer")
  learning_rate: float = option(0.1, "train.learning_rate")
  momentum: float = option(0.9, "train.momentum")
  nesterov: bool = option(True, "train.nesterov")
  weight_decay: float = option(5e-4, "train.weight_decay")
  schedule: str = option("cosine", "train.schedule")
  warmup_steps: int = option(100, "train.warmup_steps")
  label_smoothing: float = option(0.0, "train.label_smoothing")
  grad_clip_norm: float = option(0.0, "train.grad_clip_norm")
  checkpoint_every_steps: int = option(200, "train.checkpoint_every_steps", result_free=True)
  log_every_steps: int = option(50, "train.log_every_steps", result_free=True)
  # A guard: a run it stops leaves no result, a run it lets finish is the same run.
  divergence_factor: float = option(10.0, "train.divergence_factor", result_free=True)
  eval_every_steps: int = option(0, "train.eval_every_steps", result_free=True)

  def __post_init__(self):
    train_lib.make_optimizer(self, 1)


@dataclasses.dataclass(frozen=True)
class CalibrateOptions(Options):
  """Calibration (stage 'calibrate'): the plan and the activation statistics.

  `bias_correction` does not change the calibration, but the `quant` section has always been in
  this stage's fingerprint whole; keeping it there keeps existing workdirs' fingerprints.
  """

  num_images: int = option(512, "calib.num_images")
  batch_size: int = option(128, "calib.batch_size")
  skip: tuple = option((), "quant.skip")
  keep_8bit: tuple = option(("first", "last"), "quant.keep_8bit")
  fold_bn: bool = option(True, "quant.fold_bn")
  act_calibration: str = option("minmax", "quant.act_calibration")
  percentile: float = option(99.99, "quant.percentile")
  extraction: str = option("fitted", "quant.extraction")
  bias_correction: bool = option(True, "quant.bias_correction")
  attention: str = option("int8", "quant.attention")
  # The lowerable layers' 8-bit weight scale max|w|/d per output channel (numerics.weight_grid).
  weight_scale: str = option("max127", "quant.weight_scale", omit_when=("max127",))
  # Signed inputs on an asymmetric grid with a zero point where its error is smaller (calibrate).
  act_grid: str = option("symmetric", "quant.act_grid", omit_when=("symmetric",))
  # Cross-layer equalization of the folded variables every method reads (flexiq_jax.equalize).
  equalize: bool = option(False, "quant.equalize", omit_when=(False,))
  seed: int = option(0, "seed")  # which training images calibrate
  data: DataOptions = dataclasses.field(default_factory=DataOptions)

  def __post_init__(self):
    _check_choice("quant.act_calibration", self.act_calibration, ("minmax", "percentile", "mse"))
    _check_choice("quant.extraction", self.extraction, ("fitted", "naive"))
    _check_choice("quant.attention", self.attention, ATTENTION_MODES)
    _check_choice("quant.weight_scale", self.weight_scale, WEIGHT_SCALES)
    _check_choice("quant.act_grid", self.act_grid, ACT_GRIDS)


def check_levels(levels) -> tuple[float, ...]:
  """Ratio levels as floats, refused unless increasing values in (0, 1].

  Args:
    levels: the selection's ratio levels (any sequence of numbers).

  Returns:
    The levels as a tuple of floats.

  Raises:
    ValueError: the levels are not sorted ascending or one is outside (0, 1].
  """
  levels = tuple(float(l) for l in levels)
  if list(levels) != sorted(levels) or not all(0 < l <= 1 for l in levels):
    raise ValueError(f"select.levels must be increasing values in (0, 1], got {list(levels)}")
  return levels


@dataclasses.dataclass(frozen=True)
class SelectOptions(Options):
  """Channel selection (stage 'select'): the selector, its ratio levels and its search."""

  levels: tuple = option((0.25, 0.5, 0.75, 1.0), "select.levels")
  selector: str = option("evolutionary", "select.selector")
  channel_order: str = option("range", "select.channel_order")
  # The evolutionary search's size (select.evolutionary's defaults).
  population: int = option(16, "select.population")
  generations: int = option(10, "select.generations")
  fitness_batches: int = option(2, "select.fitness_batches")  # calibration batches scored per candidate
  fitness: str = option("kl", "select.fitness")
  seed: int = option(0, "seed")
  bias_correction: bool = option(True, "quant.bias_correction")  # of the scored quantized model

  def __post_init__(self):
    check_levels(self.levels)
    _check_choice("select.selector", self.selector, tuple(select_lib.SELECTORS))
    _check_choice("select.channel_order", self.channel_order, ("range", "random"))
    _check_choice("select.fitness", self.fitness, ("kl", "ce"))
    if self.selector == "greedy" and self.channel_order != "range":
      raise ValueError("select.selector='greedy' lowers channels by range, so it needs select.channel_order='range'")

  @property
  def float_levels(self) -> tuple[float, ...]:
    return check_levels(self.levels)

  @property
  def searches(self) -> bool:
    """Whether the selector scores candidates with the quantized model (needs a fitness)."""
    return self.selector == "evolutionary"

  @property
  def search_kwargs(self) -> dict:
    """The selector's own keyword arguments."""
    return {"population": self.population, "generations": self.generations} if self.searches else {}


@dataclasses.dataclass(frozen=True)
class QuantizeOptions(Options):
  """Quantized variables (stage 'quantize') from the calibration and the selection."""

  FORMAT: ClassVar[dict] = {"qvars_format": QVARS_FORMAT}

  bias_correction: bool = option(True, "quant.bias_correction")


REFRESH_MODES = ("auto", "always", "never")


def _check_fmnist_split(field: str, split: str) -> None:
  from flexiq_jax.data import fashion_mnist
  try:
    name, _ = fashion_mnist.parse_split(split)
  except ValueError as e:
    raise ValueError(f"{field}: {e}") from None
  if name not in ("train", "test"):
    raise ValueError(f"{field}: Fashion-MNIST has splits 'train' and 'test', not {split!r}")


def check_lr_grid(grid) -> tuple[float, ...]:
  """The learning-rate grid as floats, refused unless distinct positive numbers.

  Args:
    grid: `finetune.lr_grid` (any sequence of numbers; empty: no selection).

  Returns:
    The rates as a tuple of floats, in the given order.

  Raises:
    ValueError: a rate that is not a positive finite number, or one given twice.
  """
  try:
    rates = tuple(float(r) for r in (grid or ()))
  except (TypeError, ValueError):
    raise ValueError(f"finetune.lr_grid must be a tuple of learning rates, got {grid!r}") from None
  if not all(0 < r < float("inf") for r in rates) or len(set(rates)) != len(rates):
    raise ValueError(f"finetune.lr_grid must hold distinct positive learning rates, got {list(rates)}")
  return rates


@dataclasses.dataclass(frozen=True)
class FinetuneOptions(Options):
  """Multi-ratio QAT (stage 'finetune'): the recipe, the ratio sampler and the refresh after it."""

  FORMAT: ClassVar[dict] = {"qvars_format": QVARS_FORMAT}

  num_epochs: float = option(0.5, "finetune.num_epochs")
  batch_size: int = option(128, "finetune.batch_size")
  optimizer: str = option("sgd", "finetune.optimizer")
  learning_rate: float = option(0.005, "finetune.learning_rate")
  momentum: float = option(0.9, "finetune.momentum")
  nesterov: bool = option(True, "finetune.nesterov")
  weight_decay: float = option(0.0, "finetune.weight_decay")
  schedule: str = option("cosine", "finetune.schedule")
  warmup_steps: int = option(0, "finetune.warmup_steps")
  label_smoothing: float = option(0.0, "finetune.label_smoothing")
  grad_clip_norm: float = option(0.0, "finetune.grad_clip_norm")
  lsq: bool = option(False, "finetune.lsq")  # learnable activation scales
  lsq_weights: bool = option(False, "finetune.lsq_weights")  # learnable per-output-channel weight scales
  # A learnt per-output-channel gain and bias that follow the lowered share (layer_ops.ratio_affine).
  ratio_affine: bool = option(False, "finetune.ratio_affine", omit_when=(False,))
  distill_weight: float = option(0.5, "finetune.distill_weight")  # weight of KL(float || quantized)
  # Extraction-aware adaptive rounding before the QAT (finetune.rounding): AdaRound iterations per
  # lowerable layer (0: none) on the first rounding_images calibration images.
  rounding_iterations: int = option(0, "finetune.rounding_iterations", omit_when=(0,))
  rounding_images: int = option(256, "finetune.rounding_images", omit_when=(256,))
  rounding_ratios: tuple = option((1.0,), "finetune.rounding_ratios", omit_when=((1.0,),))  # reconstructed at once
  levels: tuple = option((), "finetune.levels")  # () = 0 and select.levels
  level_probs: tuple = option((), "finetune.level_probs")  # () = uniform
  uniform_prob: float = option(0.5, "finetune.uniform_prob")
  refresh: str = option("auto", "finetune.refresh")
  refresh_source: str = option("float", "finetune.refresh_source", omit_when=("float",))
  lsq_grad_scale: str = option("qmax8", "finetune.lsq_grad_scale", omit_when=("qmax8",))
  lsq_learning_rate: float = option(0.0, "finetune.lsq_learning_rate", omit_when=(0.0,))  # 0: learning_rate
  lsq_weight_grad_scale: str = option("qmax8", "finetune.lsq_weight_grad_scale", omit_when=("qmax8",))
  # Learning rates every QAT method tries, keeping the best on held-out training images (lr_select);
  # () = the configured rate. lr_select_images: how many held-out images (read only with a grid).
  lr_grid: tuple = option((), "finetune.lr_grid", omit_when=((), None))
  lr_select_images: int = option(1000, "finetune.lr_select_images", omit_when=(1000,))
  # Rates added beyond the grid while its best is at an edge (at most this many; 0: the grid only).
  lr_grid_extend: int = option(0, "finetune.lr_grid_extend", omit_when=(0, None))
  # Training images kept out of every training (e.g. 'train[-5000:]' beside a train_split of
  # 'train[:-5000]'): the learning-rate selection and the finetune's judge score on them; '': on
  # training images the QAT batches do not reach (the float model trained on them).
  holdout_split: str = option("", "data.holdout_split", omit_when=("", None))
  # Guards and monitoring: they decide whether a result is kept or shown, not what it is.
  divergence_factor: float = option(10.0, "finetune.divergence_factor", result_free=True)
  judge_images: int = option(1000, "finetune.judge_images", result_free=True)
  judge_top1_drop: float = option(2.0, "finetune.judge_top1_drop", result_free=True)
  judge_kl_rise: float = option(0.1, "finetune.judge_kl_rise", result_free=True)
  eval_every_steps: int = option(0, "finetune.eval_every_steps", result_free=True)
  every_step_ratios: tuple = option((), "finetune.every_step_ratios", omit_when=((), None))
  every_step_weights: tuple = option((), "finetune.every_step_weights", omit_when=((), None))
  checkpoint_every_steps: int = option(100, "finetune.checkpoint_every_steps", result_free=True)
  log_every_steps: int = option(50, "train.log_every_steps", result_free=True)
  select_levels: tuple = option((0.25, 0.5, 0.75, 1.0), "select.levels")  # the sampler's default levels
  seed: int = option(0, "seed")
  # Added to the QAT's seed (its batches and ratio draws) only: the same model finetuned again.
  seed_offset: int = option(0, "finetune.seed_offset", omit_when=(0,))
  # The refresh after training: re-estimated on calibration images.
  extraction: str = option("fitted", "quant.extraction")
  fitness_batches: int = option(2, "select.fitness_batches")  # calibration batches its KL is measured on
  data: DataOptions = dataclasses.field(default_factory=DataOptions)

  def __post_init__(self):
    _check_choice("finetune.refresh", self.refresh, REFRESH_MODES)
    _check_choice("finetune.refresh_source", self.refresh_source, ("float", "quantized"))
    _check_choice("finetune.lsq_grad_scale", self.lsq_grad_scale, ("qmax8", "effective"))
    _check_choice("finetune.lsq_weight_grad_scale", self.lsq_weight_grad_scale, ("qmax8", "effective"))
    self.sampler()
    finetune_lib.make_optimizer(self, 1)
    check_lr_grid(self.lr_grid)
    if self.holdout_split and self.data.name == "fashion_mnist":
      _check_fmnist_split("data.holdout_split", self.holdout_split)
    if not self.rounding_ratios or any(not 0.0 <= float(r) <= 1.0 for r in self.rounding_ratios):
      raise ValueError(f"finetune.rounding_ratios must be ratios in [0, 1], got {self.rounding_ratios}")
    if self.rounding_iterations < 0 or self.rounding_images < 1:
      raise ValueError(f"finetune.rounding_iterations must be >= 0 and finetune.rounding_images >= 1, got "
                       f"{self.rounding_iterations} and {self.rounding_images}")
    if self.lr_grid_extend < 0:
      raise ValueError(f"finetune.lr_grid_extend must be >= 0, got {self.lr_grid_extend}")
    if self.lr_grid_extend and len(self.lr_grid) == 1:  # an empty grid selects nothing: the extension is idle
      raise ValueError(f"finetune.lr_grid_extend needs a finetune.lr_grid of two or more rates to step from, got "
                       f"{list(self.lr_grid)}")
    if self.lr_grid and self.lr_select_images <= 0:
      raise ValueError(f"finetune.lr_select_images must be > 0 with finetune.lr_grid set, got {self.lr_select_images}")

  def qat_seed(self) -> int:
    """The seed of the QAT's batches and ratio draws."""
    return self.seed + finetune_lib.FLEXIQ_SEED_OFFSET + self.seed_offset

  def sampler(self) -> finetune_lib.RatioSampler:
    """The ratio sampler of the QAT steps."""
    return finetune_lib.RatioSampler.from_config(self, self.select_levels)


# The cached stages in order: name -> (options class, the stage before it).
STAGES = {
    "float": (FloatOptions, None),
    "calibrate": (CalibrateOptions, "float"),
    "select": (SelectOptions, "calibrate"),
    "quantize": (QuantizeOptions, "select"),
    "finetune": (FinetuneOptions, "quantize"),
}
# Config fields that no cached stage reads (evaluation, sweeps, run control, other modes).
NOT_STAGE_FIELDS = ("distributed", "eval_batch_size", "data.eval_split", "data.eval_examples", "sweep",
                    "layerwise", "compare")


def stage_options(config, stage: str) -> Options:
  """The options of cached stage `stage` that `config` sets.

  Args:
    config: a run.py config.
    stage: a key of STAGES ('float', 'calibrate', 'select', 'quantize' or 'finetune').

  Returns:
    The stage's `Options` instance, validated.

  Raises:
    KeyError: `stage` is not a key of STAGES.
    ValueError: a config value the stage's options reject.
  """
  return STAGES[stage][0].from_config(config)


def stage_fields(config, stage: str) -> dict:
  """The fingerprint fields of `stage`: its options' and those of every stage before it.

  Args:
    config: a run.py config.
    stage: a key of STAGES.

  Returns:
    The merged fingerprint dict (`merge_fields`).
  """
  cls, upstream = STAGES[stage]
  own = cls.from_config(config).fingerprint_fields()
  return merge_fields(stage_fields(config, upstream), own) if upstream else own


def config_leaves(config, prefix: str = "") -> list[str]:
  """Every leaf field of a config as a dotted name (a section's dict values are leaves).
  `model.kwargs` is one leaf, whatever it holds.

  Args:
    config: a ConfigDict or nested dict-like object (anything with `keys()`).
    prefix: prepended to every name (used for the recursion into sections).

  Returns:
    The dotted names, in the config's key order.
  """
  out = []
  for key in config.keys():
    value = config[key]
    name = f"{prefix}{key}"
    if hasattr(value, "keys") and name != "model.kwargs":
      out += config_leaves(value, name + ".")
    else:
      out.append(name)
  return out


def unmapped_config_fields(config) -> list[str]:
  """Config fields that no stage's options read and that are not declared stage-free: a new
  field that the stages (and so the fingerprints) would silently ignore.

  Args:
    config: a run.py config.

  Returns:
    The dotted names of those fields (empty when every field has a home).
  """
  mapped = set()
  for cls, _ in STAGES.values():
    mapped |= set(cls.config_names())
  free = lambda n: any(n == p or n.startswith(p + ".") for p in NOT_STAGE_FIELDS)
  return [n for n in config_leaves(config) if n not in mapped and not free(n)]


def check_config(config) -> None:
  """Builds (and so validates) every stage's options from `config`, refusing a config field that
  no stage has a home for.

  Args:
    config: a run.py config.

  Raises:
    ValueError: a value a stage would reject, or an unmapped field.
  """
  unmapped = unmapped_config_fields(config)
  if unmapped:
    raise ValueError(f"config field(s) {', '.join(unmapped)} are read by no stage: add them to a stage's "
                     f"options (flexiq_jax/stage_options.py) or to NOT_STAGE_FIELDS there")
  for name in STAGES:
    stage_options(config, name)


def fingerprint_fields(config, stage: str, *extra: str) -> dict:
  """`stage_fields(config, stage)` plus the config fields `extra` (dotted names, absent as None):
  the fingerprint of a cache that depends on a stage and on fields of its own.

  Args:
    config: a run.py config.
    stage: a key of STAGES.
    *extra: further dotted config field names.

  Returns:
    The fingerprint fields dict.
  """
  return {**stage_fields(config, stage), **stage_cache.config_fields(config, extra)}

"""The quantize transform: (linen model, variables, calibration, selection) -> quantized variables
and an apply function `apply(qvars, x, ratio)` whose 4-bit ratio is a traced argument.

Quantized variables (a pytree; jits, shards and checkpoints like params):
  'params'       BN-folded float weights in the model's own structure (QAT trains these)
  'batch_stats'  statistics of BatchNorms that were not folded (if any)
  'quant'        per quantized layer, nested by module path: 'act_scale' (), 'act_e' (C,),
                 'weight_e' (C,); for lowerable layers also 'rank' (C,) (position of each channel
                 in the lowering order) and 'counts' (K,) (channels lowered at each ratio level);
                 'act_zero' () where the input has an asymmetric grid (its zero point, a multiple
                 of 16; absent on a symmetric grid)
  'levels'       (K,) the ratio levels the counts were selected for
  'fill'         the fill table of the lowerable layers (plan.lowerable order) built from the
                 counts and levels (`select.fill_table`): 'layer' (N,) int32 and 'threshold' (N,)
                 float32, one entry per channel lowered at the last level

At ratio r, layer l lowers its first n_l(r) channels, n_l(r) = the number of its fill-table
entries with threshold <= r (`select.counts_at_ratio`): the selected counts at each level and,
between levels, channels added across the layers in proportion until the 4-bit share of the
lowerable MACs is the nearest to r (within one channel's MACs), so selections stay nested for
every r. The ratio is data, not a constant: changing it never recompiles. A ratio outside
[0, 1] (or NaN) gives NaN logits (`QuantizedModel.apply`); `check_ratio` rejects it on the host.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from flexiq_jax import cost
from flexiq_jax import interception
from flexiq_jax import numerics
from flexiq_jax import select
from flexiq_jax.interception import LayerCall, MatmulCall, get_path, set_path
from flexiq_jax.quantize import integer
from flexiq_jax import layer_ops
from flexiq_jax.quantize import tuning
from flexiq_jax.plan import QuantPlan, unfolded_batch_stats

if TYPE_CHECKING:
  from flexiq_jax import contract


def build_qvars(plan: QuantPlan, folded_variables, calib: dict, orders: dict, counts: dict, levels, *,
                bias_correction: bool = True) -> dict:
  """The quantized variables (module docstring) from the calibration and the selection.

  orders: {path: (C,) channel order, lowered first}; counts: {path: (K,) ints per level}.

  bias_correction: keep each lowerable layer's mean activation codes before/after lowering, so
  the apply removes the mean output shift of whichever channels are lowered (layer_ops).

  Args:
    plan: the quantization plan.
    folded_variables: the BN-folded float variables.
    calib: calibration statistics per quantized layer ('act_scale', 'act_e', 'weight_e', and
      'weight_qmax', 'act_mean_code', 'act_mean_lowered' where present/needed) and per quantized
      matmul ('a_scale', 'b_scale').
    orders: {lowerable path: (C,) channel order, lowered first}.
    counts: {lowerable path: (K,) lowered channel counts, one per level}.
    levels: (K,) ratio levels the counts were selected for.
    bias_correction: keep the mean codes for bias correction.

  Returns:
    The quantized variables: 'params', 'quant', 'levels', 'fill', and 'batch_stats' where BatchNorms
    remain unfolded.

  Raises:
    ValueError: the counts are not nested integers in [0, C] (from `add_fill_table`).
  """
  quant_tree: dict = {}
  for path in plan.quantized:
    c = calib[path]
    entry = {"act_scale": jnp.asarray(c["act_scale"], jnp.float32),
             "act_e": jnp.asarray(c["act_e"], jnp.int32),
             "weight_e": jnp.asarray(c["weight_e"], jnp.int32)}
    if "weight_qmax" in c:  # quant.weight_scale other than 'max127' (numerics.weight_grid)
      entry["weight_qmax"] = jnp.asarray(c["weight_qmax"], jnp.float32)
    if float(c.get("act_zero_point", 0.0)) > 0:  # an asymmetric activation grid (calibrate.asymmetric_grid)
      entry["act_zero"] = jnp.asarray(c["act_zero_point"], jnp.float32)
    if path in plan.lowerable:
      order = np.asarray(orders[path])
      rank = np.empty_like(order)
      rank[order] = np.arange(len(order))
      entry["rank"] = jnp.asarray(rank, jnp.int32)
      entry["counts"] = jnp.asarray(counts[path], jnp.int32)
      if bias_correction:
        entry["mean_code"] = jnp.asarray(c["act_mean_code"], jnp.float32)
        entry["mean_lowered"] = jnp.asarray(c["act_mean_lowered"], jnp.float32)
    quant_tree = set_path(quant_tree, path, entry)
  for path in plan.quantized_matmuls:  # 8-bit activation x activation matmuls: two per-tensor scales
    quant_tree = set_path(quant_tree, path, {"a_scale": jnp.asarray(calib[path]["a_scale"], jnp.float32),
                                             "b_scale": jnp.asarray(calib[path]["b_scale"], jnp.float32)})
  out = {"params": folded_variables["params"], "quant": quant_tree,
         "levels": jnp.asarray(levels, jnp.float32)}
  stats = unfolded_batch_stats(folded_variables, plan)
  if stats:
    out["batch_stats"] = stats
  return add_fill_table(plan, out)


def add_fill_table(plan: QuantPlan, qvars) -> dict:
  """qvars with 'fill', the table `QuantizedModel.layer_counts` reads the counts at any ratio
  from, built on the host from qvars' per-level 'counts' and 'levels' and the plan's MACs
  (`select.fill_table`). build_qvars adds it; call this for quantized variables saved without it.

  Args:
    plan: the quantization plan.
    qvars: quantized variables with per-level 'counts' for each lowerable layer and 'levels'.

  Returns:
    A shallow copy of `qvars` with 'fill' {'layer': (N,) int32, 'threshold': (N,) float32} (no 'fill'
    added when the plan has no lowerable layer).

  Raises:
    ValueError: the counts are not nested integers in [0, C].
  """
  if not plan.lowerable:
    return dict(qvars)
  per_level = np.stack([np.asarray(get_path(qvars["quant"], p)["counts"]) for p in plan.lowerable], axis=1)
  infos = [plan.layers[p] for p in plan.lowerable]
  layer, threshold = select.fill_table(per_level, np.asarray(qvars["levels"]), [i.in_channels for i in infos],
                                       [i.macs for i in infos])
  return {**qvars, "fill": {"layer": jnp.asarray(layer, jnp.int32), "threshold": jnp.asarray(threshold, jnp.float32)}}


def _fill(qvars) -> dict:
  if "fill" not in qvars:
    raise KeyError("qvars have no 'fill' table (saved by an older version?): add it with "
                   "quantize.add_fill_table(plan, qvars)")
  return qvars["fill"]


def default_conv_accumulator() -> str:
  """XLA:GPU runs int8 convolutions only with float32 output (exact up to 2^24 per output).

  Returns:
    'float32' on the GPU backend, 'int32' elsewhere.
  """
  return "float32" if jax.default_backend() == "gpu" else "int32"


@dataclasses.dataclass(frozen=True)
class FlexiQLayers:
  """The provider of FlexiQ's quantized layers: layer p lowers the channels whose rank is below
  counts[p] (layers without a count lower none). Quantized matmuls (q·kᵀ, attn·v) are 8-bit at
  every ratio, with the calibrated scales (LSQ does not learn them)."""

  quant: dict  # qvars['quant']
  counts: dict  # {lowerable path: traced count}
  signed: dict  # {path: bool}
  mode: str
  lsq: bool
  conv_accumulator: str
  matmul_signed: dict = dataclasses.field(default_factory=dict)  # {matmul path: (a signed, b signed)}
  lsq_grad_scale: str = "qmax8"  # layer_ops.quantize_codes
  lsq_weight_grad_scale: str = "qmax8"  # layer_ops.quantize_codes
  stream_edges: dict = dataclasses.field(default_factory=dict)  # {residual index: reader}, residual_codes
  streams: dict = dataclasses.field(default_factory=dict)  # {id(value): (value, codes, step)}
  residual_calls: list = dataclasses.field(default_factory=list)  # one entry per ResidualAdd seen

  def residual_add(self, y, shortcut, activation: str):
    """The k-th residual sum on the 8-bit stream where `stream_edges` names its reader
    (`layer_ops.residual_stream`, on that layer's grid), or None (the plain float sum)."""
    k = len(self.residual_calls)
    self.residual_calls.append(k)
    reader = self.stream_edges.get(k)
    if reader is None:
      return None
    step = get_path(self.quant, reader)["act_scale"]
    y, shortcut, on_stream = layer_ops.stream_terms(self.streams, y, shortcut)
    value, codes = layer_ops.residual_stream(y, shortcut, activation, step, signed=self.signed[reader],
                                             ste=self.mode == "fake", shortcut_stream=on_stream)
    self.streams[id(value)] = (value, codes, step)
    return value

  def matmul(self, call: MatmulCall, a, b):
    return layer_ops.quantized_matmul(call, a, b, get_path(self.quant, call.path),
                                      signed=self.matmul_signed[call.path], mode=self.mode)

  def layer(self, call: LayerCall, x):
    lq = get_path(self.quant, call.path)
    if call.path in self.counts:
      lowered = lq["rank"] < self.counts[call.path]
    else:
      lowered = jnp.zeros((call.info.in_channels,), bool)
    acc = jnp.int32 if self.conv_accumulator == "int32" else jnp.float32
    return layer_ops.quantized_forward(call, x, lq, lowered, signed=self.signed[call.path], mode=self.mode,
                                       lsq=self.lsq, conv_accumulator=acc, lsq_grad_scale=self.lsq_grad_scale,
                                       lsq_weight_grad_scale=self.lsq_weight_grad_scale)


MODES = ("int", "int_reference", "fake")


@dataclasses.dataclass(frozen=True)
class QuantizedModel:
  """mode 'int': int8 codes, int32 accumulation, on the serving form (`quantize.integer`: weights
  and tables precomputed by `prepare`; evaluation and serving); 'int_reference': the same integer
  arithmetic written plainly per call (`layer_ops.quantized_forward`, the reference the tests hold
  'int' to); 'fake': the same values in float with straight-through gradients (QAT).
  lsq: learnable activation scales (LSQ). conv_accumulator: 'int32' or 'float32' (None: chosen
  from the backend; GPUs need float32). conv_impls: how each conv of the serving form runs
  (`integer.integer_forward`; the same integers whichever): 'auto' the backend's defaults
  (`integer.default_conv_impl`), 'int8' every conv as one int8 conv, 'onednn' every conv through
  oneDNN's int8 conv with the epilogue fused (CPU; `quantize.onednn`, the default where its
  library is not built), or ((path, impl), ...) pairs as `integer.tune_conv_impls` measures them
  (layers not listed: the default). dense_impl: how the serving form's dense layers run
  (`integer.DENSE_IMPLS`): 'xla', 'pallas' (one fused kernel per layer, `quantize.pallas_dense`;
  for GPUs, interpret mode elsewhere) or 'onednn' (oneDNN's int8 matmul, CPU; 'xla' where
  unavailable). The portable export runs the XLA form (`export.export_portable`). fuse_requant:
  a layer on oneDNN whose output another quantized layer reads through nothing but a ReLU/ReLU6
  (or directly), and nothing else reads, writes that layer's activation codes (uint8/int8, its
  4-bit lowering included) instead of its float output (`interception.layer_edges`,
  `integer.IntegerLayers`): the same codes, one pass over the activations less; False keeps float
  outputs between every pair of layers. fuse_residual: in mode 'int', a model's `ResidualAdd`
  whose term is the float output of a conv on oneDNN is added (with its ReLU) inside that conv's
  kernel (`integer.IntegerLayers.residual_add`): the same float32 sums, the residual stream written
  once; False adds them in XLA. residual_codes: an 8-bit residual stream, in every mode (other
  numerics than the default's float32 sums): each `ResidualAdd` whose sum a quantized layer reads
  (the first such layer, with a symmetric per-tensor grid) keeps the sum on that layer's 8-bit grid
  (`layer_ops.residual_stream`), and a later sum adds it as codes (`layer_ops.stream_sum`); on
  oneDNN the conv before the sum writes the stream's codes (`quantize.onednn.conv` with
  `shortcut_codes`), so the stream is 8-bit between blocks as in PyTorch's int8 models."""

  model: nn.Module
  plan: QuantPlan
  mode: str = "int"
  lsq: bool = False
  conv_accumulator: str | None = None
  conv_impls: str | tuple = "auto"
  dense_impl: str = "xla"
  # With lsq: 'qmax8' | 'effective' (lowered channels' scale gradient on their 4-bit grid,
  # numerics.lsq_extraction); lsq_weight_grad_scale the same for learnt weight scales.
  lsq_grad_scale: str = "qmax8"
  lsq_weight_grad_scale: str = "qmax8"
  fuse_requant: bool = True
  fuse_residual: bool = True
  residual_codes: bool = False

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"unknown mode {self.mode!r}; use one of {MODES}")
    if isinstance(self.conv_impls, str) and self.conv_impls not in ("auto", "int8", "onednn"):
      raise ValueError(f"conv_impls must be 'auto', 'int8', 'onednn' or ((path, impl), ...) pairs, "
                       f"got {self.conv_impls!r}")
    if self.dense_impl not in integer.DENSE_IMPLS:
      raise ValueError(f"unknown dense_impl {self.dense_impl!r}; use one of {integer.DENSE_IMPLS}")

  def conv_impl_map(self) -> dict:
    """{conv path: implementation} for the serving form (layers not listed: the default)."""
    if self.conv_impls == "auto":
      return {}
    if self.conv_impls in ("int8", "onednn"):
      return {p: self.conv_impls for p in self.plan.quantized if self.plan.layers[p].kind == "conv"}
    return dict(self.conv_impls)

  def prepare(self, qvars) -> dict:
    """The serving variables of `qvars` for mode 'int' (`integer.prepare`): pass them to `apply`
    instead of qvars so the weights are not re-quantized on every call. Jit it for speed."""
    return integer.prepare(self.plan, qvars)

  def layer_counts(self, qvars, ratio) -> dict:
    """{lowerable path: channels lowered at ratio}, traced: from qvars['fill'] (module docstring),
    so the 4-bit share of the lowerable MACs is within one channel's MACs of the ratio and the
    counts are the selected ones at the levels. Above the last level: its counts; below 0 or NaN:
    none (apply turns such ratios into NaN logits)."""
    if not self.plan.lowerable:
      return {}
    fill = _fill(qvars)
    at_ratio = select.counts_at_ratio(fill["layer"], fill["threshold"], len(self.plan.lowerable), ratio)
    return {p: at_ratio[i] for i, p in enumerate(self.plan.lowerable)}

  def apply_counts(self, qvars, x, counts: dict):
    """Logits with layer p lowering its first counts[p] channels (others: none lowered).
    Mode 'int' takes quantized or prepared (`prepare`) variables."""
    accumulator = self.conv_accumulator or default_conv_accumulator()
    if self.mode == "int":
      qvars = self.prepare(qvars)
      requant_edges, residual_edges, stream_edges = self._edges(qvars, x)
      provider = integer.IntegerLayers(qvars[integer.SERVING_KEY], qvars["quant"], counts, self.plan.signed,
                                       self.plan.matmul_signed, accumulator, self.conv_impl_map(), self.dense_impl,
                                       requant_edges=requant_edges, fuse_residual=self.fuse_residual,
                                       residual_edges=residual_edges, stream_edges=stream_edges,
                                       stream_readers=tuple(r for r in stream_edges.values() if self._takes_codes(r)))
    else:
      provider = FlexiQLayers(qvars["quant"], counts, self.plan.signed, "int" if self.mode == "int_reference" else "fake",
                              self.lsq, accumulator, self.plan.matmul_signed, self.lsq_grad_scale,
                              self.lsq_weight_grad_scale, stream_edges=self._edges(qvars, x)[2])
    variables = {k: v for k, v in qvars.items() if k in ("params", "batch_stats")}
    return interception.run_with_provider(self.model, self.plan, variables, x, provider)

  def requant_edges(self, qvars, x) -> dict:
    """{producer path: (consumer path, activation)}: the layer pairs whose producer writes the
    consumer's activation codes in mode 'int' (`fuse_requant`); {} where no layer runs on oneDNN.

    Args:
      qvars: the (prepared) variables, or their shapes.
      x: the input batch, or its shape and dtype.

    Returns:
      The edges `integer.IntegerLayers` takes: both layers quantized, the producer on oneDNN with
      one flat output feature axis, the consumer taking its input as it is (a conv, or a dense
      layer contracting one axis).
    """
    return self._edges(qvars, x)[0]

  def residual_edges(self, qvars, x) -> dict:
    """{residual index: consumer path}: the residual sums (`ResidualAdd`, in call order) whose
    fused kernel also writes the activation codes of the quantized layer that reads the sum, in mode
    'int' with `fuse_residual` and `fuse_requant`; {} where no conv runs on oneDNN.

    Args:
      qvars: the (prepared) variables, or their shapes.
      x: the input batch, or its shape and dtype.

    Returns:
      The edges `integer.IntegerLayers` takes (its `residual_add` fuses only sums that a oneDNN conv
      writes; the others keep their consumer's own quantize pass).
    """
    return self._edges(qvars, x)[1]

  def stream_edges(self, qvars, x) -> dict:
    """{residual index: reader path}: the residual sums kept on the 8-bit stream (`residual_codes`),
    each on the grid of the first quantized layer that reads it; {} without `residual_codes`.

    Args:
      qvars: the quantized (or prepared) variables; their 'quant' entries name the readers' grids.
      x: the input batch, or its shape and dtype.

    Returns:
      The sums whose reader has a symmetric per-tensor activation grid (a zero point or a scale per
      channel keeps that sum in float32).
    """
    return self._edges(qvars, x)[2]

  def _edges(self, qvars, x) -> tuple[dict, dict, dict]:
    """(`requant_edges`, `residual_edges`, `stream_edges`) from one abstract trace (`interception.edges`)."""
    on_onednn = self._on_onednn()
    fused = self.mode == "int" and self.fuse_requant and on_onednn and integer.onednn.available()
    if not fused and not self.residual_codes:
      return {}, {}, {}
    layer, residual = interception.edges(self.model, self.plan, *self._abstract(qvars, x))
    stream = {}
    if self.residual_codes:
      prepared = integer.SERVING_KEY in qvars  # serving entries name a zero point 'zero_point'
      entries = qvars[integer.SERVING_KEY] if prepared else qvars["quant"]
      stream = {k: reader for k, reader in residual.items()
                if ("zero_point" if prepared else "act_zero") not in (entry := get_path(entries, reader))
                and jnp.size(entry["act_scale"]) == 1}
    if not fused:
      return {}, {}, stream
    layers = self.plan.layers
    requant = {producer: (consumer, act) for consumer, (producer, act) in layer.items()
               if producer in on_onednn
               and (layers[producer].kind == "conv" or len(layers[producer].kernel_shape) == 2)
               and self._takes_codes(consumer)}
    residual = ({k: consumer for k, consumer in residual.items() if self._takes_codes(consumer) and k not in stream}
                if self.fuse_residual else {})
    return requant, residual, stream

  def _on_onednn(self) -> set:
    impls = self.conv_impl_map()
    return {p for p in self.plan.quantized if (impls.get(p) == "onednn" if self.plan.layers[p].kind == "conv"
                                               else self.dense_impl == "onednn")}

  def _takes_codes(self, consumer: str) -> bool:
    """Whether a layer can take its input as codes written for it: a conv, or a dense layer
    contracting one axis (its input as it is)."""
    info = self.plan.layers[consumer]
    return info.kind == "conv" or info.contracted_axes == 1

  @staticmethod
  def _abstract(qvars, x):
    """(variables, input) as shapes and dtypes, for the one abstract trace of the edges."""
    shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)),
                                    {k: v for k, v in qvars.items() if k in ("params", "batch_stats")})
    return shapes, jax.ShapeDtypeStruct(jnp.shape(x), jnp.float32)

  def apply(self, qvars, x, ratio, *, checked: bool = False):
    """Logits at a 4-bit ratio in [0, 1] (a traced scalar: no recompilation when it changes).

    The traced path validates the ratio too, at the cost of one select: for a ratio outside
    [0, 1] or NaN every logit is NaN (never silently clipped). `make_predict` and the pipeline
    reject such a ratio on the host before (ValueError, `check_ratio`). checked=True also adds a
    `jax.experimental.checkify` check, which raises once the caller functionalizes it:
    `err, y = checkify.checkify(jax.jit(partial(qmodel.apply, checked=True)))(qvars, x, r); err.throw()`
    (under a plain jax.jit, without checkify, tracing a checked apply is an error).
    """
    r = jnp.asarray(ratio, jnp.float32)
    valid = (r >= 0) & (r <= 1)  # False for NaN
    if checked:
      checkify.check(valid, "ratio must be in [0, 1] (the share of 4-bit MACs), got {r}", r=r)
    logits = self.apply_counts(qvars, x, self.layer_counts(qvars, r))
    return jax.tree_util.tree_map(lambda y: jnp.where(valid, y, jnp.nan), logits)

  def with_mode(self, mode: str) -> "QuantizedModel":
    return dataclasses.replace(self, mode=mode)

  def xla_form(self) -> "QuantizedModel":
    """This model with its oneDNN layers (custom calls of a library only this process loads) run
    by the XLA implementations: convs at the default, dense layers 'xla'. Other choices are kept.

    Returns:
      The QuantizedModel (itself if it has no oneDNN layer).
    """
    impls = self.conv_impls
    if impls == "onednn":
      impls = "auto"
    elif isinstance(impls, tuple):
      impls = tuple((p, i) for p, i in impls if i != "onednn")
    dense = "xla" if self.dense_impl == "onednn" else self.dense_impl
    if impls == self.conv_impls and dense == self.dense_impl:
      return self
    return dataclasses.replace(self, conv_impls=impls, dense_impl=dense)


def export_int8(qmodel: QuantizedModel, qvars) -> dict:
  """The quantized variables for serving: each quantized layer's float kernel replaced by its
  int8 codes (per-output-channel scale in qvars['quant'][...]['weight_scale']), so the float
  weights are not shipped. `qmodel.apply` (mode 'int') gives bit-identical logits from it at every
  ratio. Layers the plan leaves in float, biases and norms stay float.

  Args:
    qmodel: the quantized model (mode 'int' or 'int_reference').
    qvars: its quantized variables with float kernels.

  Returns:
    A shallow copy of `qvars` with int8 kernels (in the kernel's shape) and 'weight_scale' (O,) per layer.

  Raises:
    ValueError: `qmodel` is in mode 'fake', or the variables are already an int8 export.
  """
  if qmodel.mode == "fake":
    raise ValueError("export_int8 serves the integer path: use a QuantizedModel with mode='int'")
  params, quant_tree = qvars["params"], qvars["quant"]
  for path in qmodel.plan.quantized:
    info = qmodel.plan.layers[path]
    layer = get_path(params, path)
    if layer["kernel"].dtype == jnp.int8:
      raise ValueError(f"{path}: these variables are already an int8 export")
    lq = get_path(quant_tree, path)
    codes, scale = layer_ops.weight_codes(info, layer["kernel"], lq.get("lsq_weight_scale"), layer_ops.weight_qmax(lq))
    params = set_path(params, path, {**layer, "kernel": codes})
    quant_tree = set_path(quant_tree, path, {**get_path(quant_tree, path), "weight_scale": scale})
  return {**qvars, "params": params, "quant": quant_tree}


def check_ratio(ratio) -> float:
  """Host-side validation for user-facing entry points: a ValueError for a ratio outside [0, 1]
  or NaN (on the traced path, `QuantizedModel.apply` returns NaN logits for such a ratio).

  Args:
    ratio: a number (Python, numpy or a concrete JAX scalar).

  Returns:
    The ratio as a Python float.

  Raises:
    TypeError: `ratio` is not convertible to a float (or is traced).
    ValueError: `ratio` is outside [0, 1] or NaN.
  """
  try:
    r = float(ratio)
  except (TypeError, ValueError, jax.errors.ConcretizationTypeError) as e:
    raise TypeError(f"ratio must be a number in [0, 1], got {ratio!r}") from e
  if not 0.0 <= r <= 1.0 or np.isnan(r):
    raise ValueError(f"ratio must be in [0, 1] (the share of 4-bit MACs), got {r}")
  return r


def make_predict(qmodel: QuantizedModel, qvars: dict, *, tune_images: jax.typing.ArrayLike | None = None,
                 input_spec: contract.InputSpec | None = None) -> Callable[..., jax.Array]:
  """predict(images, ratio, preprocess=False) for serving: one compiled function for all ratios,
  behind the serving contract (`flexiq_jax.contract`, docs/serving.md): the images' rank, shape
  and dtype are checked against `input_spec` (a `contract.InputSpec`; None: rank 4, float and
  the first layer's channel count only), NaN/Inf pixels and values outside the normalised range
  are refused, and the ratio must be a number in [0, 1]: one ValueError naming what was given.
  preprocess=True takes raw uint8 images (N, H, W[, C]) and applies the model's eval transform
  (`contract.preprocess`). In mode 'int' the serving form is prepared once here
  (`QuantizedModel.prepare`); with `tune_images` (a batch of the serving shape) each conv's
  implementation is first chosen by measurement (`tuning.tune_conv_impls`: the same logits,
  often several times faster on CPU). The prepared variables are constants of the compiled
  function, as in `export.export_portable`'s module, so the two give the same logits bit for bit.
  `predict.qmodel` is the model that runs, `predict.jitted(images, ratio)` its compiled function
  (no checks) and `predict.variables` the variables baked into it.

  Args:
    qmodel: the quantized model.
    qvars: its quantized variables.
    tune_images: a batch of the serving shape to tune the conv implementations on (mode 'int'
      only), or None.
    input_spec: the serving contract's input spec, or None for the minimal checks above.

  Returns:
    The `predict` function, with attributes `jitted`, `variables`, `qmodel` and `input_spec`.
  """
  from flexiq_jax import contract  # pylint: disable=g-import-not-at-top
  if input_spec is None:
    first = qmodel.plan.layers[qmodel.plan.quantized[0]] if qmodel.plan.quantized else None
    input_spec = contract.InputSpec(None, channels=int(first.in_channels) if first is not None and
                                    first.kind == "conv" else None)
  if qmodel.mode == "int" and tune_images is not None:
    qmodel, _ = tuning.tune_conv_impls(qmodel, qvars, tune_images)
  if qmodel.mode == "int":
    qvars = jax.jit(qmodel.prepare)(qvars)
  # The serving variables are constants of the compiled function, as in the module
  # `export_portable` serializes: XLA folds constants, so the same function with the variables
  # as arguments rounds a few logits differently (measured on a finetuned quickstart model: 7 of
  # 2000 test images at ratio 0, up to 0.025 in a logit); this way predict and the export agree
  # bit for bit at every batch size and ratio.
  jitted = jax.jit(lambda images, ratio: qmodel.apply(qvars, images, ratio))
  # The pixel checks (NaN/Inf, range) run on the device, in a call of their own: the model's
  # program stays the one the export holds.
  stats_fn = jax.jit(contract.value_stats)

  def predict(images, ratio, preprocess: bool = False):
    if preprocess:
      images = contract.preprocess(images, input_spec)
    contract.check_images(images, input_spec, values=False)
    r = jnp.float32(contract.check_ratio(ratio))
    images = jnp.asarray(images, jnp.float32)
    contract.check_values(images, input_spec, stats_fn(images))
    return jitted(images, r)

  predict.jitted = jitted
  predict.variables = qvars
  predict.qmodel = qmodel
  predict.input_spec = input_spec
  return predict


def lowered_channels(qmodel: QuantizedModel, qvars, ratio) -> dict:
  """{lowerable path: lowered channel count} at a host ratio (for cost reports): the host twin of
  `QuantizedModel.layer_counts` (select.counts_at_ratio_np on the same table: the same counts).

  Args:
    qmodel: the quantized model.
    qvars: its quantized variables (with 'fill').
    ratio: the 4-bit ratio, a number in [0, 1].

  Returns:
    {lowerable path: count as a float}; empty if the plan has no lowerable layer.

  Raises:
    TypeError: `ratio` is not a number.
    ValueError: `ratio` is outside [0, 1] or NaN.
    KeyError: `qvars` has no 'fill' table.
  """
  r = check_ratio(ratio)
  paths = qmodel.plan.lowerable
  if not paths:
    return {}
  fill = jax.device_get(_fill(qvars))
  counts = select.counts_at_ratio_np(fill["layer"], fill["threshold"], len(paths), r)
  return {p: float(counts[i]) for i, p in enumerate(paths)}


def relative_bops_at(qmodel: QuantizedModel, qvars, ratio) -> float:
  """BOPs at `ratio` relative to ratio 0; the 8-bit matmuls count in both (cost.relative_bops).

  Args:
    qmodel: the quantized model.
    qvars: its quantized variables (with 'fill').
    ratio: the 4-bit ratio, a number in [0, 1].

  Returns:
    The relative BOPs, a float in (0, 1].

  Raises:
    ValueError: `ratio` is outside [0, 1] or NaN.
  """
  return cost.relative_bops(qmodel.plan.layer_infos(), lowered_channels(qmodel, qvars, ratio),
                            matmuls=qmodel.plan.matmul_infos())


def low_bit_share_at(qmodel: QuantizedModel, qvars, ratio) -> float:
  """Share of 4-bit MACs among all quantized MACs, the 8-bit matmuls' included.

  Args:
    qmodel: the quantized model.
    qvars: its quantized variables (with 'fill').
    ratio: the 4-bit ratio, a number in [0, 1].

  Returns:
    The share, a float in [0, 1].

  Raises:
    ValueError: `ratio` is outside [0, 1] or NaN.
  """
  return cost.low_bit_mac_share(qmodel.plan.layer_infos(), lowered_channels(qmodel, qvars, ratio),
                                matmuls=qmodel.plan.matmul_infos())


def add_lsq_weight_scales(plan: QuantPlan, qvars) -> dict:
  """qvars with a learnable per-output-channel weight scale 'lsq_weight_scale' per quantized layer,
  initialised from the current weights (max |w| / 127, or / the layer's 'weight_qmax'), for LSQ
  finetuning of the weight scales.

  Args:
    plan: the quantization plan.
    qvars: quantized variables with float kernels.

  Returns:
    A shallow copy of `qvars` whose 'quant' entries each hold an (O,) 'lsq_weight_scale'.
  """
  quant = qvars["quant"]
  for path in plan.quantized:
    info = plan.layers[path]
    kernel = get_path(qvars["params"], path)["kernel"]
    scale = numerics.per_channel_weight_scale(interception.kernel_matrix(info, kernel),
                                              layer_ops.weight_qmax(get_path(quant, path)))
    quant = set_path(quant, path, {**get_path(quant, path), "lsq_weight_scale": scale})
  return {**qvars, "quant": quant}


def add_ratio_affine(plan: QuantPlan, qvars) -> dict:
  """qvars with a learnable ratio-dependent output affine per lowerable layer ('ratio_gain' and
  'ratio_bias', (O,) zeros: the identity at every ratio until trained; `layer_ops.ratio_affine`).
  Entries already there are kept.

  Args:
    plan: the quantization plan.
    qvars: quantized variables.

  Returns:
    A shallow copy of `qvars` whose lowerable layers' 'quant' entries each hold both vectors.
  """
  quant = qvars["quant"]
  for path in plan.lowerable:
    entry = get_path(quant, path)
    zeros = jnp.zeros((plan.layers[path].out_channels,), jnp.float32)
    quant = set_path(quant, path, {**{k: zeros for k in layer_ops.RATIO_AFFINE_KEYS}, **entry})
  return {**qvars, "quant": quant}

"""What stays float in the integer path: the float `dot_general` / `conv_general_dilated`
equations in the jaxpr of a QuantizedModel's integer-mode apply.

Only the intercepted layers and matmuls are quantized; anything else a model computes with a
matmul or a convolution (a plain `jnp.einsum`, a layer the plan skips, attention matmuls with
`quant.attention='float'`) still runs, in float, and is listed here. Element-wise float work
(softmax, norms, GELU, residual adds, the dequantize multiplies) is not a dot and is not listed.

The report traces every conv as an int8 conv (`conv_impls='int8'`): the float32 convs on integer
codes that the serving form may run instead (`integer.integer_forward`, exact sums below 2^24)
compute the same integers and are an execution choice, not a layer left in float.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

DOT_PRIMITIVES = ("dot_general", "conv_general_dilated")


@dataclasses.dataclass(frozen=True)
class FloatOp:
  """One float matmul or convolution of a jaxpr."""

  primitive: str  # 'dot_general' | 'conv_general_dilated'
  where: str  # the JAX name stack: Flax module path, plus the einsum equation for an einsum
  operands: tuple[str, ...]  # abstract values, e.g. 'float32[1,17,3,32]'

  def __str__(self) -> str:
    return f"{self.primitive} at {self.where or '?'}: {' x '.join(self.operands)}"


def _sub_jaxprs(value):
  """The jaxprs inside one equation parameter (pjit/custom_jvp/custom_vjp bodies, cond branches)."""
  if isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)
    return
  inner = getattr(value, "jaxpr", value)  # a ClosedJaxpr holds a Jaxpr
  if hasattr(inner, "eqns"):
    yield inner


def float_dot_ops(jaxpr, prefix: str = "") -> list[FloatOp]:
  """The dot_general / conv_general_dilated equations of `jaxpr` (a Jaxpr or ClosedJaxpr) with a
  floating-point operand, sub-jaxprs included, in program order.

  Args:
    jaxpr: a Jaxpr or ClosedJaxpr.
    prefix: name stack prepended to each op's `where` (used by the recursion into sub-jaxprs).

  Returns:
    A list of `FloatOp`, one per such equation.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  out = []
  for eqn in jaxpr.eqns:
    where = "/".join(s for s in (prefix, str(eqn.source_info.name_stack)) if s)
    if eqn.primitive.name in DOT_PRIMITIVES:
      avals = [v.aval for v in eqn.invars]
      if any(jnp.issubdtype(a.dtype, jnp.floating) for a in avals):
        out.append(FloatOp(eqn.primitive.name, where, tuple(a.str_short() for a in avals)))
    for value in eqn.params.values():
      for inner in _sub_jaxprs(value):
        out.extend(float_dot_ops(inner, where))
  return out


def float_ops_in_int_path(qmodel, qvars, sample_images, ratio: float = 0.0) -> list[FloatOp]:
  """The float matmuls and convolutions left in `qmodel`'s integer-mode apply (traced, not run:
  `sample_images` may be a jax.ShapeDtypeStruct). Empty when every dot and convolution of the
  model has int8 operands.

  Args:
    qmodel: a `QuantizedModel` (traced in 'int' mode with every conv as 'int8', whatever its own mode).
    qvars: its quantized variables.
    sample_images: an image batch, or a jax.ShapeDtypeStruct of one.
    ratio: the 4-bit ratio traced at (no op's dtype depends on it).

  Returns:
    A list of `FloatOp`, in program order.
  """
  int_model = dataclasses.replace(qmodel, mode="int", conv_impls="int8")
  closed = jax.make_jaxpr(lambda q, x, r: int_model.apply(q, x, r))(qvars, sample_images, jnp.float32(ratio))
  return float_dot_ops(closed)


def float_ops_of_plan(model, plan, folded_variables, stats: dict, sample_images) -> list[FloatOp]:
  """`float_ops_in_int_path` right after calibration (no selection yet): the integer path of
  `plan` with the calibrated scales and nothing lowered. Lowering changes no op's dtype, so the
  list holds at every ratio. `folded_variables` as calibrate got them; `stats` from
  calibrate.calibrate, `plan` with its signedness.

  Args:
    model: the float linen model.
    plan: the plan, with signedness set (`QuantPlan.with_signedness`).
    folded_variables: the BN-folded float variables.
    stats: the calibration statistics ({path: {'act_scale', 'act_e', 'weight_e', ...}}; matmuls:
      {'a_scale', 'b_scale'}).
    sample_images: an image batch, or a jax.ShapeDtypeStruct of one.

  Returns:
    A list of `FloatOp`, in program order.
  """
  from flexiq_jax.interception import set_path
  from flexiq_jax.plan import unfolded_batch_stats
  from flexiq_jax.quantize.transform import QuantizedModel

  quant: dict = {}
  for p in plan.quantized:
    quant = set_path(quant, p, {k: jnp.asarray(stats[p][k]) for k in ("act_scale", "act_e", "weight_e")}
                     | ({"act_zero": jnp.asarray(stats[p]["act_zero_point"], jnp.float32)}
                        if float(stats[p].get("act_zero_point", 0.0)) > 0 else {}))
  for p in plan.quantized_matmuls:
    quant = set_path(quant, p, {k: jnp.asarray(stats[p][k]) for k in ("a_scale", "b_scale")})
  qvars = {"params": folded_variables["params"], "quant": quant}
  batch_stats = unfolded_batch_stats(folded_variables, plan)
  if batch_stats:
    qvars["batch_stats"] = batch_stats
  int_model = QuantizedModel(model, plan, mode="int", conv_impls="int8")
  closed = jax.make_jaxpr(lambda q, x: int_model.apply_counts(q, x, {}))(qvars, sample_images)
  return float_dot_ops(closed)


def format_float_ops(ops: list[FloatOp]) -> str:
  """A short report for logs: how many float dots remain, and where.

  Args:
    ops: the ops, as from `float_ops_in_int_path`.

  Returns:
    A multi-line string (one line when `ops` is empty).
  """
  if not ops:
    return "integer path: every matmul and convolution has int8 operands"
  lines = [f"integer path: {len(ops)} float matmul/convolution op(s) remain:"]
  lines += [f"  {op}" for op in ops]
  return "\n".join(lines)

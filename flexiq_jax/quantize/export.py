"""Portable export of a quantized model: files that serve it without this code base.

`export_portable(qmodel, qvars, directory, image_shape)` writes

  model.stablehlo      the integer path in serving form (`integer.prepare`d variables baked in as
                       constants) serialized with `jax.export`: `(images (batch, H, W, C) float32,
                       ratio () float32) -> logits`. The batch size is symbolic and the ratio an
                       input, so one artifact serves every batch size and every ratio; a ratio outside
                       [0, 1] or NaN gives NaN logits (as `QuantizedModel.apply`).
  weights.safetensors  every serving variable by its '/'-joined path: the int8 kernels, lowered
                       int8 rows, every scale, steps, ranks, bias-correction tables, the fill table
  encodings.json       AIMET encodings (schema 0.6.1) of every quantized tensor, keyed by tensor name,
                       and the FlexiQ extension section: channel ranks, extraction positions, counts
                       per level, bias-correction means, the fill table (docs/DESIGN.md §4.1)
  manifest.json        inputs, outputs, platforms, files, provenance and package versions (written
                       last: a directory with a manifest is a complete export)

Loading needs only jax:
  exp = jax.export.deserialize(bytearray(open("model.stablehlo", "rb").read()))
  logits = exp.call(images, np.float32(0.5))
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexiq_jax import artifacts
from flexiq_jax import numerics
from flexiq_jax import records
from flexiq_jax.interception import get_path
from flexiq_jax.quantize import integer
from flexiq_jax import layer_ops
from flexiq_jax.quantize.transform import QuantizedModel
from flexiq_jax.version import __version__

FORMAT = "flexiq_jax.portable_export"
FORMAT_VERSION = 1
MODULE_FILE = "model.stablehlo"
WEIGHTS_FILE = "weights.safetensors"
ENCODINGS_FILE = "encodings.json"
MANIFEST_FILE = "manifest.json"
# XLA:GPU runs int8 convolutions only with float32 output (QuantizedModel.conv_accumulator).
_FLOAT_ACCUMULATOR_PLATFORMS = ("cuda", "rocm")


@dataclasses.dataclass(frozen=True)
class PortableExport:
  """What `export_portable` wrote: the directory, its files and the platforms the module runs on."""

  directory: str
  files: tuple[str, ...]
  platforms: tuple[str, ...]
  image_shape: tuple[int, int, int]

  def path(self, name: str) -> str:
    return os.path.join(self.directory, name)


def _platform_of_backend() -> str:
  backend = jax.default_backend()
  return {"gpu": "cuda"}.get(backend, backend)


def _write_atomic(path: str, data: bytes) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def serialize_module(qmodel: QuantizedModel, svars, image_shape, platforms) -> bytes:
  """The `jax.export` serialization of `qmodel.apply(svars, images, ratio)`, svars as constants.

  Args:
    qmodel: the quantized model (in the mode to export; `export_portable` passes 'int').
    svars: its serving variables, baked into the module as constants.
    image_shape: (H, W, C) of one image; the batch size is symbolic.
    platforms: platforms the module may run on (e.g. ('cpu',), ('cpu', 'cuda')).

  Returns:
    The serialized `jax.export.Exported`, as bytes: (images (batch, H, W, C) float32, ratio () float32)
    -> logits.
  """
  def serve(images, ratio):
    return qmodel.apply(svars, images, ratio)

  batch, = jax.export.symbolic_shape("batch")
  specs = (jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32))
  return bytes(jax.export.export(jax.jit(serve), platforms=platforms)(*specs).serialize())


def flat_arrays(tree) -> dict[str, np.ndarray]:
  """{'/'-joined path: numpy array} of every leaf of a nested dict.

  Args:
    tree: a pytree of nested dicts with array leaves (fetched to host here).

  Returns:
    A flat dict from '/'-joined key paths to C-contiguous numpy arrays.
  """
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]:
    out["/".join(str(getattr(k, "key", k)) for k in path)] = np.ascontiguousarray(leaf)
  return out


def weights_bytes(svars) -> bytes:
  """The safetensors file content of the serving variables, keyed by '/'-joined path.

  Args:
    svars: the serving variables.

  Returns:
    The bytes of a safetensors file, with FORMAT and the key layout in its metadata.

  Raises:
    ValueError: a leaf has a dtype the safetensors numpy writer cannot store (not bool/int/uint/float,
      or wider than 8 bytes).
  """
  from safetensors.numpy import save
  arrays = flat_arrays(svars)
  odd = [k for k, v in arrays.items() if v.dtype.kind not in "biuf" or v.dtype.itemsize > 8]
  if odd:
    raise ValueError(f"serving variables of dtypes safetensors' numpy writer cannot store: {odd[:5]}")
  return save(arrays, metadata={"format": FORMAT, "layout": "'/'-joined paths of the serving variables "
                                "(params, integer, quant, fill, levels, batch_stats)"})


# AIMET's encodings file format followed here: the 0.6.1 schema (activation_encodings and
# param_encodings keyed by tensor name, a list of one encoding per tensor or per channel, each
# {bitwidth, dtype, is_symmetric, scale, offset, min, max}), as aimet-torch 2.42.0 writes it
# (`AffineEncoding._to_legacy_format`; `AIMET_ENCODING_VERSION=0.6.1`). Its offset is that of the
# unsigned grid: real = (q_u + offset) * scale with q_u in [0, 2^bitwidth - 1], so a signed code q
# is q_u + offset: offset -128 for a signed 8-bit grid, 0 for an unsigned one.
AIMET_ENCODING_VERSION = "0.6.1"
AIMET_PACKAGE = "aimet-torch 2.42.0"
ENCODINGS_VERSION = 3  # of the FlexiQ extension section (3: the activation zero point)


def _aimet_encoding(scale: float, bits: int, signed: bool, zero_point: int = 0) -> dict:
  """One AIMET 0.6.1 encoding of a grid with step `scale`: symmetric signed [-2^(b-1), 2^(b-1)-1]
  (offset -2^(b-1)), unsigned [0, 2^b - 1] (offset 0), or unsigned with zero point z (an
  asymmetric grid: offset -z)."""
  offset = -(1 << (bits - 1)) if signed else -int(zero_point)
  return {"bitwidth": bits, "dtype": "int", "is_symmetric": "False" if zero_point else "True", "scale": float(scale),
          "offset": int(offset), "min": float(offset * scale), "max": float((offset + (1 << bits) - 1) * scale)}


def activation_tensor(path: str, operand: str = "input") -> str:
  """The name encodings.json gives a layer's input (a matmul's operands: 'a', 'b').

  Args:
    path: the layer's or matmul's module path.
    operand: 'input' for a layer, 'a' or 'b' for a matmul operand.

  Returns:
    '<path>/<operand>'.
  """
  return f"{path}/{operand}"


def weight_tensor(path: str) -> str:
  """The name of a quantized layer's int8 kernel in weights.safetensors (and encodings.json).

  Args:
    path: the layer's module path.

  Returns:
    'params/<path>/kernel'.
  """
  return f"params/{path}/kernel"


def _list(x, dtype=None) -> list:
  return np.asarray(jax.device_get(x), dtype).reshape(-1).tolist()


def encodings(qmodel: QuantizedModel, qvars: dict, svars: dict) -> dict:
  """The encodings document (docs/DESIGN.md §4.1): AIMET's 0.6.1 encodings of every quantized
  layer's input and weight and of every attention matmul's operands, keyed by tensor name, and
  the FlexiQ extension ('flexiq': per layer the channel ranks, extraction positions, per-level
  counts and bias-correction means; the fill table) from which a layer's arithmetic at any ratio
  is rebuilt.

  Args:
    qmodel: the quantized model (its plan).
    qvars: its quantized variables (as built, finetuned or an int8 export).
    svars: the serving variables (`qmodel.prepare(qvars)`), whose scales are exported.

  Returns:
    The JSON-serialisable document.
  """
  plan, quant = qmodel.plan, qvars["quant"]
  levels = _list(qvars["levels"], np.float64) if "levels" in qvars else []
  activation, params, layers = {}, {}, {}
  for path in plan.quantized:
    info, lq = plan.layers[path], jax.device_get(get_path(quant, path))
    entry = jax.device_get(get_path(svars[integer.SERVING_KEY], path))
    signed = bool(plan.signed[path])
    act_scale = float(entry["act_scale"])
    weight_scale = np.asarray(entry["weight_scale"], np.float64).reshape(-1)
    zero_point = int(round(float(layer_ops.act_zero_point(lq))))
    activation[activation_tensor(path)] = [_aimet_encoding(act_scale, 8, signed, zero_point)]
    # The weight grid holds the 4-bit rows too: lower(q, 4) can be -128 (docs/DESIGN.md §3.2).
    params[weight_tensor(path)] = [_aimet_encoding(s, 8, True) for s in weight_scale]
    qmin, qmax = numerics.int_range(8, signed)
    layer = {
        "kind": info.kind, "in_channels": int(info.in_channels), "out_channels": int(info.out_channels),
        "groups": int(info.groups), "kernel_shape": list(info.kernel_shape), "lowerable": path in plan.lowerable,
        "activation_tensor": activation_tensor(path), "weight_tensor": weight_tensor(path),
        "bias_tensor": f"params/{path}/bias" if "bias" in get_path(svars["params"], path) else None,
        "activation": {"signed": signed, "qmin": int(qmin), "qmax": int(qmax), "scale": act_scale,
                       "zero_point": zero_point, "extraction_positions": _list(lq["act_e"], np.int64)},
        "weight": {"qmin": -int(layer_ops.WEIGHT_QMAX), "qmax": int(layer_ops.WEIGHT_QMAX),
                   "per_channel_axis": "output", "scale": weight_scale.tolist(),
                   "extraction_positions": _list(lq["weight_e"], np.int64)},
        "lowered_bitwidth": 4,
    }
    if "rank" in lq:
      layer["channel_rank"] = _list(lq["rank"], np.int64)
      layer["counts_per_level"] = _list(lq["counts"], np.int64)
      layer["bias_correction"] = ({"mean_code": _list(lq["mean_code"], np.float64),
                                   "mean_lowered": _list(lq["mean_lowered"], np.float64)}
                                  if "mean_lowered" in lq else None)
    if "ratio_gain" in lq:  # layer_ops.ratio_affine: out = (1 + share·gain)·(acc·s + correction) + share·bias
      layer["ratio_affine"] = {"gain": _list(lq["ratio_gain"], np.float64), "bias": _list(lq["ratio_bias"], np.float64),
                               "share": "per output channel, the share of its kernel rows whose channel is lowered"}
    layers[path] = layer
  matmuls = {}
  for path in plan.quantized_matmuls:
    mq = jax.device_get(get_path(quant, path))
    a_signed, b_signed = plan.matmul_signed[path]
    activation[activation_tensor(path, "a")] = [_aimet_encoding(float(mq["a_scale"]), 8, a_signed)]
    activation[activation_tensor(path, "b")] = [_aimet_encoding(float(mq["b_scale"]), 8, b_signed)]
    matmuls[path] = {"equation": plan.matmuls[path].equation, "a_tensor": activation_tensor(path, "a"),
                     "b_tensor": activation_tensor(path, "b"), "a_signed": bool(a_signed), "b_signed": bool(b_signed)}
  fill = jax.device_get(qvars.get("fill", {}))
  return {
      "version": AIMET_ENCODING_VERSION,
      "producer": {"package": "flexiq_jax", "version": __version__, "aimet_schema": AIMET_PACKAGE},
      "activation_encodings": activation,
      "param_encodings": params,
      "excluded_layers": [p for p in plan.layers if p not in plan.quantized],
      "quantizer_args": {"activation_bitwidth": 8, "param_bitwidth": 8, "per_channel_quantization": True,
                         "dtype": "int", "is_symmetric": True},
      "flexiq": {
          "format": FORMAT + ".encodings", "version": ENCODINGS_VERSION,
          "ratio": "share of the lowerable layers' MACs in 4 bits, in [0, 1]",
          "levels": levels,
          "lowerable": list(plan.lowerable),
          "fill": {"layer": _list(fill["layer"], np.int64), "threshold": _list(fill["threshold"], np.float32)}
                  if fill else None,
          "layers": layers, "matmuls": matmuls,
      },
  }


def export_portable(qmodel: QuantizedModel, qvars: dict, directory: str, image_shape: Sequence[int], *,
                    platforms: tuple[str, ...] | None = None, provenance: dict | None = None,
                    input_spec: dict | None = None, serving_fingerprint: str | None = None) -> PortableExport:
  """Writes the portable export (module docstring) of `qmodel` (any mode: the integer path is
  exported) with quantized variables `qvars` (as built, finetuned or an `export_int8` export) to
  `directory`. image_shape: (H, W, C) of one image. platforms: where the module may run (default:
  this backend; e.g. ('cpu', 'cuda')). input_spec: the serving contract's input spec
  (`contract.InputSpec.to_json`), recorded in manifest.json and encodings.json.
  serving_fingerprint: the fingerprint of the serving variables exported (`artifacts`), recorded
  so that `load_portable` refuses an export its workdir's serving model no longer matches. Each
  file is written beside and renamed into place; the manifest records each file's SHA-256.
  A CUDA or ROCm platform exports the convs with float32 accumulators (XLA:GPU's int8 convs need them).
  A model with oneDNN layers (`conv_impls='onednn'`, `dense_impl='onednn'`) is exported in its XLA
  form (`QuantizedModel.xla_form`): the module holds no custom call.

  Args:
    qmodel: the quantized model.
    qvars: its quantized variables.
    directory: output directory (created if missing); an existing manifest is removed first.
    image_shape: (H, W, C) of one image.
    platforms: platforms the module may run on, or None for this backend.
    provenance: recorded in manifest.json, or None for `records.run_info()`.
    input_spec: the serving contract's input spec, or None.
    serving_fingerprint: the serving variables' fingerprint, or None.

  Returns:
    A `PortableExport` naming the directory, its files, the platforms and the image shape.

  Raises:
    ValueError: `image_shape` is not three-dimensional, or a serving variable's dtype cannot be
      stored in safetensors.
  """
  image_shape = tuple(int(d) for d in image_shape)
  if len(image_shape) != 3:
    raise ValueError(f"image_shape must be (H, W, C), got {image_shape}")
  platforms = tuple(platforms or (_platform_of_backend(),))
  # The module runs the XLA form: oneDNN layers would be custom calls to a library that only a
  # process with flexiq_jax_onednn loaded can run (and only on CPU).
  qmodel = qmodel.with_mode("int").xla_form()
  if any(p in _FLOAT_ACCUMULATOR_PLATFORMS for p in platforms):
    qmodel = dataclasses.replace(qmodel, conv_accumulator="float32")
  svars = jax.device_get(jax.jit(qmodel.prepare)(qvars))
  os.makedirs(directory, exist_ok=True)
  manifest_path = os.path.join(directory, MANIFEST_FILE)
  if os.path.exists(manifest_path):  # the directory is incomplete until the new manifest is in place
    os.remove(manifest_path)
  _write_atomic(os.path.join(directory, MODULE_FILE), serialize_module(qmodel, svars, image_shape, platforms))
  _write_atomic(os.path.join(directory, WEIGHTS_FILE), weights_bytes(svars))
  records.write_json_atomic(os.path.join(directory, ENCODINGS_FILE),
                            {**encodings(qmodel, qvars, svars), "input": input_spec})
  files = (MODULE_FILE, WEIGHTS_FILE, ENCODINGS_FILE, MANIFEST_FILE)
  records.write_json_atomic(manifest_path, {
      "format": FORMAT, "version": FORMAT_VERSION, "files": list(files), "platforms": list(platforms),
      "sha256": {f: artifacts.file_sha256(os.path.join(directory, f)) for f in files if f != MANIFEST_FILE},
      "serving_fingerprint": serving_fingerprint, "input": input_spec,
      "inputs": [{"name": "images", "shape": ["batch", *image_shape], "dtype": "float32"},
                 {"name": "ratio", "shape": [], "dtype": "float32",
                  "range": [0.0, 1.0], "note": "outside [0, 1] or NaN: NaN logits"}],
      "outputs": [{"name": "logits", "shape": ["batch", "classes"], "dtype": "float32"}],
      "load": "exp = jax.export.deserialize(bytearray(open('model.stablehlo', 'rb').read())); "
              "logits = exp.call(images, np.float32(ratio))",
      "provenance": provenance if provenance is not None else records.run_info()})
  return PortableExport(directory, files, platforms, image_shape)


def load_portable(directory: str) -> jax.export.Exported:
  """The exported module of `directory` (`jax.export.Exported`; `.call(images, ratio)`), checked
  against its manifest: each file's SHA-256, and, in a workdir, the fingerprint of the serving
  model it was made from (`artifacts.check_export`; a mismatch raises `artifacts.StaleArtifact`).
  Plain `jax.export.deserialize` on model.stablehlo loads it without these checks.

  Args:
    directory: a directory written by `export_portable`.

  Returns:
    The deserialized `jax.export.Exported`.

  Raises:
    FileNotFoundError: no manifest.json of this format in `directory`.
    artifacts.StaleArtifact: a file does not match its SHA-256, or the export no longer matches its
      workdir's serving model.
  """
  manifest = records.read_json(os.path.join(directory, MANIFEST_FILE))
  if manifest is None or manifest.get("format") != FORMAT:
    raise FileNotFoundError(f"{directory} holds no complete portable export (no {MANIFEST_FILE} of format "
                            f"{FORMAT!r}); write one with flexiq_jax.export_run or run.py --mode=export")
  artifacts.check_export(directory, manifest)  # files as written; made from the workdir's serving model
  with open(os.path.join(directory, MODULE_FILE), "rb") as f:
    return jax.export.deserialize(bytearray(f.read()))

"""Portable export of a quantized model: files that serve it without this code base.

`export_portable(qmodel, qvars, directory, image_shape)` writes

  model.stablehlo      the integer path in serving form (`integer.prepare`d variables baked in as
                       constants) serialized with `jax.export`: `(images (batch, H, W, C) float32,
                       ratio () float32) -> logits`. The batch size is symbolic and the ratio an
                       input, so one artifact serves every batch size and every ratio; a ratio outside
                       [0, 1] or NaN gives NaN logits (as `QuantizedModel.apply`).
  weights.safetensors  every serving variable by its '/'-joined path: the int8 kernels, lowered
                       int8 rows, every scale, steps, ranks, bias-correction tables, the fill table
  encodings.json       per layer (AIMET-style): activation scale and sign, extraction positions,
                       weight scales, channel rank, per-level counts, bit widths (docs/DESIGN.md §4.1)
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

from flexiq_jax import numerics
from flexiq_jax import records
from flexiq_jax.interception import get_path
from flexiq_jax.quantize import integer
from flexiq_jax.quantize import layer_ops
from flexiq_jax.quantize.transform import QuantizedModel

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
  """The `jax.export` serialization of `qmodel.apply(svars, images, ratio)`, svars as constants."""
  def serve(images, ratio):
    return qmodel.apply(svars, images, ratio)

  batch, = jax.export.symbolic_shape("batch")
  specs = (jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32))
  return bytes(jax.export.export(jax.jit(serve), platforms=platforms)(*specs).serialize())


def flat_arrays(tree) -> dict[str, np.ndarray]:
  """{'/'-joined path: numpy array} of every leaf of a nested dict."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]:
    out["/".join(str(getattr(k, "key", k)) for k in path)] = np.ascontiguousarray(leaf)
  return out


def weights_bytes(svars) -> bytes:
  from safetensors.numpy import save
  arrays = flat_arrays(svars)
  odd = [k for k, v in arrays.items() if v.dtype.kind not in "biuf" or v.dtype.itemsize > 8]
  if odd:
    raise ValueError(f"serving variables of dtypes safetensors' numpy writer cannot store: {odd[:5]}")
  return save(arrays, metadata={"format": FORMAT, "layout": "'/'-joined paths of the serving variables "
                                "(params, integer, quant, fill, levels, batch_stats)"})


def _grid(bits: int, signed: bool) -> dict:
  qmin, qmax = numerics.int_range(bits, signed)
  return {"bitwidth": bits, "dtype": "int", "is_symmetric": True, "signed": bool(signed), "qmin": int(qmin),
          "qmax": int(qmax)}


def encodings(qmodel: QuantizedModel, qvars, svars) -> dict:
  """The encodings document (docs/DESIGN.md §4.1): per quantized layer and attention matmul."""
  plan, quant = qmodel.plan, qvars["quant"]
  levels = [float(l) for l in np.asarray(qvars["levels"])] if "levels" in qvars else []
  layers = {}
  for path in plan.quantized:
    info, lq = plan.layers[path], jax.device_get(get_path(quant, path))
    entry = jax.device_get(get_path(svars[integer.SERVING_KEY], path))
    signed = bool(plan.signed[path])
    act_scale = float(entry["act_scale"])
    qmin, qmax = numerics.int_range(8, signed)
    layer = {
        "kind": info.kind, "in_channels": int(info.in_channels), "out_channels": int(info.out_channels),
        "groups": int(info.groups), "lowerable": path in plan.lowerable,
        "activation": {**_grid(8, signed), "scale": act_scale, "min": float(qmin * act_scale),
                       "max": float(qmax * act_scale), "lowered_bitwidth": 4,
                       "extraction_positions": np.asarray(lq["act_e"]).tolist()},
        "weight": {"bitwidth": 8, "dtype": "int", "is_symmetric": True, "signed": True,
                   "qmin": -layer_ops.WEIGHT_QMAX, "qmax": layer_ops.WEIGHT_QMAX, "per_channel_axis": "output",
                   "scale": np.asarray(entry["weight_scale"], np.float64).reshape(-1).tolist(),
                   "lowered_bitwidth": 4, "extraction_positions": np.asarray(lq["weight_e"]).tolist()},
    }
    if "rank" in lq:
      layer["channel_rank"] = np.asarray(lq["rank"]).tolist()
      layer["counts_per_level"] = np.asarray(lq["counts"]).tolist()
      layer["bias_correction"] = "mean_lowered" in lq
    layers[path] = layer
  matmuls = {}
  for path in plan.quantized_matmuls:
    mq = jax.device_get(get_path(quant, path))
    a_signed, b_signed = plan.matmul_signed[path]
    matmuls[path] = {"a": {**_grid(8, a_signed), "scale": float(mq["a_scale"])},
                     "b": {**_grid(8, b_signed), "scale": float(mq["b_scale"])}}
  return {"format": FORMAT + ".encodings", "version": FORMAT_VERSION, "levels": levels,
          "ratio": "share of the lowerable layers' MACs in 4 bits, in [0, 1]",
          "layers": layers, "matmuls": matmuls}


def export_portable(qmodel: QuantizedModel, qvars: dict, directory: str, image_shape: Sequence[int], *,
                    platforms: tuple[str, ...] | None = None, provenance: dict | None = None) -> PortableExport:
  """Writes the portable export (module docstring) of `qmodel` (any mode: the integer path is
  exported) with quantized variables `qvars` (as built, finetuned or an `export_int8` export) to
  `directory`. image_shape: (H, W, C) of one image. platforms: where the module may run (default:
  this backend; e.g. ('cpu', 'cuda')). Each file is written beside and renamed into place."""
  image_shape = tuple(int(d) for d in image_shape)
  if len(image_shape) != 3:
    raise ValueError(f"image_shape must be (H, W, C), got {image_shape}")
  platforms = tuple(platforms or (_platform_of_backend(),))
  qmodel = qmodel.with_mode("int")
  if any(p in _FLOAT_ACCUMULATOR_PLATFORMS for p in platforms):
    qmodel = dataclasses.replace(qmodel, conv_accumulator="float32")
  svars = jax.device_get(jax.jit(qmodel.prepare)(qvars))
  os.makedirs(directory, exist_ok=True)
  manifest_path = os.path.join(directory, MANIFEST_FILE)
  if os.path.exists(manifest_path):  # the directory is incomplete until the new manifest is in place
    os.remove(manifest_path)
  _write_atomic(os.path.join(directory, MODULE_FILE), serialize_module(qmodel, svars, image_shape, platforms))
  _write_atomic(os.path.join(directory, WEIGHTS_FILE), weights_bytes(svars))
  records.write_json_atomic(os.path.join(directory, ENCODINGS_FILE), encodings(qmodel, qvars, svars))
  files = (MODULE_FILE, WEIGHTS_FILE, ENCODINGS_FILE, MANIFEST_FILE)
  records.write_json_atomic(manifest_path, {
      "format": FORMAT, "version": FORMAT_VERSION, "files": list(files), "platforms": list(platforms),
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
  against its manifest. Plain `jax.export.deserialize` on model.stablehlo does the same."""
  manifest = records.read_json(os.path.join(directory, MANIFEST_FILE))
  if manifest is None or manifest.get("format") != FORMAT:
    raise FileNotFoundError(f"{directory} holds no complete portable export (no {MANIFEST_FILE} of format "
                            f"{FORMAT!r}); write one with flexiq_jax.export_run or run.py --mode=export")
  with open(os.path.join(directory, MODULE_FILE), "rb") as f:
    return jax.export.deserialize(bytearray(f.read()))

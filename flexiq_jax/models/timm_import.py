"""timm (PyTorch) state dict -> Flax variables for the models of this package.

The Flax models name their modules after timm's state-dict keys with `_` for `.`, so a timm key
`blocks.3.attn.qkv.weight` and the Flax leaf `params/blocks_3/attn/qkv/kernel` both normalise to
module `blocks_3_attn_qkv`. Matching is done on that normalised module name against the model's
own variable tree (from `jax.eval_shape(model.init)`), and the leaf name picks the conversion:

  conv `weight` (O, I/g, kh, kw)  -> `kernel` (kh, kw, I/g, O)     [depthwise (C,1,k,k) -> (k,k,1,C)]
  Linear `weight` (O, I)          -> `kernel` (I, O)
  norm `weight` / `bias`          -> `scale` / `bias`
  BN `running_mean` / `_var`      -> `batch_stats` `mean` / `var`  (`num_batches_tracked` dropped)
  anything else (`cls_token`, `pos_embed`, `relative_position_bias_table`) -> the param of that name

Buffers that the Flax models recompute (`relative_position_index`, `attn_mask`) are dropped.
Every key must land on a leaf of the right shape and every leaf must be filled, except the
classifier when `num_classes` differs from the checkpoint's (then freshly initialised); otherwise a
ValueError lists the missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from flexiq_jax.models import registry as models_lib

# Keys the Flax models recompute or never use.
_DROPPED_LEAVES = ("num_batches_tracked", "relative_position_index", "attn_mask")


class _Family:
  def __init__(self, head: str, stem: str, renames: tuple[tuple[str, str], ...] = ()):
    self.head = head  # timm module of the classifier
    self.stem = stem  # timm module of the conv that reads the image
    self.renames = renames  # regex substitutions on timm keys where the Flax name differs


_FAMILIES = {
    "resnet": _Family("fc", "conv1", ((r"\.downsample\.0\.", ".downsample_conv."),
                                      (r"\.downsample\.1\.", ".downsample_bn."))),
    "efficientnet": _Family("classifier", "conv_stem"),
    "regnet": _Family("head.fc", "stem.conv"),
    "vit": _Family("head", "patch_embed.proj"),
    "swin": _Family("head.fc", "patch_embed.proj"),
}


def _family(canonical: str) -> _Family:
  try:
    return _FAMILIES[models_lib.spec(canonical).timm_family]
  except ValueError:
    raise ValueError(f"no timm key mapping for model {canonical!r}") from None


# --------------------------------------------------------------------------------------------
# Reading checkpoints.


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A timm state dict as float32 numpy arrays, from .safetensors (no torch needed) or .pth/.pt/.bin.

  Training checkpoints that nest the weights under 'state_dict_ema', 'model_ema', 'state_dict' or
  'model' are unwrapped, and a 'module.' prefix is dropped. Integer and bool tensors keep their dtype.

  Args:
    path: the checkpoint file.

  Returns:
    {timm key: array}.

  Raises:
    FileNotFoundError: `path` does not exist.
    ImportError: a PyTorch pickle and torch is not installed.
    ValueError: the file cannot be read as such a checkpoint, holds no state dict, or holds NaN/Inf
      values.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist")
  if path.endswith(".safetensors"):
    # The flax reader, since safetensors' numpy reader cannot return bfloat16; jax's bfloat16
    # arrays convert to ml_dtypes' bfloat16 numpy arrays, widened to float32 below.
    from safetensors.flax import load_file
    try:
      raw = {k: np.asarray(v) for k, v in load_file(path).items()}
    except Exception as e:  # noqa: BLE001 (safetensors' errors do not name the file)
      raise ValueError(f"cannot read {path} as a .safetensors file ({type(e).__name__}: {e})") from e
  else:
    try:
      import torch
    except ImportError as e:
      raise ImportError(
          f"reading {path} (a PyTorch pickle) needs torch, which is not installed. Install torch, or "
          "convert the checkpoint to .safetensors (safetensors.torch.save_file(model.state_dict(), "
          "'model.safetensors')) on a machine that has it.") from e
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (a text file gives KeyError, a truncated one EOFError, ...)
      raise ValueError(f"cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: {e}); is it a "
                       ".pth/.pt/.bin state dict saved with torch.save?") from e
    if not isinstance(obj, Mapping):
      raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):  # timm/DeiT training checkpoints
      if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
        obj = obj[key]
        break
    raw = {k: v.detach().float().numpy() for k, v in obj.items() if hasattr(v, "detach")}
  out = {}
  for k, v in raw.items():
    k = k[len("module."):] if k.startswith("module.") else k  # DistributedDataParallel prefix
    v = np.asarray(v)
    # Integers (num_batches_tracked, index buffers) stay; floats of any width (incl. ml_dtypes'
    # bfloat16, which numpy does not count as floating) become float32.
    out[k] = v if (np.issubdtype(v.dtype, np.integer) or v.dtype == bool) else v.astype(np.float32)
  broken = [k for k, v in out.items() if v.dtype == np.float32 and not np.all(np.isfinite(v))]
  if broken:
    raise ValueError(f"{path}: {len(broken)} tensor(s) hold NaN or Inf values ({', '.join(broken[:10])}"
                     f"{', ...' if len(broken) > 10 else ''}); the checkpoint is damaged or from a diverged run")
  return out


# --------------------------------------------------------------------------------------------
# Resizing helpers (image size or window size differs from the checkpoint's).


def resize_pos_embed(pos_embed: np.ndarray, num_tokens: int, num_prefix_tokens: int = 1) -> np.ndarray:
  """(1, prefix + g*g, D) -> (1, num_tokens, D): bicubic resize of the square patch grid, class token kept.

  Args:
    pos_embed: the checkpoint's position embedding, [1, num_prefix_tokens + g*g, D].
    num_tokens: the model's token count, prefix tokens included.
    num_prefix_tokens: the leading (class/distillation) tokens, copied unchanged.

  Returns:
    The [1, num_tokens, D] embedding.

  Raises:
    ValueError: the old or new patch grid is not square.
  """
  prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
  old, new = int(round(np.sqrt(grid.shape[1]))), int(round(np.sqrt(num_tokens - num_prefix_tokens)))
  if old * old != grid.shape[1] or new * new != num_tokens - num_prefix_tokens:
    raise ValueError(f"position embedding resize needs square grids: {grid.shape[1]} -> "
                     f"{num_tokens - num_prefix_tokens} patch tokens")
  grid = grid.reshape(old, old, -1)
  # jax.image.resize antialiases when shrinking, as timm's F.interpolate(antialias=True) does.
  grid = np.asarray(jax.image.resize(grid, (new, new, grid.shape[-1]), "bicubic")).reshape(1, new * new, -1)
  return np.concatenate([prefix, grid], axis=1)


def resize_rel_pos_table(table: np.ndarray, num_rows: int) -> np.ndarray:
  """((2w-1)^2, heads) -> (num_rows, heads): bicubic resize of the square relative-offset grid.

  Args:
    table: the checkpoint's relative-position bias table, [(2w-1)^2, heads].
    num_rows: the model's row count, (2w'-1)^2 for its window size w'.

  Returns:
    The [num_rows, heads] table.

  Raises:
    ValueError: the old or new table is not a square grid.
  """
  old, new = int(round(np.sqrt(table.shape[0]))), int(round(np.sqrt(num_rows)))
  if old * old != table.shape[0] or new * new != num_rows:
    raise ValueError(f"relative-position table resize needs square tables: {table.shape[0]} -> {num_rows}")
  grid = table.reshape(old, old, -1)
  return np.asarray(jax.image.resize(grid, (new, new, grid.shape[-1]), "bicubic")).reshape(num_rows, -1)


def adapt_input_conv(kernel: np.ndarray, in_chans: int) -> np.ndarray:
  """HWIO stem kernel for a different number of image channels, timm's rule: sum the RGB filters
  for 1 channel; otherwise tile them and rescale by 3 / in_chans.

  Args:
    kernel: the checkpoint's stem kernel, [kh, kw, in, out] (in: usually 3).
    in_chans: the model's image channels.

  Returns:
    The [kh, kw, in_chans, out] kernel.
  """
  src = kernel.shape[2]
  if in_chans == 1:
    return kernel.sum(axis=2, keepdims=True)
  reps = int(np.ceil(in_chans / src))
  return np.tile(kernel, (1, 1, reps, 1))[:, :, :in_chans] * (src / in_chans)


# --------------------------------------------------------------------------------------------
# Conversion.


def _norm(parts) -> str:
  return "_".join(parts)


def _target_index(shapes) -> dict[tuple[str, str], tuple[tuple[str, ...], tuple[int, ...]]]:
  """(normalised module, leaf) -> (full Flax path incl. collection, shape)."""
  index = {}
  for col in ("params", "batch_stats"):
    for path, leaf in flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes.get(col, {}))).items():
      key = (_norm(path[:-1]), path[-1])
      if key in index:
        raise ValueError(f"Flax paths {'/'.join(index[key][0])} and {col}/{'/'.join(path)} normalise to the "
                         "same timm name; rename one of the modules")
      index[key] = ((col,) + path, tuple(leaf.shape))
  return index


def _flax_leaf(module: str, leaf: str, index) -> str | None:
  """The Flax leaf that timm's `module.leaf` maps to, or None."""
  if leaf == "weight":
    if (module, "kernel") in index:
      return "kernel"
    return "scale" if (module, "scale") in index else None
  return {"running_mean": "mean", "running_var": "var"}.get(leaf, leaf)


def _convert_array(leaf: str, value: np.ndarray) -> np.ndarray:
  """torch layout -> Flax layout. Kernels of another rank are left as they are and so fail the
  shape check with the others."""
  if leaf == "kernel" and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if leaf == "kernel" and value.ndim == 2:
    return value.T
  return value


def convert_state_dict(model, state_dict: Mapping[str, np.ndarray], name: str, *, image_shape=None,
                       replace_head: bool = False, rng=None):
  """Converts `state_dict` (timm names) for the Flax `model` (created as `name`). Returns variables.

  A position embedding, a Swin relative-position table or a stem kernel of another size than the
  model's is resized or adapted (`resize_pos_embed`, `resize_rel_pos_table`, `adapt_input_conv`).

  Args:
    model: the Flax module to fill.
    state_dict: {timm key: array}, as `read_state_dict` returns it.
    name: the model's registered name (or alias), which picks the key mapping.
    image_shape: (H, W, C), the input used to trace the model's variable shapes (default: the
      model's `image_size`, or 224, and 3 channels).
    replace_head: skip the checkpoint's classifier and use a fresh initialisation (from `rng`) for it.
    rng: the PRNG key of the classifier's initialisation (default PRNGKey(0)).

  Returns:
    The Flax variables {'params': ..., 'batch_stats': ...} (the collections the model has), float32.

  Raises:
    ValueError: the model has no timm key mapping, or the checkpoint does not fit it (the message
      lists the missing, unexpected and mis-shaped keys).
  """
  canonical = models_lib.canonical_name(name)
  fam = _family(canonical)
  if image_shape is None:
    size = getattr(model, "image_size", 224)
    image_shape = (size, size, 3)
  dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy, train=False))
  index = _target_index(shapes)
  head_module = _norm(fam.head.split("."))
  stem_module = _norm(fam.stem.split("."))

  filled: dict[tuple[str, ...], np.ndarray] = {}
  unexpected, misshaped = [], []
  head_misshaped = False
  wrong_shape = set()  # target paths reported as mis-shaped, not again as missing
  for key, value in state_dict.items():
    parts = key.split(".")
    if parts[-1] in _DROPPED_LEAVES:
      continue
    renamed = key
    for pattern, repl in fam.renames:
      renamed = re.sub(pattern, repl, renamed)
    parts = renamed.split(".")
    module, leaf = _norm(parts[:-1]), parts[-1]
    if replace_head and module == head_module:
      continue
    flax_leaf = _flax_leaf(module, leaf, index)
    if flax_leaf is None or (module, flax_leaf) not in index:
      unexpected.append(f"{key} {tuple(value.shape)}")
      continue
    path, shape = index[(module, flax_leaf)]
    value = np.asarray(value)
    array = _convert_array(flax_leaf, value)
    if array.shape != shape:
      if flax_leaf == "pos_embed" and array.ndim == 3 and array.shape[2] == shape[2]:
        array = resize_pos_embed(array, shape[1])
      elif flax_leaf == "relative_position_bias_table" and array.shape[1] == shape[1]:
        array = resize_rel_pos_table(array, shape[0])
      elif module == stem_module and flax_leaf == "kernel" and array.shape[:2] + array.shape[3:] == shape[:2] + shape[3:]:
        array = adapt_input_conv(array, shape[2])
      else:
        misshaped.append(f"{key}: checkpoint {tuple(value.shape)} -> {array.shape}, model expects {shape}")
        head_misshaped |= module == head_module
        wrong_shape.add(path)
        continue
    filled[path] = array.astype(np.float32)

  expected = {path: shape for path, shape in index.values()}
  missing = [f"{'/'.join(p)} {s}" for p, s in expected.items()
             if p not in filled and p not in wrong_shape and not (replace_head and _norm(p[1:-1]) == head_module)]
  if missing or unexpected or misshaped:
    lines = [f"timm checkpoint does not fit model {canonical!r}:"]
    for title, items in (("missing in checkpoint", missing), ("unexpected in checkpoint", unexpected),
                         ("shape mismatch", misshaped)):
      if items:
        shown = items[:25] + ([f"... and {len(items) - 25} more"] if len(items) > 25 else [])
        lines.append(f"  {title} ({len(items)}):\n    " + "\n    ".join(shown))
    if head_misshaped:
      lines.append("  (a classifier of another size: pass num_classes to replace it)")
    raise ValueError("\n".join(lines))

  if replace_head:
    # Initialise only the classifier; jit prunes the rest of the init computation.
    def init_head(key):
      params = model.init(key, dummy, train=False)
      return {p: v for p, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(params)).items()
              if _norm(p[1:-1]) == head_module}
    fresh = jax.jit(init_head)(jax.random.PRNGKey(0) if rng is None else rng)
    filled.update({p: np.asarray(v) for p, v in fresh.items()})

  return flax.traverse_util.unflatten_dict({p: jnp.asarray(v) for p, v in filled.items()})


def checkpoint_num_classes(state_dict: Mapping[str, np.ndarray], name: str) -> int:
  """The number of classes of a checkpoint's classifier.

  Args:
    state_dict: {timm key: array}.
    name: the model's registered name (or alias), which names its classifier module.

  Returns:
    The classifier's output size (from its bias, else its weight).

  Raises:
    ValueError: the checkpoint has no classifier, or the model has no timm key mapping.
  """
  fam = _family(models_lib.canonical_name(name))
  key = fam.head + ".bias"
  if key not in state_dict:
    key = fam.head + ".weight"
    if key not in state_dict:
      raise ValueError(f"checkpoint has no classifier {fam.head!r}; pass num_classes explicitly")
  return int(state_dict[key].shape[0])


def load_timm(name: str, path: str, num_classes: int | None = None, image_size: int | None = None,
              in_chans: int = 3, rng=None, **model_kwargs) -> dict[str, Any]:
  """Flax variables `{'params', 'batch_stats'?}` for `models.create(name, num_classes, **model_kwargs)`
  from the timm checkpoint at `path` (.safetensors, or .pth/.bin with torch installed).

  Args:
    name: the model's registered name (or alias).
    path: the checkpoint file.
    num_classes: None keeps the checkpoint's classifier; another value replaces it by a freshly
      initialised one (from `rng`).
    image_size: for ViT/DeiT (and Swin) a size other than the checkpoint's resizes the position
      embedding (bicubic on the patch grid; the class token's entry is kept) and, where Swin's windows
      shrink, the relative-position tables. Ignored by the convolutional models, which take any size.
    in_chans: image channels (e.g. 1 for Fashion-MNIST); the stem filters are adapted as timm does.
    rng: the PRNG key of a replaced classifier's initialisation.
    **model_kwargs: the same reduced-size arguments given to `models.create`.

  Returns:
    The variables, as `convert_state_dict` returns them.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: the checkpoint cannot be read or does not fit the model.
  """
  state_dict = read_state_dict(path)
  head = _family(models_lib.canonical_name(name)).head
  if num_classes is not None and head + ".bias" not in state_dict and head + ".weight" not in state_dict:
    ckpt_classes = None  # no classifier (or not a timm checkpoint: convert_state_dict lists the keys)
  else:
    ckpt_classes = checkpoint_num_classes(state_dict, name)
  num_classes = ckpt_classes if num_classes is None else num_classes
  model = models_lib.create(name, num_classes=num_classes, **model_kwargs)
  if image_size is not None and hasattr(model, "image_size"):
    model = model.clone(image_size=image_size)
  size = getattr(model, "image_size", image_size or 224)
  return convert_state_dict(model, state_dict, name, image_shape=(size, size, in_chans),
                            replace_head=num_classes != ckpt_classes, rng=rng)

"""Any model to the form the interception runs: an object whose
`apply(variables, images, train=False)` returns logits and calls Flax linen modules inside.

* A linen module whose `__call__` takes `train` is used as it is.
* A linen module without a `train` keyword is wrapped (`CallAdapter`) so `train` is not passed.
* A user-given `apply_fn(variables, images) -> logits` (e.g. `lambda v, x: model.apply(v, x,
  deterministic=True)`) replaces the call altogether; it must call the model's linen modules,
  which is where the interception acts.
* A Flax NNX module becomes a linen module over a params pytree (`interception_nnx.to_linen`).

`adapt(model, variables, images, apply_fn=...)` does the dispatch for `flexiq_jax.quantize_model`.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import flax.linen as nn


def takes_keyword(fn: Callable, name: str) -> bool:
  """Whether `fn` accepts the keyword argument `name` (by name or through **kwargs).

  Args:
    fn: Any callable.
    name: The keyword argument's name.

  Returns:
    True if the signature has a parameter `name` or **kwargs; False otherwise or when the
    signature cannot be read.
  """
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False
  return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@dataclasses.dataclass(frozen=True, eq=False)
class CallAdapter:
  """A linen model behind the call the pipeline makes, `apply(variables, images, train=False)`:
  `train` is passed only where the model's `__call__` takes it; with `apply_fn`, that function
  `(variables, images) -> logits` is called instead (evaluation only: `train=True` is refused).
  Compared and hashed by identity."""

  model: nn.Module
  apply_fn: Callable[[Any, Any], Any] | None = None

  @property
  def takes_train(self) -> bool:
    return takes_keyword(type(self.model).__call__, "train")

  def apply(self, variables: Any, images: Any, train: bool = False, **kwargs: Any) -> Any:
    """The model's logits (and its mutated collections where `mutable` is given)."""
    if self.apply_fn is not None:
      if train or kwargs:
        raise NotImplementedError("a model given by apply_fn runs in evaluation only (calibrate, select, "
                                  "quantize, finetune and serve need no more)")
      return self.apply_fn(variables, images)
    if self.takes_train:
      return self.model.apply(variables, images, train=train, **kwargs)
    return self.model.apply(variables, images, **kwargs)

  def init(self, rng: Any, images: Any, train: bool = False) -> Any:
    """The model's variables (`model.init`, `train` passed only where taken)."""
    if self.takes_train:
      return self.model.init(rng, images, train=train)
    return self.model.init(rng, images)


def is_nnx(model: Any) -> bool:
  """Whether `model` is a Flax NNX module.

  Args:
    model: Any object.

  Returns:
    True for an instance of flax.nnx.Module; False otherwise, or when Flax has no NNX.
  """
  try:
    from flax import nnx
  except ImportError:  # a Flax without NNX
    return False
  return isinstance(model, nnx.Module)


def adapt(model: Any, variables: Any = None, images: Any = None, *,
          apply_fn: Callable | None = None) -> tuple[Any, Any, Any]:
  """(model the pipeline can call, its variables, the images) for `quantize_model`.

  Args:
    model: a linen module or an NNX module.
    variables: a linen model's variables; for an NNX module (whose state it holds itself) the
      images may be given here, in the place the linen form has its variables.
    images: the calibration images.
    apply_fn: a linen model: `(variables, images) -> logits` called instead of `model.apply`;
      an NNX module: `(module, images) -> logits` called instead of `module(images)`.

  Returns:
    (model, variables, images): a model with `apply(variables, images, train=False)`.

  Raises:
    TypeError: If an NNX module is given variables and images, `model` is neither a linen nor an
      NNX module, or a linen model lacks its variables or images.
  """
  if is_nnx(model):
    from flexiq_jax import interception_nnx
    if images is None:
      variables, images = None, variables
    if variables is not None:
      raise TypeError("an NNX module holds its own state: call quantize_model(nnx_model, calib_images)")
    linen_model, linen_variables = interception_nnx.to_linen(model, call_fn=apply_fn)
    return linen_model, linen_variables, images
  if not isinstance(model, nn.Module):
    raise TypeError(f"quantize_model takes a Flax linen or NNX module, got {type(model).__name__}")
  if variables is None or images is None:
    raise TypeError("a linen model needs its variables: quantize_model(model, variables, calib_images)")
  if apply_fn is not None or not takes_keyword(type(model).__call__, "train"):
    return CallAdapter(model, apply_fn), variables, images
  return model, variables, images

"""Helpers for `configs/*.py`: the `get_config(arg)` argument parser."""

from __future__ import annotations


_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_arg(arg: str | None, **defaults) -> dict:
  """'fmnist,smoke,batch=64' -> {'fmnist': True, 'smoke': True, 'batch': 64} over `defaults`.

  `--config=configs/vit_b.py:fmnist,smoke` passes 'fmnist,smoke' to get_config. Unknown keys are
  an error listing the known ones, so a typo never silently runs the wrong experiment.

  Args:
    arg: the get_config argument: comma-separated `key` (set to True) or `key=value` items
      (None or empty: the defaults).
    **defaults: the known keys and their default values; a value given as `key=value` is converted
      to the type of its default: a bool from true/false (also 1/0, yes/no, any case), a None
      default keeps the string.

  Returns:
    A new dict of every key of `defaults`, with the given values over the defaults.

  Raises:
    ValueError: a key that is not in `defaults`, or a value that cannot be converted to its
      default's type.
  """
  out = dict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {', '.join(sorted(defaults))}")
    if not value:
      out[key] = True
    else:
      default = defaults[key]
      if isinstance(default, bool):
        flag = value.strip().lower()
        if flag not in _BOOLS:
          raise ValueError(f"config argument {key}={value!r}: expected true or false")
        out[key] = _BOOLS[flag]
      else:
        out[key] = type(default)(value) if default is not None else value
  return out

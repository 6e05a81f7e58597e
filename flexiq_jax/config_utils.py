"""Helpers for `configs/*.py`: the `get_config(arg)` argument parser and config fingerprints."""

from __future__ import annotations

import hashlib
import json


def parse_arg(arg: str | None, **defaults) -> dict:
  """'fmnist,smoke,batch=64' -> {'fmnist': True, 'smoke': True, 'batch': 64} over `defaults`.

  `--config=configs/vit_b.py:fmnist,smoke` passes 'fmnist,smoke' to get_config. Unknown keys are
  an error listing the known ones, so a typo never silently runs the wrong experiment.
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
      out[key] = type(default)(value) if default is not None and not isinstance(default, bool) else value
  return out


def fingerprint(*sections) -> str:
  """Stable hash of config sections (ConfigDicts or dicts), to know when a stage's output can be reused."""
  blob = json.dumps([_plain(s) for s in sections], sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _plain(section):
  if hasattr(section, "to_dict"):
    return section.to_dict()
  return section

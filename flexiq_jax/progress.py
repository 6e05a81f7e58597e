"""Progress bars (tqdm) for the long stages: images/s or steps/s and an ETA where the total is
known. Quiet under FLEXIQ_NO_PROGRESS=1 (tests, scripted runs) and when stderr is not a terminal
(logs and CI get the stages' printed summaries only)."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


def quiet() -> bool:
  return os.environ.get("FLEXIQ_NO_PROGRESS", "") not in ("", "0") or not sys.stderr.isatty()


def bar(iterable=None, *, desc: str, total: float | None = None, unit: str = "it", **kwargs) -> tqdm:
  """A tqdm bar, disabled when `quiet()`."""
  return tqdm(iterable, desc=desc, total=total, unit=unit, disable=quiet(),
              dynamic_ncols=True, **kwargs)


def image_batches(batches, *, desc: str, total_images: int | None = None):
  """Yields `batches` (arrays of images, or dicts with 'image' and optionally a padding 'mask'),
  counting images: the bar shows images/s and, with `total_images`, the ETA."""
  with bar(desc=desc, total=total_images, unit="img", unit_scale=True) as progress:
    for batch in batches:
      yield batch
      if isinstance(batch, dict):
        n = float(batch["mask"].sum()) if "mask" in batch else len(batch["image"])
      else:
        n = len(batch)
      progress.update(n)

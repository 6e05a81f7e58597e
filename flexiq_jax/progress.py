"""Progress bars (tqdm) for the long stages: images/s or steps/s and an ETA where the total is
known. Quiet under FLEXIQ_NO_PROGRESS=1 (tests, scripted runs) and when stderr is not a terminal
(logs and CI get the stages' printed summaries only)."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


def quiet() -> bool:
  """Whether progress bars are off: FLEXIQ_NO_PROGRESS is set to something other than '' or '0',
  or stderr is not a terminal.

  Returns:
    True when bars should not be shown.
  """
  return os.environ.get("FLEXIQ_NO_PROGRESS", "") not in ("", "0") or not sys.stderr.isatty()


def bar(iterable=None, *, desc: str, total: float | None = None, unit: str = "it", **kwargs) -> tqdm:
  """A tqdm bar, disabled when `quiet()`.

  Args:
    iterable: optional iterable to wrap.
    desc: the bar's label.
    total: the expected total (None: no ETA).
    unit: the unit of the count.
    **kwargs: further tqdm arguments.

  Returns:
    The `tqdm` bar (with a dynamic width).
  """
  return tqdm(iterable, desc=desc, total=total, unit=unit, disable=quiet(),
              dynamic_ncols=True, **kwargs)


def image_batches(batches, *, desc: str, total_images: int | None = None):
  """Yields `batches` (arrays of images, or dicts with 'image' and optionally a padding 'mask'),
  counting images: the bar shows images/s and, with `total_images`, the ETA. Padded rows
  (mask 0) are not counted.

  Args:
    batches: an iterable of image arrays or batch dicts.
    desc: the bar's label.
    total_images: the number of images expected (None: no ETA).

  Returns:
    A generator of the batches, unchanged.
  """
  with bar(desc=desc, total=total_images, unit="img", unit_scale=True) as progress:
    for batch in batches:
      yield batch
      if isinstance(batch, dict):
        n = float(batch["mask"].sum()) if "mask" in batch else len(batch["image"])
      else:
        n = len(batch)
      progress.update(n)

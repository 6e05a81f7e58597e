"""Candidates (a bit-width pair per quantizer group) and quantizer groups.

A candidate is written 'W<w>A<a>' (weight bits, input-activation bits), e.g. 'W8A8', 'W4A8',
'W4A4', 'W8A16'; 'FP' (or 'float') means the group is not quantized. Internally bits 0 = float;
the cost model counts float as 32 x 32 bits (cost.layerwise_bops' convention).

Quantizer groups: one per quantized layer (its weight quantizer and its input-activation
quantizer share the candidate). Residual adds: this framework intercepts only Dense/Conv/
DenseGeneral calls, so the only activation quantizers are the inputs of those layers; the
outputs of a residual add are never quantized here (they stay float until the next layer's
input quantizer), so AIMET's "inputs of an add share a group" rule has nothing to tie. A layer
whose input is a residual sum simply quantizes that sum at its own activation bits.
"""

from __future__ import annotations

import dataclasses
import re

FLOAT_BITS = 32  # what a float operand costs in BOPs


@dataclasses.dataclass(frozen=True)
class Candidate:
  weight_bits: int  # 0 = float
  act_bits: int  # 0 = float

  @property
  def name(self) -> str:
    if self.weight_bits == 0 and self.act_bits == 0:
      return "FP"
    w = "FP" if self.weight_bits == 0 else self.weight_bits
    a = "FP" if self.act_bits == 0 else self.act_bits
    return f"W{w}A{a}"

  @property
  def cost_bits(self) -> tuple[int, int]:
    return (self.weight_bits or FLOAT_BITS, self.act_bits or FLOAT_BITS)

  @property
  def bop_factor(self) -> int:
    w, a = self.cost_bits
    return w * a


def parse_candidate(text: str) -> Candidate:
  """'W8A8' -> Candidate(8, 8); 'FP'/'float' -> Candidate(0, 0); 'WFPA8' -> float weights."""
  t = text.strip().upper()
  if t in ("FP", "FLOAT", "FP32"):
    return Candidate(0, 0)
  m = re.fullmatch(r"W(\d+|FP)A(\d+|FP)", t)
  if not m:
    raise ValueError(f"bad candidate {text!r}; write e.g. 'W8A8', 'W4A4', 'W8A16' or 'FP'")
  bits = [0 if g == "FP" else int(g) for g in m.groups()]
  for b in bits:
    if b != 0 and not 2 <= b <= 16:
      raise ValueError(f"candidate {text!r}: bit widths must be in [2, 16] (or FP)")
  return Candidate(*bits)


def parse_candidates(texts) -> list[Candidate]:
  out = [parse_candidate(t) for t in texts]
  if len(set(out)) != len(out):
    raise ValueError(f"duplicate candidates in {list(texts)}")
  return out


def quantizer_groups(plan) -> list[str]:
  """One group per quantized layer (weight + input activation), in call order. See the module
  docstring for residual adds."""
  return list(plan.quantized)

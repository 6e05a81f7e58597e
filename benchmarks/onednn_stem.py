r"""Stem convolutions (1 or 3 input channels) on oneDNN int8: as given against padded to 4 channels.

  python -m benchmarks.onednn_stem                 # every shape below, 15 interleaved rounds
  python -m benchmarks.onednn_stem --rounds=7

oneDNN's int8 conv kernels take input channels in blocks of 4, so a model's first conv (an image's
1 or 3 channels) is the one layer whose channels are not a multiple of 4. This times that conv,
with its epilogue as the integer path runs it (per-channel scale, bias, ReLU, u8 codes out), on
the stems of the benchmark's networks: `onednn.conv` on the channels as given
(`pad_channels=False`: what the kernel library does with them) and on the channels padded with
zeros to 4 (`pad_channels=True`, the pad inside the same jit), beside PyTorch's int8 conv of the
same shape (FX's `x86` engine, quint8 input, channels-last), in interleaved rounds in one process
(`integer_path.median_times`), 2 threads. Both oneDNN forms must give the same codes.

Writes benchmarks/results/onednn_stem.{json,md} with command, commit, device and date.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from flexiq_jax import host_memory
from flexiq_jax import records
from flexiq_jax.quantize import onednn

from benchmarks.integer_path import cpu_model
from benchmarks.integer_path import median_times

# (name, batch, input size, input channels, kernel, stride, output channels)
SHAPES = (
    ("resnet18/50:full stem", 1, 224, 3, 7, 2, 64),
    ("resnet18/50:full stem", 16, 224, 3, 7, 2, 64),
    ("mobilenetv2:full stem", 1, 224, 3, 3, 2, 32),
    ("mobilenetv2:full stem", 16, 224, 3, 3, 2, 32),
    ("quickstart:fmnist stem", 512, 28, 1, 3, 1, 16),
    ("mobilenetv2:fmnist stem", 512, 28, 1, 3, 1, 32),
)

_ROUNDS = flags.DEFINE_integer("rounds", 15, "Interleaved timed rounds.")
_OUT = flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                           "Folder for the results files.")


def alternatives(batch: int, size: int, channels: int, kernel: int, stride: int, out: int):
  """{name: (fn, args)} for one stem shape, whether the two oneDNN forms agree, and how the library
  ran the conv as given (its `run_counts` over one call)."""
  import torch
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(-128, 128, (batch, size, size, channels)), jnp.int8)
  w = jnp.asarray(rng.integers(-127, 128, (kernel, kernel, channels, out)), jnp.int8)
  scale = jnp.asarray(rng.uniform(1e-4, 1e-3, out), jnp.float32)
  bias = jnp.asarray(rng.normal(0, 0.1, out), jnp.float32)
  pad = kernel // 2
  common = dict(strides=(stride, stride), padding=((pad, pad), (pad, pad)), scale=scale, bias=bias,
                post_op="relu", out_dtype=jnp.uint8, dst_scale=jnp.float32(0.05))
  given = jax.jit(lambda x, w: onednn.conv(x, w, pad_channels=False, **common))
  padded = jax.jit(lambda x, w: onednn.conv(x, w, pad_channels=True, **common))
  same = bool(np.array_equal(np.asarray(given(x, w)), np.asarray(padded(x, w))))
  before = onednn.run_counts()
  jax.block_until_ready(given(x, w))
  ran = {k: v - before[k] for k, v in onednn.run_counts().items() if v - before[k] and "_" not in k}

  torch.backends.quantized.engine = "x86"
  qx = torch.quantize_per_tensor(torch.randn(batch, channels, size, size), 0.02, 128, torch.quint8)
  qx = qx.contiguous(memory_format=torch.channels_last)
  conv = torch.ao.nn.intrinsic.quantized.ConvReLU2d(channels, out, kernel, stride=stride, padding=pad)
  qw = torch.quantize_per_channel(torch.randn(out, channels, kernel, kernel), torch.full((out,), 0.01),
                                  torch.zeros(out, dtype=torch.long), 0, torch.qint8)
  conv.set_weight_bias(qw, torch.randn(out))
  conv.scale, conv.zero_point = 0.05, 0
  fns = {"oneDNN, channels as given": (given, (x, w)), "oneDNN, padded to 4": (padded, (x, w)),
         "PyTorch int8 (x86)": (lambda q: conv(q), (qx,))}
  return fns, same, ran


def main(argv):
  del argv
  host_memory.rerun_with_tcmalloc()  # both libraries on the same allocator (flexiq_jax.host_memory)
  import torch
  torch.set_num_threads(2)
  info = records.run_info()
  info["host"] = records.host_description()
  if not onednn.available():
    raise SystemExit(f"the oneDNN kernels are not available: {onednn.unavailable_reason()}")
  rows = []
  for name, batch, size, channels, kernel, stride, out in SHAPES:
    fns, same, ran = alternatives(batch, size, channels, kernel, stride, out)
    spread: dict = {}
    times = median_times({k: f for k, (f, _) in fns.items()}, {k: a for k, (_, a) in fns.items()}, _ROUNDS.value,
                         spread)
    rows.append({"shape": name, "batch": batch, "input": [size, size, channels], "kernel": kernel, "stride": stride,
                 "out_channels": out, "times_s": times, "iqr_s": spread, "same_codes": same,
                 "given_ran_as": ran})
    print(rows[-1], flush=True)
  results = {"info": info, "cpu": cpu_model(), "allocator": host_memory.state(), "rounds": _ROUNDS.value,
             "torch_threads": torch.get_num_threads(), "rows": rows}
  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, "onednn_stem")
  records.write_json_atomic(path + ".json", results)
  names = list(rows[0]["times_s"])
  table = [[r["shape"], r["batch"], "x".join(map(str, r["input"])), f"{r['kernel']}x{r['kernel']} s{r['stride']}",
            r["out_channels"], *(f"{1e3 * r['times_s'][k]:.2f} ({1e3 * r['iqr_s'][k]:.2f})" for k in names),
            f"{r['times_s'][names[0]] / r['times_s'][names[1]]:.2f}x",
            f"{r['times_s'][names[1]] / r['times_s'][names[2]]:.2f}", "yes" if r["same_codes"] else "NO",
            ", ".join(f"{k} {v}" for k, v in r["given_ran_as"].items())]
           for r in rows]
  text = ["# Stem convolutions on oneDNN int8: channels as given vs padded to 4\n",
          records.provenance_header(info),
          f"CPU: {results['cpu']}; host: {info['host']}; allocator: {results['allocator']}. Median of "
          f"{_ROUNDS.value} interleaved rounds, ms (interquartile range); int8 codes in, per-channel scale, bias, "
          "ReLU and u8 codes out. Speed-up: as given / padded. Padded / PyTorch: the padded conv's time as a "
          "multiple of PyTorch int8's. The last column: how the kernel library ran the conv as given "
          "(`onednn.run_counts` over one call; 'im2col', libraries before interface version 9 only: as a 1x1 conv "
          "over the im2col matrix of its input).\n\n",
          records.markdown_table(["stem", "batch", "input HxWxC", "kernel", "out", *[f"{k} ms" for k in names],
                                  "speed-up of padding", "padded / PyTorch", "same codes",
                                  "the library's runs of the conv as given"], table), "\n"]
  with open(path + ".md", "w") as f:
    f.write("\n".join(text))
  print(f"wrote {path}.md")


if __name__ == "__main__":
  app.run(main)

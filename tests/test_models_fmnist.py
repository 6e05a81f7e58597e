"""Every model of the zoo trains on the real Fashion-MNIST through its config's `:fmnist` variant
(the float stage of the pipeline, 3 steps) with a finite loss; skipped where the dataset is not
installed.

Runtime on 2 CPU cores is mostly XLA compilation: with an empty XLA cache the eleven tests take
~6 min (EfficientNet, Swin, MobileNetV2 the slowest; the five ViT/DeiT variants share one
architecture); with conftest's persistent XLA cache warm, ~1.5 min.
"""

import json
import math
import os

import numpy as np
import pytest

from flexiq_jax import pipeline
from flexiq_jax.data import fashion_mnist
from test_configs import MODEL_CONFIGS, load_config

REAL_FMNIST = os.path.exists(os.path.join(fashion_mnist.DEFAULT_DIR, "train-images-idx3-ubyte.gz"))


@pytest.mark.skipif(not REAL_FMNIST, reason=f"Fashion-MNIST is not installed in {fashion_mnist.DEFAULT_DIR}")
@pytest.mark.parametrize("file", sorted(MODEL_CONFIGS))
def test_fmnist_variant_trains_on_real_fashion_mnist(file, tmp_path):
  config = load_config(file, "fmnist,smoke")
  assert config.data.data_dir == fashion_mnist.DEFAULT_DIR
  config.train.batch_size = 16
  config.train.num_epochs = 2.5 * 16 / 60_000  # ceil -> 3 steps
  config.train.warmup_steps = 1
  config.train.log_every_steps = 1
  config.train.checkpoint_every_steps = 100
  config.data.num_threads = 1
  float_model = pipeline.train_float(pipeline.Run(config, str(tmp_path)))
  assert json.load(open(tmp_path / "float" / "done.json"))["total_steps"] == 3
  records = [json.loads(line) for line in open(tmp_path / "float" / "metrics.jsonl")]
  assert [r["step"] for r in records] == [1, 2, 3]
  assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records), records
  assert records[0]["loss"] > 0
  logits = float_model.logits(np.zeros((2, 28, 28, 1), np.float32))
  assert logits.shape == (2, 10) and np.isfinite(np.asarray(logits)).all()

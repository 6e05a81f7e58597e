"""One process of the multi-host test (tests/test_multihost.py): trains the smoke float model on
the tiny dataset, evaluates it, and (process 0) saves the parameters and metrics to `out`.

  python tests/multihost_worker.py <process_id> <num_processes> <port> <data_dir> <workdir> <out.npz>
"""

import json
import os
import sys

os.environ.setdefault("FLEXIQ_NO_PROGRESS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def main(process_id, num_processes, port, data_dir, workdir, out):
  if num_processes > 1:
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id)
  from configs import quickstart
  from flexiq_jax import pipeline
  config = quickstart.get_config("smoke")
  config.data.data_dir = data_dir
  config.data.eval_examples = -1
  config.train.batch_size = 32  # global
  config.train.num_epochs = 0.5  # 4 steps on 256 images
  config.train.checkpoint_every_steps = 2
  config.train.log_every_steps = 1
  config.eval_batch_size = 48  # 128 test images: the last global batch is part padding
  run = pipeline.Run(config, workdir)
  fm = pipeline.train_float(run)
  metrics = pipeline.evaluate_float(run, fm)
  if jax.process_index() == 0:
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_leaves_with_path(jax.device_get(fm.variables))}
    np.savez(out, metrics=json.dumps(metrics), **flat)


if __name__ == "__main__":
  a = sys.argv[1:]
  main(int(a[0]), int(a[1]), int(a[2]), a[3], a[4], a[5])

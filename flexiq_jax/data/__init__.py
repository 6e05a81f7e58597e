"""Data: Fashion-MNIST (embedded default), any TFDS image-classification dataset, calibration sets."""

from flexiq_jax.data.datasets import (Dataset, calibration_images, eval_batches, fashion_mnist_dataset,
                                      get_dataset, tfds_dataset, train_batches)

"""experiments/residual_stream.py: its agreement measures and its refusal of a bad image count."""

import numpy as np

from experiments import residual_stream


def test_agreement_measures_top1_kl_and_sqnr():
  reference = np.array([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]])
  same = residual_stream.agreement(reference, reference)
  assert same["top1_agreement"] == 100.0 and abs(same["kl"]) < 1e-12 and same["sqnr_db"] == float("inf")
  flipped = reference.copy()
  flipped[1] = [3.0, 0.0, 1.0]  # the second row's top-1 moves
  got = residual_stream.agreement(reference, flipped)
  assert got["top1_agreement"] == 50.0 and got["kl"] > 0
  noise = np.sum((reference - flipped) ** 2)
  np.testing.assert_allclose(got["sqnr_db"], 10 * np.log10(np.sum(reference ** 2) / noise))


def test_a_bad_image_count_is_one_line_and_exit_1(capsys):
  assert residual_stream.main(["--images=0"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--images must be at least 1" in err[0]

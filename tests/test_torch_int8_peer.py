"""benchmarks.torch_int8: the PyTorch int8 peer at full 8-bit activation range observes its
activations on 0..255, where PyTorch's x86 default observes them on 0..127 (reduce_range)."""
import pytest

torch = pytest.importorskip("torch")

from benchmarks import torch_int8


def _activation_ranges(mapping):
  from torch.ao.quantization.quantize_fx import prepare_fx
  model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1)).eval()
  prepared = prepare_fx(model, mapping, example_inputs=(torch.randn(1, 3, 8, 8),))
  observers = [m for n, m in prepared.named_modules() if "activation_post_process" in n]
  assert observers
  return {(int(o.quant_min), int(o.quant_max)) for o in observers}


def test_full_range_mapping_observes_eight_bit_activations():
  from torch.ao.quantization import get_default_qconfig_mapping
  assert _activation_ranges(get_default_qconfig_mapping("x86")) == {(0, 127)}
  assert _activation_ranges(torch_int8.full_range_qconfig_mapping()) == {(0, 255)}
  # The default mapping is not changed by building the full-range one.
  assert get_default_qconfig_mapping("x86").global_qconfig.activation().reduce_range

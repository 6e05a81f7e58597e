"""Model zoo and timm import: registry, forward passes, and load_timm's key/shape handling.

Needs no torch: timm-format state dicts are written here with numpy and safetensors.
"""

import os
import re
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from flexiq_jax import models
from flexiq_jax.models import timm_import

REGISTERED = tuple(spec.name for spec in models.specs())

# timm's parameter counts of the ImageNet models (`sum(p.numel() for p in model.parameters())`).
TIMM_NUM_PARAMS = {
    "resnet18": 11_689_512, "resnet50": 25_557_032, "mobilenetv2_100": 3_504_872,
    "efficientnet_b0": 5_288_548, "regnetx_006": 6_196_040, "vit_small_patch16_224": 22_050_664,
    "vit_base_patch16_224": 86_567_656, "deit_tiny_patch16_224": 5_717_416,
    "deit_small_patch16_224": 22_050_664, "deit_base_patch16_224": 86_567_656,
    "swin_tiny_patch4_window7_224": 28_288_354, "tf_efficientnet_lite0": 4_652_008,
}


def random_variables(model, x, seed=0):
  """Random values in the model's variable tree (jitted init is slow to compile on CPU; the
  structure comes from eval_shape, which is what matters here). Variances are kept positive."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))
  out = {}
  for path, s in flat.items():
    fan_in = int(np.prod(s.shape[:-1])) if path[-1] == "kernel" else 1
    v = rng.standard_normal(s.shape).astype(np.float32) / np.sqrt(max(fan_in, 1))
    out[path] = np.abs(v) + 0.5 if path[-1] == "var" else v
  return flax.traverse_util.unflatten_dict(out)


def test_available_lists_the_eleven():
  assert set(REGISTERED) <= set(models.available())


@pytest.mark.parametrize("alias,name", [
    ("vit_b", "vit_base_patch16_224"), ("vit_s", "vit_small_patch16_224"), ("deit_t", "deit_tiny_patch16_224"),
    ("deit_s", "deit_small_patch16_224"), ("deit_b", "deit_base_patch16_224"),
    ("swin_t", "swin_tiny_patch4_window7_224"), ("mbv2", "mobilenetv2_100"), ("effnet_b0", "efficientnet_b0"),
    ("regnetx_600mf", "regnetx_006"), ("r18", "resnet18"), ("r50", "resnet50")])
def test_aliases_resolve(alias, name):
  assert models.canonical_name(alias) == name
  assert models.create(alias) == models.create(name)


def test_unknown_name_lists_known_models():
  with pytest.raises(ValueError) as e:
    models.create("vit_huge_nonexistent")
  for name in REGISTERED:
    assert name in str(e.value)


@pytest.mark.parametrize("name", REGISTERED)
def test_full_size_param_count_matches_timm(name):
  model = models.create(name)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)), train=False))
  assert sum(x.size for x in jax.tree.leaves(shapes["params"])) == TIMM_NUM_PARAMS[name]


@pytest.mark.parametrize("name", sorted(set(models.available())))
def test_small_variant_forward(name):
  model = models.create(name, num_classes=10, **models.small_kwargs(name, 28))
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 28, 28, 1)), jnp.float32)
  variables = random_variables(model, x)
  logits = jax.jit(lambda v, a: model.apply(v, a, train=False))(variables, x)
  assert logits.shape == (2, 10)
  assert np.all(np.isfinite(logits))
  assert float(jnp.abs(logits[0] - logits[1]).max()) > 0  # the two images are told apart


def test_quantizable_layers_are_plain_flax_layers():
  """Every weight lives in an nn.Dense or nn.Conv (what the quantization transform intercepts)."""
  seen = {}

  def record(next_fun, args, kwargs, context):
    seen[context.module.path] = type(context.module)
    return next_fun(*args, **kwargs)

  model = models.create("swin_t", num_classes=10, **models.small_kwargs("swin_t", 28))
  x = jnp.zeros((1, 28, 28, 3))
  variables = random_variables(model, x)
  with flax.linen.intercept_methods(record):
    jax.eval_shape(lambda v: model.apply(v, x), variables)
  kernels = [p[:-1] for p in flax.traverse_util.flatten_dict(variables["params"]) if p[-1] == "kernel"]
  assert kernels
  for path in kernels:
    assert seen[path] in (flax.linen.Dense, flax.linen.Conv), (path, seen[path])
  assert ("layers_0", "blocks_1", "attn", "qkv") in kernels


@pytest.mark.parametrize("shape", [(2, 17, 15, 8), (1, 16, 16, 3), (3, 1, 2, 4)])
def test_stem_max_pool_equals_the_reduce_window_in_value_and_gradient(shape):
  """The stem's pool as nine strided slices gives flax's reduce-window pool bit for bit, and its
  gradient (ties included: values clipped to one level) is the reduce-window's."""
  from flexiq_jax.models import layers
  import flax.linen as nn
  x = jnp.minimum(jnp.asarray(np.random.default_rng(len(shape)).normal(size=shape), jnp.float32), 0.5)
  window = lambda v: nn.max_pool(v, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  np.testing.assert_array_equal(layers.max_pool_3x3_s2(x), window(x))
  loss = lambda pool: lambda v: jnp.sum(pool(v) ** 2)
  np.testing.assert_array_equal(jax.grad(loss(layers.max_pool_3x3_s2))(x), jax.grad(loss(window))(x))


def test_residual_add_is_the_plain_sum_and_refuses_an_unknown_activation():
  from flexiq_jax.models import layers
  a, b = jnp.asarray([[-2.0, 1.0]]), jnp.asarray([[1.0, 0.5]])
  np.testing.assert_array_equal(layers.ResidualAdd().apply({}, a, b), a + b)
  np.testing.assert_array_equal(layers.ResidualAdd("relu").apply({}, a, b), jnp.maximum(a + b, 0))
  with pytest.raises(ValueError, match="unknown residual activation"):
    layers.ResidualAdd("gelu").apply({}, a, b)


def test_stem_max_pool_fuses_with_its_producer_into_one_pass():
  """The pool and the ReLU before it compile to one XLA fusion: no padded copy of the input is
  written out (XLA:CPU wrote one when the input was padded before slicing)."""
  from flexiq_jax.models import layers
  x = jnp.zeros((2, 16, 16, 8), jnp.float32)
  hlo = jax.jit(lambda v: layers.max_pool_3x3_s2(jax.nn.relu(v * 2.0))).lower(x).compile().as_text()
  assert hlo.count(" fusion(") == 1, hlo


def test_batchnorm_train_mode_updates_batch_stats():
  model = models.create("mbv2", num_classes=10, **models.small_kwargs("mbv2", 28))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 28, 28, 1)) * 3 + 1, jnp.float32)
  variables = random_variables(model, x)
  _, updates = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables)
  before = variables["batch_stats"]["bn1"]["mean"]
  assert not np.allclose(updates["batch_stats"]["bn1"]["mean"], before)


def test_swin_masks_and_index():
  from flexiq_jax.models import swin

  idx = swin.relative_position_index((2, 2))
  # Offsets (dh, dw) in [-1, 1]^2 map to (dh + 1) * 3 + (dw + 1).
  assert idx.tolist() == [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]]
  mask = swin.shifted_window_mask(8, 8, (4, 4), (2, 2))
  assert mask.shape == (4, 16, 16)
  assert not mask[0].any()  # the top-left window holds one region only
  assert (mask[3] == -100).any() and (np.diag(mask[3]) == 0).all()


# --------------------------------------------------------------------------------------------
# timm-format state dicts written with numpy.


def tiny_vit_state(embed=16, depth=2, heads=2, patch=8, image=16, classes=10, seed=0):
  rng = np.random.default_rng(seed)
  r = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.2  # noqa: E731
  g = (image // patch) ** 2
  sd = {"cls_token": r(1, 1, embed), "pos_embed": r(1, g + 1, embed),
        "patch_embed.proj.weight": r(embed, 3, patch, patch), "patch_embed.proj.bias": r(embed)}
  for i in range(depth):
    b = f"blocks.{i}."
    sd.update({b + "norm1.weight": 1 + r(embed), b + "norm1.bias": r(embed),
               b + "attn.qkv.weight": r(3 * embed, embed), b + "attn.qkv.bias": r(3 * embed),
               b + "attn.proj.weight": r(embed, embed), b + "attn.proj.bias": r(embed),
               b + "norm2.weight": 1 + r(embed), b + "norm2.bias": r(embed),
               b + "mlp.fc1.weight": r(4 * embed, embed), b + "mlp.fc1.bias": r(4 * embed),
               b + "mlp.fc2.weight": r(embed, 4 * embed), b + "mlp.fc2.bias": r(embed)})
  sd.update({"norm.weight": 1 + r(embed), "norm.bias": r(embed), "head.weight": r(classes, embed),
             "head.bias": r(classes)})
  return sd


TINY_VIT = dict(image_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2)


def tiny_resnet_state(widths=(4, 8, 8, 8), stem=8, classes=10, seed=0):
  """timm ResNet-18 layout with one BasicBlock per stage."""
  rng = np.random.default_rng(seed)
  r = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.2  # noqa: E731

  def bn(prefix, c):
    return {prefix + "weight": 1 + r(c), prefix + "bias": r(c), prefix + "running_mean": r(c),
            prefix + "running_var": 0.5 + np.abs(r(c)), prefix + "num_batches_tracked": np.array(7, np.int64)}

  sd = {"conv1.weight": r(stem, 3, 7, 7), **bn("bn1.", stem)}
  cin = stem
  for s, w in enumerate(widths):
    b = f"layer{s + 1}.0."
    sd.update({b + "conv1.weight": r(w, cin, 3, 3), **bn(b + "bn1.", w), b + "conv2.weight": r(w, w, 3, 3),
               **bn(b + "bn2.", w)})
    if s > 0 or cin != w:
      sd.update({b + "downsample.0.weight": r(w, cin, 1, 1), **bn(b + "downsample.1.", w)})
    cin = w
  sd.update({"fc.weight": r(classes, cin), "fc.bias": r(classes)})
  return sd


TINY_RESNET = dict(depths=(1, 1, 1, 1), widths=(4, 8, 8, 8), stem_width=8)


def write(tmp_path, sd, name="ckpt.safetensors"):
  path = str(tmp_path / name)
  save_file(sd, path)
  return path


def test_load_timm_maps_every_kind_of_leaf(tmp_path):
  sd = tiny_resnet_state()
  v = models.load_timm("resnet18", write(tmp_path, sd), **TINY_RESNET)
  p, bs = v["params"], v["batch_stats"]
  np.testing.assert_array_equal(p["conv1"]["kernel"], sd["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p["bn1"]["scale"], sd["bn1.weight"])
  np.testing.assert_array_equal(bs["layer2_0"]["downsample_bn"]["mean"], sd["layer2.0.downsample.1.running_mean"])
  np.testing.assert_array_equal(bs["layer2_0"]["downsample_bn"]["var"], sd["layer2.0.downsample.1.running_var"])
  np.testing.assert_array_equal(p["layer2_0"]["downsample_conv"]["kernel"][0, 0], sd["layer2.0.downsample.0.weight"][:, :, 0, 0].T)
  np.testing.assert_array_equal(p["fc"]["kernel"], sd["fc.weight"].T)
  assert "num_batches_tracked" not in str(jax.tree_util.tree_structure(v))
  model = models.create("resnet18", num_classes=10, **TINY_RESNET)
  out = model.apply(v, jnp.ones((1, 32, 32, 3)), train=False)
  assert out.shape == (1, 10) and np.all(np.isfinite(out))


def test_load_timm_vit_qkv_and_depthwise(tmp_path):
  sd = tiny_vit_state()
  v = models.load_timm("vit_b", write(tmp_path, sd), **TINY_VIT)["params"]
  np.testing.assert_array_equal(v["blocks_1"]["attn"]["qkv"]["kernel"], sd["blocks.1.attn.qkv.weight"].T)
  np.testing.assert_array_equal(v["pos_embed"], sd["pos_embed"])
  np.testing.assert_array_equal(v["blocks_0"]["norm1"]["scale"], sd["blocks.0.norm1.weight"])


def test_depthwise_kernel_layout(tmp_path):
  """A depthwise (C, 1, k, k) torch weight becomes (k, k, 1, C) for feature_group_count=C."""
  model = models.create("mbv2", num_classes=10, channel_multiplier=0.25, depth_multiplier=0.35)
  x = jnp.zeros((1, 32, 32, 3))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
  dw = shapes["params"]["blocks_1_0"]["conv_dw"]["kernel"].shape
  assert dw[:3] == (3, 3, 1)
  w = np.arange(dw[3] * 9, dtype=np.float32).reshape(dw[3], 1, 3, 3)
  assert timm_import._convert_array("kernel", w).shape == dw
  assert timm_import._convert_array("kernel", w)[1, 2, 0, 5] == w[5, 0, 1, 2]


@pytest.mark.parametrize("edit,kind,key", [
    (lambda sd: sd.pop("blocks.1.mlp.fc2.bias"), "missing in checkpoint", "blocks_1/mlp/fc2/bias"),
    (lambda sd: sd.update({"blocks.1.attn.extra.weight": np.zeros((2, 2), np.float32)}),
     "unexpected in checkpoint", "blocks.1.attn.extra.weight"),
    (lambda sd: sd.update({"blocks.0.mlp.fc1.weight": np.zeros((60, 16), np.float32)}),
     "shape mismatch", "blocks.0.mlp.fc1.weight"),
])
def test_load_timm_reports_bad_keys(tmp_path, edit, kind, key):
  sd = tiny_vit_state()
  edit(sd)
  with pytest.raises(ValueError) as e:
    models.load_timm("vit_s", write(tmp_path, sd), **TINY_VIT)
  msg = str(e.value)
  assert kind in msg and key in msg
  assert len(re.findall(r"\((\d+)\):", msg)) == 1  # only the one problem is reported


def test_load_timm_reports_all_problems_at_once(tmp_path):
  sd = tiny_resnet_state()
  sd.pop("layer3.0.bn2.running_var")
  sd["layer1.0.conv2.weight"] = np.zeros((4, 4, 5, 5), np.float32)
  sd["bogus.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as e:
    models.load_timm("r18", write(tmp_path, sd), **TINY_RESNET)
  msg = str(e.value)
  assert "batch_stats/layer3_0/bn2/var" in msg and "bogus.weight" in msg and "layer1.0.conv2.weight" in msg


def test_load_timm_keeps_or_replaces_the_classifier(tmp_path):
  sd = tiny_vit_state(classes=10)
  path = write(tmp_path, sd)
  kept = models.load_timm("deit_t", path, **TINY_VIT)["params"]
  np.testing.assert_array_equal(kept["head"]["kernel"], sd["head.weight"].T)
  same = models.load_timm("deit_t", path, num_classes=10, **TINY_VIT)["params"]
  np.testing.assert_array_equal(same["head"]["kernel"], sd["head.weight"].T)

  new = models.load_timm("deit_t", path, num_classes=3, **TINY_VIT)
  assert new["params"]["head"]["kernel"].shape == (16, 3)
  assert float(jnp.abs(new["params"]["head"]["kernel"]).max()) > 0  # freshly initialised, not zeros
  np.testing.assert_array_equal(new["params"]["blocks_0"]["attn"]["proj"]["kernel"], sd["blocks.0.attn.proj.weight"].T)
  model = models.create("deit_t", num_classes=3, **TINY_VIT)
  assert model.apply(new, jnp.ones((2, 16, 16, 3))).shape == (2, 3)

  bn = models.load_timm("r18", write(tmp_path, tiny_resnet_state(), "r.safetensors"), num_classes=4, **TINY_RESNET)
  assert bn["params"]["fc"]["kernel"].shape == (8, 4) and bn["params"]["fc"]["bias"].shape == (4,)


def test_load_timm_resizes_position_embedding(tmp_path):
  sd = tiny_vit_state(image=16, patch=8)  # 2x2 grid
  grid = np.stack(np.meshgrid(np.arange(2.0), np.arange(2.0), indexing="ij"), -1).reshape(1, 4, 2)
  sd["pos_embed"][:, 1:, :2] = grid  # a linear ramp in the first two features
  kwargs = {k: v for k, v in TINY_VIT.items() if k != "image_size"}  # the model's default is 224
  v = models.load_timm("vit_s", write(tmp_path, sd), image_size=32, **kwargs)["params"]
  pe = np.asarray(v["pos_embed"])
  assert pe.shape == (1, 17, 16)
  np.testing.assert_array_equal(pe[:, 0], sd["pos_embed"][:, 0])  # class token's entry kept
  rows = pe[0, 1:, 0].reshape(4, 4)
  assert np.all(np.diff(rows, axis=0) > 0) and np.allclose(rows, rows[:, :1], atol=1e-6)  # the ramp survives
  model = models.create("vit_s", num_classes=10, **{**TINY_VIT, "image_size": 32})
  assert model.apply({"params": v}, jnp.ones((1, 32, 32, 3))).shape == (1, 10)


def test_load_timm_same_size_resize_is_identity():
  pe = np.random.default_rng(0).standard_normal((1, 1 + 49, 8)).astype(np.float32)
  np.testing.assert_allclose(timm_import.resize_pos_embed(pe, 50), pe, atol=1e-6)


def test_load_timm_adapts_stem_to_grayscale(tmp_path):
  sd = tiny_vit_state()
  v = models.load_timm("vit_s", write(tmp_path, sd), in_chans=1, **TINY_VIT)["params"]
  np.testing.assert_allclose(v["patch_embed_proj"]["kernel"][..., 0, :],
                             sd["patch_embed.proj.weight"].sum(1).transpose(1, 2, 0), rtol=1e-6, atol=1e-6)


def test_load_timm_cnn_ignores_image_size(tmp_path):
  v = models.load_timm("r18", write(tmp_path, tiny_resnet_state()), image_size=28, **TINY_RESNET)
  assert v["params"]["fc"]["kernel"].shape == (8, 10)


def test_load_timm_pth_without_torch_says_so(tmp_path, monkeypatch):
  path = tmp_path / "model.pth"
  path.write_bytes(b"not a real pickle")
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
  with pytest.raises(ImportError, match="needs torch"):
    models.load_timm("r18", str(path))


def test_load_timm_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError):
    models.load_timm("r18", str(tmp_path / "nope.safetensors"))


def test_read_state_dict_widens_bfloat16(tmp_path):
  """bfloat16 checkpoints (numpy has no such dtype) are read as float32."""
  import json

  values = np.array([1.0, -2.5, 0.15625, 3.0e-3], np.float32)
  bf16 = (values.view(np.uint32) >> 16).astype("<u2")  # truncation: exact for the first three
  header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]},
                       "n": {"dtype": "I64", "shape": [], "data_offsets": [8, 16]}}).encode()
  path = tmp_path / "bf16.safetensors"
  path.write_bytes(len(header).to_bytes(8, "little") + header + bf16.tobytes() + np.int64(7).tobytes())
  expected = (bf16.astype(np.uint32) << 16).view(np.float32).reshape(2, 2)
  for sd in (timm_import.read_state_dict(str(path)),):
    assert sd["w"].dtype == np.float32 and sd["n"] == 7
    np.testing.assert_array_equal(sd["w"], expected)
    np.testing.assert_array_equal(sd["w"].ravel()[:3], values[:3])


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, "SAME"), (3, 2, "SAME"), (5, 2, "SAME"),
                                                   (3, 2, ((1, 1), (1, 1))), (5, 1, ((2, 2), (2, 2)))])
def test_depthwise_conv_as_taps_equals_lax(kernel, stride, padding):
  """layers.depthwise_conv_general_dilated (the models' depthwise convs) = lax's grouped conv,
  value and gradients, on even and odd sizes."""
  from jax import lax
  from flexiq_jax.models import layers

  rng = np.random.default_rng(kernel * 10 + stride)
  for size in (10, 9):
    x = jnp.asarray(rng.standard_normal((2, size, size + 1, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((kernel, kernel, 1, 6)), jnp.float32)
    ref = lambda a, b: lax.conv_general_dilated(a, b, (stride, stride), padding, dimension_numbers=layers._NHWC,
                                                feature_group_count=6)
    ours = lambda a, b: layers.depthwise_conv_general_dilated(a, b, (stride, stride), padding,
                                                              dimension_numbers=layers._NHWC, feature_group_count=6)
    np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
    loss = lambda f: (lambda a, b: jnp.sum(jnp.sin(f(a, b))))
    for g_ours, g_ref in zip(jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(ref), (0, 1))(x, w)):
      np.testing.assert_allclose(g_ours, g_ref, rtol=1e-4, atol=1e-4)
  # A conv that is not depthwise goes to lax unchanged.
  w = jnp.asarray(rng.standard_normal((3, 3, 3, 6)), jnp.float32)
  np.testing.assert_array_equal(
      layers.depthwise_conv_general_dilated(x, w, (1, 1), "SAME", feature_group_count=2,
                                            dimension_numbers=layers._NHWC),
      lax.conv_general_dilated(x, w, (1, 1), "SAME", feature_group_count=2, dimension_numbers=layers._NHWC))


def test_every_architecture_has_a_spec_a_config_and_a_timm_mapping():
  """Adding an architecture = its module (constructor + ModelSpec) and its config: every list of
  models derives from the specs."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  assert {s.name for s in models.specs()} == set(models.available()) - {"resnet_small"}
  assert len(models.specs()) >= 11
  for s in models.specs():
    assert os.path.exists(os.path.join(root, "configs", f"{s.config}.py")), s
    assert s.timm_family in timm_import._FAMILIES and (s.timm_tag == s.name or s.timm_tag.startswith(s.name + ".")), s
    assert models.spec(s.name) is s
  with pytest.raises(ValueError, match="has no ModelSpec"):
    models.spec("resnet_small")

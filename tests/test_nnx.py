"""Flax NNX models through the linen interception (flexiq_jax/interception_nnx.py) and models
whose call signature differs (flexiq_jax/adapt.py): a small NNX CNN and a small NNX ViT quantize,
calibrate, select, finetune and serve as linen models do, every ratio from one compilation, the
integer path on int8 operands and equal to the reference and (within rounding) to fake quant."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flexiq_jax
from flexiq_jax import finetune as finetune_lib
from flexiq_jax import interception
from flexiq_jax import interception_nnx
from flexiq_jax import quantize
from flexiq_jax.models.layers import NNXAttentionMatmul
from flexiq_jax.serve import count_compilations


class NNXCNN(nnx.Module):
  """conv-BN-ReLU x 3 (one depthwise), global pooling, a linear head."""

  def __init__(self, rngs: nnx.Rngs, classes: int = 10):
    self.stem = nnx.Conv(1, 8, (3, 3), use_bias=False, rngs=rngs)
    self.bn0 = nnx.BatchNorm(8, rngs=rngs)
    self.dw = nnx.Conv(8, 8, (3, 3), feature_group_count=8, use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(8, rngs=rngs)
    self.pw = nnx.Conv(8, 16, (1, 1), strides=2, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(16, classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn0(self.stem(x)))
    x = nnx.relu(self.bn1(self.dw(x)))
    x = nnx.relu(self.pw(x))
    return self.head(self.dropout(x.mean((1, 2))))


class Block(nnx.Module):
  def __init__(self, dim: int, heads: int, rngs: nnx.Rngs):
    self.heads = heads
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
    self.qk = NNXAttentionMatmul("bqhd,bkhd->bhqk")
    self.av = NNXAttentionMatmul("bhqk,bkhd->bqhd")
    self.proj = nnx.Linear(dim, dim, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.fc1 = nnx.Linear(dim, 2 * dim, rngs=rngs)
    self.fc2 = nnx.Linear(2 * dim, dim, rngs=rngs)

  def __call__(self, x):
    b, n, d = x.shape
    q, k, v = jnp.split(self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads), 3, axis=2)
    attn = jax.nn.softmax(self.qk(q[:, :, 0], k[:, :, 0]) / np.sqrt(d // self.heads), axis=-1)
    x = x + self.proj(self.av(attn, v[:, :, 0]).reshape(b, n, d))
    return x + self.fc2(nnx.gelu(self.fc1(self.norm2(x))))


class NNXViT(nnx.Module):
  """Patch embedding (a 4x4 conv), a class token, position embeddings, two blocks, a head."""

  def __init__(self, rngs: nnx.Rngs, dim: int = 16, classes: int = 10, tokens: int = 16):
    self.patch = nnx.Conv(1, dim, (4, 4), strides=4, padding="VALID", rngs=rngs)
    self.cls = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, dim)))
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, tokens + 1, dim)))
    self.blocks = nnx.List([Block(dim, 2, rngs) for _ in range(2)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, classes, rngs=rngs)

  def __call__(self, x):
    x = self.patch(x)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    x = jnp.concatenate([jnp.broadcast_to(self.cls[...], (x.shape[0], 1, x.shape[-1])), x], axis=1) + self.pos[...]
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x)[:, 0])


def _images(n, size, seed=0):
  return np.random.default_rng(seed).uniform(0, 1, (n, size, size, 1)).astype(np.float32)


def _randomise_batch_stats(model):
  """Running statistics away from (0, 1), so that folding them changes something."""
  for i, (_, bn) in enumerate((p, m) for p, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)):
    key = jax.random.PRNGKey(10 + i)
    bn.mean.set_value(0.1 * jax.random.normal(key, bn.mean.get_value().shape))
    bn.var.set_value(0.5 + jax.random.uniform(jax.random.fold_in(key, 1), bn.var.get_value().shape))


@pytest.fixture(scope="module", params=["cnn", "vit"])
def nnx_case(request):
  if request.param == "cnn":
    model = NNXCNN(nnx.Rngs(0))
    _randomise_batch_stats(model)
    size = 12
  else:
    model = NNXViT(nnx.Rngs(0))
    size = 16
  images = _images(48, size)
  qmodel, qvars = flexiq_jax.quantize_model(model, images, levels=(0.5, 1.0), population=4, generations=1,
                                            fitness_images=16, calib_batch_size=16)
  return request.param, model, images, qmodel, qvars


def test_linen_form_computes_the_nnx_model(nnx_case):
  kind, model, images, qmodel, _ = nnx_case
  linen_model, variables = interception_nnx.to_linen(model)
  model.eval()
  np.testing.assert_allclose(linen_model.apply(variables, images[:4], train=False), model(images[:4]),
                             rtol=1e-5, atol=1e-6)
  t = interception.trace(linen_model, variables, images.shape[1:])
  if kind == "cnn":
    assert list(t.layers) == ["stem", "dw", "pw", "head"] and t.foldable_bn == {"bn0": "stem", "bn1": "dw"}
    assert t.layers["dw"].groups == 8
  else:
    assert list(t.layers)[:5] == ["patch", "blocks.0.qkv", "blocks.0.proj", "blocks.0.fc1", "blocks.0.fc2"]
    assert list(t.matmuls) == ["blocks.0.qk", "blocks.0.av", "blocks.1.qk", "blocks.1.av"]
  assert set(qmodel.plan.quantized) == set(t.layers) and qmodel.plan.lowerable
  with pytest.raises(NotImplementedError, match="evaluation mode only"):
    linen_model.apply(variables, images[:2], train=True)


def _int8_layer_ops(qmodel, qvars, images):
  closed = jax.make_jaxpr(lambda q, x: qmodel.apply(q, x, 0.5))(qvars, images)
  ops = []

  def walk(jaxpr):
    for e in jaxpr.eqns:
      if e.primitive.name in ("dot_general", "conv_general_dilated"):
        ops.append(tuple(str(v.aval.dtype) for v in e.invars))
      for sub in jax.core.subjaxprs(e) if hasattr(jax.core, "subjaxprs") else ():
        walk(sub)
      for p in e.params.values():
        if hasattr(p, "jaxpr"):
          walk(p.jaxpr if hasattr(p.jaxpr, "eqns") else p.jaxpr.jaxpr)
  walk(closed.jaxpr)
  return ops


def test_int_path_equals_reference_and_fake_and_serves_every_ratio_from_one_compilation(nnx_case):
  kind, model, images, qmodel, qvars = nnx_case
  x = images[:8]
  conv_int8 = dataclasses.replace(qmodel, conv_impls="int8")
  reference = jax.jit(qmodel.with_mode("int_reference").apply)
  fake = jax.jit(qmodel.with_mode("fake").apply)
  predict = flexiq_jax.make_predict(conv_int8, qvars)
  out = {0.0: np.asarray(predict(x, 0.0))}  # compiles the model (and the serving contract's input check)
  with count_compilations() as compiled:
    out.update({r: np.asarray(predict(x, r)) for r in (0.3, 0.5, 0.77, 1.0)})
  assert compiled.count == 0  # the ratio is data: no compilation when it changes
  for r, logits in out.items():
    ref = np.asarray(reference(qvars, x, r))
    np.testing.assert_allclose(logits, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())  # same integers
    f = np.asarray(fake(qvars, x, r))
    np.testing.assert_allclose(logits, f, atol=2e-3 * np.abs(f).max())
  assert not np.allclose(out[0.0], out[1.0])
  # Every quantized layer and matmul is one int8 (or uint8) x int8 dot/conv in the integer path.
  ops = [o for o in _int8_layer_ops(conv_int8, qvars, x) if o != ("int32", "int32")]
  assert len(ops) == len(qmodel.plan.quantized) + len(qmodel.plan.quantized_matmuls)
  assert all(set(o) <= {"int8", "uint8"} for o in ops), ops
  # Closer to the float NNX model at 8 bits than with every lowerable channel at 4 bits.
  model.eval()
  float_logits = np.asarray(model(x))
  assert np.abs(out[0.0] - float_logits).max() < np.abs(out[1.0] - float_logits).max()


def test_nnx_model_finetunes_and_exports(nnx_case, tmp_path):
  kind, model, images, qmodel, qvars = nnx_case
  fake = qmodel.with_mode("fake")
  tx = optax.sgd(1e-3)
  sampler = finetune_lib.RatioSampler((0.0, 0.5, 1.0), (1 / 3,) * 3)
  state = finetune_lib.create_state(qvars, tx, lsq=False)
  step = jax.jit(lambda s, b: finetune_lib.qat_step(s, b, qmodel=fake, tx=tx, sampler=sampler,
                                                     rng_key=jax.random.PRNGKey(0)))
  batch = {"image": images[:16], "label": np.arange(16) % 10}
  for _ in range(2):
    state, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  tuned = finetune_lib.merge_qvars(state.trainable, state.frozen)
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), tuned["params"], qvars["params"])
  assert max(jax.tree_util.tree_leaves(moved)) > 0
  served = quantize.export_int8(qmodel, tuned)
  np.testing.assert_array_equal(np.asarray(qmodel.apply(served, images[:4], 0.5)),
                                np.asarray(qmodel.apply(tuned, images[:4], 0.5)))
  exported = flexiq_jax.export_portable(qmodel, tuned, str(tmp_path / "export"), images.shape[1:])
  logits = flexiq_jax.load_portable(exported.directory).call(images[:4], np.float32(0.5))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(qmodel.apply(tuned, images[:4], 0.5)), rtol=1e-5,
                             atol=1e-5)


def test_nnx_call_fn_and_linen_models_without_train_keyword():
  images = _images(32, 12)
  model = NNXCNN(nnx.Rngs(1))
  calls = []

  def call(module, x):
    calls.append(x.shape)
    return module(x) * 2.0

  qmodel, qvars = flexiq_jax.quantize_model(model, images, apply_fn=call, levels=(1.0,), selector="greedy")
  model.eval()
  np.testing.assert_allclose(qmodel.with_mode("fake").apply(qvars, images[:2], 0.0) / 2.0, model(images[:2]),
                             atol=0.1 * float(jnp.abs(model(images[:2])).max()))
  assert calls

  class NoTrain(nn.Module):  # a linen model whose __call__ has no train keyword
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(8, (3, 3))(x))
      return nn.Dense(10)(nn.Dense(16)(x.mean((1, 2))))

  net = NoTrain()
  variables = net.init(jax.random.PRNGKey(0), images[:1])
  qmodel, qvars = flexiq_jax.quantize_model(net, variables, images, levels=(1.0,), selector="greedy")
  ref = net.apply(variables, images[:4])
  out = qmodel.apply(qvars, images[:4], 0.0)
  np.testing.assert_allclose(out, ref, atol=0.05 * float(jnp.abs(ref).max()))
  # ... or a user-given apply function, e.g. for a keyword the model needs.
  qmodel2, _ = flexiq_jax.quantize_model(net, variables, images, levels=(1.0,), selector="greedy",
                                         apply_fn=lambda v, x: net.apply(v, x))
  assert qmodel2.plan.quantized == qmodel.plan.quantized
  with pytest.raises(TypeError, match="holds its own state"):
    flexiq_jax.quantize_model(model, {"params": {}}, images)
  with pytest.raises(TypeError, match="needs its variables"):
    flexiq_jax.quantize_model(net, images)


def test_nnx_multi_head_attention_projections_are_quantized_and_its_einsums_reported():
  """nnx.MultiHeadAttention's nnx.LinearGeneral projections go through the interception as
  linen DenseGeneral layers; its two attention einsums are plain jnp code and stay float, listed."""

  class Tiny(nnx.Module):
    def __init__(self, rngs):
      self.patch = nnx.Conv(1, 16, (4, 4), strides=4, padding="VALID", rngs=rngs)
      self.norm = nnx.LayerNorm(16, rngs=rngs)
      self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=16, decode=False, rngs=rngs)
      self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
      x = self.patch(x)
      x = x.reshape(x.shape[0], -1, x.shape[-1])
      return self.head((x + self.attn(self.norm(x))).mean(1))

  model = Tiny(nnx.Rngs(0))
  images = _images(32, 16)
  qmodel, qvars = flexiq_jax.quantize_model(model, images, levels=(1.0,), selector="greedy")
  assert qmodel.plan.lowerable == ["attn.query", "attn.key", "attn.value", "attn.out"]
  assert qmodel.plan.layers["attn.out"].contracted_axes == 2  # heads x head_dim -> features
  float_ops = quantize.float_ops_in_int_path(qmodel, qvars, images[:2])
  assert len(float_ops) == 2  # q·kᵀ and attn·v inside nnx.dot_product_attention
  model.eval()
  ref = np.asarray(model(images[:4]))
  np.testing.assert_allclose(qmodel.apply(qvars, images[:4], 0.0), ref, atol=0.1 * np.abs(ref).max())

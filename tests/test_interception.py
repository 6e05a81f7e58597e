"""flexiq_jax.interception: tracing (LayerInfo, MatmulInfo, foldable BatchNorms, epsilons), the
geometry every provider shares (LayerCall.float_forward), run_with_provider (layers and matmuls)
and the nested-dict path helpers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexiq_jax import interception, quantize
from flexiq_jax.interception import FloatLayers, LayerCall
from flexiq_jax.models.layers import AttentionMatmul


class Tiny(nn.Module):
  """Hand-countable: conv 3x3 (3->8) on 8x8, depthwise 3x3 stride 2, grouped 1x1, tokens dense."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), name="conv")(x)          # 8*8 * 3*8*9
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    x = nn.Conv(8, (3, 3), strides=2, padding=((1, 1), (1, 1)), feature_group_count=8, name="dw")(x)  # 4*4 * 8*9
    x = nn.Conv(4, (1, 1), feature_group_count=2, name="grouped")(x)          # 4*4 * 8*4/2
    x = nn.BatchNorm(use_running_average=True, name="late_bn")(nn.relu(x))    # reads a ReLU: not foldable
    x = x.reshape(x.shape[0], 16, 4)                                          # 16 tokens
    x = nn.DenseGeneral((2, 3), name="qkv_like")(x)                           # 16 * 4*6
    x = nn.DenseGeneral(5, axis=(-2, -1), name="proj")(x)                     # 16 * 6*5
    return nn.Dense(10, name="head")(x.mean(1))                               # 5*10


class BNNet(nn.Module):
  """Two conv+BN pairs (one conv without bias), a strided 'SAME' conv and a dense head."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(6, (3, 3), padding="SAME", use_bias=False, name="c1")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(x))
    x = nn.Conv(8, (3, 3), strides=2, padding="SAME", name="c2")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, epsilon=1e-3, name="bn2")(x))
    return nn.Dense(4, name="head")(x.mean(axis=(1, 2)))


class Shared(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    dense = nn.Dense(4, name="shared")
    return dense(dense(x))


def _init(model, shape, seed=0):
  return model.init(jax.random.PRNGKey(seed), jnp.zeros((1,) + shape))


def _with_random_bn_stats(variables, seed=0):
  """Non-trivial BatchNorm statistics (and scales/offsets), so folding is really exercised."""
  rng = np.random.default_rng(seed)
  rand = lambda lo, hi, like: jnp.asarray(rng.uniform(lo, hi, like.shape), jnp.float32)
  params = dict(variables["params"])
  stats = {}
  for name, s in variables["batch_stats"].items():
    stats[name] = {"mean": rand(-0.3, 0.3, s["mean"]), "var": rand(0.3, 2.0, s["var"])}
    params[name] = {"scale": rand(0.5, 1.5, params[name]["scale"]), "bias": rand(-0.2, 0.2, params[name]["bias"])}
  return {"params": params, "batch_stats": stats}


# -- trace -----------------------------------------------------------------------------------------

def test_trace_layer_infos_against_hand_count():
  model = Tiny()
  traced = interception.trace(model, _init(model, (8, 8, 3)), (8, 8, 3))
  layers = traced.layers
  expected = {"conv": 64 * 3 * 8 * 9, "dw": 16 * 8 * 9, "grouped": 16 * 8 * 4 // 2,
              "qkv_like": 16 * 4 * 6, "proj": 16 * 6 * 5, "head": 5 * 10}
  assert {p: i.macs for p, i in layers.items()} == expected
  assert list(layers) == list(expected)  # call order
  assert [i.order for i in layers.values()] == list(range(6))
  assert layers["dw"].groups == 8 and layers["dw"].in_channels == 8
  assert layers["proj"].in_channels == 6 and layers["qkv_like"].out_channels == 6
  assert layers["proj"].contracted_axes == 2 and layers["qkv_like"].contracted_axes == 1
  assert layers["conv"].kind == "conv" and layers["head"].kind == "dense"
  assert layers["conv"].kernel_shape == (3, 3, 3, 8) and layers["dw"].kernel_shape == (3, 3, 1, 8)
  assert layers["dw"].input_shape == (1, 8, 8, 8) and layers["dw"].output_shape == (1, 4, 4, 8)
  assert layers["qkv_like"].output_shape == (1, 16, 2, 3)
  assert {p: i.positions for p, i in layers.items()} == {"conv": 64, "dw": 16, "grouped": 16, "qkv_like": 16,
                                                         "proj": 16, "head": 1}
  assert layers["conv"].macs_per_channel == 64 * 8 * 9  # 4608 MACs per input channel
  assert layers["grouped"].macs_per_channel == 256 / 8
  # Only the BatchNorm reading a conv output directly folds; every BatchNorm's epsilon is recorded.
  assert traced.foldable_bn == {"bn": "conv"}
  assert traced.bn_epsilon == {"bn": pytest.approx(1e-3), "late_bn": pytest.approx(1e-5)}


def test_trace_rejects_a_layer_called_twice():
  model = Shared()
  with pytest.raises(NotImplementedError, match="called twice"):
    interception.trace(model, _init(model, (4,)), (4,))


class Attn(nn.Module):
  """Tokens -> Dense -> one attention-like matmul pair (AttentionMatmul) -> Dense head."""

  shared: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(6, name="qkv")(x).reshape(x.shape[0], x.shape[1], 2, 3)  # (B, N=5, heads=2, 3)
    qk = AttentionMatmul("bqhd,bkhd->bhqk", name="qk")
    attn = jax.nn.softmax(qk(x, x), axis=-1)  # (B, 2, 5, 5)
    if self.shared:
      attn = qk(x, x)
    y = AttentionMatmul("bhqk,bkhd->bqhd", name="av")(attn, x)  # (B, 5, 2, 3)
    return nn.Dense(4, name="head")(y.reshape(y.shape[0], -1))


def test_trace_records_matmuls_apart_from_layers():
  model = Attn()
  traced = interception.trace(model, _init(model, (5, 4)), (5, 4))
  assert list(traced.layers) == ["qkv", "head"]
  assert list(traced.matmuls) == ["qk", "av"]
  qk, av = traced.matmuls["qk"], traced.matmuls["av"]
  assert (qk.a_shape, qk.b_shape, qk.output_shape) == ((1, 5, 2, 3), (1, 5, 2, 3), (1, 2, 5, 5))
  assert (av.a_shape, av.output_shape, av.order) == ((1, 2, 5, 5), (1, 5, 2, 3), 1)
  # Output elements per example x summed size: heads·N·N x head_dim, and heads·N·head_dim x N.
  assert (qk.summed_size, qk.macs) == (3, 2 * 5 * 5 * 3)
  assert (av.summed_size, av.macs) == (5, 2 * 5 * 3 * 5)
  assert interception.einsum_summed_size("ij,jk->ik", (2, 7), (7, 3)) == 7
  with pytest.raises(NotImplementedError, match="ellipses"):
    interception.einsum_summed_size("...j,jk->...k", (2, 7), (7, 3))
  with pytest.raises(NotImplementedError, match="called twice"):
    interception.trace(Attn(shared=True), _init(Attn(shared=True), (5, 4)), (5, 4))


def test_run_with_provider_hands_planned_matmuls_to_the_provider():
  model = Attn()
  variables = _init(model, (5, 4))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 4))
  plan = quantize.build_plan(model, variables, (5, 4))
  assert plan.quantized_matmuls == ["qk", "av"]

  class Doubling:
    def __init__(self):
      self.calls = []

    def layer(self, call, x):
      return call.float_forward(x)

    def matmul(self, call, a, b):
      self.calls.append((call.path, call.info.equation, a.shape, b.shape))
      return 2 * call.float_forward(a, b)

  ref = model.apply(variables, x)
  np.testing.assert_array_equal(interception.run_with_provider(model, plan, variables, x, FloatLayers()), ref)
  doubling = Doubling()
  out = interception.run_with_provider(model, plan, variables, x, doubling)
  assert [c[0] for c in doubling.calls] == ["qk", "av"] and doubling.calls[1][2] == (2, 2, 5, 5)
  assert not np.allclose(out, ref)
  # Only the matmuls in matmul_paths (default plan.quantized_matmuls) reach the provider.
  doubling = Doubling()
  interception.run_with_provider(model, plan, variables, x, doubling, matmul_paths=["av"])
  assert [c[0] for c in doubling.calls] == ["av"]
  float_plan = quantize.build_plan(model, variables, (5, 4), attention="float")
  doubling = Doubling()
  np.testing.assert_array_equal(interception.run_with_provider(model, float_plan, variables, x, doubling), ref)
  assert doubling.calls == []


def test_sample_input_is_abstract():
  s = interception.sample_input((8, 8, 3), batch=2)
  assert isinstance(s, jax.ShapeDtypeStruct) and s.shape == (2, 8, 8, 3) and s.dtype == jnp.float32


# -- geometry --------------------------------------------------------------------------------------

def _module_calls(model, variables, x):
  """{path: (module, input, output)} of every quantizable call, from the model's own apply."""
  seen = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and isinstance(context.module, interception.QUANTIZABLE):
      seen[interception.path_str(context.module)] = (context.module, args[0], out)
    return out

  with nn.intercept_methods(interceptor):
    model.apply(variables, x, train=False)
  return seen


def test_float_forward_reproduces_every_layer_and_accepts_another_kernel():
  model = Tiny()
  variables = _init(model, (8, 8, 3))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
  layers = interception.trace(model, variables, (8, 8, 3)).layers
  calls = _module_calls(model, variables, x)
  assert set(calls) == set(layers)
  for path, (module, inp, out) in calls.items():
    p = interception.get_path(variables["params"], path)
    call = LayerCall(layers[path], module, p["kernel"], p.get("bias"))
    assert call.path == path
    np.testing.assert_allclose(call.float_forward(inp), out, rtol=1e-5, atol=1e-5, err_msg=path)
    # The layer is linear in its kernel: doubling the kernel doubles everything but the bias.
    doubled = call.float_forward(inp, kernel=2 * p["kernel"])
    np.testing.assert_allclose(doubled, 2 * out - p["bias"], rtol=1e-4, atol=1e-4, err_msg=path)


def test_matrix_views_of_dense_general_inputs_and_kernels():
  model = Tiny()
  layers = interception.trace(model, _init(model, (8, 8, 3)), (8, 8, 3)).layers
  proj, conv = layers["proj"], layers["conv"]
  x = jnp.arange(2 * 16 * 2 * 3, dtype=jnp.float32).reshape(2, 16, 2, 3)
  assert interception.as_matrix_input(proj, x).shape == (2, 16, 6)
  np.testing.assert_array_equal(interception.as_matrix_input(proj, x)[1, 3], x[1, 3].reshape(-1))
  assert interception.flat_features(proj, x).shape == (32, 6)
  img = jnp.ones((2, 8, 8, 3))
  assert interception.as_matrix_input(conv, img) is img  # convs keep NHWC
  assert interception.flat_features(conv, img).shape == (128, 3)
  assert interception.kernel_matrix(proj, jnp.zeros((2, 3, 5))).shape == (6, 5)
  assert interception.kernel_matrix(layers["qkv_like"], jnp.zeros((4, 2, 3))).shape == (4, 6)
  assert interception.kernel_matrix(conv, jnp.zeros((3, 3, 3, 8))).shape == (3, 3, 3, 8)


def test_conv_padding_forms():
  same = nn.Conv(4, (3, 3), strides=2, padding="SAME")
  # 'SAME' at stride 2 on an even size pads (0, 1), as XLA does (not PyTorch's symmetric 1).
  assert [tuple(p) for p in interception.conv_padding(same, (1, 8, 8, 3), (3, 3, 3, 4))] == [(0, 1), (0, 1)]
  assert interception.conv_padding(nn.Conv(4, (3, 3), padding=2), (1, 8, 8, 3), (3, 3, 3, 4)) == [(2, 2)] * 2
  assert interception.conv_padding(nn.Conv(4, (3, 3), padding=((1, 2), (0, 1))), (1, 8, 8, 3),
                                   (3, 3, 3, 4)) == [(1, 2), (0, 1)]
  with pytest.raises(NotImplementedError, match="circular"):
    circular = nn.Conv(4, (3, 3), padding="CIRCULAR").bind({"params": {}})  # bound: the error names its path
    interception.conv_padding(circular, (1, 8, 8, 3), (3, 3, 3, 4))


# -- run_with_provider -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bn_net():
  model = BNNet()
  variables = _with_random_bn_stats(_init(model, (6, 6, 3)))
  plan = quantize.build_plan(model, variables, (6, 6, 3))
  images = jax.random.normal(jax.random.PRNGKey(2), (4, 6, 6, 3))
  return model, variables, plan, quantize.fold_batchnorm(variables, plan), images


class Counting:
  """A provider that computes layers in float and counts its calls per layer."""

  def __init__(self):
    self.calls = []

  def layer(self, call, x):
    self.calls.append(call.path)
    assert x.shape[1:] == call.info.input_shape[1:]
    return call.float_forward(x)


def test_float_provider_on_folded_variables_equals_the_model(bn_net):
  model, variables, plan, folded, images = bn_net
  assert plan.folded_bn == {"bn1": "c1", "bn2": "c2"}
  assert plan.bn_epsilon == {"bn1": pytest.approx(1e-5), "bn2": pytest.approx(1e-3)}
  ref = model.apply(variables, images, train=False)
  assert float(jnp.std(ref)) > 1e-3
  out = interception.run_with_provider(model, plan, folded, images, FloatLayers())
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  # Unfolded variables are not what the interception expects: the folded BNs are bypassed.
  unfolded = interception.run_with_provider(model, plan, variables, images, FloatLayers())
  assert not np.allclose(unfolded, ref, atol=1e-3)


def test_provider_is_called_once_per_quantized_layer(bn_net):
  model, variables, plan, folded, images = bn_net
  ref = model.apply(variables, images, train=False)
  counting = Counting()
  out = interception.run_with_provider(model, plan, folded, images, counting)
  assert counting.calls == plan.quantized == ["c1", "c2", "head"]
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  # A subset of paths: only those reach the provider; a folded conv outside it still gets its
  # folded bias (the model output is unchanged).
  counting = Counting()
  out = interception.run_with_provider(model, plan, folded, images, counting, paths=["head"])
  assert counting.calls == ["head"]
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  # Skipped layers are not targets.
  skip_plan = quantize.build_plan(model, variables, (6, 6, 3), skip=("c2",))
  counting = Counting()
  interception.run_with_provider(model, skip_plan, folded, images, counting)
  assert counting.calls == ["c1", "head"]


def test_the_provider_output_is_what_the_layer_returns(bn_net):
  model, variables, plan, folded, images = bn_net

  class ZeroHead:
    def layer(self, call, x):
      y = call.float_forward(x)
      return jnp.zeros_like(y) if call.path == "head" else y

  out = interception.run_with_provider(model, plan, folded, images, ZeroHead())
  np.testing.assert_array_equal(out, np.zeros((4, 4)))


# -- nested-dict paths -----------------------------------------------------------------------------

def test_get_set_and_flatten_paths():
  tree = {"a": {"b": {"c": 1, "d": 2}}, "e": 3}
  assert interception.get_path(tree, "a/b/c") == 1 and interception.get_path(tree, "e") == 3
  new = interception.set_path(tree, "a/b/c", 10)
  assert new["a"]["b"] == {"c": 10, "d": 2} and tree["a"]["b"]["c"] == 1  # functional
  assert new["e"] == 3
  created = interception.set_path(tree, "x/y", 4)
  assert created["x"] == {"y": 4} and "x" not in tree
  assert interception.flatten_paths(new) == {"a/b/c": 10, "a/b/d": 2, "e": 3}
  assert interception.flatten_paths({}) == {}


def test_depthwise_conv_of_float_operands_is_computed_as_taps_and_equals_xla():
  """A depthwise conv on float operands (the QAT and calibration forward) sums k*k taps, not
  XLA's grouped conv, with the same result; integer accumulation keeps XLA's conv."""
  module = nn.Conv(8, (3, 3), strides=2, padding="SAME", feature_group_count=8)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 8))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 1, 8))
  padding = interception.conv_padding(module, x.shape, kernel.shape)
  want = jax.lax.conv_general_dilated(x, kernel, (2, 2), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=8)
  np.testing.assert_allclose(interception.conv(module, x, kernel, padding), want, rtol=1e-5, atol=1e-5)
  grouped = lambda f, *a: [e for e in jax.make_jaxpr(f)(*a).jaxpr.eqns
                           if e.primitive.name == "conv_general_dilated" and e.params["feature_group_count"] > 1]
  assert not grouped(lambda a, b: interception.conv(module, a, b, padding), x, kernel)
  xi, ki = jnp.round(x * 20).astype(jnp.int8), jnp.round(kernel * 20).astype(jnp.int8)
  assert grouped(lambda a, b: interception.conv(module, a, b, padding, preferred=jnp.int32), xi, ki)

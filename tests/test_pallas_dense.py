"""The fused Pallas dense kernels (quantize/pallas_dense.py), run in Pallas interpret mode on CPU,
against `integer.integer_forward`: bit-identical outputs (signed and unsigned inputs, lowered
counts from none to all, shapes that are not block multiples), and the packed rows' round trip.

The reference is integer_forward under jit, as it serves: XLA:CPU contracts its epilogue's
`acc * scale + bias` into a fused multiply-add inside a jitted fusion (so eagerly it rounds the
last bit differently), and the interpret-mode kernel is compiled the same way. Every function is
jitted once at module level with the layer as an argument, so the tests share compilations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexiq_jax.interception import LayerCall, LayerInfo
from flexiq_jax.quantize import integer, pallas_dense
from flexiq_jax.serve.server import count_compilations

M, C, O = 21, 75, 40  # no multiple of the blocks below
BLOCK_M, BLOCK_N = 16, 16
BLOCK_K = 32  # < C / 2: counts fall in whole lowered blocks, a mixed block and whole 8-bit blocks
COUNTS = (0, 5, BLOCK_K, BLOCK_K + 7, 2 * BLOCK_K, C)


def dense_info(c, o):
  return LayerInfo("dense", "dense", 0, c, o, 1, (c, o), (1, c), (1, o), 1)


@jax.jit
def prepare(params, lq):
  c, o = params["kernel"].shape
  return integer.prepare_layer(dense_info(c, o), params, lq, lowerable=True)


@functools.partial(jax.jit, static_argnames=("signed",))
def reference(x, entry, kernel, bias, lowered, *, signed):
  c, o = kernel.shape
  return integer.integer_forward(LayerCall(dense_info(c, o), None, kernel, bias), x, entry, lowered, signed=signed)


@functools.partial(jax.jit, static_argnames=("signed",))
def fused(x, entry, kernel, bias, lowered, *, signed):
  return pallas_dense.fused_dense(x, entry, kernel, bias, lowered, signed=signed, interpret=True, block_m=BLOCK_M,
                                  block_n=BLOCK_N, block_k=BLOCK_K)


@functools.partial(jax.jit, static_argnames=("signed",))
def fused_packed(x, entry, packed, bias, count, *, signed):
  return pallas_dense.fused_dense_packed(x, entry, packed, bias, count, signed=signed, interpret=True,
                                         block_m=BLOCK_M)


pack = jax.jit(functools.partial(pallas_dense.pack_lowered_rows, block_k=BLOCK_K, block_n=BLOCK_N))


def make_layer(seed, *, signed, lost=True, bias=True):
  """(entry, kernel, bias, x, weight_e) of a random dense layer in serving form (prepare_layer)."""
  rng = np.random.default_rng(seed)
  kernel = rng.normal(size=(C, O)).astype(np.float32) * rng.uniform(0.2, 2.0, size=(C, 1)).astype(np.float32)
  lq = {"act_scale": jnp.float32(0.037), "act_e": jnp.asarray(rng.integers(0, 5, C), jnp.int32),
        "weight_e": jnp.asarray(rng.integers(0, 5, C), jnp.int32),
        "rank": jnp.asarray(rng.permutation(C), jnp.int32)}
  if lost:
    lq["mean_code"] = jnp.asarray(rng.uniform(-20, 60, C), jnp.float32)
    lq["mean_lowered"] = lq["mean_code"] + jnp.asarray(rng.normal(size=C), jnp.float32)
  params = {"kernel": jnp.asarray(kernel)}
  if bias:
    params["bias"] = jnp.asarray(rng.normal(size=O), jnp.float32)
  layer_params, entry = prepare(params, lq)
  # Activations across the code range and beyond it (clipping), a few near half-code ties.
  x = rng.normal(scale=3.0, size=(M, C)).astype(np.float32)
  if not signed:
    x = np.abs(x) * 1.5
  x[0, :8] = (np.arange(8) + 0.5) * 0.037
  x[1, :4] = [1e4, -1e4, 0.0, -0.0]
  return entry, layer_params["kernel"], layer_params.get("bias"), jnp.asarray(x), lq["weight_e"]


@pytest.mark.parametrize("signed", [True, False])
def test_fused_dense_matches_integer_forward(signed):
  entry, kernel, bias, x, _ = make_layer(0, signed=signed)
  for count in COUNTS:
    lowered = entry["rank"] < count
    np.testing.assert_array_equal(np.asarray(fused(x, entry, kernel, bias, lowered, signed=signed)),
                                  np.asarray(reference(x, entry, kernel, bias, lowered, signed=signed)),
                                  err_msg=f"{count=}")


def test_fused_dense_never_lowered_without_bias_or_correction():
  entry, kernel, _, x, _ = make_layer(1, signed=True, lost=False, bias=False)
  entry = {k: v for k, v in entry.items() if k not in ("w_low", "rank")}
  np.testing.assert_array_equal(np.asarray(fused(x, entry, kernel, None, None, signed=True)),
                                np.asarray(reference(x, entry, kernel, None, None, signed=True)))


@pytest.mark.parametrize("signed", [True, False])
def test_fused_dense_packed_matches_integer_forward(signed):
  entry, kernel, bias, x, weight_e = make_layer(2, signed=signed)
  packed = pack(entry["w_low"], weight_e, entry["rank"], kernel)
  check = lambda count: np.testing.assert_array_equal(
      np.asarray(fused_packed(x, entry, packed, bias, jnp.int32(count), signed=signed)),
      np.asarray(reference(x, entry, kernel, bias, entry["rank"] < count, signed=signed)), err_msg=f"{count=}")
  check(COUNTS[0])
  # The count is traced: after the first call no count compiles anything. Lowerings are counted
  # (jax.monitoring), not the jit's C++ cache entries: a long process evicts those.
  with count_compilations() as compiled:
    for count in COUNTS[1:]:
      check(count)
  assert compiled.count == 0


def test_leading_axes():
  """(batch, tokens, C) activations in, (batch, tokens, O) out, for both kernels."""
  entry, kernel, bias, x, weight_e = make_layer(3, signed=False)
  x3 = x.reshape(3, 7, C)
  lowered = entry["rank"] < 40
  want = np.asarray(reference(x3, entry, kernel, bias, lowered, signed=False))
  assert want.shape == (3, 7, O)
  np.testing.assert_array_equal(np.asarray(fused(x3, entry, kernel, bias, lowered, signed=False)), want)
  packed = pack(entry["w_low"], weight_e, entry["rank"], kernel)
  np.testing.assert_array_equal(np.asarray(fused_packed(x3, entry, packed, bias, jnp.int32(40), signed=False)), want)


def test_pack_unpack_round_trip_and_bytes():
  entry, kernel, _, _, weight_e = make_layer(4, signed=True)
  packed = pack(entry["w_low"], weight_e, entry["rank"], kernel)
  cp, op = 96, 48  # C = 75 padded to 3 blocks of 32, O = 40 to 3 of 16
  assert packed.packed.shape == (cp // 2, op) and packed.packed.dtype == jnp.uint8
  assert packed.rows8.shape == (cp, op) and packed.rows8.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(pallas_dense.unpack_lowered_rows(packed)), np.asarray(entry["w_low"]))
  order = np.argsort(np.asarray(entry["rank"]))
  np.testing.assert_array_equal(np.asarray(packed.rows8)[:C, :O], np.asarray(kernel)[order])
  assert not np.asarray(packed.rows8)[C:].any() and not np.asarray(packed.packed)[:, O:].any()
  # Weight bytes read fall as the ratio rises, to half at full lowering (whole blocks).
  read = [pallas_dense.weight_bytes_read(packed, n) for n in (0, BLOCK_K, 2 * BLOCK_K, cp)]
  assert read == [cp * op, cp * op - BLOCK_K // 2 * op, cp * op - BLOCK_K * op, cp * op // 2]


def test_round_half_even_matches_jnp_round():
  v = np.concatenate([np.arange(-300, 300) * 0.5, np.arange(-300, 300) * 0.25 + 1e-3,
                      np.nextafter(np.float32(0.5), np.float32(0)) * np.array([1, -1]),
                      np.array([2.0 ** 23 + 1, -(2.0 ** 23) - 1, 2.0 ** 24 + 2, 1e30, -1e30, np.inf, -np.inf]),
                      np.random.default_rng(0).normal(scale=200, size=2000)]).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(jax.jit(pallas_dense._round_half_even)(v)), np.round(v))


@pytest.mark.parametrize("signed", [True, False])
def test_kernels_lower_to_triton_for_cuda(signed):
  """Off interpret mode, both kernels lower to Triton IR (no GPU needed: lowering only, Triton's
  own compilation to PTX is not run): every primitive in them has a Pallas Triton lowering."""
  entry, kernel, bias, x, weight_e = make_layer(5, signed=signed)
  packed = pack(entry["w_low"], weight_e, entry["rank"], kernel)
  blocks = dict(block_m=16, block_n=BLOCK_N, block_k=BLOCK_K)
  try:
    dense = jax.jit(lambda x, lowered: pallas_dense.fused_dense(x, entry, kernel, bias, lowered, signed=signed,
                                                                **blocks)).trace(x, entry["rank"] < 5)
    packed_ = jax.jit(lambda x, count: pallas_dense.fused_dense_packed(x, entry, packed, bias, count, signed=signed,
                                                                       block_m=16)).trace(x, jnp.int32(5))
    texts = [t.lower(lowering_platforms=("cuda",)).as_text() for t in (dense, packed_)]
  except ImportError as e:  # a jaxlib without the Triton dialect
    pytest.skip(f"no Pallas Triton lowering here: {e}")
  for text in texts:
    assert "__gpu$xla.gpu.triton" in text or "triton_kernel_call" in text


def test_a_transformer_serves_through_the_fused_kernel_with_the_same_logits(monkeypatch):
  """QuantizedModel(dense_impl='pallas'): every dense layer of a tiny ViT (qkv, proj, fc1, fc2,
  head) runs through `fused_dense` inside the serving form; the logits match the XLA serving
  form's at ratios 0, 0.5 and 1 (interpret mode here; separate compilations may round the
  epilogue's last bit differently, so to a few ulps), and the predictions are the same."""
  from flexiq_jax import calibrate, models, quantize
  model = models.create("vit_s", num_classes=10, image_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 16, 3)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images[:1])
  plan = quantize.build_plan(model, variables, (16, 16, 3))
  stats = calibrate.calibrate(model, plan, variables, [images])
  plan = plan.with_signedness(stats)
  orders = {p: np.arange(plan.layers[p].in_channels) for p in plan.lowerable}
  counts = {p: np.array([plan.layers[p].in_channels // 2, plan.layers[p].in_channels]) for p in plan.lowerable}
  qvars = quantize.build_qvars(plan, variables, stats, orders, counts, [0.5, 1.0])
  assert sum(plan.layers[p].kind == "dense" for p in plan.lowerable) >= 4
  xla = quantize.QuantizedModel(model, plan, mode="int")
  fused = quantize.QuantizedModel(model, plan, mode="int", dense_impl="pallas")
  svars = jax.jit(xla.prepare)(qvars)
  traced = []  # the layers whose fused kernel was traced: every dense layer, none of the others
  original = pallas_dense.fused_dense
  monkeypatch.setattr(pallas_dense, "fused_dense", lambda x, entry, kernel, *a, **k: traced.append(kernel.shape)
                      or original(x, entry, kernel, *a, **k))
  for ratio in (0.0, 0.5, 1.0):
    want = np.asarray(jax.jit(xla.apply)(svars, images, jnp.float32(ratio)))
    got = np.asarray(jax.jit(fused.apply)(svars, images, jnp.float32(ratio)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
  dense = [plan.layers[p] for p in plan.quantized if plan.layers[p].kind == "dense"]
  assert sorted(traced) == sorted(3 * [(i.in_channels, i.out_channels) for i in dense])
  with pytest.raises(ValueError, match="unknown dense_impl 'triton'"):
    quantize.QuantizedModel(model, plan, dense_impl="triton")

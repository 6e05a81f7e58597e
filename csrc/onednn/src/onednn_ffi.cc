// oneDNN int8 convolution and matmul as XLA FFI handlers (CPU).
//
// Both take u8 or s8 activation codes, s8 weight codes and accumulate in s32. The output type
// selects the epilogue:
//   s32          the raw accumulators (no scale, bias or post-op): the exactness contract;
//   f32          acc * scale[o] + bias[o], then the post-op;
//   u8 / s8      the f32 result above divided by dst_scale, rounded to nearest even and saturated.
// Post-ops: 0 none, 1 ReLU, 2 ReLU6 (clip to [0, 6]), 3 GELU (erf form).
//
// Exactness on CPUs without VNNI. There oneDNN's int8 kernels multiply with vpmaddubsw, whose
// pairwise s16 sums saturate for large u8 x s8 products, and for s8 activations some kernels halve
// the weights (7-bit weights) while others saturate. The accumulators then differ from the exact
// ones. The "split" mode keeps them exact with u8 activations and weights that cannot saturate:
//   acc = 2 * conv(u, w >> 1) + conv(u, w & 1)       (|w >> 1| <= 64: pair sums below 2^15)
// where u = x for u8 codes; for s8 codes u = x + 128 (u8), padded explicitly with 128 (the shifted
// zero), and acc gets -128 * the sum of each output channel's weights. The primitive runs twice
// (same shapes) and the two s32 results are combined here, then the epilogue (a plain loop).
// On VNNI CPUs ("direct" mode) one primitive runs with the scale, bias, post-op and output scale
// fused as oneDNN attributes. The `mode` attribute: 0 split exactly where the CPU lacks VNNI,
// 1 always split, 2 always direct (exact only on VNNI CPUs or for small codes).
//
// Primitives (and the weight reorder into the layout each primitive prefers) are created once per
// shape and attribute set and cached; weights are reordered on every call, since at a traced 4-bit
// ratio the kernel a layer runs changes between calls.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

bool HasVnni() {
  static const bool vnni = [] {
    const int isa = static_cast<int>(dnnl::get_effective_cpu_isa());
    return (isa & static_cast<int>(dnnl::cpu_isa::avx2_vnni)) == static_cast<int>(dnnl::cpu_isa::avx2_vnni) ||
           (isa & static_cast<int>(dnnl::cpu_isa::avx512_core_vnni)) ==
               static_cast<int>(dnnl::cpu_isa::avx512_core_vnni);
  }();
  return vnni;
}

bool ToDnnlType(ffi::DataType t, dt* out) {
  switch (t) {
    case ffi::DataType::U8: *out = dt::u8; return true;
    case ffi::DataType::S8: *out = dt::s8; return true;
    case ffi::DataType::S32: *out = dt::s32; return true;
    case ffi::DataType::F32: *out = dt::f32; return true;
    default: return false;
  }
}

// Attributes of a direct primitive: per-output-channel weight scales (mask), the post-op and, for
// an 8-bit output, a per-tensor destination scale. None for an s32 output.
dnnl::primitive_attr EpilogueAttr(dt out, int weight_scale_mask, int64_t post_op) {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  if (out == dt::s32) return attr;
  attr.set_scales_mask(DNNL_ARG_WEIGHTS, weight_scale_mask);
  if (out == dt::u8 || out == dt::s8) attr.set_scales_mask(DNNL_ARG_DST, 0);
  dnnl::post_ops ops;
  if (post_op == 1) ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
  if (post_op == 2) ops.append_eltwise(dnnl::algorithm::eltwise_clip, 0.f, 6.f);
  if (post_op == 3) ops.append_eltwise(dnnl::algorithm::eltwise_gelu_erf, 0.f, 0.f);
  attr.set_post_ops(ops);
  return attr;
}

struct Cached {
  dnnl::primitive prim;
  dnnl::memory::desc user_weights, weights, scratchpad;
  dnnl::reorder weight_reorder;
  bool reorder_weights = false;
};

// Builds the primitive for (attributes, dst desc, with bias): conv or matmul.
using Maker = std::function<std::shared_ptr<Cached>(const dnnl::primitive_attr&, const dnnl::memory::desc&, bool)>;

std::mutex cache_mutex;
std::unordered_map<std::string, std::shared_ptr<Cached>>& Cache() {
  static auto* cache = new std::unordered_map<std::string, std::shared_ptr<Cached>>();
  return *cache;
}

std::shared_ptr<Cached> GetOrMake(const std::string& key, const std::function<std::shared_ptr<Cached>()>& make) {
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    auto it = Cache().find(key);
    if (it != Cache().end()) return it->second;
  }
  auto entry = make();  // outside the lock: creating a primitive can take milliseconds
  std::lock_guard<std::mutex> lock(cache_mutex);
  return Cache().emplace(key, std::move(entry)).first->second;  // the first one created wins
}

template <typename PD>
std::shared_ptr<Cached> Finish(const PD& pd, dnnl::primitive prim, const dnnl::memory::desc& user_weights) {
  auto entry = std::make_shared<Cached>();
  entry->prim = std::move(prim);
  entry->user_weights = user_weights;
  entry->weights = pd.weights_desc();
  entry->scratchpad = pd.scratchpad_desc();
  entry->reorder_weights = entry->weights != user_weights;
  if (entry->reorder_weights)
    entry->weight_reorder =
        dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), user_weights, Engine(), entry->weights));
  return entry;
}

// One execution of a cached primitive on plain (user-layout) weights.
void Execute(const Cached& c, dnnl::stream& stream, const dnnl::memory::desc& src_md, void* src, void* weights,
             const dnnl::memory::desc& dst_md, void* dst, const std::unordered_map<int, dnnl::memory>& extra) {
  dnnl::engine& eng = Engine();
  dnnl::memory user_w(c.user_weights, eng, weights);
  dnnl::memory w = user_w;
  if (c.reorder_weights) {
    w = dnnl::memory(c.weights, eng);
    c.weight_reorder.execute(stream, user_w, w);
  }
  std::unordered_map<int, dnnl::memory> args = extra;
  args.emplace(DNNL_ARG_SRC, dnnl::memory(src_md, eng, src));
  args.emplace(DNNL_ARG_WEIGHTS, w);
  args.emplace(DNNL_ARG_DST, dnnl::memory(dst_md, eng, dst));
  args.emplace(DNNL_ARG_SCRATCHPAD, dnnl::memory(c.scratchpad, eng));
  c.prim.execute(stream, args);
}

template <typename T>
inline T Saturate(float v) {
  const float lo = static_cast<float>(std::numeric_limits<T>::min());
  const float hi = static_cast<float>(std::numeric_limits<T>::max());
  return static_cast<T>(std::nearbyint(std::fmin(std::fmax(v, lo), hi)));
}

inline float PostOp(float y, int64_t post_op) {
  if (post_op == 1) return y > 0.f ? y : 0.f;
  if (post_op == 2) return std::fmin(std::fmax(y, 0.f), 6.f);
  if (post_op == 3) return 0.5f * y * (1.f + std::erf(y * 0.70710678118654752f));
  return y;
}

// The split mode's combination of the two s32 results and the epilogue (file comment). Channels
// are the fastest-varying axis of the output (NHWC, or (M, N)).
void CombineAndFinish(const int32_t* a, const int32_t* b, const int32_t* offset, int64_t count, int64_t channels,
                      const float* scale, const float* bias, float dst_scale, int64_t post_op, dt out, void* dst) {
  const float inv = 1.f / dst_scale;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < count; ++i) {
    const int64_t o = i % channels;
    const int32_t acc = 2 * a[i] + b[i] + (offset ? offset[o] : 0);
    if (out == dt::s32) {
      static_cast<int32_t*>(dst)[i] = acc;
      continue;
    }
    const float y = PostOp(static_cast<float>(acc) * scale[o] + bias[o], post_op);
    if (out == dt::f32) static_cast<float*>(dst)[i] = y;
    else if (out == dt::u8) static_cast<uint8_t*>(dst)[i] = Saturate<uint8_t>(y * inv);
    else static_cast<int8_t*>(dst)[i] = Saturate<int8_t>(y * inv);
  }
}

// Runs one layer: direct (one fused primitive) or split (two s32 runs, then the combination; `offset`
// (channels,) is added to the accumulators, or null).
ffi::Error Run(const std::string& key, const Maker& make, const dnnl::memory::desc& src_md, void* src,
               const int8_t* weights, int64_t weight_count, const dnnl::memory::desc& dst_md, void* dst,
               int weight_scale_mask, const float* scale, const float* bias, const dnnl::memory::desc& bias_md,
               const float* dst_scale, int64_t post_op, bool split, const int32_t* offset) {
  const dt out = dst_md.get_data_type();
  try {
    dnnl::engine& eng = Engine();
    dnnl::stream stream(eng);
    if (!split) {
      std::ostringstream k;
      k << key << "|direct|" << int(out) << '|' << post_op;
      auto c = GetOrMake(k.str(), [&] {
        return make(EpilogueAttr(out, weight_scale_mask, post_op), dst_md, out != dt::s32);
      });
      std::unordered_map<int, dnnl::memory> extra;
      if (out != dt::s32) {
        const int64_t channels = bias_md.get_dims().back();
        extra.emplace(DNNL_ARG_BIAS, dnnl::memory(bias_md, eng, const_cast<float*>(bias)));
        extra.emplace(DNNL_ARG_ATTR_SCALES | DNNL_ARG_WEIGHTS,
                      dnnl::memory({{channels}, dt::f32, tag::x}, eng, const_cast<float*>(scale)));
        if (out != dt::f32)
          extra.emplace(DNNL_ARG_ATTR_SCALES | DNNL_ARG_DST,
                        dnnl::memory({{1}, dt::f32, tag::x}, eng, const_cast<float*>(dst_scale)));
      }
      Execute(*c, stream, src_md, src, const_cast<int8_t*>(weights), dst_md, dst, extra);
      stream.wait();
      return ffi::Error::Success();
    }
    // Split: u8 activations (the caller shifted s8 codes and passes `offset`), weights w >> 1, w & 1.
    std::vector<int8_t> wa(weight_count), wb(weight_count);
    for (int64_t i = 0; i < weight_count; ++i) {
      wa[i] = static_cast<int8_t>(weights[i] >> 1);
      wb[i] = static_cast<int8_t>(weights[i] & 1);
    }
    dnnl::memory::desc acc_md(dst_md.get_dims(), dt::s32, dst_md.get_strides());
    auto c = GetOrMake(key + "|split", [&] { return make(EpilogueAttr(dt::s32, 0, 0), acc_md, false); });
    const int64_t count = acc_md.get_size() / sizeof(int32_t);
    std::vector<int32_t> b(count);
    std::vector<int32_t> a_buf(out == dt::s32 ? 0 : count);
    int32_t* a = out == dt::s32 ? static_cast<int32_t*>(dst) : a_buf.data();
    Execute(*c, stream, src_md, src, wa.data(), acc_md, a, {});
    Execute(*c, stream, src_md, src, wb.data(), acc_md, b.data(), {});
    stream.wait();
    const int64_t channels = dst_md.get_dims()[1];  // conv {n, o, h, w}, matmul {m, n}
    CombineAndFinish(a, b.data(), offset, count, channels, scale, bias, *dst_scale, post_op, out, dst);
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

bool Split(int64_t mode) { return mode == 1 || (mode == 0 && !HasVnni()); }

// -128 * the sum of each output channel's weights, channels last in `weights` (HWIO or (K, N)).
std::vector<int32_t> ShiftOffset(const int8_t* weights, int64_t count, int64_t channels) {
  std::vector<int32_t> offset(channels, 0);
  for (int64_t i = 0; i < count; ++i) offset[i % channels] += weights[i];
  for (auto& v : offset) v *= -128;
  return offset;
}

std::string Dims(ffi::Span<const int64_t> v) {
  std::ostringstream s;
  for (int64_t x : v) s << x << ',';
  return s.str();
}

// src: NHWC (u8|s8); weights: HWIO s8 with I = C / groups; scale, bias: (O,) f32; dst_scale: ()
// f32; dst: NHWC (s32|f32|u8|s8). strides, pad_lo, pad_hi, dilation: (2,) each, dilation as in
// XLA (1 = none).
ffi::Error ConvImpl(ffi::AnyBuffer src, ffi::AnyBuffer weights, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> dst_scale, ffi::Result<ffi::AnyBuffer> dst,
                    ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_lo,
                    ffi::Span<const int64_t> pad_hi, ffi::Span<const int64_t> dilation, int64_t groups,
                    int64_t post_op, int64_t mode) {
  dt src_t, w_t, dst_t;
  if (!ToDnnlType(src.element_type(), &src_t) || (src_t != dt::u8 && src_t != dt::s8))
    return ffi::Error::InvalidArgument("onednn conv: src must be u8 or s8");
  if (!ToDnnlType(weights.element_type(), &w_t) || w_t != dt::s8)
    return ffi::Error::InvalidArgument("onednn conv: weights must be s8");
  if (!ToDnnlType(dst->element_type(), &dst_t))
    return ffi::Error::InvalidArgument("onednn conv: dst must be s32, f32, u8 or s8");
  auto x = src.dimensions(), k = weights.dimensions(), y = dst->dimensions();
  if (x.size() != 4 || k.size() != 4 || y.size() != 4 || strides.size() != 2 || pad_lo.size() != 2 ||
      pad_hi.size() != 2 || dilation.size() != 2 || groups < 1)
    return ffi::Error::InvalidArgument("onednn conv: expects NHWC src/dst, HWIO weights and 2-D attributes");
  const int64_t n = x[0], h = x[1], w = x[2], c = x[3], kh = k[0], kw = k[1], o = k[3];
  if (c != k[2] * groups || o % groups != 0 || y[0] != n || y[3] != o)
    return ffi::Error::InvalidArgument("onednn conv: channel counts do not match the groups");
  std::ostringstream key;
  key << "conv|" << Dims(x) << '|' << Dims(k) << '|' << Dims(y) << '|' << Dims(strides) << Dims(pad_lo)
      << Dims(pad_hi) << Dims(dilation) << '|' << groups << '|' << int(src_t);

  dnnl::memory::desc src_md({n, c, h, w}, src_t, tag::nhwc);
  dnnl::memory::desc dst_md({n, o, y[1], y[2]}, dst_t, tag::nhwc);
  dnnl::memory::desc bias_md({o}, dt::f32, tag::x);
  dnnl::memory::desc user_w =
      groups == 1 ? dnnl::memory::desc({o, c, kh, kw}, dt::s8, tag::hwio)
                  : dnnl::memory::desc({groups, o / groups, c / groups, kh, kw}, dt::s8, tag::hwigo);
  dnnl::memory::dims st = {strides[0], strides[1]}, dl = {dilation[0] - 1, dilation[1] - 1};
  dnnl::memory::dims pl = {pad_lo[0], pad_lo[1]}, pr = {pad_hi[0], pad_hi[1]};
  Maker make = [&](const dnnl::primitive_attr& attr, const dnnl::memory::desc& dmd, bool with_bias) {
    dnnl::memory::desc any_w(user_w.get_dims(), dt::s8, tag::any);
    auto pd = with_bias
        ? dnnl::convolution_forward::primitive_desc(Engine(), dnnl::prop_kind::forward_inference,
              dnnl::algorithm::convolution_direct, src_md, any_w, bias_md, dmd, st, dl, pl, pr, attr)
        : dnnl::convolution_forward::primitive_desc(Engine(), dnnl::prop_kind::forward_inference,
              dnnl::algorithm::convolution_direct, src_md, any_w, dmd, st, dl, pl, pr, attr);
    return Finish(pd, dnnl::convolution_forward(pd), user_w);
  };
  const int8_t* wptr = static_cast<const int8_t*>(weights.untyped_data());
  const int64_t wcount = static_cast<int64_t>(weights.element_count());
  const bool split = Split(mode);
  if (!split || src_t == dt::u8)
    return Run(key.str(), make, src_md, src.untyped_data(), wptr, wcount, dst_md, dst->untyped_data(),
               groups == 1 ? 1 : 3, scale.typed_data(), bias.typed_data(), bias_md, dst_scale.typed_data(), post_op,
               split, nullptr);
  // s8 codes, split: u = x + 128 padded with 128 (the shifted zero), then an unpadded conv.
  const int64_t hp = h + pad_lo[0] + pad_hi[0], wp = w + pad_lo[1] + pad_hi[1];
  std::vector<uint8_t> shifted(n * hp * wp * c, 128);
  const int8_t* xs = static_cast<const int8_t*>(src.untyped_data());
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < n; ++b)
    for (int64_t i = 0; i < h; ++i) {
      const int8_t* from = xs + ((b * h + i) * w) * c;
      uint8_t* to = shifted.data() + ((b * hp + i + pad_lo[0]) * wp + pad_lo[1]) * c;
      for (int64_t j = 0; j < w * c; ++j) to[j] = static_cast<uint8_t>(from[j] + 128);
    }
  dnnl::memory::desc shifted_md({n, c, hp, wp}, dt::u8, tag::nhwc);
  pl = {0, 0};
  pr = {0, 0};
  src_md = shifted_md;
  std::ostringstream skey;
  skey << key.str() << "|shifted";
  const std::vector<int32_t> offset = ShiftOffset(wptr, wcount, o);
  return Run(skey.str(), make, shifted_md, shifted.data(), wptr, wcount, dst_md, dst->untyped_data(),
             groups == 1 ? 1 : 3, scale.typed_data(), bias.typed_data(), bias_md, dst_scale.typed_data(), post_op,
             true, offset.data());
}

// src: (M, K) u8|s8; weights: (K, N) s8; scale, bias: (N,) f32; dst_scale: () f32; dst: (M, N).
ffi::Error MatmulImpl(ffi::AnyBuffer src, ffi::AnyBuffer weights, ffi::Buffer<ffi::F32> scale,
                      ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> dst_scale,
                      ffi::Result<ffi::AnyBuffer> dst, int64_t post_op, int64_t mode) {
  dt src_t, w_t, dst_t;
  if (!ToDnnlType(src.element_type(), &src_t) || (src_t != dt::u8 && src_t != dt::s8))
    return ffi::Error::InvalidArgument("onednn matmul: src must be u8 or s8");
  if (!ToDnnlType(weights.element_type(), &w_t) || w_t != dt::s8)
    return ffi::Error::InvalidArgument("onednn matmul: weights must be s8");
  if (!ToDnnlType(dst->element_type(), &dst_t))
    return ffi::Error::InvalidArgument("onednn matmul: dst must be s32, f32, u8 or s8");
  auto a = src.dimensions(), b = weights.dimensions(), y = dst->dimensions();
  if (a.size() != 2 || b.size() != 2 || y.size() != 2 || a[1] != b[0] || y[0] != a[0] || y[1] != b[1])
    return ffi::Error::InvalidArgument("onednn matmul: expects (M, K) x (K, N) -> (M, N)");
  const int64_t m = a[0], kk = a[1], nn = b[1];
  std::ostringstream key;
  key << "matmul|" << m << ',' << kk << ',' << nn << '|' << int(src_t);
  dnnl::memory::desc src_md({m, kk}, src_t, tag::ab);
  dnnl::memory::desc dst_md({m, nn}, dst_t, tag::ab);
  dnnl::memory::desc bias_md({1, nn}, dt::f32, tag::ab);
  dnnl::memory::desc user_w({kk, nn}, dt::s8, tag::ab);
  Maker make = [&](const dnnl::primitive_attr& attr, const dnnl::memory::desc& dmd, bool with_bias) {
    dnnl::memory::desc any_w({kk, nn}, dt::s8, tag::any);
    auto pd = with_bias ? dnnl::matmul::primitive_desc(Engine(), src_md, any_w, bias_md, dmd, attr)
                        : dnnl::matmul::primitive_desc(Engine(), src_md, any_w, dmd, attr);
    return Finish(pd, dnnl::matmul(pd), user_w);
  };
  const int8_t* wptr = static_cast<const int8_t*>(weights.untyped_data());
  const bool split = Split(mode);
  if (!split || src_t == dt::u8)
    return Run(key.str(), make, src_md, src.untyped_data(), wptr, kk * nn, dst_md, dst->untyped_data(), 1 << 1,
               scale.typed_data(), bias.typed_data(), bias_md, dst_scale.typed_data(), post_op, split, nullptr);
  // s8 codes, split: u = x + 128, and -128 * the column sums of the weights.
  std::vector<uint8_t> shifted(m * kk);
  const int8_t* xs = static_cast<const int8_t*>(src.untyped_data());
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < m * kk; ++i) shifted[i] = static_cast<uint8_t>(xs[i] + 128);
  src_md = dnnl::memory::desc({m, kk}, dt::u8, tag::ab);
  const std::vector<int32_t> offset = ShiftOffset(wptr, kk * nn, nn);
  return Run(key.str() + "|shifted", make, src_md, shifted.data(), wptr, kk * nn, dst_md, dst->untyped_data(),
             1 << 1, scale.typed_data(), bias.typed_data(), bias_md, dst_scale.typed_data(), post_op, true,
             offset.data());
}

}  // namespace

// The library is built with hidden visibility; only these symbols are exported.
#pragma GCC visibility push(default)

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlexiqOnednnConv, ConvImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("strides")
                                  .Attr<ffi::Span<const int64_t>>("pad_lo")
                                  .Attr<ffi::Span<const int64_t>>("pad_hi")
                                  .Attr<ffi::Span<const int64_t>>("dilation")
                                  .Attr<int64_t>("groups")
                                  .Attr<int64_t>("post_op")
                                  .Attr<int64_t>("mode"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlexiqOnednnMatmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("post_op")
                                  .Attr<int64_t>("mode"));

// The oneDNN version this library runs with: major * 10000 + minor * 100 + patch.
extern "C" int flexiq_onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}

// The CPU ISA oneDNN dispatches to (dnnl::cpu_isa as an integer; 0 = all / unknown).
extern "C" int flexiq_onednn_isa() { return static_cast<int>(dnnl::get_effective_cpu_isa()); }

// Whether mode 0 runs the direct (fused) kernels here: 1 on CPUs with VNNI, 0 where it splits.
extern "C" int flexiq_onednn_direct() { return HasVnni() ? 1 : 0; }

#pragma GCC visibility pop

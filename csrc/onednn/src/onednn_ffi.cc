// oneDNN int8 convolution and matmul as XLA FFI handlers (CPU).
//
// Both take u8 or s8 activation codes, s8 weight codes and accumulate in s32. The output type
// selects the epilogue:
//   s32          the raw accumulators (no scale, bias or post-op): the exactness contract;
//   f32          acc * scale[o] + bias[o], then the post-op;
//   u8 / s8      the f32 result above times 1 / dst_scale (the float32 inverse), rounded to nearest
//                even and saturated (oneDNN's dst scale: a direct primitive writes the codes);
//                through the *Lowered targets also each channel's 4-bit extraction (Requant): the
//                activation codes of the layer that reads this output.
// Post-ops: 0 none, 1 ReLU, 2 ReLU6 (clip to [0, 6]), 3 GELU (erf form).
// The conv_add target takes one more operand, an f32 tensor of the output's shape (a residual sum's
// other term), added to the f32 result before the post-op: post_op(acc * scale + bias + addend).
// The conv_add_codes target also returns the sum requantized (u8/s8, with each channel's 4-bit
// extraction): the activation codes of the layer that reads the sum, from the same pass.
// The conv_stream target keeps the residual stream 8-bit: it takes the shortcut as u8/s8 codes q on
// a step s and writes the sum's codes, dst = requant(post_op(StreamSum)), with
//   StreamSum = ((y * (1 / s)) + q) * s,   y = acc * scale + bias,
// each multiplication and the addition rounded to float32 (1 / s too): on VNNI CPUs oneDNN's
// post-ops eltwise_linear, binary_add (the codes as src1) and eltwise_linear inside the primitive
// (a sum post-op would add s * q as one fused multiply-add, which flexiq_jax's XLA arithmetic
// cannot reproduce); elsewhere the f32 output of the layer's exact run, then one pass (StreamRows).
// A second result holds the codes with the 4-bit extraction of the layer that reads the sum. The
// shortcut may also be f32 (a downsampling conv's output): the plain sum post_op(y + shortcut) then.
// The f32 addend's layer runs without its post-op, then one pass adds the addend and applies the post-op while
// the output is still in cache. (oneDNN's sum and binary-add post-ops ran the ResNet-18 stage-1
// convs slower than the conv plus this pass: the kernel then reads the addend from memory.)
//
// How a layer runs (the `mode` attribute: 0 auto, 1 split, 2 direct, 3 single):
//   direct  one primitive, the scale, bias, post-op and output scale fused as oneDNN attributes.
//           Exact on CPUs with VNNI. Without VNNI oneDNN's int8 kernels multiply with vpmaddubsw,
//           whose pairwise s16 sums u0 * w0 + u1 * w1 saturate once they pass 32767 (255 * 127 * 2
//           does), and for s8 activations some kernels halve the weights (7-bit weights) while
//           others saturate: the accumulators are then not the exact ones.
//   single  exact on every CPU with one int8 run: the activations are split into low codes and a
//           sparse remainder,
//             v = x + z,  lo = clamp(v, 0, t),  r = v - lo,
//             acc = conv(lo, w) + conv(r, w) - z * (the sum of each output channel's weights),
//           t the largest code with 2 * t * max|w| <= 32767 (127 for any int8 weights, 146 for
//           weights within +-112), z = 0 for u8 codes and (t + 1) / 2 for s8. conv(lo, w) is one u8
//           primitive (its pair sums |lo0 * w0 + lo1 * w1| <= 2 * t * max|w| cannot saturate, and
//           u8 sources are never halved), conv(r, w) the few nonzero r (u8 codes above t, s8 codes
//           outside [-z, t - z]) gathered per output position from a per-pixel list, in the same
//           pass over the outputs as the epilogue; for s8 codes the input is padded explicitly
//           with z (the shifted zero). The remainder's cost grows with its density; past an eighth
//           of the activations the layer runs split instead (the same integers).
//   split   exact on every CPU: u8 activations u and weights that cannot saturate,
//             acc = 2 * conv(u, w >> 1) + conv(u, w & 1)      (|w >> 1| <= 64: pair sums < 2^15)
//           u = x for u8 codes; for s8 codes u = x + 128, padded explicitly with 128 (the shifted
//           zero), and acc gets -128 * the sum of each output channel's weights. Both halves run
//           as one primitive with twice the output channels (per group), or as two runs for
//           depthwise convs; the combination and the epilogue are a plain loop here.
//   auto    direct where the CPU has VNNI. Elsewhere a depthwise conv runs one u8 primitive
//           (s8 codes shifted as above) if that primitive reproduces the exact accumulators on a
//           probe with the largest products (checked once per shape; oneDNN's depthwise kernels
//           do not use pairwise s16 sums), and everything else runs single.
//
// Dense convs get their input channels as a multiple of 4 (the Python wrapper pads an image's 1
// or 3 with zeros): oneDNN's int8 conv kernels take input channels in blocks of 4.
//
// Primitives (and the weight reorder into the layout each primitive prefers) are created once per
// shape and attribute set and cached. Weights are reordered into the primitive's layout once per
// content and kept (a layer's weights change only with the traced 4-bit ratio; each call compares
// them byte for byte with the kept ones). The buffers a call needs (the 7-bit copy, accumulators,
// oneDNN's scratchpad) are kept per thread and reused.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <numeric>
#include <sstream>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include <immintrin.h>
#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;
using dims = dnnl::memory::dims;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

bool HasVnni() {
  static const bool vnni = [] {
    const int isa = static_cast<int>(dnnl::get_effective_cpu_isa());
    const int avx2_vnni = static_cast<int>(dnnl::cpu_isa::avx2_vnni);
    const int avx512_vnni = static_cast<int>(dnnl::cpu_isa::avx512_core_vnni);
    return (isa & avx2_vnni) == avx2_vnni || (isa & avx512_vnni) == avx512_vnni;
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

template <typename T>
std::unique_ptr<T[]> Uninitialized(int64_t count) {
  return std::unique_ptr<T[]>(new T[count > 0 ? count : 1]);
}

// One layer's geometry. A matmul is a 1x1 "conv" over m rows: n = m, h = w = 1, c = k.
struct Geometry {
  bool conv = true;
  int64_t n = 0, h = 1, w = 1, c = 0, kh = 1, kw = 1, o = 0, groups = 1, oh = 1, ow = 1;
  dims strides{1, 1}, dilation{0, 0}, pad_lo{0, 0}, pad_hi{0, 0};

  int64_t rows() const { return n * oh * ow; }
  int64_t group_out() const { return o / groups; }
  bool depthwise() const { return conv && groups > 1 && groups == c && group_out() == 1; }
  int64_t weight_count() const { return kh * kw * (c / groups) * o; }

  std::string Key() const {
    std::ostringstream s;
    s << (conv ? "conv|" : "matmul|") << n << ',' << h << ',' << w << ',' << c << '|' << kh << ',' << kw << ','
      << o << ',' << groups << '|' << oh << ',' << ow << '|' << strides[0] << ',' << strides[1] << '|'
      << dilation[0] << ',' << dilation[1] << '|' << pad_lo[0] << ',' << pad_lo[1] << ',' << pad_hi[0] << ','
      << pad_hi[1];
    return s.str();
  }
};

// What a primitive is built for, besides the geometry.
struct Variant {
  dt src;
  bool prepadded;  // src holds the padding already (the shifted s8 path): an unpadded conv
  int mult;        // output channels per group times this (2: both split halves in one run)
  dt dst;
  bool fused;      // scale, bias, post-op (and dst scale) as attributes
  int64_t post_op;
  float stream_scale = 0.f;  // > 0: the residual sum on the 8-bit stream (file comment, ConvStreamImpl)

  std::string Key() const {
    std::ostringstream s;
    s << int(src) << ',' << prepadded << ',' << mult << ',' << int(dst) << ',' << fused << ',' << post_op << ','
      << std::hexfloat << stream_scale;
    return s.str();
  }
};

// Weights reordered into a primitive's layout, with the plain weights they came from.
struct Reordered {
  std::vector<int8_t> plain;
  dnnl::memory memory;
  int32_t max_abs = 0;  // the largest |weight|
};

int32_t MaxAbs(const int8_t* w, int64_t count) {
  int32_t m = 0;
  for (int64_t i = 0; i < count; ++i) m = std::max(m, std::abs(static_cast<int32_t>(w[i])));
  return m;
}

struct Cached {
  dnnl::primitive prim;
  dnnl::memory::desc src, user_weights, weights, bias, dst, scratchpad;
  dnnl::reorder weight_reorder;
  bool reorder_weights = false;
  int probe = -1;  // depthwise probe: -1 not run, 0 inexact, 1 exact
  // The weights most recently reordered for this primitive, most recent first (several layers of
  // one shape share the primitive; a new 4-bit ratio brings new weights to the lowered layers).
  std::mutex reordered_mutex;
  std::vector<std::shared_ptr<Reordered>> reordered;
};
constexpr size_t kReorderedKept = 16;

dnnl::primitive_attr Attr(const Geometry& g, const Variant& v) {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  if (!v.fused) return attr;
  attr.set_scales_mask(DNNL_ARG_WEIGHTS, !g.conv ? 1 << 1 : g.groups == 1 ? 1 : 3);  // per output channel
  if (v.dst == dt::u8 || v.dst == dt::s8) attr.set_scales_mask(DNNL_ARG_DST, 0);  // one scale, codes out
  dnnl::post_ops ops;
  if (v.stream_scale > 0.f) {  // StreamSum: ((y * (1 / s)) + q) * s, each step rounded to float32
    ops.append_eltwise(dnnl::algorithm::eltwise_linear, 1.f / v.stream_scale, 0.f);
    ops.append_binary(dnnl::algorithm::binary_add, dnnl::memory::desc({g.n, g.o, g.oh, g.ow}, v.dst, tag::nhwc));
    ops.append_eltwise(dnnl::algorithm::eltwise_linear, v.stream_scale, 0.f);
  }
  if (v.post_op == 1) ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
  if (v.post_op == 2) ops.append_eltwise(dnnl::algorithm::eltwise_clip, 0.f, 6.f);
  if (v.post_op == 3) ops.append_eltwise(dnnl::algorithm::eltwise_gelu_erf, 0.f, 0.f);
  attr.set_post_ops(ops);
  return attr;
}

template <typename PD>
std::shared_ptr<Cached> Finish(const PD& pd, dnnl::primitive prim, const dnnl::memory::desc& src,
                               const dnnl::memory::desc& user_weights, const dnnl::memory::desc& bias,
                               const dnnl::memory::desc& dst) {
  auto entry = std::make_shared<Cached>();
  entry->prim = std::move(prim);
  entry->src = src;
  entry->user_weights = user_weights;
  entry->bias = bias;
  entry->dst = dst;
  entry->weights = pd.weights_desc();
  entry->scratchpad = pd.scratchpad_desc();
  entry->reorder_weights = entry->weights != user_weights;
  if (entry->reorder_weights)
    entry->weight_reorder =
        dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), user_weights, Engine(), entry->weights));
  return entry;
}

std::shared_ptr<Cached> Build(const Geometry& g, const Variant& v) {
  const int64_t o = g.o * v.mult;
  const dnnl::primitive_attr attr = Attr(g, v);
  if (!g.conv) {
    dnnl::memory::desc src({g.n, g.c}, v.src, tag::ab), dst({g.n, o}, v.dst, tag::ab);
    dnnl::memory::desc user_w({g.c, o}, dt::s8, tag::ab), any_w({g.c, o}, dt::s8, tag::any);
    dnnl::memory::desc bias({1, o}, dt::f32, tag::ab);
    auto pd = v.fused ? dnnl::matmul::primitive_desc(Engine(), src, any_w, bias, dst, attr)
                      : dnnl::matmul::primitive_desc(Engine(), src, any_w, dst, attr);
    return Finish(pd, dnnl::matmul(pd), src, user_w, bias, dst);
  }
  const int64_t h = v.prepadded ? g.h + g.pad_lo[0] + g.pad_hi[0] : g.h;
  const int64_t w = v.prepadded ? g.w + g.pad_lo[1] + g.pad_hi[1] : g.w;
  const dims pl = v.prepadded ? dims{0, 0} : g.pad_lo, pr = v.prepadded ? dims{0, 0} : g.pad_hi;
  dnnl::memory::desc src({g.n, g.c, h, w}, v.src, tag::nhwc), dst({g.n, o, g.oh, g.ow}, v.dst, tag::nhwc);
  dnnl::memory::desc user_w = g.groups == 1
      ? dnnl::memory::desc({o, g.c, g.kh, g.kw}, dt::s8, tag::hwio)
      : dnnl::memory::desc({g.groups, o / g.groups, g.c / g.groups, g.kh, g.kw}, dt::s8, tag::hwigo);
  dnnl::memory::desc any_w(user_w.get_dims(), dt::s8, tag::any), bias({o}, dt::f32, tag::x);
  auto pd = v.fused
      ? dnnl::convolution_forward::primitive_desc(Engine(), dnnl::prop_kind::forward_inference,
            dnnl::algorithm::convolution_direct, src, any_w, bias, dst, g.strides, g.dilation, pl, pr, attr)
      : dnnl::convolution_forward::primitive_desc(Engine(), dnnl::prop_kind::forward_inference,
            dnnl::algorithm::convolution_direct, src, any_w, dst, g.strides, g.dilation, pl, pr, attr);
  return Finish(pd, dnnl::convolution_forward(pd), src, user_w, bias, dst);
}

std::mutex cache_mutex;
std::unordered_map<std::string, std::shared_ptr<Cached>>& Cache() {
  static auto* cache = new std::unordered_map<std::string, std::shared_ptr<Cached>>();
  return *cache;
}

std::shared_ptr<Cached> Get(const Geometry& g, const Variant& v) {
  const std::string key = g.Key() + '#' + v.Key();
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    auto it = Cache().find(key);
    if (it != Cache().end()) return it->second;
  }
  auto entry = Build(g, v);  // outside the lock: creating a primitive can take milliseconds
  std::lock_guard<std::mutex> lock(cache_mutex);
  return Cache().emplace(key, std::move(entry)).first->second;  // the first one created wins
}

// Grow-only per-thread buffers (XLA may run custom calls on several threads at once): a fresh
// allocation per call costs page faults on every layer.
// How the layers ran since the library was loaded (flexiq_onednn_runs): direct, split, single,
// a probed depthwise u8 kernel; the single mode's remainders and input elements, and its time (ns)
// in its three steps: splitting the codes, the primitive, and one pass over the outputs that adds
// the remainder and applies the epilogue.
enum Count { kRunDirect, kRunSplit, kRunSingle, kRunDepthwise, kSingleRemainders, kSingleInputs,
             kSingleNsSplitCodes, kSingleNsPrimitive, kSingleNsFinish, kCountCount };
std::atomic<int64_t> counts[kCountCount];

enum Slot { kSlotLo, kSlotAcc, kSlotScratchpad, kSlotPixelEnd, kSlotStream, kSlotCount };

void* Buffer(Slot slot, size_t bytes) {
  thread_local std::vector<std::unique_ptr<char[]>> buffers(kSlotCount);
  thread_local std::vector<size_t> sizes(kSlotCount, 0);
  if (sizes[slot] < bytes) {
    buffers[slot].reset(new char[bytes]);
    sizes[slot] = bytes;
  }
  return buffers[slot].get();
}

// The weights in the primitive's layout: reordered once per content (compared byte for byte with
// the plain weights each earlier reorder came from) and kept, since a layer's weights are the same
// at every call of one ratio.
std::shared_ptr<Reordered> ReorderedWeights(Cached& c, const int8_t* weights, dnnl::stream& stream) {
  const size_t bytes = c.user_weights.get_size();
  std::lock_guard<std::mutex> lock(c.reordered_mutex);
  auto& kept = c.reordered;
  for (size_t i = 0; i < kept.size(); ++i)
    if (std::memcmp(kept[i]->plain.data(), weights, bytes) == 0) {
      std::rotate(kept.begin(), kept.begin() + i, kept.begin() + i + 1);  // most recent first
      return kept.front();
    }
  auto entry = std::make_shared<Reordered>();
  entry->plain.assign(weights, weights + bytes);
  entry->max_abs = MaxAbs(weights, static_cast<int64_t>(bytes));
  entry->memory = dnnl::memory(c.weights, Engine());
  dnnl::memory user_w(c.user_weights, Engine(), entry->plain.data());
  c.weight_reorder.execute(stream, user_w, entry->memory);
  stream.wait();
  kept.insert(kept.begin(), entry);
  if (kept.size() > kReorderedKept) kept.pop_back();
  return entry;
}

// One execution on plain (user-layout) weights; scale and bias only for a fused primitive.
void Execute(const Cached& c, const void* src, const int8_t* weights, void* dst, const float* scale = nullptr,
             const float* bias = nullptr,
             std::shared_ptr<Reordered> keep = nullptr,  // keep: ReorderedWeights(c, weights), if known
             const float* dst_scale = nullptr,           // a fused primitive with u8/s8 output
             const void* shortcut = nullptr) {           // a stream variant's shortcut codes
  dnnl::engine& eng = Engine();
  dnnl::stream stream(eng);
  dnnl::memory w(c.user_weights, eng, const_cast<int8_t*>(weights));
  if (c.reorder_weights) {  // `keep` holds the reordered weights while the primitive runs
    if (!keep) keep = ReorderedWeights(const_cast<Cached&>(c), weights, stream);
    w = keep->memory;
  }
  std::unordered_map<int, dnnl::memory> args = {
      {DNNL_ARG_SRC, dnnl::memory(c.src, eng, const_cast<void*>(src))},
      {DNNL_ARG_WEIGHTS, w},
      {DNNL_ARG_DST, dnnl::memory(c.dst, eng, dst)},
      {DNNL_ARG_SCRATCHPAD, dnnl::memory(c.scratchpad, eng, Buffer(kSlotScratchpad, c.scratchpad.get_size()))}};
  if (scale != nullptr) {
    const int64_t channels = c.bias.get_dims().back();
    args.emplace(DNNL_ARG_BIAS, dnnl::memory(c.bias, eng, const_cast<float*>(bias)));
    args.emplace(DNNL_ARG_ATTR_SCALES | DNNL_ARG_WEIGHTS,
                 dnnl::memory({{channels}, dt::f32, tag::x}, eng, const_cast<float*>(scale)));
  }
  if (dst_scale != nullptr)
    args.emplace(DNNL_ARG_ATTR_SCALES | DNNL_ARG_DST, dnnl::memory({{1}, dt::f32, tag::x}, eng, const_cast<float*>(dst_scale)));
  if (shortcut != nullptr)  // the binary post-op (the second of the stream's post-ops, Attr)
    args.emplace(DNNL_ARG_ATTR_MULTIPLE_POST_OP(1) | DNNL_ARG_SRC_1, dnnl::memory(c.dst, eng, const_cast<void*>(shortcut)));
  c.prim.execute(stream, args);
  stream.wait();
}

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// A u8/s8 output's requantization: q = round(y * inv_scale) (inv_scale = 1 / scale in float32,
// rounded to nearest even), saturated to the type's range: what oneDNN's dst scale computes, so a
// direct primitive writes these codes itself. Then, with `lowering` (4 rows of `channels` floats:
// inv_step, lo, hi, step), each channel's 4-bit extraction clamp(floor(q * inv_step + 1/2), lo, hi)
// * step (inv_step = 1, lo and hi the type's range, step = 1 leave q as it is). That is the
// activation quantization of the layer that reads this output (flexiq_jax's activation_codes),
// operation for operation in float32, so the codes are the ones it computes from the float output.
struct Requant {
  float scale = 1.f;
  const float* lowering = nullptr;
  int64_t channels = 0;
  float inv = 1.f;  // 1 / scale (Requant::Of)
  static Requant Of(float scale, int64_t channels) { return Requant{scale, nullptr, channels, 1.f / scale}; }
};

inline float Extract(float q, const Requant& rq, int64_t oc) {
  const float* l = rq.lowering;
  const int64_t n = rq.channels;
  return std::fmin(std::fmax(std::floor(q * l[oc] + 0.5f), l[n + oc]), l[2 * n + oc]) * l[3 * n + oc];
}

template <typename T>
inline T RequantCode(float y, const Requant& rq, int64_t oc) {
  const float lo = static_cast<float>(std::numeric_limits<T>::min());
  const float hi = static_cast<float>(std::numeric_limits<T>::max());
  float q = std::fmin(std::fmax(std::nearbyint(y * rq.inv), lo), hi);
  if (rq.lowering) q = Extract(q, rq, oc);
  return static_cast<T>(q);
}

// The 4-bit extraction of 8 channels [oc, oc + 8) of codes q (floats holding the 8-bit codes).
__attribute__((target("avx2"))) inline __m256 Extract8(__m256 q, const Requant& rq, int64_t oc) {
  const float* l = rq.lowering;
  const int64_t n = rq.channels;
  __m256 v = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(q, _mm256_loadu_ps(l + oc)), _mm256_set1_ps(0.5f)));
  v = _mm256_min_ps(_mm256_max_ps(v, _mm256_loadu_ps(l + n + oc)), _mm256_loadu_ps(l + 2 * n + oc));
  return _mm256_mul_ps(v, _mm256_loadu_ps(l + 3 * n + oc));
}

template <typename T>
__attribute__((target("avx2"))) inline void Store8(__m256 q, T* d) {
  const __m256i i = _mm256_cvtps_epi32(q);  // integers within the type's range: exact
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
  const __m128i b = std::is_same_v<T, uint8_t> ? _mm_packus_epi16(w, w) : _mm_packs_epi16(w, w);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(d), b);
}

// RequantCode for the 8 channels [oc, oc + 8) with AVX2 (the same operations: a multiplication,
// rounding to nearest even, min/max, floor), stored as 8 bytes.
template <typename T>
__attribute__((target("avx2"))) inline void RequantStore8(__m256 y, const Requant& rq, int64_t oc, T* d) {
  const float lo8 = static_cast<float>(std::numeric_limits<T>::min());
  const float hi8 = static_cast<float>(std::numeric_limits<T>::max());
  __m256 q = _mm256_round_ps(_mm256_mul_ps(y, _mm256_set1_ps(rq.inv)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  q = _mm256_min_ps(_mm256_max_ps(q, _mm256_set1_ps(lo8)), _mm256_set1_ps(hi8));
  if (rq.lowering) q = Extract8(q, rq, oc);
  Store8<T>(q, d + oc);
}

// The 8-channel blocks of a lowering that change some code (a channel with inv_step != 1), or
// none: at ratio 0 no channel is lowered and the codes stay as the primitive wrote them.
std::vector<int64_t> LoweredBlocks(const Requant& rq) {
  std::vector<int64_t> blocks;
  if (!rq.lowering) return blocks;
  for (int64_t b = 0; b < rq.channels; b += 8)
    for (int64_t oc = b; oc < std::min(b + 8, rq.channels); ++oc)
      if (rq.lowering[oc] != 1.f) {
        blocks.push_back(b);
        break;
      }
  return blocks;
}

// The 4-bit extraction (Requant's lowering) applied in place to u8/s8 codes (rows x channels), on
// the 8-channel blocks that hold a lowered channel.
template <typename T>
__attribute__((target("avx2"))) void ExtractRowsT(T* codes, int64_t rows, const Requant& rq) {
  const std::vector<int64_t> blocks = LoweredBlocks(rq);
  if (blocks.empty()) return;
  const int64_t channels = rq.channels;
  static const bool avx2 = __builtin_cpu_supports("avx2");
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    T* row = codes + r * channels;
    for (const int64_t b : blocks) {
      if (avx2 && b + 8 <= channels) {
        const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + b));
        const __m256i wide = std::is_same_v<T, uint8_t> ? _mm256_cvtepu8_epi32(raw) : _mm256_cvtepi8_epi32(raw);
        Store8<T>(Extract8(_mm256_cvtepi32_ps(wide), rq, b), row + b);
        continue;
      }
      for (int64_t oc = b; oc < std::min(b + 8, channels); ++oc)
        row[oc] = static_cast<T>(Extract(static_cast<float>(row[oc]), rq, oc));
    }
  }
}

// The same extraction in 16-bit integers, 32 codes at a time (AVX-512BW), for steps 2^e with
// e in [0, 7]: floor(q / 2^e + 1/2) = (q + 2^(e-1)) >> e (an arithmetic shift; nothing added for
// e = 0), clamped to [lo, hi], then << e: the float formula's integers exactly. An unlowered
// channel (e = 0, the type's bounds) is left as it is. The codes are taken as one flat array whose
// channel pattern repeats every lcm(channels, 32) bytes (a period): the 32-byte blocks of a period
// that hold a lowered channel are done in every period, so layers with few channels run full
// vectors too. Returns false (nothing done) where a step is not such a power of two or the period
// is long.
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl"))) bool ExtractRowsAvx512(T* codes, int64_t rows, const Requant& rq) {
  const int64_t channels = rq.channels, period = std::lcm<int64_t>(channels, 32);
  if (period > 8192) return false;
  const float* l = rq.lowering;
  std::vector<int16_t> add(period), shift(period), lo(period), hi(period);
  std::vector<int64_t> blocks;  // offsets within the period
  for (int64_t j = 0; j < period; ++j) {
    const int64_t oc = j % channels;
    int e = 0;
    while (e <= 7 && static_cast<float>(1 << e) != l[3 * channels + oc]) ++e;
    if (e > 7 || l[oc] != 1.f / static_cast<float>(1 << e)) return false;
    shift[j] = static_cast<int16_t>(e);
    add[j] = static_cast<int16_t>(e > 0 ? 1 << (e - 1) : 0);
    lo[j] = static_cast<int16_t>(l[channels + oc]);
    hi[j] = static_cast<int16_t>(l[2 * channels + oc]);
    if (l[oc] != 1.f && (blocks.empty() || blocks.back() != j / 32 * 32)) blocks.push_back(j / 32 * 32);
  }
  if (blocks.empty()) return true;
  constexpr bool kUnsigned = std::is_same_v<T, uint8_t>;
  const int64_t total = rows * channels, periods = (total + period - 1) / period;
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < periods; ++p) {
    T* base = codes + p * period;
    const int64_t left = total - p * period;  // the last period may be cut short
    for (const int64_t b : blocks) {
      if (b >= left) break;
      const int64_t n = std::min<int64_t>(32, left - b);
      const __mmask32 m = n == 32 ? ~__mmask32(0) : (__mmask32(1) << n) - 1;
      const __m256i raw = _mm256_maskz_loadu_epi8(m, base + b);
      __m512i v = kUnsigned ? _mm512_cvtepu8_epi16(raw) : _mm512_cvtepi8_epi16(raw);
      const __m512i sh = _mm512_loadu_si512(shift.data() + b);
      v = _mm512_srav_epi16(_mm512_add_epi16(v, _mm512_loadu_si512(add.data() + b)), sh);
      v = _mm512_min_epi16(_mm512_max_epi16(v, _mm512_loadu_si512(lo.data() + b)), _mm512_loadu_si512(hi.data() + b));
      v = _mm512_sllv_epi16(v, sh);
      const __m256i packed = kUnsigned ? _mm512_cvtusepi16_epi8(v) : _mm512_cvtsepi16_epi8(v);
      _mm256_mask_storeu_epi8(base + b, m, packed);
    }
  }
  return true;
}

void ExtractRows(void* codes, int64_t rows, const Requant& rq, dt out) {
  static const bool avx512bw = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  if (!rq.lowering) return;
  if (out == dt::u8) {
    if (!(avx512bw && ExtractRowsAvx512(static_cast<uint8_t*>(codes), rows, rq)))
      ExtractRowsT(static_cast<uint8_t*>(codes), rows, rq);
  } else if (!(avx512bw && ExtractRowsAvx512(static_cast<int8_t*>(codes), rows, rq))) {
    ExtractRowsT(static_cast<int8_t*>(codes), rows, rq);
  }
}

inline float PostOp(float y, int64_t post_op) {
  if (post_op == 1) return y > 0.f ? y : 0.f;
  if (post_op == 2) return std::fmin(std::fmax(y, 0.f), 6.f);
  if (post_op == 3) return 0.5f * y * (1.f + std::erf(y * 0.70710678118654752f));
  return y;
}

// The accumulators from split or shifted runs, and the epilogue:
//   acc[r, oc] = factor * hi[r * hi_row + hi_col[oc]] + lo[r * lo_row + lo_col[oc]] + offset[oc]
// (lo and offset optional), then written to dst[r, oc] as s32, or through the epilogue.
struct Combine {
  const int32_t* hi;
  int64_t hi_row;
  std::vector<int64_t> hi_col;
  int32_t factor = 1;
  const int32_t* lo = nullptr;
  int64_t lo_row = 0;
  std::vector<int64_t> lo_col;
  const int32_t* offset = nullptr;
};

void CombineAndFinish(const Combine& k, int64_t rows, int64_t channels, const float* scale, const float* bias,
                      const Requant& rq, int64_t post_op, dt out, void* dst) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* hi = k.hi + r * k.hi_row;
    const int32_t* lo = k.lo ? k.lo + r * k.lo_row : nullptr;
    for (int64_t oc = 0; oc < channels; ++oc) {
      int32_t acc = k.factor * hi[k.hi_col[oc]];
      if (lo) acc += lo[k.lo_col[oc]];
      if (k.offset) acc += k.offset[oc];
      const int64_t i = r * channels + oc;
      if (out == dt::s32) {
        static_cast<int32_t*>(dst)[i] = acc;
        continue;
      }
      const float y = PostOp(static_cast<float>(acc) * scale[oc] + bias[oc], post_op);
      if (out == dt::f32) static_cast<float*>(dst)[i] = y;
      else if (out == dt::u8) static_cast<uint8_t*>(dst)[i] = RequantCode<uint8_t>(y, rq, oc);
      else static_cast<int8_t*>(dst)[i] = RequantCode<int8_t>(y, rq, oc);
    }
  }
}

// s8 codes as u8 (x + 128); for a conv also padded with 128, the shifted zero.
std::unique_ptr<uint8_t[]> Shifted(const Geometry& g, const int8_t* x) {
  if (!g.conv) {
    auto u = Uninitialized<uint8_t>(g.n * g.c);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < g.n * g.c; ++i) u[i] = static_cast<uint8_t>(x[i] + 128);
    return u;
  }
  const int64_t hp = g.h + g.pad_lo[0] + g.pad_hi[0], wp = g.w + g.pad_lo[1] + g.pad_hi[1];
  auto u = Uninitialized<uint8_t>(g.n * hp * wp * g.c);
  std::memset(u.get(), 128, g.n * hp * wp * g.c);
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < g.n; ++b)
    for (int64_t i = 0; i < g.h; ++i) {
      const int8_t* from = x + (b * g.h + i) * g.w * g.c;
      uint8_t* to = u.get() + ((b * hp + i + g.pad_lo[0]) * wp + g.pad_lo[1]) * g.c;
      for (int64_t j = 0; j < g.w * g.c; ++j) to[j] = static_cast<uint8_t>(from[j] + 128);
    }
  return u;
}

// -shift * the sum of each output channel's weights (channels last: HWIO or (K, N)).
std::vector<int32_t> ShiftOffset(const Geometry& g, const int8_t* weights, int32_t shift = 128) {
  std::vector<int32_t> offset(g.o, 0);
  int32_t* __restrict__ sum = offset.data();
  const int64_t rows = g.weight_count() / g.o;  // row by row: no division per weight, vectorized
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* __restrict__ w = weights + r * g.o;
    for (int64_t oc = 0; oc < g.o; ++oc) sum[oc] += w[oc];
  }
  for (auto& v : offset) v *= -shift;
  return offset;
}

// The single mode's sparse remainder (file comment): per chunk of images, the nonzero r in input
// order, and for every input pixel the end of its entries in its chunk's list (a pixel's entries
// begin where the previous pixel's end, or at 0 for a chunk's first pixel).
struct Remainder {
  int32_t column;  // the input pixel's column (a matmul: 0)
  int32_t channel;
  int32_t value;
};

struct SparseRemainder {
  int64_t chunks = 0;
  std::vector<std::vector<Remainder>> lists;
  std::vector<int64_t> chunk_first_image;  // chunks + 1 entries
  std::vector<int32_t> chunk_of_image;
  int32_t* pixel_end = nullptr;            // n * h * w entries
};

// One image row of the split (pixels [0, count) of `channels` codes each): the low codes to `to`,
// the nonzero remainders appended to `list`, each pixel's list end to `end`. u8 codes: lo =
// min(x, top), r = x - lo; s8 codes: v = x + z, lo = clamp(v, 0, top), r = v - lo.
void SplitRowU8Plain(const uint8_t* __restrict__ x, uint8_t* __restrict__ to, int64_t count, int64_t channels,
                     int32_t top, std::vector<Remainder>& list, int32_t* __restrict__ end) {
  const uint8_t t = static_cast<uint8_t>(top);
  uint8_t m = 0;
  for (int64_t j = 0; j < count * channels; ++j) {  // the whole row at once: vectorizes for any channels
    const uint8_t v = x[j];
    to[j] = v < t ? v : t;
    m = m > v ? m : v;
  }
  for (int64_t p = 0; p < count; ++p) {
    if (m > t)
      for (int64_t c = 0; c < channels; ++c)
        if (x[p * channels + c] > t) list.push_back({static_cast<int32_t>(p), static_cast<int32_t>(c), x[p * channels + c] - top});
    end[p] = static_cast<int32_t>(list.size());
  }
}

void SplitRowS8Plain(const int8_t* __restrict__ x, uint8_t* __restrict__ to, int64_t count, int64_t channels,
                     int32_t top, int32_t z, std::vector<Remainder>& list, int32_t* __restrict__ end) {
  // v in [0, top] <=> x in [-z, top - z]; both bounds lie in [-128, 127] (z <= 128, top - z <= 127).
  const int8_t lo_code = static_cast<int8_t>(std::max(-z, -128)), hi_code = static_cast<int8_t>(std::min(top - z, 127));
  int8_t mn = 127, mx = -128;
  for (int64_t j = 0; j < count * channels; ++j) {  // the whole row at once: vectorizes for any channels
    const int8_t v = x[j];
    const int8_t l = v < lo_code ? lo_code : v > hi_code ? hi_code : v;
    to[j] = static_cast<uint8_t>(l + z);
    mn = mn < v ? mn : v;
    mx = mx > v ? mx : v;
  }
  const bool any = mn < lo_code || mx > hi_code;
  for (int64_t p = 0; p < count; ++p) {
    if (any)
      for (int64_t c = 0; c < channels; ++c) {
        const int32_t v = x[p * channels + c];
        if (v < lo_code || v > hi_code) {
          const int32_t l = v < lo_code ? lo_code : hi_code;
          list.push_back({static_cast<int32_t>(p), static_cast<int32_t>(c), v - l});
        }
      }
    end[p] = static_cast<int32_t>(list.size());
  }
}

// The same for any channel count, u8 or s8 codes (s8: v = x + z, lo = clamp(v, 0, top)), with
// AVX2: the row as one run of bytes, 32 at a time; the codes outside the low range found from a
// byte mask (j -> pixel j / channels, channel j % channels), then each pixel's list end.
template <bool kSigned>
__attribute__((target("avx2"))) void SplitRowAnyAvx2(const uint8_t* __restrict__ x, uint8_t* __restrict__ to,
                                                     int64_t count, int64_t channels, int32_t top, int32_t z,
                                                     std::vector<Remainder>& list, int32_t* __restrict__ end) {
  const int64_t n = count * channels, first = static_cast<int64_t>(list.size());
  // u8: low iff x <= top; s8: low iff lo_code <= x <= hi_code, and lo = clamp(x) + z.
  const int32_t lo_code = std::max(-z, -128), hi_code = std::min(top - z, 127);
  auto add = [&](int64_t j) {
    const int32_t v = kSigned ? static_cast<int32_t>(static_cast<int8_t>(x[j])) : static_cast<int32_t>(x[j]);
    const int32_t r = kSigned ? (v < lo_code ? v - lo_code : v - hi_code) : v - top;
    list.push_back({static_cast<int32_t>(j / channels), static_cast<int32_t>(j % channels), r});
  };
  const __m256i t = _mm256_set1_epi8(static_cast<char>(kSigned ? hi_code : top));
  const __m256i above = _mm256_set1_epi8(static_cast<char>(kSigned ? hi_code : std::min(top + 1, 255)));
  const __m256i below = _mm256_set1_epi8(static_cast<char>(lo_code));
  const __m256i shift = _mm256_set1_epi8(static_cast<char>(z));
  int64_t j0 = 0;
  for (; j0 + 32 <= n; j0 += 32) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j0));
    uint32_t mask;
    if constexpr (kSigned) {
      const __m256i l = _mm256_min_epi8(_mm256_max_epi8(v, below), t);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(to + j0), _mm256_add_epi8(l, shift));  // in [0, top]
      mask = static_cast<uint32_t>(_mm256_movemask_epi8(
          _mm256_or_si256(_mm256_cmpgt_epi8(below, v), _mm256_cmpgt_epi8(v, above))));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(to + j0), _mm256_min_epu8(v, t));
      // v > top  <=>  max(v, top + 1) == v  (top < 255 here)
      mask = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(_mm256_max_epu8(v, above), v)));
    }
    while (mask) {
      add(j0 + __builtin_ctz(mask));
      mask &= mask - 1;
    }
  }
  for (int64_t j = j0; j < n; ++j) {
    const int32_t v = kSigned ? static_cast<int32_t>(static_cast<int8_t>(x[j])) : static_cast<int32_t>(x[j]);
    const int32_t l = kSigned ? std::min(std::max(v, lo_code), hi_code) : std::min(v, top);
    to[j] = static_cast<uint8_t>(kSigned ? l + z : l);
    if (v != l) add(j);
  }
  int64_t e = first;
  const int64_t size = static_cast<int64_t>(list.size());
  for (int64_t p = 0; p < count; ++p) {
    while (e < size && list[e].column == p) ++e;
    end[p] = static_cast<int32_t>(e);
  }
}

void SplitRowU8(const uint8_t* x, uint8_t* to, int64_t count, int64_t channels, int32_t top,
                std::vector<Remainder>& list, int32_t* end) {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2 && top < 255) SplitRowAnyAvx2<false>(x, to, count, channels, top, 0, list, end);
  else SplitRowU8Plain(x, to, count, channels, top, list, end);
}

void SplitRowS8(const int8_t* x, uint8_t* to, int64_t count, int64_t channels, int32_t top, int32_t z,
                std::vector<Remainder>& list, int32_t* end) {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) SplitRowAnyAvx2<true>(reinterpret_cast<const uint8_t*>(x), to, count, channels, top, z, list, end);
  else SplitRowS8Plain(x, to, count, channels, top, z, list, end);
}

// acc[j] += r * w[j], j < n (vectorized by the compiler; an AVX2 clone where the CPU has it).
__attribute__((target_clones("avx2", "default"))) void Axpy(int32_t* __restrict__ acc, const int8_t* __restrict__ w, int32_t r,
                                                            int64_t n) {
  for (int64_t j = 0; j < n; ++j) acc[j] += r * static_cast<int32_t>(w[j]);
}

// One remainder's contribution to an output row: value times a weight row.
struct Term {
  int32_t value;
  const int8_t* w;
};

// acc[j] += sum_e terms[e].value * terms[e].w[j], j < n (the portable form).
void AddTermsPlain(int32_t* __restrict__ acc, const Term* terms, int64_t count, int64_t n) {
  for (int64_t e = 0; e < count; ++e) Axpy(acc, terms[e].w, terms[e].value, n);
}

// The same with AVX2 for n a multiple of 16: two terms at a time as 16-bit pairs (w_a[j], w_b[j])
// multiplied by (r_a, r_b) and summed into 32 bits by vpmaddwd (|r| <= 255 and |w| <= 128, so
// every product and pair sum is exact), the sums of a block of 32 outputs kept in registers.
__attribute__((target("avx2"))) void AddTermsAvx2(int32_t* __restrict__ acc, const Term* terms, int64_t count,
                                                  int64_t n) {
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const bool two = j0 + 32 <= n;  // a block of 32 outputs, else of 16
    __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256(), s2 = _mm256_setzero_si256(),
            s3 = _mm256_setzero_si256();
    for (int64_t e = 0; e < count; e += 2) {
      const Term& ta = terms[e];
      const Term zero{0, ta.w};
      const Term& tb = e + 1 < count ? terms[e + 1] : zero;
      const __m256i r = _mm256_set1_epi32(static_cast<int32_t>((static_cast<uint32_t>(tb.value) << 16) |
                                                                (static_cast<uint32_t>(ta.value) & 0xffffu)));
      __m256i wa = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ta.w + j0)));
      __m256i wb = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tb.w + j0)));
      s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_unpacklo_epi16(wa, wb), r));  // j 0-3, 8-11
      s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_unpackhi_epi16(wa, wb), r));  // j 4-7, 12-15
      if (two) {
        wa = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ta.w + j0 + 16)));
        wb = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tb.w + j0 + 16)));
        s2 = _mm256_add_epi32(s2, _mm256_madd_epi16(_mm256_unpacklo_epi16(wa, wb), r));
        s3 = _mm256_add_epi32(s3, _mm256_madd_epi16(_mm256_unpackhi_epi16(wa, wb), r));
      }
    }
    __m256i* out = reinterpret_cast<__m256i*>(acc + j0);
    _mm256_storeu_si256(out, _mm256_add_epi32(_mm256_loadu_si256(out), _mm256_permute2x128_si256(s0, s1, 0x20)));
    _mm256_storeu_si256(out + 1, _mm256_add_epi32(_mm256_loadu_si256(out + 1), _mm256_permute2x128_si256(s0, s1, 0x31)));
    if (two) {
      _mm256_storeu_si256(out + 2, _mm256_add_epi32(_mm256_loadu_si256(out + 2), _mm256_permute2x128_si256(s2, s3, 0x20)));
      _mm256_storeu_si256(out + 3, _mm256_add_epi32(_mm256_loadu_si256(out + 3), _mm256_permute2x128_si256(s2, s3, 0x31)));
      j0 += 16;
    }
  }
}

void AddTerms(int32_t* acc, const Term* terms, int64_t count, int64_t n) {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2 && n % 16 == 0) AddTermsAvx2(acc, terms, count, n);
  else AddTermsPlain(acc, terms, count, n);
}

// The epilogue of one output row of accumulators (offset optional): dst may be acc itself.
template <typename Out, int kPostOp>
inline void EpilogueRowPlain(const int32_t* a, int64_t channels, const int32_t* offset, const float* scale,
                        const float* bias, const Requant& rq, Out* d) {
  for (int64_t oc = 0; oc < channels; ++oc) {
    const int32_t v = offset ? a[oc] + offset[oc] : a[oc];
    if constexpr (std::is_same_v<Out, int32_t>) {
      d[oc] = v;
    } else {
      const float y = PostOp(static_cast<float>(v) * scale[oc] + bias[oc], kPostOp);
      if constexpr (std::is_same_v<Out, float>) d[oc] = y;
      else d[oc] = RequantCode<Out>(y, rq, oc);
    }
  }
}

// The float epilogue of one row with AVX2 (channels a multiple of 8; no post-op, ReLU or ReLU6):
// the same operations in the same order, so the same floats.
template <int kPostOp>
__attribute__((target("avx2"))) void EpilogueRowF32Avx2(const int32_t* a, int64_t channels, const int32_t* offset,
                                                         const float* scale, const float* bias, float* d) {
  const __m256 zero = _mm256_setzero_ps(), six = _mm256_set1_ps(6.f);
  for (int64_t oc = 0; oc < channels; oc += 8) {
    __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + oc));
    if (offset) v = _mm256_add_epi32(v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(offset + oc)));
    // No FMA: the multiply and the add rounded separately, as the plain loop does.
    __m256 y = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_loadu_ps(scale + oc)),
                             _mm256_loadu_ps(bias + oc));
    if constexpr (kPostOp == 1) y = _mm256_max_ps(y, zero);
    if constexpr (kPostOp == 2) y = _mm256_min_ps(_mm256_max_ps(y, zero), six);
    _mm256_storeu_ps(d + oc, y);
  }
}

// The same to requantized u8/s8 codes (RequantStore8).
template <typename Out, int kPostOp>
__attribute__((target("avx2"))) void EpilogueRowCodesAvx2(const int32_t* a, int64_t channels, const int32_t* offset,
                                                           const float* scale, const float* bias, const Requant& rq,
                                                           Out* d) {
  const __m256 zero = _mm256_setzero_ps(), six = _mm256_set1_ps(6.f);
  for (int64_t oc = 0; oc < channels; oc += 8) {
    __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + oc));
    if (offset) v = _mm256_add_epi32(v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(offset + oc)));
    __m256 y = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_loadu_ps(scale + oc)),
                             _mm256_loadu_ps(bias + oc));
    if constexpr (kPostOp == 1) y = _mm256_max_ps(y, zero);
    if constexpr (kPostOp == 2) y = _mm256_min_ps(_mm256_max_ps(y, zero), six);
    RequantStore8<Out>(y, rq, oc, d);
  }
}

template <typename Out, int kPostOp>
inline void EpilogueRow(const int32_t* a, int64_t channels, const int32_t* offset, const float* scale,
                        const float* bias, const Requant& rq, Out* d) {
  if constexpr (kPostOp != 3 && !std::is_same_v<Out, int32_t>) {
    static const bool avx2 = __builtin_cpu_supports("avx2");
    if (avx2 && channels % 8 == 0) {
      if constexpr (std::is_same_v<Out, float>) return EpilogueRowF32Avx2<kPostOp>(a, channels, offset, scale, bias, d);
      else return EpilogueRowCodesAvx2<Out, kPostOp>(a, channels, offset, scale, bias, rq, d);
    }
  }
  EpilogueRowPlain<Out, kPostOp>(a, channels, offset, scale, bias, rq, d);
}

// The single mode's last pass, one output row at a time: the remainder of every input pixel the
// row's taps read (a gather, so rows run in parallel and each is read and written once), then the
// epilogue. acc: the primitive's accumulators; dst may be acc itself.
template <typename Out, int kPostOp>
void FinishSingleT(const Geometry& g, const SparseRemainder& rem, const int8_t* weights, int32_t* acc,
                   const int32_t* offset, const float* scale, const float* bias, const Requant& rq, Out* dst,
                   bool epilogue) {
  const int64_t cg = g.c / g.groups, og = g.group_out(), taps = g.kh * g.kw;
#pragma omp parallel
  {
    std::vector<Term> terms;
    std::vector<int64_t> term_out;  // grouped convs: each term's first output channel
    terms.reserve(taps * cg);
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < g.n; ++b)
      for (int64_t oy = 0; oy < g.oh; ++oy) {
        const int64_t k = rem.chunk_of_image[b];
        const int64_t chunk_first_pixel = rem.chunk_first_image[k] * g.h * g.w;
        const std::vector<Remainder>& list = rem.lists[k];
        for (int64_t ox = 0; ox < g.ow; ++ox) {
          const int64_t row = (b * g.oh + oy) * g.ow + ox;
          int32_t* a = acc + row * g.o;
          terms.clear();
          term_out.clear();
          // Per kernel row: the input row's pixels under the taps are one range of the list.
          const int64_t dx = g.dilation[1] + 1, x0 = ox * g.strides[1] - g.pad_lo[1];
          const int64_t first = std::max<int64_t>(x0, 0), last = std::min<int64_t>(x0 + (g.kw - 1) * dx, g.w - 1);
          for (int64_t ta = 0; ta < g.kh && first <= last; ++ta) {
            const int64_t iy = oy * g.strides[0] - g.pad_lo[0] + ta * (g.dilation[0] + 1);
            if (iy < 0 || iy >= g.h) continue;
            const int64_t p0 = (b * g.h + iy) * g.w + first, p1 = (b * g.h + iy) * g.w + last;
            const int64_t e0 = p0 == chunk_first_pixel ? 0 : rem.pixel_end[p0 - 1], e1 = rem.pixel_end[p1];
            for (int64_t e = e0; e < e1; ++e) {
              const int64_t tx = list[e].column - x0;  // the tap's offset: td * dx
              if (dx != 1 && tx % dx != 0) continue;
              const int64_t ch = list[e].channel;
              const int8_t* w_tap = weights + (ta * g.kw + tx / dx) * cg * g.o;
              if (g.groups == 1) {
                terms.push_back({list[e].value, w_tap + ch * g.o});
              } else {
                const int64_t q = ch / cg;
                terms.push_back({list[e].value, w_tap + (ch % cg) * g.o + q * og});
                term_out.push_back(q * og);
              }
            }
          }
          if (g.groups == 1) {
            if (!terms.empty()) AddTerms(a, terms.data(), static_cast<int64_t>(terms.size()), g.o);
          } else {
            for (size_t e = 0; e < terms.size(); ++e) Axpy(a + term_out[e], terms[e].w, terms[e].value, og);
          }
          if (epilogue) EpilogueRow<Out, kPostOp>(a, g.o, offset, scale, bias, rq, dst + row * g.o);
        }
      }
  }
}

template <typename Out>
void FinishSingleFor(const Geometry& g, const SparseRemainder& rem, const int8_t* weights, int32_t* acc,
                     const int32_t* offset, const float* scale, const float* bias, const Requant& rq, int64_t post_op,
                     Out* dst, bool epilogue) {
  switch (post_op) {
    case 1: return FinishSingleT<Out, 1>(g, rem, weights, acc, offset, scale, bias, rq, dst, epilogue);
    case 2: return FinishSingleT<Out, 2>(g, rem, weights, acc, offset, scale, bias, rq, dst, epilogue);
    case 3: return FinishSingleT<Out, 3>(g, rem, weights, acc, offset, scale, bias, rq, dst, epilogue);
    default: return FinishSingleT<Out, 0>(g, rem, weights, acc, offset, scale, bias, rq, dst, epilogue);
  }
}


// Runs a layer in the single mode (file comment). Returns false (nothing written) where the
// remainder is too dense to pay, so that the caller splits instead.
constexpr int64_t kParallelSplitCodes = int64_t{1} << 24;

bool RunSingle(const Geometry& g, dt src_t, const void* x, const int8_t* weights, dt out, void* dst,
               const float* scale, const float* bias, const Requant& rq, int64_t post_op) {
  int64_t t0 = NowNs();
  const bool s8 = src_t == dt::s8;
  auto c = Get(g, {dt::u8, s8, 1, dt::s32, false, 0});
  std::shared_ptr<Reordered> kept;
  int32_t max_abs;
  if (c->reorder_weights) {
    dnnl::stream stream(Engine());
    kept = ReorderedWeights(*c, weights, stream);
    max_abs = kept->max_abs;
  } else {
    max_abs = MaxAbs(weights, g.weight_count());
  }
  // The largest 7+-bit code t with 2 * t * max|w| <= 32767 (127 for any int8 weights; 146 for
  // weights within +-112), and z, the shift that centres s8 codes on [0, t].
  const int32_t top = std::min<int32_t>(255, 32767 / (2 * std::max<int32_t>(max_abs, 1)));
  const int32_t z = s8 ? (top + 1) / 2 : 0;
  const int64_t hp = s8 ? g.h + g.pad_lo[0] + g.pad_hi[0] : g.h, wp = s8 ? g.w + g.pad_lo[1] + g.pad_hi[1] : g.w;
  const int64_t plane = g.h * g.w * g.c;  // one image (a conv) or one row (a matmul)
  uint8_t* lo = static_cast<uint8_t*>(Buffer(kSlotLo, g.n * hp * wp * g.c));
  if (s8 && (hp != g.h || wp != g.w)) std::memset(lo, z, g.n * hp * wp * g.c);
  // The low codes and the nonzero remainders, per chunk of images (rows): chunks split in parallel.
  SparseRemainder rem;
  rem.chunks = std::min<int64_t>(g.n, 4 * static_cast<int64_t>(omp_get_max_threads()));
  rem.lists.resize(rem.chunks);
  rem.chunk_first_image.resize(rem.chunks + 1);
  rem.chunk_of_image.resize(g.n);
  for (int64_t k = 0; k <= rem.chunks; ++k) rem.chunk_first_image[k] = g.n * k / rem.chunks;
  for (int64_t k = 0; k < rem.chunks; ++k)
    for (int64_t b = rem.chunk_first_image[k]; b < rem.chunk_first_image[k + 1]; ++b) rem.chunk_of_image[b] = k;
  rem.pixel_end = static_cast<int32_t*>(Buffer(kSlotPixelEnd, g.n * g.h * g.w * sizeof(int32_t)));
  int64_t total = 0;
  // One thread unless the input is large: the split is a light pass (about a millisecond per few
  // million codes), and waiting for a second thread to be scheduled on a busy machine costs more.
  const bool parallel_split = g.n * plane >= kParallelSplitCodes;
#pragma omp parallel for schedule(static) reduction(+ : total) if (parallel_split)
  for (int64_t k = 0; k < rem.chunks; ++k) {
    std::vector<Remainder>& list = rem.lists[k];
    for (int64_t b = rem.chunk_first_image[k]; b < rem.chunk_first_image[k + 1]; ++b)
      for (int64_t i = 0; i < g.h; ++i) {
        const int64_t from = (b * g.h + i) * g.w;  // the row's first pixel
        uint8_t* to = lo + ((b * hp + i + (s8 ? g.pad_lo[0] : 0)) * wp + (s8 ? g.pad_lo[1] : 0)) * g.c;
        if (s8)
          SplitRowS8(static_cast<const int8_t*>(x) + from * g.c, to, g.w, g.c, top, z, list, rem.pixel_end + from);
        else
          SplitRowU8(static_cast<const uint8_t*>(x) + from * g.c, to, g.w, g.c, top, list, rem.pixel_end + from);
      }
    total += static_cast<int64_t>(list.size());
  }
  if (8 * total > g.n * plane) return false;  // dense: splitting the weights costs less
  counts[kRunSingle] += 1;
  counts[kSingleRemainders] += total;
  counts[kSingleInputs] += g.n * plane;
  int64_t t1 = NowNs();
  counts[kSingleNsSplitCodes] += t1 - t0;

  const int64_t rows = g.rows();
  int32_t* acc = out == dt::s32 || out == dt::f32 ? static_cast<int32_t*>(dst)  // in place: same size
                                                  : static_cast<int32_t*>(Buffer(kSlotAcc, rows * g.o * 4));
  Execute(*c, lo, weights, acc, nullptr, nullptr, kept);
  t0 = NowNs();
  counts[kSingleNsPrimitive] += t0 - t1;

  // One pass over the outputs: the remainder's contributions, then the epilogue.
  const bool epilogue = !(out == dt::s32 && !s8);
  if (total > 0 || epilogue) {
    const std::vector<int32_t> offset = s8 ? ShiftOffset(g, weights, z) : std::vector<int32_t>();
    const int32_t* off = s8 ? offset.data() : nullptr;
    if (out == dt::s32) FinishSingleFor(g, rem, weights, acc, off, scale, bias, rq, 0, static_cast<int32_t*>(dst), epilogue);
    else if (out == dt::f32) FinishSingleFor(g, rem, weights, acc, off, scale, bias, rq, post_op, static_cast<float*>(dst), epilogue);
    else if (out == dt::u8) FinishSingleFor(g, rem, weights, acc, off, scale, bias, rq, post_op, static_cast<uint8_t*>(dst), epilogue);
    else FinishSingleFor(g, rem, weights, acc, off, scale, bias, rq, post_op, static_cast<int8_t*>(dst), epilogue);
  }
  counts[kSingleNsFinish] += NowNs() - t0;
  return true;
}

// Whether a depthwise u8 primitive gives the exact accumulators on a probe with the largest
// products: every code 255, each channel's weights all 127 or all -128 (saturating pair sums and
// halving both show), and a second probe of varied codes and weights.
bool ProbeDepthwise(const Geometry& g, const Cached& c) {
  const int64_t in = g.n * c.src.get_dims()[2] * c.src.get_dims()[3] * g.c;
  const int64_t ih = c.src.get_dims()[2], iw = c.src.get_dims()[3];
  const dims pl = ih == g.h ? g.pad_lo : dims{0, 0};
  std::vector<uint8_t> x(in);
  std::vector<int8_t> w(g.weight_count());
  std::vector<int32_t> got(g.rows() * g.o);
  for (int trial = 0; trial < 2; ++trial) {
    for (int64_t i = 0; i < in; ++i) x[i] = trial == 0 ? 255 : static_cast<uint8_t>((i * 37 + 11) % 256);
    for (int64_t i = 0; i < g.weight_count(); ++i) {
      const int64_t oc = i % g.o;
      w[i] = trial == 0 ? (oc % 2 ? 127 : -128) : static_cast<int8_t>((i * 53 + oc * 7) % 255 - 127);
    }
    Execute(c, x.data(), w.data(), got.data());
    for (int64_t b = 0; b < g.n; ++b)
      for (int64_t y = 0; y < g.oh; ++y)
        for (int64_t z = 0; z < g.ow; ++z)
          for (int64_t oc = 0; oc < g.o; ++oc) {
            int64_t acc = 0;
            for (int64_t a = 0; a < g.kh; ++a)
              for (int64_t d = 0; d < g.kw; ++d) {
                const int64_t yy = y * g.strides[0] + a * (g.dilation[0] + 1) - pl[0];
                const int64_t zz = z * g.strides[1] + d * (g.dilation[1] + 1) - pl[1];
                if (yy < 0 || yy >= ih || zz < 0 || zz >= iw) continue;
                acc += int64_t(x[((b * ih + yy) * iw + zz) * g.c + oc]) * w[(a * g.kw + d) * g.o + oc];
              }
            if (acc != got[((b * g.oh + y) * g.ow + z) * g.o + oc]) return false;
          }
  }
  return true;
}

// The residual pass: y = post_op(y + addend) in place (post_op none or ReLU vectorized), and with
// `codes` also the sum's requantization (Requant) to u8/s8 codes: the activation codes of the layer
// that reads the sum, written while the sum is in registers.
template <typename T>
__attribute__((target("avx2"))) void AddRowsAvx2(float* y, const float* addend, int64_t rows, int64_t channels,
                                                int64_t post_op, const Requant& rq, T* codes) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t oc = 0; oc < channels; oc += 8) {
      const int64_t i = r * channels + oc;
      __m256 v = _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_loadu_ps(addend + i));
      if (post_op == 1) v = _mm256_max_ps(v, _mm256_setzero_ps());
      _mm256_storeu_ps(y + i, v);
      if (codes) RequantStore8<T>(v, rq, oc, codes + r * channels);
    }
}

template <typename T>
void AddRows(float* y, const float* addend, int64_t rows, int64_t channels, int64_t post_op, const Requant& rq,
             T* codes) {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2 && channels % 8 == 0 && (post_op == 0 || post_op == 1)) {
    AddRowsAvx2<T>(y, addend, rows, channels, post_op, rq, codes);
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t oc = 0; oc < channels; ++oc) {
      const int64_t i = r * channels + oc;
      y[i] = PostOp(y[i] + addend[i], post_op);
      if (codes) codes[i] = RequantCode<T>(y[i], rq, oc);
    }
}

// Runs one layer (file comment): x are the codes (src type `src_t`), weights plain (HWIO or
// (K, N)), dst of type `out`; with `addend`, the residual sum (and with `codes`, its u8/s8 codes of
// type `codes_t`, AddRows).
ffi::Error Run(const Geometry& g, dt src_t, const void* x, const int8_t* weights, dt out, void* dst,
               const float* scale, const float* bias, const Requant& rq, int64_t post_op, int64_t mode,
               const float* addend = nullptr, dt codes_t = dt::undef, void* codes = nullptr) {
  try {
    if (addend != nullptr) {  // an f32 output (ConvRun checks)
      float* y = static_cast<float*>(dst);
      if (auto e = Run(g, src_t, x, weights, out, dst, scale, bias, Requant(), 0, mode); e.failure()) return e;
      if (codes_t == dt::s8) AddRows(y, addend, g.rows(), g.o, post_op, rq, static_cast<int8_t*>(codes));
      else AddRows(y, addend, g.rows(), g.o, post_op, rq, static_cast<uint8_t*>(codes));
      return ffi::Error::Success();
    }
    const bool fuse = out != dt::s32;
    // A u8/s8 output of a fused primitive: the primitive writes the 8-bit codes itself (oneDNN's
    // dst scale: round(y * (1 / scale)), saturated), then the lowered channels' 4-bit extraction
    // runs in place on the codes (ExtractRows; nothing to do where no channel is lowered).
    const bool codes = out == dt::u8 || out == dt::s8;
    const float* dst_scale = codes ? &rq.scale : nullptr;
    if (mode == 2 || (mode == 0 && HasVnni())) {
      Execute(*Get(g, {src_t, false, 1, out, fuse, fuse ? post_op : 0}), x, weights, dst, fuse ? scale : nullptr,
              bias, nullptr, dst_scale);
      if (codes) ExtractRows(dst, g.rows(), rq, out);
      counts[kRunDirect] += 1;
      return ffi::Error::Success();
    }
    if (mode == 3 || (mode == 0 && !g.depthwise())) {
      if (RunSingle(g, src_t, x, weights, out, dst, scale, bias, rq, post_op)) return ffi::Error::Success();
    }
    const bool shift = src_t == dt::s8;
    std::unique_ptr<uint8_t[]> shifted = shift ? Shifted(g, static_cast<const int8_t*>(x)) : nullptr;
    const void* u = shift ? static_cast<const void*>(shifted.get()) : x;
    const std::vector<int32_t> offset = shift ? ShiftOffset(g, weights) : std::vector<int32_t>();
    const int64_t rows = g.rows(), og = g.group_out();
    std::vector<int64_t> plain(g.o);
    for (int64_t oc = 0; oc < g.o; ++oc) plain[oc] = oc;

    if (mode == 0 && g.depthwise()) {  // one u8 primitive, where the probe shows it exact
      auto c = Get(g, {dt::u8, shift, 1, dt::s32, false, 0});
      {
        std::lock_guard<std::mutex> lock(cache_mutex);
        if (c->probe < 0) c->probe = ProbeDepthwise(g, *c) ? 1 : 0;
      }
      if (c->probe == 1) {
        counts[kRunDepthwise] += 1;
        if (!shift) {
          auto f = Get(g, {dt::u8, false, 1, out, fuse, fuse ? post_op : 0});
          Execute(*f, x, weights, dst, fuse ? scale : nullptr, bias, nullptr, dst_scale);
          if (codes) ExtractRows(dst, rows, rq, out);
          return ffi::Error::Success();
        }
        auto acc = Uninitialized<int32_t>(rows * g.o);
        Execute(*c, u, weights, acc.get());
        Combine k{acc.get(), g.o, plain};
        k.offset = offset.data();
        CombineAndFinish(k, rows, g.o, scale, bias, rq, post_op, out, dst);
        return ffi::Error::Success();
      }
      if (RunSingle(g, src_t, x, weights, out, dst, scale, bias, rq, post_op)) return ffi::Error::Success();
    }
    // Split: the halves w >> 1 and w & 1.
    counts[kRunSplit] += 1;
    const int64_t count = g.weight_count();
    if (og == 1 && g.groups > 1) {  // depthwise-like: two runs (two outputs per group would leave
                                    // oneDNN's depthwise kernels)
      auto wa = Uninitialized<int8_t>(count), wb = Uninitialized<int8_t>(count);
      for (int64_t i = 0; i < count; ++i) {
        wa[i] = static_cast<int8_t>(weights[i] >> 1);
        wb[i] = static_cast<int8_t>(weights[i] & 1);
      }
      auto c = Get(g, {dt::u8, shift, 1, dt::s32, false, 0});
      auto a = Uninitialized<int32_t>(rows * g.o), b = Uninitialized<int32_t>(rows * g.o);
      Execute(*c, u, wa.get(), a.get());
      Execute(*c, u, wb.get(), b.get());
      Combine k{a.get(), g.o, plain, 2, b.get(), g.o, plain};
      if (shift) k.offset = offset.data();
      CombineAndFinish(k, rows, g.o, scale, bias, rq, post_op, out, dst);
      return ffi::Error::Success();
    }
    // One run with both halves: group q's outputs [q*og, (q+1)*og) become [w >> 1 | w & 1] at
    // [2*q*og, 2*(q+1)*og).
    auto w2 = Uninitialized<int8_t>(2 * count);
    const int64_t taps_in = count / g.o;  // kh * kw * (c / groups): the rows of the HWIO/(K, N) kernel
    for (int64_t t = 0; t < taps_in; ++t)
      for (int64_t q = 0; q < g.groups; ++q)
        for (int64_t j = 0; j < og; ++j) {
          const int8_t v = weights[t * g.o + q * og + j];
          w2[t * 2 * g.o + 2 * q * og + j] = static_cast<int8_t>(v >> 1);
          w2[t * 2 * g.o + 2 * q * og + og + j] = static_cast<int8_t>(v & 1);
        }
    auto c = Get(g, {dt::u8, shift, 2, dt::s32, false, 0});
    auto both = Uninitialized<int32_t>(rows * 2 * g.o);
    Execute(*c, u, w2.get(), both.get());
    std::vector<int64_t> hi_col(g.o), lo_col(g.o);
    for (int64_t oc = 0; oc < g.o; ++oc) {
      hi_col[oc] = 2 * (oc / og) * og + oc % og;
      lo_col[oc] = hi_col[oc] + og;
    }
    Combine k{both.get(), 2 * g.o, hi_col, 2, both.get(), 2 * g.o, lo_col};
    if (shift) k.offset = offset.data();
    CombineAndFinish(k, rows, g.o, scale, bias, rq, post_op, out, dst);
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Types(ffi::AnyBuffer src, ffi::AnyBuffer weights, ffi::DataType dst_type, dt* src_t,
                 dt* out, const char* what) {
  dt w_t;
  if (!ToDnnlType(src.element_type(), src_t) || (*src_t != dt::u8 && *src_t != dt::s8))
    return ffi::Error::InvalidArgument(std::string(what) + ": src must be u8 or s8");
  if (!ToDnnlType(weights.element_type(), &w_t) || w_t != dt::s8)
    return ffi::Error::InvalidArgument(std::string(what) + ": weights must be s8");
  if (!ToDnnlType(dst_type, out))
    return ffi::Error::InvalidArgument(std::string(what) + ": dst must be s32, f32, u8 or s8");
  return ffi::Error::Success();
}

// The lowering rows of a requantized output (Requant): 4 x channels floats, or none.
ffi::Error Lowering(ffi::Buffer<ffi::F32> lowering, int64_t channels, const float** rows) {
  if (lowering.element_count() != static_cast<size_t>(4 * channels))
    return ffi::Error::InvalidArgument("onednn: the lowering operand must hold 4 x (output channels) floats");
  *rows = lowering.typed_data();
  return ffi::Error::Success();
}

// A conv's geometry from its operands' shapes and attributes (ConvRun).
ffi::Error ConvGeometry(const ffi::AnyBuffer& src, const ffi::AnyBuffer& weights, const ffi::AnyBuffer& dst,
                        ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_lo,
                        ffi::Span<const int64_t> pad_hi, ffi::Span<const int64_t> dilation, int64_t groups,
                        Geometry* out) {
  auto x = src.dimensions(), k = weights.dimensions(), y = dst.dimensions();
  if (x.size() != 4 || k.size() != 4 || y.size() != 4 || strides.size() != 2 || pad_lo.size() != 2 ||
      pad_hi.size() != 2 || dilation.size() != 2 || groups < 1)
    return ffi::Error::InvalidArgument("onednn conv: expects NHWC src/dst, HWIO weights and 2-D attributes");
  Geometry& g = *out;
  g.n = x[0], g.h = x[1], g.w = x[2], g.c = x[3], g.kh = k[0], g.kw = k[1], g.o = k[3], g.groups = groups;
  g.oh = y[1], g.ow = y[2];
  g.strides = {strides[0], strides[1]};
  g.dilation = {dilation[0] - 1, dilation[1] - 1};
  g.pad_lo = {pad_lo[0], pad_lo[1]};
  g.pad_hi = {pad_hi[0], pad_hi[1]};
  if (g.c != k[2] * groups || g.o % groups != 0 || y[0] != g.n || y[3] != g.o)
    return ffi::Error::InvalidArgument("onednn conv: channel counts do not match the groups");
  return ffi::Error::Success();
}

// src: NHWC (u8|s8); weights: HWIO s8 with I = C / groups; scale, bias: (O,) f32; dst_scale: ()
// f32; lowering: (4, O) f32 or nullptr (Requant); dst: NHWC (s32|f32|u8|s8). strides, pad_lo,
// pad_hi, dilation: (2,) each, dilation as in XLA (1 = none).
ffi::Error ConvRun(ffi::AnyBuffer src, ffi::AnyBuffer weights, ffi::Buffer<ffi::F32> scale,
                   ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> dst_scale, ffi::Buffer<ffi::F32>* lowering,
                   ffi::Result<ffi::AnyBuffer> dst, ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_lo,
                   ffi::Span<const int64_t> pad_hi, ffi::Span<const int64_t> dilation, int64_t groups,
                   int64_t post_op, int64_t mode, ffi::Buffer<ffi::F32>* addend = nullptr,
                   ffi::Result<ffi::AnyBuffer>* codes = nullptr) {
  dt src_t, out;
  if (auto e = Types(src, weights, dst->element_type(), &src_t, &out, "onednn conv"); e.failure()) return e;
  Geometry g;
  if (auto e = ConvGeometry(src, weights, *dst, strides, pad_lo, pad_hi, dilation, groups, &g); e.failure()) return e;
  Requant rq = Requant::Of(*dst_scale.typed_data(), g.o);
  if (lowering)
    if (auto e = Lowering(*lowering, g.o, &rq.lowering); e.failure()) return e;
  if (addend && (out != dt::f32 || addend->element_count() != static_cast<size_t>(g.rows() * g.o)))
    return ffi::Error::InvalidArgument("onednn conv: the addend must be f32 of the output's shape, with an f32 output");
  dt codes_t = dt::undef;
  if (codes) {
    ToDnnlType((*codes)->element_type(), &codes_t);
    if ((codes_t != dt::u8 && codes_t != dt::s8) || (*codes)->element_count() != static_cast<size_t>(g.rows() * g.o))
      return ffi::Error::InvalidArgument("onednn conv: the sum's codes must be u8 or s8 of the output's shape");
  }
  return Run(g, src_t, src.untyped_data(), static_cast<const int8_t*>(weights.untyped_data()), out,
             dst->untyped_data(), scale.typed_data(), bias.typed_data(), rq, post_op, mode,
             addend ? addend->typed_data() : nullptr, codes_t, codes ? (*codes)->untyped_data() : nullptr);
}

ffi::Error ConvImpl(ffi::AnyBuffer src, ffi::AnyBuffer weights, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> dst_scale, ffi::Result<ffi::AnyBuffer> dst,
                    ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_lo,
                    ffi::Span<const int64_t> pad_hi, ffi::Span<const int64_t> dilation, int64_t groups,
                    int64_t post_op, int64_t mode) {
  return ConvRun(src, weights, scale, bias, dst_scale, nullptr, dst, strides, pad_lo, pad_hi, dilation, groups,
                 post_op, mode);
}

ffi::Error ConvAddImpl(ffi::AnyBuffer src, ffi::AnyBuffer weights, ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> dst_scale, ffi::Buffer<ffi::F32> addend,
                       ffi::Result<ffi::AnyBuffer> dst, ffi::Span<const int64_t> strides,
                       ffi::Span<const int64_t> pad_lo, ffi::Span<const int64_t> pad_hi,
                       ffi::Span<const int64_t> dilation, int64_t groups, int64_t post_op, int64_t mode) {
  return ConvRun(src, weights, scale, bias, dst_scale, nullptr, dst, strides, pad_lo, pad_hi, dilation, groups,
                 post_op, mode, &addend);
}

// The residual sum (ConvAddImpl) and its requantization with `lowering` (Requant) to the codes of
// the layer that reads the sum: two results, the f32 sum and the u8/s8 codes.
ffi::Error ConvAddCodesImpl(ffi::AnyBuffer src, ffi::AnyBuffer weights, ffi::Buffer<ffi::F32> scale,
                            ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> dst_scale,
                            ffi::Buffer<ffi::F32> lowering, ffi::Buffer<ffi::F32> addend,
                            ffi::Result<ffi::AnyBuffer> dst, ffi::Result<ffi::AnyBuffer> codes,
                            ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_lo,
                            ffi::Span<const int64_t> pad_hi, ffi::Span<const int64_t> dilation, int64_t groups,
                            int64_t post_op, int64_t mode) {
  return ConvRun(src, weights, scale, bias, dst_scale, &lowering, dst, strides, pad_lo, pad_hi, dilation, groups,
                 post_op, mode, &addend, &codes);
}

// The residual sum on the 8-bit stream (file comment): dst = requant(post_op(StreamSum(y, q, s))),
// y = acc * scale + bias, q the shortcut's u8/s8 codes (the dst type) on step s = shortcut_scale,
// requant the dst type's rounding on dst_scale's grid (no 4-bit extraction: the stream stays 8-bit);
// `reader` the same codes with `lowering`'s 4-bit extraction (Requant), the reading layer's input.
template <typename T>
void StreamRows(const float* y, const T* shortcut, float step, int64_t count, int64_t post_op, const Requant& rq,
                T* dst) {
  const float inv_step = 1.f / step;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < count; ++i) {
    const float sum = (y[i] * inv_step + static_cast<float>(shortcut[i])) * step;  // no contraction (setup.py)
    dst[i] = RequantCode<T>(PostOp(sum, post_op), rq, 0);
  }
}

// The same with a float32 shortcut (a downsampling conv's output): requant(post_op(y + shortcut)),
// the plain float32 sum.
template <typename T>
__attribute__((target("avx2"))) void AddRowsToCodesAvx2(const float* y, const float* shortcut, int64_t count,
                                                       int64_t post_op, const Requant& rq, T* dst) {
  const int64_t blocks = count / 8;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    __m256 v = _mm256_add_ps(_mm256_loadu_ps(y + 8 * b), _mm256_loadu_ps(shortcut + 8 * b));
    if (post_op == 1) v = _mm256_max_ps(v, _mm256_setzero_ps());
    if (post_op == 2) v = _mm256_min_ps(_mm256_max_ps(v, _mm256_setzero_ps()), _mm256_set1_ps(6.f));
    RequantStore8<T>(v, rq, 0, dst + 8 * b);  // rq has no lowering: the channel index is unused
  }
  for (int64_t i = 8 * blocks; i < count; ++i) dst[i] = RequantCode<T>(PostOp(y[i] + shortcut[i], post_op), rq, 0);
}

template <typename T>
void AddRowsToCodes(const float* y, const float* shortcut, int64_t count, int64_t post_op, const Requant& rq, T* dst) {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) {
    AddRowsToCodesAvx2(y, shortcut, count, post_op, rq, dst);
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < count; ++i) dst[i] = RequantCode<T>(PostOp(y[i] + shortcut[i], post_op), rq, 0);
}

ffi::Error ConvStreamImpl(ffi::AnyBuffer src, ffi::AnyBuffer weights, ffi::Buffer<ffi::F32> scale,
                          ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> dst_scale, ffi::Buffer<ffi::F32> lowering,
                          ffi::AnyBuffer shortcut, ffi::Buffer<ffi::F32> shortcut_scale,
                          ffi::Result<ffi::AnyBuffer> dst, ffi::Result<ffi::AnyBuffer> reader,
                          ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_lo,
                          ffi::Span<const int64_t> pad_hi, ffi::Span<const int64_t> dilation, int64_t groups,
                          int64_t post_op, int64_t mode) {
  dt src_t, out;
  if (auto e = Types(src, weights, dst->element_type(), &src_t, &out, "onednn conv"); e.failure()) return e;
  Geometry g;
  if (auto e = ConvGeometry(src, weights, *dst, strides, pad_lo, pad_hi, dilation, groups, &g); e.failure()) return e;
  const float step = *shortcut_scale.typed_data();
  const bool float_shortcut = shortcut.element_type() == ffi::DataType::F32;
  if ((out != dt::u8 && out != dt::s8) || (!float_shortcut && shortcut.element_type() != dst->element_type()) ||
      shortcut.element_count() != static_cast<size_t>(g.rows() * g.o) || !(step > 0.f) || post_op == 3)
    return ffi::Error::InvalidArgument("onednn conv: a stream sum takes f32 or u8/s8 shortcut codes of the output's "
                                       "type, of its shape, a positive step, and post-op none, ReLU or ReLU6");
  const Requant rq = Requant::Of(*dst_scale.typed_data(), g.o);
  Requant extract = rq;  // the reader's codes: the stream's with its lowered channels extracted
  if (auto e = Lowering(lowering, g.o, &extract.lowering); e.failure()) return e;
  if (reader->element_type() != dst->element_type() || reader->element_count() != shortcut.element_count())
    return ffi::Error::InvalidArgument("onednn conv: the reader's codes must be of the stream's type and shape");
  const auto finish = [&] {
    std::memcpy(reader->untyped_data(), dst->untyped_data(), g.rows() * g.o);
    ExtractRows(reader->untyped_data(), g.rows(), extract, out);
  };
  try {
    if (!float_shortcut && (mode == 2 || (mode == 0 && HasVnni()))) {
      Variant v{src_t, false, 1, out, true, post_op};
      v.stream_scale = step;
      Execute(*Get(g, v), src.untyped_data(), static_cast<const int8_t*>(weights.untyped_data()),
              dst->untyped_data(), scale.typed_data(), bias.typed_data(), nullptr, &rq.scale, shortcut.untyped_data());
      counts[kRunDirect] += 1;
      finish();
      return ffi::Error::Success();
    }
    // Elsewhere the layer's f32 output (exact accumulators in every mode), then one pass.
    float* y = static_cast<float*>(Buffer(kSlotStream, sizeof(float) * g.rows() * g.o));
    if (auto e = Run(g, src_t, src.untyped_data(), static_cast<const int8_t*>(weights.untyped_data()), dt::f32, y,
                     scale.typed_data(), bias.typed_data(), Requant(), 0, mode);
        e.failure())
      return e;
    const int64_t count = g.rows() * g.o;
    if (float_shortcut && out == dt::u8)
      AddRowsToCodes(y, static_cast<const float*>(shortcut.untyped_data()), count, post_op, rq,
                     static_cast<uint8_t*>(dst->untyped_data()));
    else if (float_shortcut)
      AddRowsToCodes(y, static_cast<const float*>(shortcut.untyped_data()), count, post_op, rq,
                     static_cast<int8_t*>(dst->untyped_data()));
    else if (out == dt::u8)
      StreamRows(y, static_cast<const uint8_t*>(shortcut.untyped_data()), step, count, post_op, rq,
                 static_cast<uint8_t*>(dst->untyped_data()));
    else
      StreamRows(y, static_cast<const int8_t*>(shortcut.untyped_data()), step, count, post_op, rq,
                 static_cast<int8_t*>(dst->untyped_data()));
    finish();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn conv: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error ConvLoweredImpl(ffi::AnyBuffer src, ffi::AnyBuffer weights, ffi::Buffer<ffi::F32> scale,
                           ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> dst_scale,
                           ffi::Buffer<ffi::F32> lowering, ffi::Result<ffi::AnyBuffer> dst,
                           ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_lo,
                           ffi::Span<const int64_t> pad_hi, ffi::Span<const int64_t> dilation, int64_t groups,
                           int64_t post_op, int64_t mode) {
  return ConvRun(src, weights, scale, bias, dst_scale, &lowering, dst, strides, pad_lo, pad_hi, dilation, groups,
                 post_op, mode);
}

// src: (M, K) u8|s8; weights: (K, N) s8; scale, bias: (N,) f32; dst_scale: () f32; lowering: (4, N)
// f32 or nullptr (Requant); dst: (M, N).
ffi::Error MatmulRun(ffi::AnyBuffer src, ffi::AnyBuffer weights, ffi::Buffer<ffi::F32> scale,
                     ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> dst_scale, ffi::Buffer<ffi::F32>* lowering,
                     ffi::Result<ffi::AnyBuffer> dst, int64_t post_op, int64_t mode) {
  dt src_t, out;
  if (auto e = Types(src, weights, dst->element_type(), &src_t, &out, "onednn matmul"); e.failure()) return e;
  auto a = src.dimensions(), b = weights.dimensions(), y = dst->dimensions();
  if (a.size() != 2 || b.size() != 2 || y.size() != 2 || a[1] != b[0] || y[0] != a[0] || y[1] != b[1])
    return ffi::Error::InvalidArgument("onednn matmul: expects (M, K) x (K, N) -> (M, N)");
  Geometry g;
  g.conv = false;
  g.n = a[0], g.c = a[1], g.o = b[1];
  Requant rq = Requant::Of(*dst_scale.typed_data(), g.o);
  if (lowering)
    if (auto e = Lowering(*lowering, g.o, &rq.lowering); e.failure()) return e;
  return Run(g, src_t, src.untyped_data(), static_cast<const int8_t*>(weights.untyped_data()), out,
             dst->untyped_data(), scale.typed_data(), bias.typed_data(), rq, post_op, mode);
}

ffi::Error MatmulImpl(ffi::AnyBuffer src, ffi::AnyBuffer weights, ffi::Buffer<ffi::F32> scale,
                      ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> dst_scale,
                      ffi::Result<ffi::AnyBuffer> dst, int64_t post_op, int64_t mode) {
  return MatmulRun(src, weights, scale, bias, dst_scale, nullptr, dst, post_op, mode);
}

ffi::Error MatmulLoweredImpl(ffi::AnyBuffer src, ffi::AnyBuffer weights, ffi::Buffer<ffi::F32> scale,
                             ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> dst_scale,
                             ffi::Buffer<ffi::F32> lowering, ffi::Result<ffi::AnyBuffer> dst, int64_t post_op,
                             int64_t mode) {
  return MatmulRun(src, weights, scale, bias, dst_scale, &lowering, dst, post_op, mode);
}

// The bindings' shared parts: every target's first operands (src, weights, scale, bias,
// dst_scale), and the attributes of a conv and of a matmul after its operands and results.
auto Operands() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>();
}

template <typename B>
auto ConvAttrs(B binding) {
  return std::move(binding)
      .template Attr<ffi::Span<const int64_t>>("strides")
      .template Attr<ffi::Span<const int64_t>>("pad_lo")
      .template Attr<ffi::Span<const int64_t>>("pad_hi")
      .template Attr<ffi::Span<const int64_t>>("dilation")
      .template Attr<int64_t>("groups")
      .template Attr<int64_t>("post_op")
      .template Attr<int64_t>("mode");
}

template <typename B>
auto MatmulAttrs(B binding) {
  return std::move(binding).template Attr<int64_t>("post_op").template Attr<int64_t>("mode");
}

}  // namespace

// The library is built with hidden visibility; only these symbols are exported.
#pragma GCC visibility push(default)

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlexiqOnednnConv, ConvImpl, ConvAttrs(Operands().Ret<ffi::AnyBuffer>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlexiqOnednnMatmul, MatmulImpl, MatmulAttrs(Operands().Ret<ffi::AnyBuffer>()));

// The same with a lowering operand after dst_scale: u8/s8 outputs requantized with each channel's
// 4-bit extraction (Requant), the next layer's activation codes.
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlexiqOnednnConvLowered, ConvLoweredImpl,
                              ConvAttrs(Operands().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::AnyBuffer>()));

// The conv with an addend operand after dst_scale (an f32 output only): post_op(result + addend).
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlexiqOnednnConvAdd, ConvAddImpl,
                              ConvAttrs(Operands().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::AnyBuffer>()));

// The residual sum and the codes of the layer that reads it: lowering and addend operands after
// dst_scale, two results.
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlexiqOnednnConvAddCodes, ConvAddCodesImpl,
                              ConvAttrs(Operands()
                                            .Arg<ffi::Buffer<ffi::F32>>()
                                            .Arg<ffi::Buffer<ffi::F32>>()
                                            .Ret<ffi::AnyBuffer>()
                                            .Ret<ffi::AnyBuffer>()));

// The residual sum on the 8-bit stream: lowering, the shortcut's codes and its step after dst_scale;
// two results, the stream's codes and those of the layer that reads it (ConvStreamImpl).
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlexiqOnednnConvStream, ConvStreamImpl,
                              ConvAttrs(Operands()
                                            .Arg<ffi::Buffer<ffi::F32>>()
                                            .Arg<ffi::AnyBuffer>()
                                            .Arg<ffi::Buffer<ffi::F32>>()
                                            .Ret<ffi::AnyBuffer>()
                                            .Ret<ffi::AnyBuffer>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlexiqOnednnMatmulLowered, MatmulLoweredImpl,
                              MatmulAttrs(Operands().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::AnyBuffer>()));

// The interface version of this library (the FFI targets' attributes, the modes, the exported
// functions): flexiq_jax refuses a library whose version is not the one it was written for.
extern "C" int flexiq_onednn_abi() { return 10; }

// The oneDNN version this library runs with: major * 10000 + minor * 100 + patch.
extern "C" int flexiq_onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}

// The CPU ISA oneDNN dispatches to (dnnl::cpu_isa as an integer; 0 = all / unknown).
extern "C" int flexiq_onednn_isa() { return static_cast<int>(dnnl::get_effective_cpu_isa()); }

// How many layers ran each way since the library was loaded (the Count enum above), or -1.
extern "C" int64_t flexiq_onednn_runs(int what) { return what >= 0 && what < kCountCount ? counts[what].load() : -1; }

// Whether mode 0 (auto) runs the direct (fused) kernels here: 1 on CPUs with VNNI.
extern "C" int flexiq_onednn_direct() { return HasVnni() ? 1 : 0; }

#pragma GCC visibility pop

// kvflow's CPU forward pass: the whole Llama-family decoder in one C++ call per engine step.
//
// Why: profiling the `135m` single stream showed ~7,600 ATen calls and ~14 ms of a 28 ms decode
// step outside the matrix products — per-op dispatch, Python module calls, dtype round trips and
// an attention that gathers blocks before a batched matmul. Here each layer is nine calls: four
// linears (oneDNN-prepacked or plain `at::linear`, the very ops the Python model uses) and five
// fused kernels (residual add + RMSNorm, q/k norm + rotary + KV-cache write, paged attention that
// reads the blocks in place, SiLU-and-multiply). Steps of a few tokens run the linears as a GEMV of
// our own over row-blocked weight copies (`decode_linear`), which streams them faster than oneDNN.
//
// Numerics follow the Python modules of kvflow/model/layers.py step by step: every place where
// the Python path rounds to the model dtype, so do these kernels (`round_to<T>`), and
// `-ffp-contract=off` keeps the compiler from fusing a multiply and an add that PyTorch runs as
// two ops. What can differ is the order of summation inside reductions (RMSNorm's mean of squares,
// attention's dot products and softmax sum, which here stay in fp32 throughout), so outputs agree
// to fp32 rounding, not bit for bit.

#include <pybind11/functional.h>
#include <torch/extension.h>
#include <pybind11/stl.h>

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>

// x86 intrinsics only where there are x86 units: an arm64 build (the image's `generic` ISA) takes
// the portable loops, and prefetches are GCC's builtin, which is prefetcht0/t1 on x86.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <map>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// Python passes an empty tensor where a weight does not exist (no bias, no q/k norm).
inline at::Tensor optional_weight(const at::Tensor& t) { return t.defined() && t.numel() > 0 ? t : at::Tensor(); }

// Round to the nearest bf16 (ties to even), as c10::BFloat16 does, but as plain integer
// arithmetic the compiler vectorizes; NaN stays a quiet NaN.
inline uint32_t bf16_bits(float v) {
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc00000u;
  return (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
}

// v rounded to T and back: where the PyTorch modules store an intermediate in the model dtype.
template <typename T>
inline float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

template <>
inline float round_to<c10::BFloat16>(float v) {
  return __builtin_bit_cast(float, bf16_bits(v));
}

template <>
inline float round_to<float>(float v) {
  return v;
}

// dst[i] = T(src[i]).
template <typename T>
inline void from_float(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

template <>
inline void from_float<c10::BFloat16>(const float* src, c10::BFloat16* dst, int64_t n) {
  uint16_t* bits = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) bits[i] = static_cast<uint16_t>(bf16_bits(src[i]) >> 16);
}

// dst[i] = float(src[i]); bf16 is read as raw bits (the upper half of a float), which the compiler
// turns into a vector shift.
template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <>
inline void to_float<c10::BFloat16>(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(bits[i]) << 16;
}

// exp(v) by Cody-Waite range reduction and the Cephes polynomial (about 1 ulp); the vector
// version below computes the same expression, 16 lanes at a time. Inputs below -87.3 give ~0.
inline float exp_scalar(float v) {
  v = std::min(std::max(v, -87.3f), 88.7f);
  const float k = std::floor(v * 1.44269504088896341f + 0.5f);
  const float r = (v - k * 0.693359375f) - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  return p * __builtin_bit_cast(float, (static_cast<int32_t>(k) + 127) << 23);
}

#ifdef __AVX512F__
// exp_scalar on sixteen lanes.
inline __m512 exp16(__m512 v) {
  const float coeffs[] = {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
  v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
  const __m512 k = _mm512_roundscale_ps(_mm512_add_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                                      _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(_mm512_sub_ps(v, _mm512_mul_ps(k, _mm512_set1_ps(0.693359375f))),
                                 _mm512_mul_ps(k, _mm512_set1_ps(-2.12194440e-4f)));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  for (float c : coeffs) p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(c));
  p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(p, _mm512_mul_ps(r, r)), r), _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}
#endif

// x[i] = exp(x[i]) in place.
inline void exp_inplace(float* x, int64_t n) {
  int64_t i = 0;
#ifdef __AVX512F__
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, exp16(_mm512_loadu_ps(x + i)));
#endif
  for (; i < n; ++i) x[i] = exp_scalar(x[i]);
}

// Dot product in fp32 (explicit fused multiply-adds: a summation order of our own either way).
#ifndef __AVX512F__
// The generic build keeps one out-of-line copy: inlined, each caller's `omp simd reduction` chose its
// own summation order, so a dense and an int8 cache's rope_and_store normalised keys differently.
__attribute__((noinline))
#endif
inline float dot(const float* a, const float* b, int64_t n) {
#ifdef __AVX512F__
  if (n % 16 == 0) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    return _mm512_reduce_add_ps(acc);
  }
#endif
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// ----------------------------------------------------------------------------- RMSNorm
// out = w * (x * rsqrt(mean(x^2) + eps)).to(T), the fp32 computation of kvflow's RMSNorm.
// `w` holds the weight already in fp32 (exact: it is a T tensor); x is overwritten with the result.
template <typename T>
inline void rms_norm_row(float* x, const float* w, T* out, int64_t dim, float eps) {
  const float inv = 1.f / std::sqrt(dot(x, x, dim) / static_cast<float>(dim) + eps);
#pragma omp simd
  for (int64_t i = 0; i < dim; ++i) x[i] = w[i] * round_to<T>(x[i] * inv);
  from_float(x, out, dim);
}

// residual = residual + delta (rounded to T, as `x + f(x)` is); out = RMSNorm(residual).
// With `delta` undefined only the norm runs.
template <typename T>
void add_rms_norm(at::Tensor& residual, const at::Tensor& delta, const at::Tensor& weight,
                  at::Tensor& out, float eps) {
  const int64_t rows = residual.size(0), dim = residual.size(1);
  T* res = residual.data_ptr<T>();
  const T* d = delta.defined() ? delta.data_ptr<T>() : nullptr;
  const T* w = weight.data_ptr<T>();
  T* o = out.data_ptr<T>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(dim), add(dim), wf(dim);
    to_float(w, wf.data(), dim);
    for (int64_t r = begin; r < end; ++r) {
      T* x = res + r * dim;
      to_float(x, row.data(), dim);
      if (d) {
        to_float(d + r * dim, add.data(), dim);
#pragma omp simd
        for (int64_t i = 0; i < dim; ++i) row[i] = round_to<T>(row[i] + add[i]);
        from_float(row.data(), x, dim);
      }
      rms_norm_row<T>(row.data(), wf.data(), o + r * dim, dim, eps);
    }
  });
}

// ----------------------------------------------------------------------------- rotary + KV write
// A row x[0..D) of keys or values into its cache row, exactly as kv_quant.py computes it: as is (a
// dense cache of T); as int8 codes and the row's scale, written to *token_scale (amax, then 127 /
// amax once in fp32, products rounded half to even); or as float8_e4m3fn codes of x / head_scale,
// saturated at +-448 (c10's conversion, PyTorch's own).
template <typename T, typename KV>
inline void store_kv_row(const float* x, KV* dst, float* token_scale, float head_scale, int64_t D) {
  if constexpr (std::is_same_v<KV, int8_t>) {
    float amax = 0.f;
    for (int64_t i = 0; i < D; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int64_t i = 0; i < D; ++i)
      dst[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(x[i] * inv))));
    *token_scale = amax / 127.f;
  } else if constexpr (std::is_same_v<KV, c10::Float8_e4m3fn>) {
    for (int64_t i = 0; i < D; ++i) dst[i] = c10::Float8_e4m3fn(std::min(448.f, std::max(-448.f, x[i] / head_scale)));
  } else {
    from_float(x, dst, D);
  }
}

// Split the fused qkv projection, apply the optional per-head q/k RMSNorm (Qwen3) and the
// rotate-half rotary embedding (cos/sin rounded to T, each product and sum rounded, as in
// layers._rotate), store k and v at their cache slots and return q as [T, H, D]. KV is the cache's
// element type: T, or int8_t / c10::Float8_e4m3fn with `kv_scales` (see PagedAttentionView; fp8
// scales must be set: the engine calibrates them in PyTorch on the first prompt).
template <typename T, typename KV = T>
void rope_and_store(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& slots,
                    const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& q_norm,
                    const at::Tensor& k_norm, float eps, at::Tensor& kv_cache, const at::Tensor& kv_scales,
                    at::Tensor& q_out, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
  const int64_t tokens = qkv.size(0), row_stride = qkv.stride(0);
  const int64_t half = head_dim / 2, block_size = kv_cache.size(3);
  const int64_t cache_half = kv_cache.stride(0);  // keys, then values
  float* scales = nullptr;
  int64_t scales_half = 0;
  constexpr bool kHeadScales = std::is_same_v<KV, c10::Float8_e4m3fn>;
  if constexpr (std::is_same_v<KV, int8_t> || kHeadScales) {
    TORCH_CHECK(kv_scales.defined() && kv_scales.scalar_type() == at::kFloat && kv_scales.is_contiguous(),
                "rope_and_store: a quantised KV cache needs its fp32 scales");
    TORCH_CHECK(!kHeadScales || kv_scales.numel() == 2 * num_kv_heads, "rope_and_store: fp8 scales are [2, kv_heads, 1]");
    scales = kv_scales.data_ptr<float>();
    scales_half = kv_scales.stride(0);
  }
  const T* src = qkv.data_ptr<T>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const float* cos_t = cos.data_ptr<float>();
  const float* sin_t = sin.data_ptr<float>();
  const T* qn = q_norm.defined() ? q_norm.data_ptr<T>() : nullptr;
  const T* kn = k_norm.defined() ? k_norm.data_ptr<T>() : nullptr;
  KV* cache = kv_cache.data_ptr<KV>();
  T* q = q_out.data_ptr<T>();
  at::parallel_for(0, tokens, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> x(head_dim), y(head_dim), c(half), s(half), qw(head_dim), kw(head_dim);
    if (qn) to_float(qn, qw.data(), head_dim);
    if (kn) to_float(kn, kw.data(), head_dim);
    std::vector<T> normed(head_dim);
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t i = 0; i < half; ++i) {
        c[i] = round_to<T>(cos_t[pos[t] * half + i]);
        s[i] = round_to<T>(sin_t[pos[t] * half + i]);
      }
      const int64_t block = slot[t] / block_size, offset = slot[t] % block_size;
      for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {
        const bool is_q = h < num_heads;
        const T* in = src + t * row_stride + h * head_dim;
        if (is_q ? qn : kn) {
          to_float(in, x.data(), head_dim);
          rms_norm_row<T>(x.data(), is_q ? qw.data() : kw.data(), normed.data(), head_dim, eps);
          in = normed.data();
        }
        to_float(in, x.data(), head_dim);
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = x[i], x2 = x[i + half];
          y[i] = round_to<T>(round_to<T>(x1 * c[i]) - round_to<T>(x2 * s[i]));
          y[i + half] = round_to<T>(round_to<T>(x2 * c[i]) + round_to<T>(x1 * s[i]));
        }
        if (is_q) {
          from_float(y.data(), q + (t * num_heads + h) * head_dim, head_dim);
        } else {
          const int64_t g = h - num_heads, row = (block * num_kv_heads + g) * block_size + offset;
          store_kv_row<T, KV>(y.data(), cache + row * head_dim, kHeadScales ? nullptr : scales + row,
                              kHeadScales ? scales[g] : 0.f, head_dim);
        }
      }
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        const T* in = src + t * row_stride + (num_heads + num_kv_heads + h) * head_dim;
        const int64_t row = (block * num_kv_heads + h) * block_size + offset;
        if constexpr (std::is_same_v<KV, T>) {
          std::copy(in, in + head_dim, cache + cache_half + row * head_dim);
        } else {
          to_float(in, x.data(), head_dim);
          store_kv_row<T, KV>(x.data(), cache + cache_half + row * head_dim,
                              kHeadScales ? nullptr : scales + scales_half + row,
                              kHeadScales ? scales[scales_half + h] : 0.f, head_dim);
        }
      }
    }
  });
}

// ----------------------------------------------------------------------------- paged attention
// paged_attention<T>: flash decoding over the paged KV cache, in its own file.
#include "cpu_attention.h"
// kivi_attention<T> and kivi_store<T>: the 4- and 2-bit KIVI cache read and written in place.
#include "cpu_kivi.h"

// ----------------------------------------------------------------------------- SiLU and multiply
// out = silu(gate).to(T) * up, the rounding of `F.silu(gate) * up` in GatedMLP.
template <typename T>
void silu_and_mul(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t rows = gate_up.size(0), inter = out.size(1), stride = gate_up.stride(0);
  const T* in = gate_up.data_ptr<T>();
  T* out_p = out.data_ptr<T>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> gate(inter), up(inter), e(inter);
    for (int64_t r = begin; r < end; ++r) {
      to_float(in + r * stride, gate.data(), inter);
      to_float(in + r * stride + inter, up.data(), inter);
#pragma omp simd
      for (int64_t i = 0; i < inter; ++i) e[i] = -gate[i];
      exp_inplace(e.data(), inter);
#pragma omp simd
      for (int64_t i = 0; i < inter; ++i) e[i] = round_to<T>(gate[i] / (1.f + e[i])) * up[i];
      from_float(e.data(), out_p + r * inter, inter);
    }
  });
}

// ----------------------------------------------------------------------------- decode GEMV
// A decode step multiplies a few rows by every weight matrix: it streams the weights once and is
// bound by memory bandwidth. oneDNN's packed GEMV reaches 13–19 GB/s on the 135m layer shapes
// here, with ~15 µs of fixed cost per call. This kernel reads a copy of the weight laid out as
// [N/4][K/32][4][32] bf16, so a block of four output rows is one sequential stream, and multiplies
// it with `vdpbf16ps` (bf16 pairs, fp32 accumulation; one rounding to bf16 at the end, as oneDNN
// rounds its fp32 result). Only the order of the fp32 sums differs from oneDNN.
constexpr int64_t kDecodeRows = 4;  // steps with at most this many tokens take the decode GEMV

#if defined(__AVX512BF16__)
constexpr bool kHasDecodeGemv = true;

at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& blocked, const at::Tensor& bias) {
  const int64_t rows = x.size(0), K = x.size(1), N = blocked.size(0) * 4;
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && blocked.scalar_type() == at::kBFloat16 && x.is_contiguous() &&
                  blocked.is_contiguous() && blocked.dim() == 4 && blocked.size(1) * 32 == K &&
                  blocked.size(2) == 4 && blocked.size(3) == 32,
              "decode_linear: bf16 x [M, K] and a [N/4, K/32, 4, 32] weight");
  TORCH_CHECK(!bias.defined() || (bias.numel() == N && bias.scalar_type() == at::kBFloat16), "decode_linear: bias");
  at::Tensor y = at::empty({rows, N}, x.options());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(blocked.data_ptr<at::BFloat16>());
  const at::BFloat16* bp = bias.defined() ? bias.data_ptr<at::BFloat16>() : nullptr;
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, N / 4, 8, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const uint16_t* w = wp + block * 4 * K;
      for (int64_t m = 0; m < rows; ++m) {
        const uint16_t* xr = xp + m * K;
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t c = 0; c < K / 32; ++c) {
          const __m512bh xv = (__m512bh)_mm512_loadu_si512(xr + c * 32);
          const uint16_t* q = w + c * 128;
          for (int i = 0; i < 4; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512(q + 32 * i), xv);
        }
        for (int i = 0; i < 4; ++i) {
          const int64_t n = block * 4 + i;
          float v = _mm512_reduce_add_ps(acc[i]);
          if (bp) v += static_cast<float>(bp[n]);
          yp[m * N + n] = at::BFloat16(v);
        }
      }
    }
  });
  return y;
}
#else
constexpr bool kHasDecodeGemv = false;

at::Tensor decode_linear(const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "decode_linear: this build has no AVX512-BF16");
}
#endif

// linear_f32: fp32 weights times a few rows, each row computed alike whatever the rows beside it.
#include "cpu_gemv_f32.h"

// True where an fp32 step of x's rows takes linear_f32 over this plain weight.
inline bool small_f32(const at::Tensor& x, const at::Tensor& weight, bool packed) {
  return kHasLinearF32 && !packed && x.size(0) <= kSmallRowsF32 && x.scalar_type() == at::kFloat &&
         weight.scalar_type() == at::kFloat && weight.dim() == 2 && weight.is_contiguous();
}

// ----------------------------------------------------------------------------- linear
// The same two ops the Python model calls: oneDNN's packed linear or at::linear; for decode
// steps, the GEMV above where the weight has a row-blocked copy, and fp32 steps of a few rows
// linear_f32.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, bool packed,
                  const at::Tensor& blocked = at::Tensor()) {
  if (blocked.defined() && x.size(0) <= kDecodeRows) {
    RECORD_FUNCTION("kvflow::decode_linear", std::vector<c10::IValue>());
    return decode_linear(x.contiguous(), blocked, bias);
  }
  if (small_f32(x, weight, packed)) {
    RECORD_FUNCTION("kvflow::linear_f32", std::vector<c10::IValue>());
    return linear_f32(x, weight, bias);
  }
  std::optional<at::Tensor> b = bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt;
  if (!packed) return at::linear(x, weight, b);
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack{x, weight, b, std::string("none"), c10::List<std::optional<at::Scalar>>(),
                                 std::optional<std::string>()};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

#define KVFLOW_DISPATCH(dtype, NAME, ...)                                     \
  switch (dtype) {                                                           \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__(); break; }       \
    case at::kBFloat16: { using scalar_t = c10::BFloat16; __VA_ARGS__(); break; } \
    case at::kHalf: { using scalar_t = c10::Half; __VA_ARGS__(); break; }    \
    default: TORCH_CHECK(false, NAME, ": unsupported dtype ", dtype);       \
  }

// kv_t, the KV cache's element type, for a cache tensor's dtype: int8 codes, float8_e4m3fn codes, or
// the model's own dtype T (a dense cache of another dtype is refused).
#define KVFLOW_KV_DISPATCH(kv_dtype, T, ...)                                                         \
  do {                                                                                               \
    if ((kv_dtype) == at::kChar) {                                                                   \
      using kv_t = int8_t;                                                                           \
      __VA_ARGS__();                                                                                 \
    } else if ((kv_dtype) == at::kFloat8_e4m3fn) {                                                   \
      using kv_t = c10::Float8_e4m3fn;                                                               \
      __VA_ARGS__();                                                                                 \
    } else {                                                                                         \
      TORCH_CHECK((kv_dtype) == c10::CppTypeToScalarType<T>::value, "KV cache dtype ", (kv_dtype),   \
                  " is neither int8, float8_e4m3fn nor the model's dtype");                          \
      using kv_t = T;                                                                                \
      __VA_ARGS__();                                                                                 \
    }                                                                                                \
  } while (0)

// A kernel call of the forward, named in torch.profiler traces (`kvflow bench profile`).
#define KVFLOW_RUN(dtype, NAME, ...)                                    \
  do {                                                                  \
    RECORD_FUNCTION("kvflow::" NAME, std::vector<c10::IValue>());       \
    KVFLOW_DISPATCH(dtype, NAME, __VA_ARGS__)                           \
  } while (0)

}  // namespace

// Quantised projections (q8_0, q4_0, q4_k, int8): cpu_quant.h's kernels.
#include "cpu_quant_forward.h"
// LoRA adapters' low-rank deltas (kvflow/model/lora.py's slots): add_lora.
#include "cpu_lora.h"

// ----------------------------------------------------------------------------- the model
struct LayerWeights {
  at::Tensor input_norm, qkv, qkv_bias, q_norm, k_norm, o, o_bias, post_norm, gate_up, gate_up_bias, down, down_bias;
  at::Tensor qkv_blocked, o_blocked, gate_up_blocked, down_blocked;  // decode GEMV copies (undefined: none)
  int64_t window;  // sliding window in tokens; 0 = full attention
  QuantProjection qkv_q, o_q, gate_up_q, down_q;  // quantised projections (undefined: float weights)
  // LoRA slots (kvflow/model/lora.py): A [S, W, K] and B [S, W, N] of qkv, o, gate_up, down; undefined: none.
  at::Tensor lora[8];
};

// A layer's projection: the quantised kernels where it has quantised weights, else `linear`.
inline at::Tensor project(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, bool packed,
                          const at::Tensor& blocked, const QuantProjection& quant) {
  return quant.defined() ? quant_project(x, quant, bias) : linear(x, weight, bias, packed, blocked);
}

class CpuModel {
 public:
  CpuModel(at::Tensor embed, std::vector<std::vector<at::Tensor>> layers, std::vector<int64_t> windows,
           at::Tensor final_norm, at::Tensor cos, at::Tensor sin, std::vector<at::Tensor> kv_caches,
           std::vector<at::Tensor> kv_scales, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps,
           bool packed, std::vector<at::Tensor> kv_rings, int64_t kivi_bits)
      : embed_(std::move(embed)), final_norm_(std::move(final_norm)), cos_(std::move(cos)), sin_(std::move(sin)),
        kv_caches_(std::move(kv_caches)), kv_scales_(std::move(kv_scales)), kv_rings_(std::move(kv_rings)),
        kivi_bits_(kivi_bits), num_heads_(num_heads),
        num_kv_heads_(num_kv_heads),
        head_dim_(head_dim), eps_(static_cast<float>(eps)), packed_(packed),
        scale_(1.f / std::sqrt(static_cast<float>(head_dim))) {
    TORCH_CHECK(layers.size() == windows.size() && layers.size() == kv_caches_.size(), "CpuModel: layer count mismatch");
    kv_type_ = kv_caches_.front().scalar_type();
    quantised_ = kv_type_ == at::kChar || kv_type_ == at::kFloat8_e4m3fn;
    // KIVI: kv_caches_ are the layers' codes, kv_scales_ their meta and kv_rings_ their residual rings.
    TORCH_CHECK(kivi_bits_ == 0 || (kv_type_ == at::kByte && kv_scales_.size() == kv_caches_.size() &&
                                    kv_rings_.size() == kv_caches_.size()),
                "CpuModel: a KIVI cache needs codes, meta and a ring per layer");
    TORCH_CHECK(kivi_bits_ > 0 || kv_rings_.empty(), "CpuModel: residual rings belong to a KIVI cache");
    TORCH_CHECK(kivi_bits_ > 0 || kv_scales_.size() == (quantised_ ? kv_caches_.size() : 0),
                "CpuModel: an int8 KV cache needs one scales tensor per layer, a dense one none");
    TORCH_CHECK(cos_.scalar_type() == at::kFloat && sin_.scalar_type() == at::kFloat, "CpuModel: rotary tables must be fp32");
    for (size_t i = 0; i < layers.size(); ++i) layers_.push_back(make_layer(layers[i], windows[i]));
    alternatives_.resize(layers_.size());
  }

  // Block zoo (kvflow/model/block_zoo.py): `variant`'s own weights for `layer` (the constructor's slot layout),
  // used for the rows of that variant's runs; its other layers are the base's.
  void set_variant_layer(int64_t layer, int64_t variant, const std::vector<at::Tensor>& weights) {
    TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(layers_.size()), "CpuModel: no layer ", layer);
    alternatives_[layer][variant] = make_layer(weights, layers_[layer].window);
  }

  // Block zoo: `variant`'s own final norm.
  void set_variant_final_norm(int64_t variant, const at::Tensor& weight) { final_norms_[variant] = weight; }

  // LoRA slots per layer: [A, B] of qkv, o, gate_up and down (LoRASlots.cpp_tensors), read in place each step.
  void set_lora(const std::vector<std::vector<at::Tensor>>& slots) {
    TORCH_CHECK(slots.size() == layers_.size(), "CpuModel: LoRA slots for every layer");
    for (size_t l = 0; l < slots.size(); ++l) {
      TORCH_CHECK(slots[l].size() == 8, "CpuModel: a layer's LoRA slots are [A [S, W, K], B [S, W, N]] of its four "
                  "projections");
      for (int k = 0; k < 8; ++k) {
        TORCH_CHECK(slots[l][k].dim() == 3 && slots[l][k].is_contiguous() &&
                    slots[l][k].scalar_type() == embed_.scalar_type(), "CpuModel: LoRA slots are contiguous "
                    "[S, W, K] / [S, W, N] tensors of the model's dtype");
        layers_[l].lora[k] = slots[l][k];
      }
    }
  }

  // A layer from its weight slots: 16 tensors, or 24 with its projections' quantisation specs and scales.
  static LayerWeights make_layer(const std::vector<at::Tensor>& w, int64_t window) {
    TORCH_CHECK(w.size() == 16 || w.size() == 24, "CpuModel: a layer has 16 weight slots, or 24 with its "
                "projections' quantisation specs and scales");
    auto o = [&](int k) { return optional_weight(w[k]); };
    LayerWeights lw{w[0], w[1], o(2), o(3), o(4), w[5], o(6), w[7], w[8], o(9), w[10], o(11),
                    o(12), o(13), o(14), o(15), window};
    if (w.size() == 24) {  // (spec, scales) of qkv, o, gate_up, down; codes in their weight slots
      lw.qkv_q = quant_projection(o(16), w[1], o(17));
      lw.o_q = quant_projection(o(18), w[5], o(19));
      lw.gate_up_q = quant_projection(o(20), w[8], o(21));
      lw.down_q = quant_projection(o(22), w[10], o(23));
    }
    TORCH_CHECK(kHasDecodeGemv || !lw.qkv_blocked.defined(), "CpuModel: no decode GEMV in this build");
    return lw;
  }

  // input_ids, positions, seq_index, slot_mapping: [T] int64; block_tables: [B, max_blocks] int64.
  // A cache split into G layer groups (kvflow/worker/kv_layer_groups.py): block_tables [G, B, max_blocks]
  // and slot_mapping [G, T], layer l storing and reading through group l / (L / G)'s.
  // kv_positions: [T] int64, each token's index in its sequence's cache (its position, less what a
  // KV policy dropped before it; positions alone drive the rotary embedding). Undefined: positions.
  // Returns the final-norm hidden states [T, hidden].
  // `layer_done(l)`, when given, runs after layer l has written its KV (disaggregated prefill
  // streams each layer's KV while later layers compute); it takes the GIL for the call.
  // A KV policy's per-layer work (kvflow/attention/policy_step.py), when given, runs in Python
  // around each layer's attention, with the layer's queries [T, H, D] after the rotary embedding:
  // `before_attention(l, q)` returns nothing, or [block_tables, kv_positions] to attend with instead
  // (Quest's reduced tables); `after_attention(l, q)` runs once the layer has attended (H2O's block
  // mass, SnapKV's selection and copy).
  // `kivi` (a KIVI cache): the step's KiviStep tensors (cpu_kernels.kivi_step_tensors); each layer
  // attends over the cache as it was, then quantises the completed groups and writes the ring.
  // `shared_prefix`: [groups, members], decodes whose leading blocks are read once per group
  // (cpu_attention.h's SharedPrefix); the step's own tables only (not Quest's reduced ones, not KIVI).
  // `lora_runs`: [R, 3] int64 (slot, start, end) of tokens that add a LoRA slot's delta to every projection (add_lora).
  // `zoo_runs`: [R, 3] int64 (variant, start, end), sorted by start: runs of tokens whose variant's own layers
  // (set_variant_layer) and final norm replace the base's; attention runs once over every token.
  at::Tensor forward(const at::Tensor& input_ids, const at::Tensor& positions, const at::Tensor& seq_index,
                     const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                     const std::function<void(int64_t)>& layer_done, const std::optional<at::Tensor>& kv_positions_in,
                     const std::function<std::vector<at::Tensor>(int64_t, const at::Tensor&)>& before_attention,
                     const std::function<void(int64_t, const at::Tensor&)>& after_attention,
                     const std::optional<std::vector<at::Tensor>>& kivi,
                     const std::optional<std::vector<at::Tensor>>& shared_prefix = std::nullopt,
                     const std::optional<at::Tensor>& lora_in = std::nullopt,
                     const std::optional<at::Tensor>& zoo_runs_in = std::nullopt) {
    const int64_t tokens = input_ids.size(0);
    const at::Tensor zoo_runs = zoo_runs_in.has_value() ? *zoo_runs_in : at::Tensor();
    TORCH_CHECK(!zoo_runs.defined() || (zoo_runs.scalar_type() == at::kLong && zoo_runs.is_contiguous() &&
                                        zoo_runs.dim() == 2 && zoo_runs.size(1) == 3),
                "CpuModel: zoo_runs is a contiguous [R, 3] int64 tensor");
    const at::Tensor lora_runs = lora_in.has_value() ? *lora_in : at::Tensor();
    const int64_t q_cols = num_heads_ * head_dim_, kv_cols = num_kv_heads_ * head_dim_;
    const LoRAShards qkv_shards = {0, q_cols, q_cols + kv_cols, q_cols + 2 * kv_cols};
    TORCH_CHECK(!lora_runs.defined() || (lora_runs.scalar_type() == at::kLong && lora_runs.is_contiguous() &&
                                         lora_runs.dim() == 2 && lora_runs.size(1) == 3),
                "CpuModel: lora_runs is a contiguous [R, 3] int64 tensor");
    TORCH_CHECK(!lora_runs.defined() || layers_.front().lora[0].defined(), "CpuModel: lora_runs without LoRA slots");
    TORCH_CHECK(!shared_prefix || (shared_prefix->size() == 2 && kivi_bits_ == 0),
                "CpuModel: shared_prefix is [groups, members], over a paged (not KIVI) cache");
    const SharedPrefix shared = shared_prefix ? shared_prefix_of((*shared_prefix)[0], (*shared_prefix)[1],
                                                                 kv_caches_[0].size(3))
                                              : SharedPrefix{};
    TORCH_CHECK((kivi_bits_ > 0) == kivi.has_value(), "CpuModel: a KIVI cache's step needs its KiviStep, others none");
    const at::Tensor kv_positions = kv_positions_in.has_value() ? *kv_positions_in : positions;
    for (const auto* t : {&input_ids, &positions, &seq_index, &slot_mapping, &block_tables, &kv_positions}) {
      TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "CpuModel: index tensors must be contiguous int64");
    }
    const int64_t groups = block_tables.dim() == 3 ? block_tables.size(0) : 1;
    TORCH_CHECK(block_tables.dim() == 2 || (slot_mapping.dim() == 2 && slot_mapping.size(0) == groups &&
                                            static_cast<int64_t>(layers_.size()) % groups == 0),
                "CpuModel: layer groups take block_tables [G, B, M] and slot_mapping [G, T], G dividing the layers");
    TORCH_CHECK(groups == 1 || (!kivi_bits_ && !before_attention && !shared_prefix),
                "CpuModel: layer groups do not run with KIVI, Quest's reads or shared-prefix attention");
    const int64_t layers_per_group = static_cast<int64_t>(layers_.size()) / groups;
    at::Tensor residual = at::embedding(embed_, input_ids);  // a fresh tensor: updated in place below
    at::Tensor normed = at::empty_like(residual);
    at::Tensor delta;  // what the previous sublayer adds to the residual stream
    const auto dtype = residual.scalar_type();
    at::Tensor q = at::empty({tokens, num_heads_, head_dim_}, residual.options());
    at::Tensor attn = at::empty_like(q);
    // KIVI: the step's keys and values [2, T, KVH, 1, D], written by rope_and_store as a cache of
    // T one-token blocks (token t at slot t), read by attention and then by the store.
    at::Tensor step_kv, step_slots;
    if (kivi_bits_) {
      step_kv = at::empty({2, tokens, num_kv_heads_, 1, head_dim_}, residual.options());
      step_slots = at::arange(tokens, input_ids.options());
    }
    for (size_t l = 0; l < layers_.size(); ++l) {
      const LayerWeights& w = layers_[l];
      at::Tensor& cache = kv_caches_[l];
      const int64_t group = static_cast<int64_t>(l) / layers_per_group;
      const at::Tensor block_tables_l = groups > 1 ? block_tables.select(0, group) : block_tables;
      const at::Tensor slot_mapping_l = groups > 1 ? slot_mapping.select(0, group) : slot_mapping;
      const at::Tensor scales = quantised_ ? kv_scales_[l] : at::Tensor();
      const std::vector<Span> spans = layer_spans(l, zoo_runs, tokens);
      norm_spans(residual, delta, normed, spans, &LayerWeights::input_norm);
      at::Tensor qkv = project_spans(normed, spans, Projection::kQkv);
      add_lora(qkv, normed, w.lora[0], w.lora[1], lora_runs, qkv_shards);
      if (kivi_bits_) {
        TORCH_CHECK(!before_attention, "CpuModel: Quest's reduced reads do not run over a KIVI cache");
        kivi_layer(l, qkv, positions, seq_index, kv_positions, block_tables, step_kv, step_slots, *kivi, q, attn);
        // After the layer's store: SnapKV reads the blocks and ring as the step left them.
        if (after_attention) after_attention(static_cast<int64_t>(l), q);
      } else {
        KVFLOW_RUN(dtype, "rope_and_store", [&] {
          KVFLOW_KV_DISPATCH(kv_type_, scalar_t, [&] {
            rope_and_store<scalar_t, kv_t>(qkv, positions, slot_mapping_l, cos_, sin_, w.q_norm, w.k_norm, eps_, cache,
                                           scales, q, num_heads_, num_kv_heads_, head_dim_);
          });
        });
        std::vector<at::Tensor> reads;
        if (before_attention) reads = before_attention(static_cast<int64_t>(l), q);
        TORCH_CHECK(reads.empty() || (reads.size() == 2 && reads[0].scalar_type() == at::kLong &&
                                      reads[0].is_contiguous() && reads[1].scalar_type() == at::kLong &&
                                      reads[1].is_contiguous() && reads[1].size(0) == tokens),
                    "CpuModel: before_attention returns nothing or [block_tables, kv_positions] (contiguous int64)");
        const at::Tensor& tables = reads.empty() ? block_tables_l : reads[0];
        const at::Tensor& key_positions = reads.empty() ? kv_positions : reads[1];
        KVFLOW_RUN(dtype, "paged_attention", [&] {
          KVFLOW_KV_DISPATCH(kv_type_, scalar_t, [&] {
            paged_attention<scalar_t, kv_t>(q, cache, scales, tables, seq_index, key_positions, scale_, w.window,
                                            attn, 0, reads.empty() ? shared : SharedPrefix{});
          });
        });
        if (after_attention) after_attention(static_cast<int64_t>(l), q);
      }
      const at::Tensor attn_flat = attn.view({tokens, num_heads_ * head_dim_});
      delta = project_spans(attn_flat, spans, Projection::kO);
      add_lora(delta, attn_flat, w.lora[2], w.lora[3], lora_runs, {0, delta.size(1)});
      norm_spans(residual, delta, normed, spans, &LayerWeights::post_norm);
      at::Tensor gate_up = project_spans(normed, spans, Projection::kGateUp);
      add_lora(gate_up, normed, w.lora[4], w.lora[5], lora_runs, {0, gate_up.size(1) / 2, gate_up.size(1)});
      at::Tensor act = at::empty({tokens, gate_up.size(1) / 2}, residual.options());
      KVFLOW_RUN(dtype, "silu_and_mul", [&] { silu_and_mul<scalar_t>(gate_up, act); });
      delta = project_spans(act, spans, Projection::kDown);
      add_lora(delta, act, w.lora[6], w.lora[7], lora_runs, {0, delta.size(1)});
      if (layer_done) layer_done(static_cast<int64_t>(l));
    }
    // The final norm: each variant's own where it has one (a block zoo), else the base's.
    std::vector<std::pair<Span, at::Tensor>> norms;
    for (const Span& span : final_spans(zoo_runs, tokens)) {
      const auto own = span.variant >= 0 ? final_norms_.find(span.variant) : final_norms_.end();
      norms.emplace_back(span, own == final_norms_.end() ? final_norm_ : own->second);
    }
    for (const auto& [span, weight] : norms) {
      at::Tensor res = norms.size() == 1 ? residual : residual.narrow(0, span.start, span.count);
      at::Tensor out = norms.size() == 1 ? normed : normed.narrow(0, span.start, span.count);
      const at::Tensor d = norms.size() == 1 || !delta.defined() ? delta : delta.narrow(0, span.start, span.count);
      KVFLOW_RUN(dtype, "add_rms_norm", [&] { add_rms_norm<scalar_t>(res, d, weight, out, eps_); });
    }
    return normed;
  }

 private:
  // Block zoo: a run of rows computed with one layer's weights (the base's, or a variant's own).
  struct Span {
    int64_t start, count;
    const LayerWeights* weights;
    int64_t variant;  // -1: the base
  };
  enum class Projection { kQkv, kO, kGateUp, kDown };

  // Layer l's spans over [0, tokens): each zoo run whose variant has its own layer l, the base for the rest
  // (one span for everything when no run in the step has one).
  std::vector<Span> layer_spans(size_t l, const at::Tensor& runs, int64_t tokens) const {
    std::vector<Span> spans;
    int64_t at = 0;
    if (runs.defined()) {
      const int64_t* r = runs.data_ptr<int64_t>();
      for (int64_t i = 0; i < runs.size(0); ++i) {
        const auto own = alternatives_[l].find(r[3 * i]);
        if (own == alternatives_[l].end()) continue;
        if (r[3 * i + 1] > at) spans.push_back({at, r[3 * i + 1] - at, &layers_[l], -1});
        spans.push_back({r[3 * i + 1], r[3 * i + 2] - r[3 * i + 1], &own->second, r[3 * i]});
        at = r[3 * i + 2];
      }
    }
    if (at < tokens) spans.push_back({at, tokens - at, &layers_[l], -1});
    return spans;
  }

  // The final norm's spans: one per zoo run (its variant), the base between them.
  std::vector<Span> final_spans(const at::Tensor& runs, int64_t tokens) const {
    std::vector<Span> spans;
    int64_t at = 0;
    if (runs.defined() && !final_norms_.empty()) {
      const int64_t* r = runs.data_ptr<int64_t>();
      for (int64_t i = 0; i < runs.size(0); ++i) {
        if (!final_norms_.count(r[3 * i])) continue;
        if (r[3 * i + 1] > at) spans.push_back({at, r[3 * i + 1] - at, nullptr, -1});
        spans.push_back({r[3 * i + 1], r[3 * i + 2] - r[3 * i + 1], nullptr, r[3 * i]});
        at = r[3 * i + 2];
      }
    }
    if (at < tokens) spans.push_back({at, tokens - at, nullptr, -1});
    return spans;
  }

  // residual += delta; normed = RMSNorm(residual) with each span's norm weight (`which` of its layer).
  void norm_spans(at::Tensor& residual, const at::Tensor& delta, at::Tensor& normed, const std::vector<Span>& spans,
                  at::Tensor LayerWeights::*which) const {
    const auto dtype = residual.scalar_type();
    if (spans.size() == 1) {
      KVFLOW_RUN(dtype, "add_rms_norm", [&] { add_rms_norm<scalar_t>(residual, delta, spans[0].weights->*which,
                                                                     normed, eps_); });
      return;
    }
    for (const Span& span : spans) {
      at::Tensor res = residual.narrow(0, span.start, span.count), out = normed.narrow(0, span.start, span.count);
      const at::Tensor d = delta.defined() ? delta.narrow(0, span.start, span.count) : delta;
      KVFLOW_RUN(dtype, "add_rms_norm", [&] { add_rms_norm<scalar_t>(res, d, span.weights->*which, out, eps_); });
    }
  }

  // A projection of x's rows, each span through its layer's weights (one call where there is one span).
  at::Tensor project_spans(const at::Tensor& x, const std::vector<Span>& spans, Projection which) const {
    auto one = [&](const at::Tensor& rows, const LayerWeights& w) {
      switch (which) {
        case Projection::kQkv: return project(rows, w.qkv, w.qkv_bias, packed_, w.qkv_blocked, w.qkv_q);
        case Projection::kO: return project(rows, w.o, w.o_bias, packed_, w.o_blocked, w.o_q);
        case Projection::kGateUp:
          return project(rows, w.gate_up, w.gate_up_bias, packed_, w.gate_up_blocked, w.gate_up_q);
        default: return project(rows, w.down, w.down_bias, packed_, w.down_blocked, w.down_q);
      }
    };
    if (spans.size() == 1) return one(x, *spans[0].weights);
    std::vector<at::Tensor> parts;
    for (const Span& span : spans) parts.push_back(one(x.narrow(0, span.start, span.count), *span.weights));
    return at::cat(parts, 0);
  }

  // One layer's rotary embedding, KIVI attention (over the cache as it was) and store, in that order:
  // a long chunk's ring writes may wrap onto positions its own queries still read.
  void kivi_layer(size_t l, const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& seq_index,
                  const at::Tensor& kv_positions, const at::Tensor& block_tables, at::Tensor& step_kv,
                  const at::Tensor& step_slots, const std::vector<at::Tensor>& step, at::Tensor& q, at::Tensor& attn) {
    const LayerWeights& w = layers_[l];
    const auto dtype = qkv.scalar_type();
    const at::Tensor none;
    KVFLOW_RUN(dtype, "rope_and_store", [&] {
      rope_and_store<scalar_t, scalar_t>(qkv, positions, step_slots, cos_, sin_, w.q_norm, w.k_norm, eps_, step_kv,
                                         none, q, num_heads_, num_kv_heads_, head_dim_);
    });
    const at::Tensor k = step_kv[0].view({-1, num_kv_heads_, head_dim_}), v = step_kv[1].view({-1, num_kv_heads_, head_dim_});
    KVFLOW_RUN(dtype, "kivi_attention", [&] {
      const KiviCache<scalar_t> c(kv_caches_[l], kv_scales_[l], kv_rings_[l], k, v, kivi_bits_);
      kivi_attention<scalar_t>(q, c, step, block_tables, seq_index, kv_positions, scale_, w.window, attn);
    });
    KVFLOW_RUN(dtype, "kivi_store", [&] {
      const KiviCache<scalar_t> c(kv_caches_[l], kv_scales_[l], kv_rings_[l], k, v, kivi_bits_);
      kivi_store<scalar_t>(c, step);
    });
  }

  at::Tensor embed_, final_norm_, cos_, sin_;
  std::vector<at::Tensor> kv_caches_, kv_scales_;  // per layer; scales only for an int8 cache (KIVI: meta)
  std::vector<at::Tensor> kv_rings_;  // KIVI: each layer's residual ring
  int64_t kivi_bits_ = 0;
  at::ScalarType kv_type_;
  bool quantised_ = false;
  std::vector<LayerWeights> layers_;
  std::vector<std::map<int64_t, LayerWeights>> alternatives_;  // block zoo: per layer, variant -> its own weights
  std::map<int64_t, at::Tensor> final_norms_;  // block zoo: variant -> its own final norm
  int64_t num_heads_, num_kv_heads_, head_dim_;
  float eps_;
  bool packed_;
  float scale_;
};

// draft_greedy: a draft model's greedy proposals for a whole speculative pass in one call.
#include "cpu_argmax.h"
#include "cpu_draft.h"

// Single kernels, exposed for the tests that compare each one with a plain PyTorch reference.
// Returns (x + delta, RMSNorm(x + delta)); x itself is left unchanged.
std::vector<at::Tensor> rms_norm_op(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight, double eps) {
  at::Tensor residual = x.clone();
  at::Tensor out = at::empty_like(x);
  const at::Tensor d = optional_weight(delta);
  KVFLOW_DISPATCH(x.scalar_type(), "rms_norm", [&] { add_rms_norm<scalar_t>(residual, d, weight, out, static_cast<float>(eps)); });
  return {residual, out};
}

at::Tensor rope_and_store_op(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& slots,
                             const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& q_norm,
                             const at::Tensor& k_norm, double eps, at::Tensor kv_cache, int64_t num_heads,
                             int64_t num_kv_heads, int64_t head_dim, const std::optional<at::Tensor>& kv_scales) {
  at::Tensor q = at::empty({qkv.size(0), num_heads, head_dim}, qkv.options());
  const at::Tensor scales = kv_scales ? optional_weight(*kv_scales) : at::Tensor();
  KVFLOW_DISPATCH(qkv.scalar_type(), "rope_and_store", [&] {
    KVFLOW_KV_DISPATCH(kv_cache.scalar_type(), scalar_t, [&] {
      rope_and_store<scalar_t, kv_t>(qkv, positions, slots, cos, sin, optional_weight(q_norm), optional_weight(k_norm),
                                     static_cast<float>(eps), kv_cache, scales, q, num_heads, num_kv_heads, head_dim);
    });
  });
  return q;
}

// decode_chunk > 0 fixes the keys per decode chunk of the vectorised kernel (tests); 0 lets it choose.
// kv_scales: the fp32 scales of an int8 or fp8 kv_cache (None or an empty tensor for a dense one).
// shared_groups, shared_members: shared-prefix groups of decode tokens (cpu_attention.h's SharedPrefix).
at::Tensor paged_attention_op(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                              const at::Tensor& seq_index, const at::Tensor& positions, double scale, int64_t window,
                              int64_t decode_chunk, const std::optional<at::Tensor>& kv_scales,
                              const std::optional<at::Tensor>& shared_groups,
                              const std::optional<at::Tensor>& shared_members) {
  at::Tensor out = at::empty_like(q);
  const at::Tensor scales = kv_scales ? optional_weight(*kv_scales) : at::Tensor();
  const SharedPrefix shared = shared_prefix_of(shared_groups.value_or(at::Tensor()),
                                               shared_members.value_or(at::Tensor()), kv_cache.size(3));
  KVFLOW_DISPATCH(q.scalar_type(), "paged_attention", [&] {
    KVFLOW_KV_DISPATCH(kv_cache.scalar_type(), scalar_t, [&] {
      paged_attention<scalar_t, kv_t>(q, kv_cache, scales, block_tables, seq_index, positions,
                                      static_cast<float>(scale), window, out, decode_chunk, shared);
    });
  });
  return out;
}

// KIVI: attention over the cache (codes, meta, ring) as it was before the step and the step's own
// k, v; `step` is cpu_kernels.kivi_step_tensors' list. Returns [T, H, D].
at::Tensor kivi_attention_op(const at::Tensor& q, const at::Tensor& codes, const at::Tensor& meta, const at::Tensor& ring,
                             const at::Tensor& k, const at::Tensor& v, const at::Tensor& block_tables,
                             const at::Tensor& seq_index, const at::Tensor& positions, const std::vector<at::Tensor>& step,
                             int64_t bits, double scale, int64_t window, int64_t decode_chunk) {
  at::Tensor out = at::empty_like(q);
  KVFLOW_DISPATCH(q.scalar_type(), "kivi_attention", [&] {
    TORCH_CHECK(k.scalar_type() == q.scalar_type(), "kivi_attention: q, k, v and the ring of one dtype");
    const KiviCache<scalar_t> c(codes, meta, ring, k, v, bits);
    kivi_attention<scalar_t>(q, c, step, block_tables, seq_index, positions, static_cast<float>(scale), window, out,
                             decode_chunk);
  });
  return out;
}

// KIVI: kivi.store_kivi in place (the step's completed groups quantised, its residual tokens to the ring).
void kivi_store_op(at::Tensor codes, at::Tensor meta, at::Tensor ring, const at::Tensor& k, const at::Tensor& v,
                   const std::vector<at::Tensor>& step, int64_t bits) {
  KVFLOW_DISPATCH(k.scalar_type(), "kivi_store", [&] {
    const KiviCache<scalar_t> c(codes, meta, ring, k, v, bits);
    kivi_store<scalar_t>(c, step);
  });
}

// Quest's bound on q·k over each block's keys, per query head: Σ_d max(q_d·min_d, q_d·max_d), which
// is q⁺·max + q⁻·min, read from the blocks' key bounds in place (kvflow/attention/kv_policy_ops.py
// has the PyTorch reference). q [R, H, D]; bounds [blocks, KVH, 2 (min, max), D] of q's dtype;
// tables [R, nb] int64; num_blocks [R] int64. Returns [R, H, nb] fp32 times `scale`, -inf past a
// row's blocks. A row walks its blocks once, reading each block's bounds for every kv head as one
// contiguous run (blocks are scattered: one pass, with the next blocks prefetched), 16 lanes at a
// time, q⁺ and q⁻ split once per row.
template <typename T>
void quest_bounds_kernel(const at::Tensor& q, const at::Tensor& bounds, const at::Tensor& tables,
                         const at::Tensor& num_blocks, float scale, at::Tensor& out) {
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = bounds.size(1), nb = tables.size(1), group = heads / kv_heads;
  const int64_t block_stride = kv_heads * 2 * dim;  // elements of one block's bounds
#ifdef __AVX512F__
  const int64_t chunks = dim / 16;  // whole 16-lane vectors; the rest (dim % 16) is summed in scalars
#else
  const int64_t chunks = 0;  // the generic build (no AVX-512): every lane in the scalar loop
#endif
  constexpr int64_t kPrefetch = 4;  // blocks ahead
  const T* qp = q.data_ptr<T>();
  const T* bp = bounds.data_ptr<T>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* np = num_blocks.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  // Rows split further into runs of blocks, so one long sequence still uses every thread.
  const int64_t runs = std::max<int64_t>(1, std::min<int64_t>(nb / 64, at::get_num_threads()));
  const int64_t run_len = (nb + runs - 1) / runs;
  at::parallel_for(0, rows * runs, 1, [&](int64_t begin, int64_t end) {
#ifdef __AVX512F__
    std::vector<__m512> qpos(heads * chunks), qneg(heads * chunks);
#endif
    std::vector<float> tail_q(heads * dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / runs, j0 = (item % runs) * run_len, j1 = std::min(nb, j0 + run_len);
      const T* qrow = qp + r * heads * dim;
      for (int64_t h = 0; h < heads; ++h) {
#ifdef __AVX512F__
        for (int64_t c = 0; c < chunks; ++c) {
          const __m512 x = load16(qrow + h * dim + 16 * c);
          qpos[h * chunks + c] = _mm512_max_ps(x, _mm512_setzero_ps());
          qneg[h * chunks + c] = _mm512_min_ps(x, _mm512_setzero_ps());
        }
#endif
        for (int64_t d = 16 * chunks; d < dim; ++d) tail_q[h * dim + d] = static_cast<float>(qrow[h * dim + d]);
      }
      const int64_t n = std::min(np[r], nb);
      float* o = op + r * heads * nb;
      for (int64_t j = j0; j < j1; ++j) {
        if (j >= n) {
          for (int64_t h = 0; h < heads; ++h) o[h * nb + j] = -std::numeric_limits<float>::infinity();
          continue;
        }
        if (j + kPrefetch < n) {
          const char* next = reinterpret_cast<const char*>(bp + tp[r * nb + j + kPrefetch] * block_stride);
          for (int64_t off = 0; off < block_stride * static_cast<int64_t>(sizeof(T)); off += 64)
            __builtin_prefetch(next + off, 0, 3);  // prefetcht0 on x86
        }
        const T* block = bp + tp[r * nb + j] * block_stride;
        for (int64_t k = 0; k < kv_heads; ++k) {
          const T* lo = block + k * 2 * dim;
          const T* hi = lo + dim;
          for (int64_t g = 0; g < group; ++g) {
            const int64_t h = k * group + g;
            float sum = 0.f;
#ifdef __AVX512F__
            __m512 acc = _mm512_setzero_ps();
            for (int64_t c = 0; c < chunks; ++c) {
              acc = _mm512_fmadd_ps(qpos[h * chunks + c], load16(hi + 16 * c), acc);
              acc = _mm512_fmadd_ps(qneg[h * chunks + c], load16(lo + 16 * c), acc);
            }
            sum = _mm512_reduce_add_ps(acc);
#endif
            for (int64_t d = 16 * chunks; d < dim; ++d) {
              const float x = tail_q[h * dim + d];
              sum += x * static_cast<float>(x > 0.f ? hi[d] : lo[d]);
            }
            o[h * nb + j] = sum * scale;
          }
        }
      }
    }
  });
}

at::Tensor quest_bounds_op(const at::Tensor& q, const at::Tensor& bounds, const at::Tensor& tables,
                           const at::Tensor& num_blocks, double scale) {
  TORCH_CHECK(q.dim() == 3 && bounds.dim() == 4 && bounds.size(2) == 2 && bounds.size(3) == q.size(2) &&
                  q.size(1) % bounds.size(1) == 0 && tables.dim() == 2 && tables.size(0) == q.size(0),
              "quest_bounds: q [R, H, D], bounds [blocks, KVH, 2, D], tables [R, nb]");
  TORCH_CHECK(q.scalar_type() == bounds.scalar_type() && q.is_contiguous() && bounds.is_contiguous(),
              "quest_bounds: q and bounds must be contiguous and of one dtype");
  TORCH_CHECK(tables.scalar_type() == at::kLong && num_blocks.scalar_type() == at::kLong && tables.is_contiguous() &&
                  num_blocks.is_contiguous(), "quest_bounds: tables and num_blocks must be contiguous int64");
  at::Tensor out = at::empty({q.size(0), q.size(1), tables.size(1)}, q.options().dtype(at::kFloat));
  KVFLOW_DISPATCH(q.scalar_type(), "quest_bounds", [&] {
    quest_bounds_kernel<scalar_t>(q, bounds, tables, num_blocks, static_cast<float>(scale), out);
  });
  return out;
}

// H2O's per-block attention mass for decode rows (kv_policy_ops.block_attention_mass is the PyTorch
// reference): per query head, softmax(q·k · scale) over the row's first kv_lens[r] keys, read in
// place from the paged cache in its own format (codes times their scale), summed per block.
// q [R, H, D] (D a multiple of 16); tables [R, nb]; returns [R, KVH, nb] fp32 (the caller sums kv heads).
template <typename T, typename KV>
void block_mass_kernel(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& kv_scales,
                       const at::Tensor& tables, const at::Tensor& kv_lens, float scale, at::Tensor& out) {
  const at::Tensor none = at::empty({0}, tables.options());
  at::Tensor unused = at::empty({0}, q.options());
  const PagedAttentionView<T, KV> v(q, kv_cache, kv_scales, tables, none, none, unused);
  const int64_t rows = q.size(0), nb = tables.size(1), dim = v.head_dim, chunks = dim / 16;
  const int64_t* lens = kv_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows * v.num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s;
#ifdef __AVX512F__
    std::vector<__m512> qv(chunks);
#endif
    for (int64_t rk = begin; rk < end; ++rk) {
      const int64_t r = rk / v.num_kv_heads, g = rk % v.num_kv_heads, n = lens[r];
      const int64_t* table = v.tables + r * v.table_stride;
      float* mass = op + rk * nb;
      std::fill(mass, mass + nb, 0.f);
      s.resize(n);
      for (int64_t h = g * v.group; h < (g + 1) * v.group; ++h) {
        const T* qrow = v.q + (r * v.num_heads + h) * dim;
#ifdef __AVX512F__
        for (int64_t c = 0; c < chunks; ++c) qv[c] = load16(qrow + 16 * c);
#endif
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < n; ++j) {
          const int64_t b = j / v.block_size;
          const KV* key = v.block_rows(v.keys, table, b, g, j);
#ifdef __AVX512F__
          __m512 acc = _mm512_setzero_ps();
          for (int64_t c = 0; c < chunks; ++c) acc = _mm512_fmadd_ps(load16(key + 16 * c), qv[c], acc);
          float dot = _mm512_reduce_add_ps(acc);
#else  // the generic build: the same products, summed in order
          float dot = 0.f;
          for (int64_t d = 0; d < dim; ++d) dot += static_cast<float>(qrow[d]) * static_cast<float>(key[d]);
#endif
          if constexpr (PagedAttentionView<T, KV>::kTokenScales) dot *= *v.scale_rows(v.key_scales, table, b, g, j);
          if constexpr (PagedAttentionView<T, KV>::kHeadScales) dot *= v.key_scales[g];
          s[j] = dot * scale;
          m = std::max(m, s[j]);
        }
        float z = 0.f;
        for (int64_t j = 0; j < n; ++j) z += (s[j] = std::exp(s[j] - m));
        const float inv = 1.f / z;
        for (int64_t j = 0; j < n; ++j) mass[j / v.block_size] += s[j] * inv;
      }
    }
  });
}

at::Tensor block_mass_op(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& tables,
                         const at::Tensor& kv_lens, double scale, const std::optional<at::Tensor>& kv_scales) {
  TORCH_CHECK(q.dim() == 3 && q.size(2) % 16 == 0 && q.is_contiguous() && tables.scalar_type() == at::kLong &&
                  tables.is_contiguous() && kv_lens.scalar_type() == at::kLong && kv_lens.numel() == q.size(0),
              "block_mass: q [R, H, D] contiguous with D a multiple of 16, int64 tables [R, nb] and kv_lens [R]");
  at::Tensor out = at::empty({q.size(0), kv_cache.size(2), tables.size(1)}, q.options().dtype(at::kFloat));
  const at::Tensor scales = kv_scales ? optional_weight(*kv_scales) : at::Tensor();
  KVFLOW_DISPATCH(q.scalar_type(), "block_mass", [&] {
    KVFLOW_KV_DISPATCH(kv_cache.scalar_type(), scalar_t, [&] {
      block_mass_kernel<scalar_t, kv_t>(q, kv_cache, scales, tables, kv_lens, static_cast<float>(scale), out);
    });
  });
  return out.sum(1);
}

// Quest's key bounds: fold a step's keys [T, KVH, D] (as stored) into their blocks' min/max
// (bounds [blocks, KVH, 2, D] of the keys' dtype); a block whose offset 0 is written starts over.
// Tokens arrive in order, so a block's offset-0 token precedes its others in the step.
void fold_key_bounds_op(at::Tensor& bounds, const at::Tensor& keys, const at::Tensor& slot_block,
                        const at::Tensor& slot_offset) {
  TORCH_CHECK(bounds.is_contiguous() && keys.is_contiguous() && bounds.scalar_type() == keys.scalar_type() &&
                  slot_block.scalar_type() == at::kLong && slot_offset.scalar_type() == at::kLong,
              "fold_key_bounds: contiguous bounds and keys of one dtype, int64 slots");
  const int64_t tokens = keys.size(0), row = keys.size(1) * keys.size(2), dim = keys.size(2);
  const int64_t* blk = slot_block.data_ptr<int64_t>();
  const int64_t* off = slot_offset.data_ptr<int64_t>();
  KVFLOW_DISPATCH(keys.scalar_type(), "fold_key_bounds", [&] {
    const scalar_t* k = keys.data_ptr<scalar_t>();
    scalar_t* b = bounds.data_ptr<scalar_t>();
    for (int64_t t = 0; t < tokens; ++t) {
      scalar_t* block = b + blk[t] * 2 * row;  // [KVH, 2, D]
      const scalar_t* key = k + t * row;
      for (int64_t h = 0; h < keys.size(1); ++h) {
        scalar_t* lo = block + h * 2 * dim;
        scalar_t* hi = lo + dim;
        const scalar_t* x = key + h * dim;
        for (int64_t d = 0; d < dim; ++d) {
          const float v = static_cast<float>(x[d]);
          if (off[t] == 0 || v < static_cast<float>(lo[d])) lo[d] = x[d];
          if (off[t] == 0 || v > static_cast<float>(hi[d])) hi[d] = x[d];
        }
      }
    }
  });
}

// Quest's choice of blocks for each decode row (kv_policy_ops.quest_select is the PyTorch
// reference): per query head the bounds softmaxed over the row's blocks, summed over heads; the
// row's `sink_blocks` first and `window_blocks` newest blocks (at least the query's own) always
// read; the best others up to `read_blocks` in all, in table order. Returns the reduced tables
// [R, max read] (padding repeats the last block) and the context lengths over them [R].
std::vector<at::Tensor> quest_select_op(const at::Tensor& q, const at::Tensor& bounds, const at::Tensor& tables,
                                        const at::Tensor& kv_lens, const at::Tensor& read_blocks,
                                        const at::Tensor& sink_blocks, const at::Tensor& window_blocks,
                                        int64_t block_size, double scale) {
  for (const auto* t : {&kv_lens, &read_blocks, &sink_blocks, &window_blocks}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->numel() == q.size(0),
                "quest_select: per-row arguments are contiguous int64 [R]");
  }
  const int64_t rows = q.size(0), heads = q.size(1), nb = tables.size(1);
  at::Tensor num_blocks = (kv_lens + (block_size - 1)).div(block_size, "floor").clamp_max(nb);
  at::Tensor upper = quest_bounds_op(q, bounds, tables, num_blocks, scale);  // [R, H, nb]
  const int64_t* nbp = num_blocks.data_ptr<int64_t>();
  const int64_t* rp = read_blocks.data_ptr<int64_t>();
  int64_t width = 1;
  for (int64_t r = 0; r < rows; ++r) width = std::max(width, std::min(rp[r], nbp[r]));
  at::Tensor chosen = at::empty({rows, width}, tables.options());
  at::Tensor lens = at::empty({rows}, kv_lens.options());
  const float* up = upper.data_ptr<float>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t *lp = kv_lens.data_ptr<int64_t>(), *sp = sink_blocks.data_ptr<int64_t>();
  const int64_t* wp = window_blocks.data_ptr<int64_t>();
  int64_t* cp = chosen.data_ptr<int64_t>();
  int64_t* lenp = lens.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> score(nb), e(nb);
    std::vector<int64_t> order(nb);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = nbp[r], k = std::min(rp[r], n);
      std::fill(score.begin(), score.begin() + n, 0.f);
      for (int64_t h = 0; h < heads; ++h) {
        const float* u = up + (r * heads + h) * nb;
        float m = -std::numeric_limits<float>::infinity(), z = 0.f;
        for (int64_t j = 0; j < n; ++j) m = std::max(m, u[j]);
        for (int64_t j = 0; j < n; ++j) z += (e[j] = std::exp(u[j] - m));
        const float inv = 1.f / z;
        for (int64_t j = 0; j < n; ++j) score[j] += e[j] * inv;
      }
      const int64_t newest = n - std::max<int64_t>(wp[r], 1);
      for (int64_t j = 0; j < n; ++j) {
        if (j < sp[r] || j >= newest) score[j] = std::numeric_limits<float>::infinity();
      }
      for (int64_t j = 0; j < n; ++j) order[j] = j;
      std::nth_element(order.begin(), order.begin() + (k - 1), order.begin() + n,
                       [&](int64_t a, int64_t b) { return score[a] > score[b] || (score[a] == score[b] && a < b); });
      std::sort(order.begin(), order.begin() + k);
      int64_t* out = cp + r * width;
      for (int64_t i = 0; i < width; ++i) out[i] = tp[r * nb + order[std::min(i, k - 1)]];
      lenp[r] = (k - 1) * block_size + lp[r] - (n - 1) * block_size;
    }
  });
  return {chosen, lens};
}

at::Tensor decode_linear_op(const at::Tensor& x, const at::Tensor& blocked, const at::Tensor& bias) {
  return decode_linear(x.contiguous(), blocked, optional_weight(bias));
}

at::Tensor silu_and_mul_op(const at::Tensor& gate_up) {
  at::Tensor out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  KVFLOW_DISPATCH(gate_up.scalar_type(), "silu_and_mul", [&] { silu_and_mul<scalar_t>(gate_up, out); });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<CpuModel>(m, "CpuModel")
      .def(pybind11::init<at::Tensor, std::vector<std::vector<at::Tensor>>, std::vector<int64_t>, at::Tensor,
                          at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, int64_t, int64_t,
                          int64_t, double, bool, std::vector<at::Tensor>, int64_t>())
      .def("forward", &CpuModel::forward, pybind11::arg("input_ids"), pybind11::arg("positions"),
           pybind11::arg("seq_index"), pybind11::arg("slot_mapping"), pybind11::arg("block_tables"),
           pybind11::arg("layer_done") = pybind11::none(), pybind11::arg("kv_positions") = pybind11::none(),
           pybind11::arg("before_attention") = pybind11::none(), pybind11::arg("after_attention") = pybind11::none(),
           pybind11::arg("kivi") = pybind11::none(), pybind11::arg("shared_prefix") = pybind11::none(),
           pybind11::arg("lora") = pybind11::none(), pybind11::arg("zoo_runs") = pybind11::none(),
           pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("set_lora", &CpuModel::set_lora)
      .def("set_variant_layer", &CpuModel::set_variant_layer)
      .def("set_variant_final_norm", &CpuModel::set_variant_final_norm)
      .def("draft_greedy", &draft_greedy, pybind11::arg("feed_ids"), pybind11::arg("feed_lens"), pybind11::arg("starts"),
           pybind11::arg("counts"), pybind11::arg("block_tables"), pybind11::arg("block_size"), pybind11::arg("head"),
           pybind11::arg("head_bias"), pybind11::arg("head_packed"), pybind11::arg("head_blocked"),
           pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("rms_norm", &rms_norm_op);
  m.def("rope_and_store", &rope_and_store_op, pybind11::arg("qkv"), pybind11::arg("positions"),
        pybind11::arg("slots"), pybind11::arg("cos"), pybind11::arg("sin"), pybind11::arg("q_norm"),
        pybind11::arg("k_norm"), pybind11::arg("eps"), pybind11::arg("kv_cache"), pybind11::arg("num_heads"),
        pybind11::arg("num_kv_heads"), pybind11::arg("head_dim"), pybind11::arg("kv_scales") = pybind11::none());
  m.def("paged_attention", &paged_attention_op, pybind11::arg("q"), pybind11::arg("kv_cache"),
        pybind11::arg("block_tables"), pybind11::arg("seq_index"), pybind11::arg("positions"), pybind11::arg("scale"),
        pybind11::arg("window"), pybind11::arg("decode_chunk") = 0, pybind11::arg("kv_scales") = pybind11::none(),
        pybind11::arg("shared_groups") = pybind11::none(), pybind11::arg("shared_members") = pybind11::none());
  m.def("kivi_attention", &kivi_attention_op, pybind11::arg("q"), pybind11::arg("codes"), pybind11::arg("meta"),
        pybind11::arg("ring"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("block_tables"),
        pybind11::arg("seq_index"), pybind11::arg("positions"), pybind11::arg("step"), pybind11::arg("bits"),
        pybind11::arg("scale"), pybind11::arg("window"), pybind11::arg("decode_chunk") = 0);
  m.def("kivi_store", &kivi_store_op, pybind11::arg("codes"), pybind11::arg("meta"), pybind11::arg("ring"),
        pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("step"), pybind11::arg("bits"));
  m.def("quest_bounds", &quest_bounds_op, pybind11::arg("q"), pybind11::arg("bounds"), pybind11::arg("tables"),
        pybind11::arg("num_blocks"), pybind11::arg("scale"));
  m.def("block_mass", &block_mass_op, pybind11::arg("q"), pybind11::arg("kv_cache"), pybind11::arg("tables"),
        pybind11::arg("kv_lens"), pybind11::arg("scale"), pybind11::arg("kv_scales") = pybind11::none());
  m.def("fold_key_bounds", &fold_key_bounds_op, pybind11::arg("bounds"), pybind11::arg("keys"),
        pybind11::arg("slot_block"), pybind11::arg("slot_offset"));
  m.def("quest_select", &quest_select_op, pybind11::arg("q"), pybind11::arg("bounds"), pybind11::arg("tables"),
        pybind11::arg("kv_lens"), pybind11::arg("read_blocks"), pybind11::arg("sink_blocks"),
        pybind11::arg("window_blocks"), pybind11::arg("block_size"), pybind11::arg("scale"));
  m.def("silu_and_mul", &silu_and_mul_op);
  m.def("decode_linear", &decode_linear_op);
  m.def("linear_f32", [](const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
    return linear_f32(x, weight, optional_weight(bias));
  });
  // Greedy rows' tokens from the LM head's output in its own dtype (cpu_argmax.h).
  m.def("argmax_rows", &argmax_rows, pybind11::arg("logits"));
  // The forward's own linear (the LM head of CpuForward.logits goes through it, as draft_greedy's does).
  m.def("linear", [](const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, bool packed,
                     const at::Tensor& blocked) {
    return linear(x, weight, optional_weight(bias), packed, optional_weight(blocked));
  }, pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("packed"),
     pybind11::arg("blocked"));
  // The forward's LoRA delta (cpu_lora.h), in place on `out`; for tests against a reference.
  m.def("add_lora", [](at::Tensor out, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                       const at::Tensor& runs, const std::vector<int64_t>& shard_cols) {
    add_lora(out, x, a, b, runs, shard_cols);
  }, pybind11::arg("out"), pybind11::arg("x"), pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("runs"),
     pybind11::arg("shard_cols"));
  m.attr("lora_fused_max_rows") = kLoRAFusedMaxRows;
  m.attr("small_rows_f32") = kHasLinearF32 ? kSmallRowsF32 : 0;
  m.attr("has_decode_gemv") = kHasDecodeGemv;
  m.attr("decode_rows") = kDecodeRows;
}

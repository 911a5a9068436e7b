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

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
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

// x[i] = exp(x[i]) in place.
inline void exp_inplace(float* x, int64_t n) {
  int64_t i = 0;
#ifdef __AVX512F__
  const __m512 lo = _mm512_set1_ps(-87.3f), hi = _mm512_set1_ps(88.7f), log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 half = _mm512_set1_ps(0.5f), c1 = _mm512_set1_ps(0.693359375f), c2 = _mm512_set1_ps(-2.12194440e-4f);
  const __m512 one = _mm512_set1_ps(1.0f);
  const float coeffs[] = {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_loadu_ps(x + i), lo), hi);
    const __m512 k = _mm512_roundscale_ps(_mm512_add_ps(_mm512_mul_ps(v, log2e), half),
                                          _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_sub_ps(_mm512_sub_ps(v, _mm512_mul_ps(k, c1)), _mm512_mul_ps(k, c2));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    for (float c : coeffs) p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(c));
    p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(p, _mm512_mul_ps(r, r)), r), one);
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23);
    _mm512_storeu_ps(x + i, _mm512_mul_ps(p, _mm512_castsi512_ps(e)));
  }
#endif
  for (; i < n; ++i) x[i] = exp_scalar(x[i]);
}

// Dot product in fp32 (explicit fused multiply-adds: a summation order of our own either way).
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
// Split the fused qkv projection, apply the optional per-head q/k RMSNorm (Qwen3) and the
// rotate-half rotary embedding (cos/sin rounded to T, each product and sum rounded, as in
// layers._rotate), store k and v at their cache slots and return q as [T, H, D].
template <typename T>
void rope_and_store(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& slots,
                    const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& q_norm,
                    const at::Tensor& k_norm, float eps, at::Tensor& kv_cache, at::Tensor& q_out,
                    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
  const int64_t tokens = qkv.size(0), row_stride = qkv.stride(0);
  const int64_t half = head_dim / 2, block_size = kv_cache.size(3);
  const int64_t cache_half = kv_cache.stride(0);  // keys, then values
  const T* src = qkv.data_ptr<T>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const float* cos_t = cos.data_ptr<float>();
  const float* sin_t = sin.data_ptr<float>();
  const T* qn = q_norm.defined() ? q_norm.data_ptr<T>() : nullptr;
  const T* kn = k_norm.defined() ? k_norm.data_ptr<T>() : nullptr;
  T* cache = kv_cache.data_ptr<T>();
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
        T* out = is_q ? q + (t * num_heads + h) * head_dim
                      : cache + ((block * num_kv_heads + (h - num_heads)) * block_size + offset) * head_dim;
        from_float(y.data(), out, head_dim);
      }
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        const T* in = src + t * row_stride + (num_heads + num_kv_heads + h) * head_dim;
        T* out = cache + cache_half + ((block * num_kv_heads + h) * block_size + offset) * head_dim;
        std::copy(in, in + head_dim, out);
      }
    }
  });
}

// ----------------------------------------------------------------------------- paged attention
// max(x[0..n)), n >= 1: std::max_element does not vectorise (it must return the first maximum).
inline float max_of(const float* x, int64_t n) {
  int64_t i = 0;
  float r = -std::numeric_limits<float>::infinity();
#ifdef __AVX512F__
  __m512 m = _mm512_set1_ps(r);
  for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + i));
  r = _mm512_reduce_max_ps(m);
#endif
  for (; i < n; ++i) r = std::max(r, x[i]);
  return r;
}

// s[j] = exp(s[j] - max(s)) in place; returns their sum, the softmax's denominator.
inline float exp_shifted(float* s, int64_t n) {
  const float mx = max_of(s, n);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] -= mx;
  exp_inplace(s, n);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += s[j];
  return sum;
}

// out = T(a * (1 / denom)): an accumulated attention row normalised by its softmax sum, rounded once.
template <typename T>
inline void store_normalised(float* a, float denom, T* out, int64_t n) {
  const float inv = 1.f / denom;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) a[i] *= inv;
  from_float(a, out, n);
}

// One paged_attention call's tensors as raw pointers and sizes, shared by both kernels.
template <typename T>
struct PagedAttentionView {
  int64_t tokens, num_heads, head_dim, num_kv_heads, block_size, group, table_stride;
  const T *q, *keys, *values;
  const int64_t *tables, *seq, *pos;
  T* out;

  PagedAttentionView(const at::Tensor& q_, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                     const at::Tensor& seq_index, const at::Tensor& positions, at::Tensor& out_)
      : tokens(q_.size(0)), num_heads(q_.size(1)), head_dim(q_.size(2)), num_kv_heads(kv_cache.size(2)),
        block_size(kv_cache.size(3)), group(num_heads / num_kv_heads), table_stride(block_tables.stride(0)),
        q(q_.data_ptr<T>()), keys(kv_cache.data_ptr<T>()), values(keys + kv_cache.stride(0)),
        tables(block_tables.data_ptr<int64_t>()), seq(seq_index.data_ptr<int64_t>()),
        pos(positions.data_ptr<int64_t>()), out(out_.data_ptr<T>()) {}

  // Rows [j0, ...) of block b of sequence `table` for kv head g: contiguous in the head-major cache.
  const T* block_rows(const T* cache_half, const int64_t* table, int64_t b, int64_t g, int64_t j0) const {
    return cache_half + ((table[b] * num_kv_heads + g) * block_size + (j0 - b * block_size)) * head_dim;
  }
};

#if defined(__AVX512F__)
// v[0..15] -> one vector whose lane j is the sum of v[j]'s lanes: a transpose-and-add tree, 45
// shuffles and adds for 16 dot products instead of 16 separate horizontal reductions.
inline __m512 sum_lanes16(const __m512* v) {
  __m512 pairs[8], quads[4], halves[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [v2i, v2i+1, v2i, v2i+1] partial sums
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: [v4i .. v4i+3] partial sums
    const __m512d x = _mm512_castps_pd(pairs[2 * i]), y = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)  // 128-bit lanes: [q2i (L0+L1), q2i (L2+L3), q2i+1 (L0+L1), q2i+1 (L2+L3)]
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// Sixteen elements of T, widened to fp32 in a register (exact for all three types).
template <typename T>
inline __m512 load16(const T* p);
template <>
inline __m512 load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <>
inline __m512 load16<c10::BFloat16>(const c10::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
template <>
inline __m512 load16<c10::Half>(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// The dot products of one query head with sixteen keys (rows kr, kr + D, ...; the first m valid),
// in fp32 lanes before their final sum. bf16 on a CPU with AVX512-BF16 multiplies bf16 pairs
// directly (`vdpbf16ps`: the products are exact in fp32); otherwise keys are widened to fp32.
template <typename T, int C>
inline void key_dots16(const T* q, const T* kr, int m, __m512* dots) {
  constexpr int D = 16 * C;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16> && C % 2 == 0) {
    __m512bh qv[C / 2];
    for (int k = 0; k < C / 2; ++k) qv[k] = (__m512bh)_mm512_loadu_si512(q + 32 * k);
    for (int i = 0; i < 16; ++i) {
      dots[i] = _mm512_setzero_ps();
      if (i >= m) continue;
      for (int k = 0; k < C / 2; ++k)
        dots[i] = _mm512_dpbf16_ps(dots[i], (__m512bh)_mm512_loadu_si512(kr + i * D + 32 * k), qv[k]);
    }
    return;
  }
#endif
  __m512 qf[C];
  for (int k = 0; k < C; ++k) qf[k] = load16(q + 16 * k);
  for (int i = 0; i < 16; ++i) {
    dots[i] = _mm512_setzero_ps();
    if (i >= m) continue;
    for (int k = 0; k < C; ++k) dots[i] = _mm512_fmadd_ps(load16(kr + i * D + 16 * k), qf[k], dots[i]);
  }
}

// Query tiles for paged_attention_vec: runs of up to kQueryTile tokens of one sequence at
// consecutive positions (a prefill chunk), which share every key and value load. A decode token is
// a tile of one. Tiles are listed in zigzag order of cost (first, last, second, second to last...)
// so that the static split of at::parallel_for gives each thread a similar share of a long causal
// prefill, whose later queries see more keys.
constexpr int64_t kQueryTile = 8;

std::vector<std::pair<int64_t, int64_t>> query_tiles(const int64_t* seq, const int64_t* pos, int64_t tokens) {
  std::vector<std::pair<int64_t, int64_t>> tiles;  // (first token, count)
  for (int64_t t = 0; t < tokens;) {
    int64_t count = 1;
    while (count < kQueryTile && t + count < tokens && seq[t + count] == seq[t] && pos[t + count] == pos[t] + count) ++count;
    tiles.emplace_back(t, count);
    t += count;
  }
  std::vector<std::pair<int64_t, int64_t>> zigzag;
  zigzag.reserve(tiles.size());
  for (size_t lo = 0, hi = tiles.size(); lo < hi;) {
    zigzag.push_back(tiles[lo++]);
    if (lo < hi) zigzag.push_back(tiles[--hi]);
  }
  return zigzag;
}

// paged_attention (below) for head_dim = 16 * C, vectorised by hand, with the same fp32
// arithmetic, reading the cache in place. One work item is a query tile and a kv head: all its
// queries' heads share each key and value row while it is in L1. Scores are computed sixteen keys
// at a time and summed by one transpose tree; the value sum runs fused multiply-adds on value rows
// widened to fp32 once per tile. The generic loop spends most of its time converting each key and
// value row into an fp32 buffer and reducing every dot product on its own; at the `135m` offline
// decode shape this kernel is 2.2–2.6× faster in bf16 and reads the cache at about the memory
// bandwidth; query tiles made a 2,000-token prefill 1.6× faster than one query per item.
template <typename T, int C>
void paged_attention_vec(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                         const at::Tensor& seq_index, const at::Tensor& positions, float scale, int64_t window,
                         at::Tensor& out) {
  constexpr int64_t D = 16 * C;
  const PagedAttentionView<T> v(q, kv_cache, block_tables, seq_index, positions, out);
  const int64_t num_heads = v.num_heads, num_kv_heads = v.num_kv_heads, block_size = v.block_size, group = v.group;
  const int64_t* pos = v.pos;
  const __m512 scale_v = _mm512_set1_ps(scale);
  const auto tiles = query_tiles(v.seq, pos, v.tokens);
  at::parallel_for(0, static_cast<int64_t>(tiles.size()) * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc(kQueryTile * group * D), denom(kQueryTile * group), wide(16 * D);
    for (int64_t item = begin; item < end; ++item) {
      const auto [t0, count] = tiles[item / num_kv_heads];
      const int64_t g = item % num_kv_heads;
      // Query i of the tile sees keys [first(i), last(i)]; the tile spans [lo, hi].
      auto last = [&](int64_t i) { return pos[t0 + i]; };
      auto first = [&](int64_t i) { return window > 0 ? std::max<int64_t>(0, last(i) - window + 1) : int64_t{0}; };
      const int64_t lo = first(0), hi = last(count - 1), n = hi - lo + 1, rows = count * group;
      const int64_t* table = v.tables + v.seq[t0] * v.table_stride;
      scores.resize(rows * n);  // row r = i * group + h, column j - lo
      // Pass 1: scores, sixteen keys at a time; a query's keys after its own position are skipped.
      for (int64_t b = lo / block_size; b <= hi / block_size; ++b) {
        const int64_t j0 = std::max(lo, b * block_size), j1 = std::min(hi + 1, (b + 1) * block_size);
        const T* kb = v.block_rows(v.keys, table, b, g, j0);
        for (int64_t c = j0; c < j1; c += 16) {
          for (int64_t i = 0; i < count; ++i) {
            const int m = static_cast<int>(std::min<int64_t>({16, j1 - c, last(i) + 1 - c}));
            if (m <= 0) continue;
            const __mmask16 valid = static_cast<__mmask16>((1u << m) - 1u);
            for (int64_t h = 0; h < group; ++h) {
              __m512 dots[16];
              key_dots16<T, C>(v.q + ((t0 + i) * num_heads + g * group + h) * D, kb + (c - j0) * D, m, dots);
              _mm512_mask_storeu_ps(scores.data() + (i * group + h) * n + (c - lo), valid,
                                    _mm512_mul_ps(sum_lanes16(dots), scale_v));
            }
          }
        }
      }
      // Softmax of each row over its own keys; entries outside them stay unused.
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = r / group;
        denom[r] = exp_shifted(scores.data() + r * n + (first(i) - lo), last(i) - first(i) + 1);
      }
      // Pass 2: the probability-weighted sum of the values. Sixteen value rows at a time are
      // widened to fp32 once (fp32 caches are read in place) for every row of the tile.
      std::fill(acc.begin(), acc.begin() + rows * D, 0.f);
      for (int64_t b = lo / block_size; b <= hi / block_size; ++b) {
        const int64_t j0 = std::max(lo, b * block_size), j1 = std::min(hi + 1, (b + 1) * block_size);
        const T* vb = v.block_rows(v.values, table, b, g, j0);
        for (int64_t c = j0; c < j1; c += 16) {
          const int64_t m = std::min<int64_t>(16, j1 - c);
          const float* vf;
          if constexpr (std::is_same_v<T, float>) {
            vf = vb + (c - j0) * D;
          } else {
            for (int64_t k = 0; k < m * C; ++k) _mm512_storeu_ps(wide.data() + 16 * k, load16(vb + (c - j0) * D + 16 * k));
            vf = wide.data();
          }
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = r / group;
            const int64_t from = std::max<int64_t>(c, first(i)), to = std::min<int64_t>(c + m, last(i) + 1);
            if (from >= to) continue;
            __m512 a[C];
            for (int k = 0; k < C; ++k) a[k] = _mm512_loadu_ps(acc.data() + r * D + 16 * k);
            const float* p = scores.data() + r * n;  // p[j - lo]: key j's weight
            for (int64_t j = from; j < to; ++j) {
              const __m512 pj = _mm512_set1_ps(p[j - lo]);
              for (int k = 0; k < C; ++k) a[k] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vf + (j - c) * D + 16 * k), a[k]);
            }
            for (int k = 0; k < C; ++k) _mm512_storeu_ps(acc.data() + r * D + 16 * k, a[k]);
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = r / group, h = r % group;
        store_normalised(acc.data() + r * D, denom[r], v.out + ((t0 + i) * num_heads + g * group + h) * D, D);
      }
    }
  });
}
#endif

// Each query token attends to keys [start, pos] of its own sequence, read from the head-major
// paged cache [2, blocks, kv_heads, block_size, D] through the block table; no gather, no mask.
// One work item is a (token, kv head) pair: the group's query heads share every key and value
// load. Scores, softmax and the weighted sum stay in fp32; the output is rounded once.
template <typename T>
void paged_attention(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                     const at::Tensor& seq_index, const at::Tensor& positions, float scale, int64_t window,
                     at::Tensor& out) {
#if defined(__AVX512F__)
  switch (q.size(2)) {  // the common head sizes take the hand-vectorised kernel
    case 32: return paged_attention_vec<T, 2>(q, kv_cache, block_tables, seq_index, positions, scale, window, out);
    case 64: return paged_attention_vec<T, 4>(q, kv_cache, block_tables, seq_index, positions, scale, window, out);
    case 128: return paged_attention_vec<T, 8>(q, kv_cache, block_tables, seq_index, positions, scale, window, out);
    default: break;
  }
#endif
  const PagedAttentionView<T> v(q, kv_cache, block_tables, seq_index, positions, out);
  const int64_t num_heads = v.num_heads, head_dim = v.head_dim, num_kv_heads = v.num_kv_heads;
  const int64_t block_size = v.block_size, group = v.group;
  at::parallel_for(0, v.tokens * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * head_dim), acc(group * head_dim), row(block_size * head_dim), scores, denom(group);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / num_kv_heads, g = item % num_kv_heads;
      const int64_t last = v.pos[t];
      const int64_t first = window > 0 ? std::max<int64_t>(0, last - window + 1) : 0;
      const int64_t n = last - first + 1;
      const int64_t* table = v.tables + v.seq[t] * v.table_stride;
      to_float(v.q + (t * num_heads + g * group) * head_dim, qf.data(), group * head_dim);
      scores.resize(group * n);
      // Calls fn(j - first, row) for every visible key or value row of this sequence and kv head,
      // converting one block at a time to fp32 (a block's rows are contiguous for a kv head).
      auto for_each_row = [&](const T* cache_half, auto&& fn) {
        for (int64_t b = first / block_size; b <= last / block_size; ++b) {
          const int64_t j0 = std::max(first, b * block_size), j1 = std::min(last + 1, (b + 1) * block_size);
          to_float(v.block_rows(cache_half, table, b, g, j0), row.data(), (j1 - j0) * head_dim);
          for (int64_t j = j0; j < j1; ++j) fn(j - first, row.data() + (j - j0) * head_dim);
        }
      };
      // Pass 1: scores.
      for_each_row(v.keys, [&](int64_t j, const float* kr) {
        for (int64_t h = 0; h < group; ++h) scores[h * n + j] = dot(qf.data() + h * head_dim, kr, head_dim) * scale;
      });
      for (int64_t h = 0; h < group; ++h) denom[h] = exp_shifted(scores.data() + h * n, n);
      // Pass 2: the probability-weighted sum of the values.
      std::fill(acc.begin(), acc.end(), 0.f);
      for_each_row(v.values, [&](int64_t j, const float* vr) {
        for (int64_t h = 0; h < group; ++h) {
          const float p = scores[h * n + j];
          float* a = acc.data() + h * head_dim;
#pragma omp simd
          for (int64_t i = 0; i < head_dim; ++i) a[i] += p * vr[i];
        }
      });
      for (int64_t h = 0; h < group; ++h)
        store_normalised(acc.data() + h * head_dim, denom[h], v.out + (t * num_heads + g * group + h) * head_dim,
                         head_dim);
    }
  });
}

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

// ----------------------------------------------------------------------------- linear
// The same two ops the Python model calls: oneDNN's packed linear or at::linear; for decode
// steps, the GEMV above where the weight has a row-blocked copy.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, bool packed,
                  const at::Tensor& blocked = at::Tensor()) {
  if (blocked.defined() && x.size(0) <= kDecodeRows) {
    RECORD_FUNCTION("kvflow::decode_linear", std::vector<c10::IValue>());
    return decode_linear(x.contiguous(), blocked, bias);
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

// A kernel call of the forward, named in torch.profiler traces (`kvflow bench profile`).
#define KVFLOW_RUN(dtype, NAME, ...)                                    \
  do {                                                                  \
    RECORD_FUNCTION("kvflow::" NAME, std::vector<c10::IValue>());       \
    KVFLOW_DISPATCH(dtype, NAME, __VA_ARGS__)                           \
  } while (0)

}  // namespace

// ----------------------------------------------------------------------------- the model
struct LayerWeights {
  at::Tensor input_norm, qkv, qkv_bias, q_norm, k_norm, o, o_bias, post_norm, gate_up, gate_up_bias, down, down_bias;
  at::Tensor qkv_blocked, o_blocked, gate_up_blocked, down_blocked;  // decode GEMV copies (undefined: none)
  int64_t window;  // sliding window in tokens; 0 = full attention
};

class CpuModel {
 public:
  CpuModel(at::Tensor embed, std::vector<std::vector<at::Tensor>> layers, std::vector<int64_t> windows,
           at::Tensor final_norm, at::Tensor cos, at::Tensor sin, std::vector<at::Tensor> kv_caches,
           int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, bool packed)
      : embed_(std::move(embed)), final_norm_(std::move(final_norm)), cos_(std::move(cos)), sin_(std::move(sin)),
        kv_caches_(std::move(kv_caches)), num_heads_(num_heads), num_kv_heads_(num_kv_heads),
        head_dim_(head_dim), eps_(static_cast<float>(eps)), packed_(packed),
        scale_(1.f / std::sqrt(static_cast<float>(head_dim))) {
    TORCH_CHECK(layers.size() == windows.size() && layers.size() == kv_caches_.size(), "CpuModel: layer count mismatch");
    TORCH_CHECK(cos_.scalar_type() == at::kFloat && sin_.scalar_type() == at::kFloat, "CpuModel: rotary tables must be fp32");
    for (size_t i = 0; i < layers.size(); ++i) {
      const auto& w = layers[i];
      TORCH_CHECK(w.size() == 16, "CpuModel: a layer has 16 weight slots");
      auto o = [&](int k) { return optional_weight(w[k]); };
      layers_.push_back({w[0], w[1], o(2), o(3), o(4), w[5], o(6), w[7], w[8], o(9), w[10], o(11),
                         o(12), o(13), o(14), o(15), windows[i]});
      TORCH_CHECK(kHasDecodeGemv || !layers_.back().qkv_blocked.defined(), "CpuModel: no decode GEMV in this build");
    }
  }

  // input_ids, positions, seq_index, slot_mapping: [T] int64; block_tables: [B, max_blocks] int64.
  // Returns the final-norm hidden states [T, hidden].
  // `layer_done(l)`, when given, runs after layer l has written its KV (disaggregated prefill
  // streams each layer's KV while later layers compute); it takes the GIL for the call.
  at::Tensor forward(const at::Tensor& input_ids, const at::Tensor& positions, const at::Tensor& seq_index,
                     const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                     const std::function<void(int64_t)>& layer_done) {
    const int64_t tokens = input_ids.size(0);
    for (const auto* t : {&input_ids, &positions, &seq_index, &slot_mapping, &block_tables}) {
      TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "CpuModel: index tensors must be contiguous int64");
    }
    at::Tensor residual = at::embedding(embed_, input_ids);  // a fresh tensor: updated in place below
    at::Tensor normed = at::empty_like(residual);
    at::Tensor delta;  // what the previous sublayer adds to the residual stream
    const auto dtype = residual.scalar_type();
    at::Tensor q = at::empty({tokens, num_heads_, head_dim_}, residual.options());
    at::Tensor attn = at::empty_like(q);
    for (size_t l = 0; l < layers_.size(); ++l) {
      const LayerWeights& w = layers_[l];
      at::Tensor& cache = kv_caches_[l];
      KVFLOW_RUN(dtype, "add_rms_norm", [&] { add_rms_norm<scalar_t>(residual, delta, w.input_norm, normed, eps_); });
      at::Tensor qkv = linear(normed, w.qkv, w.qkv_bias, packed_, w.qkv_blocked);
      KVFLOW_RUN(dtype, "rope_and_store", [&] {
        rope_and_store<scalar_t>(qkv, positions, slot_mapping, cos_, sin_, w.q_norm, w.k_norm, eps_, cache, q,
                                 num_heads_, num_kv_heads_, head_dim_);
      });
      KVFLOW_RUN(dtype, "paged_attention", [&] {
        paged_attention<scalar_t>(q, cache, block_tables, seq_index, positions, scale_, w.window, attn);
      });
      delta = linear(attn.view({tokens, num_heads_ * head_dim_}), w.o, w.o_bias, packed_, w.o_blocked);
      KVFLOW_RUN(dtype, "add_rms_norm", [&] { add_rms_norm<scalar_t>(residual, delta, w.post_norm, normed, eps_); });
      at::Tensor gate_up = linear(normed, w.gate_up, w.gate_up_bias, packed_, w.gate_up_blocked);
      at::Tensor act = at::empty({tokens, gate_up.size(1) / 2}, residual.options());
      KVFLOW_RUN(dtype, "silu_and_mul", [&] { silu_and_mul<scalar_t>(gate_up, act); });
      delta = linear(act, w.down, w.down_bias, packed_, w.down_blocked);
      if (layer_done) layer_done(static_cast<int64_t>(l));
    }
    KVFLOW_RUN(dtype, "add_rms_norm", [&] { add_rms_norm<scalar_t>(residual, delta, final_norm_, normed, eps_); });
    return normed;
  }

 private:
  at::Tensor embed_, final_norm_, cos_, sin_;
  std::vector<at::Tensor> kv_caches_;
  std::vector<LayerWeights> layers_;
  int64_t num_heads_, num_kv_heads_, head_dim_;
  float eps_;
  bool packed_;
  float scale_;
};

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
                             int64_t num_kv_heads, int64_t head_dim) {
  at::Tensor q = at::empty({qkv.size(0), num_heads, head_dim}, qkv.options());
  KVFLOW_DISPATCH(qkv.scalar_type(), "rope_and_store", [&] {
    rope_and_store<scalar_t>(qkv, positions, slots, cos, sin, optional_weight(q_norm), optional_weight(k_norm),
                             static_cast<float>(eps), kv_cache, q, num_heads, num_kv_heads, head_dim);
  });
  return q;
}

at::Tensor paged_attention_op(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                              const at::Tensor& seq_index, const at::Tensor& positions, double scale, int64_t window) {
  at::Tensor out = at::empty_like(q);
  KVFLOW_DISPATCH(q.scalar_type(), "paged_attention", [&] {
    paged_attention<scalar_t>(q, kv_cache, block_tables, seq_index, positions, static_cast<float>(scale), window, out);
  });
  return out;
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
                          at::Tensor, at::Tensor, std::vector<at::Tensor>, int64_t, int64_t, int64_t, double, bool>())
      .def("forward", &CpuModel::forward, pybind11::arg("input_ids"), pybind11::arg("positions"),
           pybind11::arg("seq_index"), pybind11::arg("slot_mapping"), pybind11::arg("block_tables"),
           pybind11::arg("layer_done") = pybind11::none(), pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("rms_norm", &rms_norm_op);
  m.def("rope_and_store", &rope_and_store_op);
  m.def("paged_attention", &paged_attention_op);
  m.def("silu_and_mul", &silu_and_mul_op);
  m.def("decode_linear", &decode_linear_op);
  m.attr("has_decode_gemv") = kHasDecodeGemv;
  m.attr("decode_rows") = kDecodeRows;
}

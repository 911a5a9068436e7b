// kvflow's CPU kernels for bipolar-INT weights (kvflow/model/quant/bipolar.py): n-bit codes (n = 2..8)
// held as n bit planes, where bit b_i of a weight means ±1 (2b_i − 1) times 2^i, and per group of G
// weights along K a scale s and an offset o: w = s · Σ_i (2b_i − 1)·2^i + o.
//
// The decode GEMV has two AVX-512 forms (groups of whole 16-lane vectors):
//   planes:  the bit-plane decomposition itself, no weight ever multiplied. A plane's ±1 product with x
//            is 2·P_i − X, where P_i sums the activations whose bit is set and X sums the group's. A
//            plane's 16 bits are a mask register as they lie in memory, so P_i is one masked add per 16
//            weights (`vaddps` under the plane's mask), and
//              y = Σ_g s_g · Σ_i 2^i · Σ_{k∈g, b_ik=1} 2x_k  +  Σ_g (o_g − (2^n − 1)·s_g) · X_g.
//            n masked adds per 16 weights and activation row.
//   decoded: the planes recombined once per 16 weights into codes (n masked adds of powers of two),
//            scaled into weights (one multiply-add) and multiplied with each row: n + 1 + rows operations
//            per 16 weights, where the decomposition's are n · rows.
// "auto" takes decoded, which measured faster at every n even for one row (`135m` qkv, one thread: 2 bits
// 72 vs 82 µs, 4 bits 112 vs 132, 8 bits 188 vs 222): a masked add and a mask move cost an operation each
// per plane, either way, and the decomposition pays them per row. Against int8's exact GEMV (a widening, a
// conversion and a multiply-add per 16 weights) the planes win on bytes always (n/8 + 32/G bytes per weight
// against 1) but not on work (`kvflow bench quant-gemv --formats int8 bipolar2 ... --kernels planes
// decoded`). Both equal bipolar.bitplane_linear up to fp32 rounding.
//
// More rows (prefill) dequantise tiles of W into x's dtype for at::mm, like the GGUF formats
// (kvflow_quant::tiled_mm). Where the AVX-512 GEMV cannot run (no AVX-512, as an x86-64-v3 build, or G not
// a multiple of 16) every row count takes those tiles: their plain decode measured 2-10x faster than the
// scalar GEMV (and at least as fast as the PyTorch reference), which stays for tests (kernel "scalar").
#pragma once

#include "cpu_quant.h"

namespace kvflow_bipolar {

using kvflow_quant::kGemvRows;
using kvflow_quant::Output;

struct Weights {
  const uint8_t* planes;  // [N, bits, K/8]: bit j of byte c of plane i is b_i of weight 8c + j
  const float* params;    // [N, 2, K/G]: each row's group scales, then its group offsets
  int64_t N, K, bits, group;
  const uint8_t* plane(int64_t n, int64_t i) const { return planes + (n * bits + i) * (K / 8); }
  const float* scales(int64_t n) const { return params + n * 2 * (K / group); }
  const float* offsets(int64_t n) const { return scales(n) + K / group; }
  float top() const { return static_cast<float>((1 << bits) - 1); }
};

// A GEMV pass's activation rows: x itself, x·2^(i+1) for the first `scaled_planes` planes (only the kernels
// that read them: the decomposition reads 2x, the scalar loops every plane's), and Σx per group (fp32).
struct Rows {
  int64_t rows = 0, K = 0, groups = 0, scaled_planes = 0;
  std::vector<uint16_t> xb;   // [rows, K] x's bf16 bits where x came in as bf16, else empty
  std::vector<float> raw;     // [rows, K]
  std::vector<float> scaled;  // [rows, scaled_planes, K]
  std::vector<float> sums;    // [rows, groups]
  const float* x(int64_t m) const { return raw.data() + m * K; }
  const float* plane_x(int64_t m, int64_t i) const { return scaled.data() + (m * scaled_planes + i) * K; }
};

inline void load_rows(const at::Tensor& x, int64_t row0, int64_t rows, const Weights& w, int64_t scaled_planes,
                      Rows& a) {
  a.rows = rows, a.K = w.K, a.groups = w.K / w.group, a.scaled_planes = scaled_planes;
  a.scaled.resize(rows * scaled_planes * w.K);
  a.raw.resize(rows * w.K);
  a.sums.assign(rows * a.groups, 0.f);
  if (x.scalar_type() == at::kBFloat16) {
    a.xb.resize(rows * w.K);
    std::memcpy(a.xb.data(), reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) + row0 * w.K,
                rows * w.K * sizeof(uint16_t));
  } else {
    a.xb.clear();
  }
  for (int64_t m = 0; m < rows; ++m) {
    float* row = a.raw.data() + m * w.K;
    if (x.scalar_type() == at::kFloat) {
      std::memcpy(row, x.data_ptr<float>() + (row0 + m) * w.K, w.K * sizeof(float));
    } else {
      const uint16_t* src = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) + (row0 + m) * w.K;
      for (int64_t k = 0; k < w.K; ++k) row[k] = kvflow_quant::bf16_value(src[k]);
    }
    for (int64_t i = 0; i < scaled_planes; ++i) {
      const float p = static_cast<float>(2 << i);
      float* dst = a.scaled.data() + (m * scaled_planes + i) * w.K;
      for (int64_t k = 0; k < w.K; ++k) dst[k] = row[k] * p;
    }
    for (int64_t k = 0; k < w.K; ++k) a.sums[m * a.groups + k / w.group] += row[k];
  }
}

// Σ_g (o_g − top·s_g) · X_g of row m: the part of y that does not depend on the bits where the sums
// over the bits count codes u (2u = v + top); with `values` (sums over v itself) Σ_g o_g · X_g.
inline float offset_term(const Weights& w, const Rows& a, int64_t n, int64_t m, bool values = false) {
  const float* s = w.scales(n);
  const float* o = w.offsets(n);
  const float* x = a.sums.data() + m * a.groups;
  const float top = values ? 0.f : w.top();
  float t = 0.f;
  for (int64_t g = 0; g < a.groups; ++g) t += (o[g] - top * s[g]) * x[g];
  return t;
}

// The same sums, one weight at a time (CPUs without AVX-512, groups not a multiple of 16; tests).
inline void gemv_scalar(const Weights& w, const Rows& a, const Output& out, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* s = w.scales(n);
    for (int64_t m = 0; m < a.rows; ++m) {
      float y = 0.f;
      for (int64_t g = 0; g < a.groups; ++g) {
        float acc = 0.f;
        for (int64_t i = 0; i < w.bits; ++i) {
          const uint8_t* p = w.plane(n, i);
          const float* x = a.plane_x(m, i);
          for (int64_t k = g * w.group; k < (g + 1) * w.group; ++k)
            if ((p[k >> 3] >> (k & 7)) & 1) acc += x[k];
        }
        y += s[g] * acc;
      }
      out.put(m, n, y + offset_term(w, a, n, m));
    }
  }
}

// Whether the decoded GEMV takes its bf16 form (gemv_bf16_avx512) for these weights and rows.
inline bool bf16_runs(const Weights& w, const Rows& a) {
#if KVFLOW_QUANT_AVX512 && defined(__AVX512BF16__)
  return !a.xb.empty() && w.bits <= 5 && w.group % 32 == 0;
#else
  (void)w, (void)a;
  return false;
#endif
}

// The bits of weights k, k+1, ... of a plane as one Word (k a multiple of its width: whole bytes).
template <typename Word>
inline Word plane_word(const uint8_t* plane, int64_t k) {
  Word bits;
  std::memcpy(&bits, plane + (static_cast<uint64_t>(k) >> 3), sizeof(Word));
  return bits;
}

#if KVFLOW_QUANT_AVX512
inline __mmask16 plane_bits(const uint8_t* plane, int64_t k) { return _cvtu32_mask16(plane_word<uint16_t>(plane, k)); }

// The decomposition (kernel "planes"): each row's 16 activations are loaded once and added under each
// plane's mask into that plane's accumulator (two sets, alternating by chunk, so that the adds form
// independent chains); at a group's end the planes are recombined with their powers of two and scaled.
// The activations read are a.plane_x(m, 0) = 2x, so plane i weighs 2^i.
template <int M, int B>
void gemv_planes_avx512(const Weights& w, const Rows& a, const Output& out, int64_t n0, int64_t n1) {
  constexpr int S = B <= 4 ? 2 : 1;  // accumulator sets
  const int64_t G = w.group, groups = w.K / G;
  for (int64_t n = n0; n < n1; ++n) {
    const float* s = w.scales(n);
    const uint8_t* planes[B];
    for (int i = 0; i < B; ++i) planes[i] = w.plane(n, i);
    __m512 total[M];
    for (int m = 0; m < M; ++m) total[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m512 acc[M][S][B];
      for (int m = 0; m < M; ++m)
        for (int t = 0; t < S; ++t)
          for (int i = 0; i < B; ++i) acc[m][t][i] = _mm512_setzero_ps();
      // Chunks of 16 into set t (a constant: accumulators indexed at run time would live on the stack).
      const auto chunk = [&](int64_t k, auto set) {
        constexpr int t = decltype(set)::value;
        __mmask16 bits[B];
        for (int i = 0; i < B; ++i) bits[i] = plane_bits(planes[i], k);
        for (int m = 0; m < M; ++m) {
          const __m512 x = _mm512_loadu_ps(a.plane_x(m, 0) + k);
          for (int i = 0; i < B; ++i) acc[m][t][i] = _mm512_mask_add_ps(acc[m][t][i], bits[i], acc[m][t][i], x);
        }
      };
      int64_t k = g * G;
      for (; k + 16 * S <= (g + 1) * G; k += 16 * S) {
        chunk(k, std::integral_constant<int, 0>{});
        if constexpr (S > 1) chunk(k + 16, std::integral_constant<int, S - 1>{});
      }
      if (k < (g + 1) * G) chunk(k, std::integral_constant<int, 0>{});
      const __m512 scale = _mm512_set1_ps(s[g]);
      for (int m = 0; m < M; ++m) {
        __m512 sum = _mm512_setzero_ps();
        for (int i = B - 1; i >= 0; --i) {  // Σ_i 2^i · acc_i, Horner's way: exact doublings
          __m512 plane = acc[m][0][i];
          for (int t = 1; t < S; ++t) plane = _mm512_add_ps(plane, acc[m][t][i]);
          sum = _mm512_add_ps(_mm512_add_ps(sum, sum), plane);
        }
        total[m] = _mm512_fmadd_ps(sum, scale, total[m]);
      }
    }
    for (int m = 0; m < M; ++m) out.put(m, n, _mm512_reduce_add_ps(total[m]) + offset_term(w, a, n, m));
  }
}

// Three rows or more: the planes are recombined once per 16 weights into their codes (B masked adds of
// the powers of two), scaled into the weights (w = s·2u + o − top·s, one rounding), and each row takes one
// multiply-add: B + 1 + M operations per 16 weights where the decomposition's would be B·M.
template <int M, int B>
void gemv_decoded_avx512(const Weights& w, const Rows& a, const Output& out, int64_t n0, int64_t n1) {
  const int64_t G = w.group, groups = w.K / G;
  __m512 powers[B];
  for (int i = 0; i < B; ++i) powers[i] = _mm512_set1_ps(static_cast<float>(2 << i));
  for (int64_t n = n0; n < n1; ++n) {
    const float* s = w.scales(n);
    const float* o = w.offsets(n);
    const uint8_t* planes[B];
    for (int i = 0; i < B; ++i) planes[i] = w.plane(n, i);
    __m512 acc[M][2];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const __m512 scale = _mm512_set1_ps(s[g]), base = _mm512_set1_ps(o[g] - w.top() * s[g]);
      const auto chunk = [&](int64_t k, auto set) {  // as in gemv_planes_avx512: `set` a constant
        constexpr int t = decltype(set)::value;
        __m512 u = _mm512_setzero_ps();
        for (int i = 0; i < B; ++i) u = _mm512_mask_add_ps(u, plane_bits(planes[i], k), u, powers[i]);
        const __m512 weight = _mm512_fmadd_ps(u, scale, base);
        for (int m = 0; m < M; ++m) acc[m][t] = _mm512_fmadd_ps(weight, _mm512_loadu_ps(a.x(m) + k), acc[m][t]);
      };
      int64_t k = g * G;
      for (; k + 32 <= (g + 1) * G; k += 32) {
        chunk(k, std::integral_constant<int, 0>{});
        chunk(k + 16, std::integral_constant<int, 1>{});
      }
      if (k < (g + 1) * G) chunk(k, std::integral_constant<int, 0>{});
    }
    for (int m = 0; m < M; ++m) out.put(m, n, _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])));
  }
}

#if defined(__AVX512BF16__)
// bf16 activations (a bf16 model's layers), n ≤ 5, groups of whole 32s: 32 weights at a time, their codes u
// built as 16-bit integers by n masked adds (a 32-bit mask per plane), looked up as bf16(2u − top) (exact:
// |v| ≤ 31) with one `vpermw`, then `vdpbf16ps` against the activations: 32 exact products summed in fp32
// per instruction, where the fp32 path pays a multiply-add per 16. The same products; only the fp32
// summation order differs.
constexpr int kBf16MaxBits = 5;

inline __mmask32 plane_bits32(const uint8_t* plane, int64_t k) { return _cvtu32_mask32(plane_word<uint32_t>(plane, k)); }

template <int M, int B>
void gemv_bf16_avx512(const Weights& w, const Rows& a, const Output& out, int64_t n0, int64_t n1) {
  static_assert(B <= kBf16MaxBits, "vpermw looks up 32 codes");
  alignas(64) uint16_t table[32];
  for (int u = 0; u < 32; ++u) table[u] = kvflow_quant::bf16_round(static_cast<float>(2 * u - ((1 << B) - 1)));
  const __m512i values = _mm512_load_si512(table);
  __m512i powers[B];
  for (int i = 0; i < B; ++i) powers[i] = _mm512_set1_epi16(static_cast<short>(1 << i));
  const int64_t G = w.group, groups = w.K / G;
  for (int64_t n = n0; n < n1; ++n) {
    const float* s = w.scales(n);
    const uint8_t* planes[B];
    for (int i = 0; i < B; ++i) planes[i] = w.plane(n, i);
    // Two totals (even and odd groups) and, within a group, two partial sums (even and odd 32s): four
    // short dependency chains where one long one left the adders waiting (1.4x at one row, measured).
    __m512 total[M][2];
    for (int m = 0; m < M; ++m) total[m][0] = total[m][1] = _mm512_setzero_ps();
    const auto group = [&](int64_t g, auto set) {
      constexpr int t = decltype(set)::value;
      __m512 acc[M][2];
      for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
      const auto chunk = [&](int64_t k, auto half) {
        constexpr int h = decltype(half)::value;
        __m512i u = _mm512_setzero_si512();
        for (int i = 0; i < B; ++i) u = _mm512_mask_add_epi16(u, plane_bits32(planes[i], k), u, powers[i]);
        const __m512bh v = (__m512bh)_mm512_permutexvar_epi16(u, values);
        for (int m = 0; m < M; ++m)
          acc[m][h] = _mm512_dpbf16_ps(acc[m][h], v, (__m512bh)_mm512_loadu_si512(a.xb.data() + m * a.K + k));
      };
      int64_t k = g * G;
      for (; k + 64 <= (g + 1) * G; k += 64) {
        chunk(k, std::integral_constant<int, 0>{});
        chunk(k + 32, std::integral_constant<int, 1>{});
      }
      if (k < (g + 1) * G) chunk(k, std::integral_constant<int, 0>{});
      const __m512 scale = _mm512_set1_ps(s[g]);
      for (int m = 0; m < M; ++m) total[m][t] = _mm512_fmadd_ps(_mm512_add_ps(acc[m][0], acc[m][1]), scale, total[m][t]);
    };
    int64_t g = 0;
    for (; g + 2 <= groups; g += 2) {
      group(g, std::integral_constant<int, 0>{});
      group(g + 1, std::integral_constant<int, 1>{});
    }
    if (g < groups) group(g, std::integral_constant<int, 0>{});
    for (int m = 0; m < M; ++m)
      out.put(m, n, _mm512_reduce_add_ps(_mm512_add_ps(total[m][0], total[m][1])) + offset_term(w, a, n, m, true));
  }
}
#endif

template <int M>
void gemv_avx512_rows(const Weights& w, const Rows& a, const Output& out, int64_t n0, int64_t n1, bool planes_way) {
#if defined(__AVX512BF16__)
  if (!planes_way && bf16_runs(w, a)) {
    switch (w.bits) {
      case 2: return gemv_bf16_avx512<M, 2>(w, a, out, n0, n1);
      case 3: return gemv_bf16_avx512<M, 3>(w, a, out, n0, n1);
      case 4: return gemv_bf16_avx512<M, 4>(w, a, out, n0, n1);
      case 5: return gemv_bf16_avx512<M, 5>(w, a, out, n0, n1);
    }
  }
#endif
  const auto run = [&](auto planes) {
    constexpr int B = decltype(planes)::value;
    if (planes_way) gemv_planes_avx512<M, B>(w, a, out, n0, n1);
    else gemv_decoded_avx512<M, B>(w, a, out, n0, n1);
  };
  switch (w.bits) {
    case 2: return run(std::integral_constant<int, 2>{});
    case 3: return run(std::integral_constant<int, 3>{});
    case 4: return run(std::integral_constant<int, 4>{});
    case 5: return run(std::integral_constant<int, 5>{});
    case 6: return run(std::integral_constant<int, 6>{});
    case 7: return run(std::integral_constant<int, 7>{});
    case 8: return run(std::integral_constant<int, 8>{});
    default: TORCH_CHECK(false, "bipolar_linear: bits must be in [2, 8], not ", w.bits);
  }
}
#endif

inline bool avx512_runs(const Weights& w) { return KVFLOW_QUANT_AVX512 && w.group % 16 == 0; }

// The GEMV's kernels: "planes" (the AVX-512 decomposition), "decoded" (AVX-512, the planes decoded into
// weights), "scalar"; "auto": decoded on AVX-512 with groups of whole vectors (see the top), else scalar.
enum class Kernel { kPlanes, kDecoded, kScalar };

inline Kernel pick_kernel(const Weights& w, const std::string& name) {
  if (name == "scalar") return Kernel::kScalar;
  if (name == "planes" || name == "decoded") {
    TORCH_CHECK(avx512_runs(w), "bipolar_linear: the ", name, " kernel needs an AVX-512 build and a group size that "
                "is a multiple of 16, not ", w.group);
    return name == "planes" ? Kernel::kPlanes : Kernel::kDecoded;
  }
  TORCH_CHECK(name == "auto", "bipolar_linear: kernel is auto, planes, decoded or scalar, not ", name);
  return avx512_runs(w) ? Kernel::kDecoded : Kernel::kScalar;
}

inline void gemv(const Weights& w, const at::Tensor& x, int64_t row0, int64_t rows, const std::string& kernel_name,
                 const Output& out) {
  const Kernel kernel = pick_kernel(w, kernel_name);
  Rows a;
  load_rows(x, row0, rows, w, kernel == Kernel::kScalar ? w.bits : kernel == Kernel::kPlanes ? 1 : 0, a);
  const Output o{out.f, out.h, out.N, row0};
  at::parallel_for(0, w.N, 16, [&](int64_t n0, int64_t n1) {
#if KVFLOW_QUANT_AVX512
    if (kernel != Kernel::kScalar) {
      kvflow_quant::for_rows(rows, [&](auto r) {
        gemv_avx512_rows<decltype(r)::value>(w, a, o, n0, n1, kernel == Kernel::kPlanes);
      });
      return;
    }
#endif
    gemv_scalar(w, a, o, n0, n1);
  });
}

// Rows [n0, n1) of W: s · (2u − top) + o, in fp32 (as dequantize_bipolar: the product, then the sum; the
// odd value 2u − top is exact in fp32, so every path gives the same bits).
inline void dequantize_rows(const Weights& w, int64_t n0, int64_t n1, int64_t stride, float* f32, uint16_t* b16) {
  std::vector<float> row(w.K);
  const int top = (1 << w.bits) - 1;
  for (int64_t n = n0; n < n1; ++n) {
    const float* s = w.scales(n);
    const float* o = w.offsets(n);
    float* dst = f32 ? f32 + (n - n0) * stride : row.data();
    int64_t k = 0;
#if KVFLOW_QUANT_AVX512
    if (w.group % 16 == 0) {  // the codes by masked adds of the powers of two, as the decoded GEMV
      const __m512 minus_top = _mm512_set1_ps(static_cast<float>(-top));
      for (; k < w.K; k += 16) {
        __m512 u = _mm512_setzero_ps();
        for (int64_t i = 0; i < w.bits; ++i)
          u = _mm512_mask_add_ps(u, plane_bits(w.plane(n, i), k), u, _mm512_set1_ps(static_cast<float>(2 << i)));
        const __m512 v = _mm512_add_ps(u, minus_top);  // 2u − top: exact
        _mm512_storeu_ps(dst + k, _mm512_add_ps(_mm512_mul_ps(v, _mm512_set1_ps(s[k / w.group])),
                                                _mm512_set1_ps(o[k / w.group])));
      }
    }
#endif
    for (; k < w.K; ++k) {
      int u = 0;
      for (int64_t i = 0; i < w.bits; ++i) u |= ((w.plane(n, i)[k >> 3] >> (k & 7)) & 1) << i;
      const float v = static_cast<float>(2 * u - top);
      dst[k] = v * s[k / w.group] + o[k / w.group];
    }
    if (b16)
      for (int64_t k = 0; k < w.K; ++k) b16[(n - n0) * stride + k] = kvflow_quant::bf16_round(row[k]);
  }
}

inline Weights weights_of(const at::Tensor& planes, const at::Tensor& params, int64_t N, int64_t K, int64_t bits,
                          int64_t group) {
  TORCH_CHECK(bits >= 2 && bits <= 8, "bipolar: bits must be in [2, 8], not ", bits);
  TORCH_CHECK(group >= 8 && group % 8 == 0 && K % group == 0, "bipolar: the group size (", group,
              ") must be a multiple of 8 that divides K (", K, ")");
  TORCH_CHECK(planes.is_contiguous() && planes.scalar_type() == at::kByte && planes.numel() == N * bits * (K / 8),
              "bipolar: planes must be contiguous uint8 [", N, ", ", bits, ", ", K / 8, "]");
  TORCH_CHECK(params.is_contiguous() && params.scalar_type() == at::kFloat && params.numel() == N * 2 * (K / group),
              "bipolar: params must be contiguous fp32 [", N, ", 2, ", K / group, "] (scales, then offsets)");
  return Weights{planes.data_ptr<uint8_t>(), params.data_ptr<float>(), N, K, bits, group};
}

// y = x · Wᵀ for x [M, K] fp32 or bf16, in x's dtype. `path`: "auto" (GEMV up to kGemvRows rows, else the
// dequantised-tile GEMM), "gemv" or "mm"; `kernel`: the GEMV's (pick_kernel).
inline at::Tensor bipolar_linear(const at::Tensor& x_in, const at::Tensor& planes, const at::Tensor& params, int64_t N,
                                 int64_t K, int64_t bits, int64_t group, const std::string& path,
                                 const std::string& kernel, int64_t tile_rows) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == K, "bipolar_linear: x must be [M, ", K, "]");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "bipolar_linear: x must be float32 or bfloat16, not ", x_in.scalar_type());
  const Weights w = weights_of(planes, params, N, K, bits, group);
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0);
  // A kernel this build or group cannot run is refused whatever the path; "auto" without a vector GEMV
  // takes the tiles (see the top).
  const bool vector_gemv = pick_kernel(w, kernel) != Kernel::kScalar || kernel == "scalar";
  TORCH_CHECK(path == "auto" || path == "gemv" || path == "mm", "bipolar_linear: unknown path ", path);
  if (path == "mm" || (path == "auto" && (M > kGemvRows || !vector_gemv))) {
    return kvflow_quant::tiled_mm(x, N, K, tile_rows, [&](int64_t n0, int64_t n1, float* f32, uint16_t* b16) {
      dequantize_rows(w, n0, n1, K, f32, b16);
    });
  }
  at::Tensor y = at::empty({M, N}, x.options());
  Output out;
  out.N = N;
  if (y.scalar_type() == at::kFloat) out.f = y.data_ptr<float>(); else out.h = y.data_ptr<at::BFloat16>();
  for (int64_t row0 = 0; row0 < M; row0 += kGemvRows) gemv(w, x, row0, std::min(kGemvRows, M - row0), kernel, out);
  return y;
}

// W in fp32 [N, K] (tests).
inline at::Tensor dequantize(const at::Tensor& planes, const at::Tensor& params, int64_t N, int64_t K, int64_t bits,
                             int64_t group) {
  const Weights w = weights_of(planes, params, N, K, bits, group);
  at::Tensor out = at::empty({N, K}, at::kFloat);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    dequantize_rows(w, n0, n1, K, out.data_ptr<float>() + n0 * K, nullptr);
  });
  return out;
}

}  // namespace kvflow_bipolar

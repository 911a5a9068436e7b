// kvflow's CPU kernels for quantised linear weights: y = x · Wᵀ with W held in GGUF's q8_0, q4_0
// or q4_k blocks (llama.cpp's bytes unchanged, one row of blocks per output feature) or as int8
// with one fp32 scale per output feature. x is fp32 or bf16 [M, K]; y has x's dtype.
//
// Decode (a few rows, `kGemvRows` at most per pass) is a GEMV that streams each weight row's blocks
// once and is bound by memory bandwidth; it has two arithmetics:
//   exact: the activations stay fp32; each block is dequantised into registers and multiplied
//          with fp32 fused multiply-adds. Only fp32 rounding separates it from the product of
//          the dequantised weights (the precise mode).
//   q8:    llama.cpp's own approach: each activation row is quantised to int8 per block of 32
//          (one fp32 scale per block, round to nearest even), and the weights' integer codes are
//          multiplied with VNNI int8 dot products (`vpdpbusd`), int32 per block, then scaled. The
//          result is the dequantised weights times the *quantised* activations, so it is not bit-
//          equal to dequantise-then-fp32: each activation moves by at most half its block's step.
//          For int8 weights this is W8A8: one dynamic symmetric scale per token, int32 over all K.
// `vpdpbusd` multiplies unsigned by signed bytes in groups of four. The q4 codes are unsigned
// nibbles already; q8_0/int8 codes get +128 (xor 0x80). The offsets (q4_0's 8, the +128) come back
// out through the accumulator's start value: each int32 lane starts at −offset · Σ of its four
// activation codes, so the lane ends at Σ code·activation with the weight's true signed code.
//
// Prefill (more rows) dequantises tiles of W into x's dtype and multiplies them with at::mm
// (oneDNN). Measured against a register-blocked `vdpbf16ps` kernel over each thread's own
// dequantised 16-row tile (`135m` layer shapes, 64 rows, one thread), at::mm was 2.3-5x faster,
// so that kernel was dropped; the tiles reach 0.70-0.82x of bf16 oneDNN on a packed weight.
// int8 weights with q8 activations (W8A8) are the exception: their rows go through oneDNN's int8
// GEMM on the codes themselves (gemm_int8), about twice bf16's speed. Where the CPU has AVX-512 VNNI,
// a layer holds its W8A8 codes packed instead and runs cpu_vnni_packed.h's kernel for every batch size
// (the same results, faster), and so do q8_0 and q4_0 layers in q8 mode (up to fp32 summation order);
// these row-major kernels remain for exact activations, the other formats, the other machines and callers
// that hand a plain weight.
//
// Everything has a plain scalar version (the `scalar` entries), compiled everywhere and used where
// the CPU lacks AVX-512 F/BW/VNNI (AVX2 has kernels of its own for q8_0, q4_0 and q4_k); tests call each.
#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define KVFLOW_QUANT_AVX2 1
#else
#define KVFLOW_QUANT_AVX2 0
#endif
#if KVFLOW_QUANT_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && \
    defined(__AVX512VL__)
#define KVFLOW_QUANT_AVX512 1
#else
#define KVFLOW_QUANT_AVX512 0
#endif

namespace kvflow_quant {

constexpr int64_t kGemvRows = 8;  // a GEMV pass multiplies at most this many activation rows

enum class Format { kQ8_0, kQ4_0, kQ4_K, kInt8 };

struct Layout {
  int64_t block;  // values per block (int8: 1, a row has no blocks)
  int64_t bytes;  // bytes per block
};

inline Layout layout(Format f) {
  switch (f) {
    case Format::kQ8_0: return {32, 34};   // fp16 d, int8 q[32]
    case Format::kQ4_0: return {32, 18};   // fp16 d, q[16]: low nibbles values 0..15, high 16..31
    case Format::kQ4_K: return {256, 144}; // fp16 d, fp16 dmin, 12 B of 6-bit scales/mins, 128 B nibbles
    case Format::kInt8: return {1, 1};
  }
  return {1, 1};
}

inline Format parse_format(const std::string& name) {
  if (name == "q8_0") return Format::kQ8_0;
  if (name == "q4_0") return Format::kQ4_0;
  if (name == "q4_k") return Format::kQ4_K;
  if (name == "int8") return Format::kInt8;
  TORCH_CHECK(false, "quant_linear: unknown format ", name, " (q8_0, q4_0, q4_k, int8)");
}

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

// q4_k's 6-bit scale and min of sub-block j (llama.cpp's get_scale_min_k4): bytes 0..3 hold the
// low six bits of scales 0..3, bytes 4..7 those of mins 0..3; bytes 8..11 the low four bits of
// scales/mins 4..7, whose top two bits are the top bits of bytes 0..3 / 4..7.
inline void q4k_scale_min(const uint8_t* s, int j, int& sc, int& mn) {
  if (j < 4) {
    sc = s[j] & 63;
    mn = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// A q4_k super-block's eight sub-block scales (d·sc) and mins (dmin·m) in fp32.
inline void q4k_scales(const uint8_t* block, float* scale, float* min) {
  const float d = half_at(block), dmin = half_at(block + 2);
  for (int j = 0; j < 8; ++j) {
    int sc, mn;
    q4k_scale_min(block + 4, j, sc, mn);
    scale[j] = d * static_cast<float>(sc);
    min[j] = dmin * static_cast<float>(mn);
  }
}

// One weight row in fp32 (`scale`: int8's row scale; unused by the block formats).
inline void dequantize_row(Format f, const uint8_t* row, float scale, int64_t K, float* out) {
  const Layout lay = layout(f);
  switch (f) {
    case Format::kQ8_0:
      for (int64_t b = 0; b < K / 32; ++b) {
        const uint8_t* p = row + b * lay.bytes;
        const float d = half_at(p);
        const int8_t* q = reinterpret_cast<const int8_t*>(p + 2);
        for (int i = 0; i < 32; ++i) out[b * 32 + i] = d * static_cast<float>(q[i]);
      }
      break;
    case Format::kQ4_0:
      for (int64_t b = 0; b < K / 32; ++b) {
        const uint8_t* p = row + b * lay.bytes;
        const float d = half_at(p);
        for (int i = 0; i < 16; ++i) {
          out[b * 32 + i] = d * static_cast<float>((p[2 + i] & 0xF) - 8);
          out[b * 32 + 16 + i] = d * static_cast<float>((p[2 + i] >> 4) - 8);
        }
      }
      break;
    case Format::kQ4_K:
      for (int64_t b = 0; b < K / 256; ++b) {
        const uint8_t* p = row + b * lay.bytes;
        float sc[8], mn[8];
        q4k_scales(p, sc, mn);
        const uint8_t* q = p + 16;
        float* o = out + b * 256;
        for (int j = 0; j < 4; ++j, q += 32, o += 64) {
          for (int i = 0; i < 32; ++i) o[i] = sc[2 * j] * static_cast<float>(q[i] & 0xF) - mn[2 * j];
          for (int i = 0; i < 32; ++i) o[32 + i] = sc[2 * j + 1] * static_cast<float>(q[i] >> 4) - mn[2 * j + 1];
        }
      }
      break;
    case Format::kInt8: {
      const int8_t* q = reinterpret_cast<const int8_t*>(row);
      for (int64_t i = 0; i < K; ++i) out[i] = scale * static_cast<float>(q[i]);
      break;
    }
  }
}

// Round to the nearest bf16 (ties to even), NaN kept quiet: as c10::BFloat16, vectorisable.
inline uint16_t bf16_round(float v) {
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_value(uint16_t h) { return __builtin_bit_cast(float, static_cast<uint32_t>(h) << 16); }

// ----------------------------------------------------------------------------- activations
// The activation rows as the GEMV reads them, K padded with zeros to Kp (a multiple of 64).
struct Activations {
  int64_t rows = 0, K = 0, Kp = 0;
  std::vector<float> x;          // [rows, Kp] fp32 (exact mode)
  std::vector<uint16_t> xb;      // [rows, Kp] the same rows' bf16 bits where x came in as bf16 (exact in bf16)
  std::vector<uint16_t> xbp;     // [rows, Kp] xb in the q4_0 bf16 kernel's order (pair_order), where it runs
  std::vector<float> block_sum;  // [rows, Kp/32] fp32 Σx per 32-block (exact q4_k's mins)
  // q8 mode
  bool per_token = false;        // one scale per row (int8 W8A8), else one per 32-block
  std::vector<int8_t> q;         // [rows, Kp] codes
  std::vector<float> d;          // [rows, Kp/32] or [rows] (per token) scales, 0 in the padding
  std::vector<float> lane_d;     // [rows, Kp/4] d of each int32 lane (4 codes) of a VNNI dot
  std::vector<float> dsum;       // [rows, Kp/32] d·Σq per block: the block's Σx as the kernels see it
  std::vector<int32_t> init;     // [rows, Kp/4] −offset·Σ of the lane's four codes (see the top)
  std::vector<int32_t> qsum;     // [rows] Σq of the row (per-token W8A8)
};

inline int64_t padded(int64_t K) { return (K + 63) / 64 * 64; }

// x [rows, K] (fp32 or bf16, contiguous) into fp32 rows padded with zeros.
inline void load_rows(const at::Tensor& x, int64_t row0, int64_t rows, Activations& a) {
  const int64_t K = x.size(1);
  a.rows = rows, a.K = K, a.Kp = padded(K);
  a.x.assign(rows * a.Kp, 0.f);
  for (int64_t m = 0; m < rows; ++m) {
    float* dst = a.x.data() + m * a.Kp;
    if (x.scalar_type() == at::kFloat) {
      std::memcpy(dst, x.data_ptr<float>() + (row0 + m) * K, K * sizeof(float));
    } else {
      const uint16_t* src = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) + (row0 + m) * K;
      for (int64_t k = 0; k < K; ++k) dst[k] = bf16_value(src[k]);
    }
  }
  if (x.scalar_type() == at::kBFloat16) {
    a.xb.assign(rows * a.Kp, 0);
    const uint16_t* src = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) + row0 * K;
    for (int64_t m = 0; m < rows; ++m) std::memcpy(a.xb.data() + m * a.Kp, src + m * K, K * sizeof(uint16_t));
  } else {
    a.xb.clear();
  }
  a.xbp.clear();
}

// xb by pairs of 32-blocks (a, b) in the order the AVX-512 q4_0 bf16 kernel decodes their codes: a's values
// 0-7, 16-23, b's 0-7, 16-23, then a's 8-15, 24-31, b's 8-15, 24-31 (Kp is a multiple of 64: whole pairs).
inline void pair_order(Activations& a) {
  a.xbp.assign(a.xb.size(), 0);
  static constexpr int kFrom[64] = {0,  1,  2,  3,  4,  5,  6,  7,  16, 17, 18, 19, 20, 21, 22, 23,
                                    32, 33, 34, 35, 36, 37, 38, 39, 48, 49, 50, 51, 52, 53, 54, 55,
                                    8,  9,  10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31,
                                    40, 41, 42, 43, 44, 45, 46, 47, 56, 57, 58, 59, 60, 61, 62, 63};
  for (int64_t base = 0; base < static_cast<int64_t>(a.xb.size()); base += 64)
    for (int i = 0; i < 64; ++i) a.xbp[base + i] = a.xb[base + kFrom[i]];
}

inline void block_sums(Activations& a) {
  const int64_t nb = a.Kp / 32;
  a.block_sum.assign(a.rows * nb, 0.f);
  for (int64_t m = 0; m < a.rows; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      float s = 0.f;
      for (int i = 0; i < 32; ++i) s += a.x[m * a.Kp + b * 32 + i];
      a.block_sum[m * nb + b] = s;
    }
}

// Symmetric int8 codes of a group: d = max|x| / 127, q = round-to-nearest-even(x / d).
inline float quantize_group(const float* x, int64_t n, int8_t* q) {
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float d = amax / 127.f;
  const float id = d > 0.f ? 1.f / d : 0.f;
  for (int64_t i = 0; i < n; ++i) q[i] = static_cast<int8_t>(std::nearbyint(x[i] * id));
  return d;
}

// q8 mode: quantise a.x per 32-block or per token; `offset` is the weight code offset the VNNI dot
// removes through its start value (128 for q8_0/int8, 8 for q4_0, 0 for q4_k).
inline void quantize_rows(Activations& a, bool per_token, int32_t offset) {
  const int64_t Kp = a.Kp, ng = per_token ? 1 : Kp / 32;
  a.per_token = per_token;
  a.q.assign(a.rows * Kp, 0);
  a.d.assign(a.rows * ng, 0.f);
  a.lane_d.assign(a.rows * Kp / 4, 0.f);
  a.dsum.assign(a.rows * Kp / 32, 0.f);
  a.init.assign(a.rows * Kp / 4, 0);
  a.qsum.assign(a.rows, 0);
  for (int64_t m = 0; m < a.rows; ++m) {
    const float* x = a.x.data() + m * Kp;
    int8_t* q = a.q.data() + m * Kp;
    float* d = a.d.data() + m * ng;
    if (per_token) {
      d[0] = quantize_group(x, a.K, q);
    } else {
      for (int64_t b = 0; b < Kp / 32; ++b) d[b] = quantize_group(x + b * 32, 32, q + b * 32);
    }
    int32_t total = 0;
    for (int64_t l = 0; l < Kp / 4; ++l) {
      const int32_t s = q[4 * l] + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3];
      a.init[m * Kp / 4 + l] = -offset * s;
      a.lane_d[m * Kp / 4 + l] = d[per_token ? 0 : l / 8];
      total += s;
    }
    a.qsum[m] = total;
    for (int64_t b = 0; b < Kp / 32; ++b) {
      int32_t s = 0;
      for (int i = 0; i < 32; ++i) s += q[b * 32 + i];
      a.dsum[m * Kp / 32 + b] = d[per_token ? 0 : b] * static_cast<float>(s);
    }
  }
}

// Where a GEMV writes: y [.., N] fp32 or bf16, rows from `row0`.
struct Output {
  float* f = nullptr;
  at::BFloat16* h = nullptr;
  int64_t N = 0, row0 = 0;
  void put(int64_t m, int64_t n, float v) const {
    const int64_t i = (row0 + m) * N + n;
    if (f) f[i] = v; else h[i] = at::BFloat16(v);
  }
};

struct Weights {
  Format format;
  const uint8_t* data;  // [N, row_bytes]
  const float* scales;  // int8: [N]
  int64_t N, K, row_bytes;
  const uint8_t* row(int64_t n) const { return data + n * row_bytes; }
};

// The order in which the SIMD GEMVs visit their rows [n0, n1): kRowRuns far-apart runs of the range
// taking turns, a row each (run s's c-th row, then run s + 1's), or one row after the next. Each row is
// read front to back either way, but taking turns keeps four rows' cache-line misses in flight where one
// run keeps one. Measured per kernel (one thread, `135m`/`500m` shapes, weights from memory, `kvflow bench
// quant-gemv`, alternating A/B runs; docs/benchmarks.md): the q8-mode GEMV on q8_0 and int8 rows of at most
// 1 KB gained 5-40%; the exact one on q8_0 moved 0.91-1.11x (bound by its arithmetic), kept for `500m`'s
// gains; int8 exact and q4_0 lost 2-9%, rows longer than 1 KB (down_proj) up to 20%, so those (and q4_k,
// unmeasured) keep the plain order. Runs taking turns 16 rows at a time, and prefetching ahead in one run,
// gained nothing; the bf16 decode GEMV and bipolar's lost. The AVX2 kernels take the same orders,
// unmeasured: this machine runs the AVX-512 ones.
constexpr int64_t kRowRuns = 4;
constexpr int64_t kInterleavedRowBytes = 1024;
struct RowOrder {
  int64_t n0, runs, run_len, rem;  // `runs` runs of run_len rows, the first `rem` one row longer
  RowOrder(int64_t n0_, int64_t n1, int64_t runs_) : n0(n0_), runs(runs_), run_len((n1 - n0_) / runs_),
                                                      rem((n1 - n0_) % runs_) {}
  int64_t start(int64_t s) const { return n0 + s * run_len + std::min(s, rem); }
  // The i-th row visited: the first runs * run_len go round the runs; the rest are the longer runs' last rows.
  int64_t operator[](int64_t i) const {
    if (runs == 1) return n0 + i;  // the plain order, without a division per row
    const int64_t round = runs * run_len;
    return i < round ? start(i % runs) + i / runs : start(i - round) + run_len;
  }
};

// How many runs take turns for this weight in q8 or exact mode (1: the plain order), as measured above.
inline int64_t interleaved_runs(const Weights& w, bool q8) {
  const bool gains = w.format == Format::kQ8_0 || (q8 && w.format == Format::kInt8);
  return gains && w.row_bytes <= kInterleavedRowBytes ? kRowRuns : 1;
}

// ----------------------------------------------------------------------------- scalar GEMV
inline void gemv_scalar_exact(const Weights& w, const Activations& a, const Output& out, int64_t n0, int64_t n1) {
  std::vector<float> row(a.Kp, 0.f);
  for (int64_t n = n0; n < n1; ++n) {
    dequantize_row(w.format, w.row(n), w.scales ? w.scales[n] : 1.f, w.K, row.data());
    for (int64_t m = 0; m < a.rows; ++m) {
      const float* x = a.x.data() + m * a.Kp;
      float s = 0.f;
      for (int64_t k = 0; k < w.K; ++k) s += row[k] * x[k];
      out.put(m, n, s);
    }
  }
}

// GCC 12.2 at -O3 with AVX512-VNNI vectorises a signed-by-signed int8 dot product loop into
// `vpdpbusd`, which takes one side as unsigned: wrong sums (a 10-line C loop shows it; -O1, or
// -mno-avx512vnni, gives the right ones). The scalar kernels are the reference for CPUs without
// those units, so their integer dot products stay out of the vectoriser.
#if defined(__GNUC__) && !defined(__clang__)
#define KVFLOW_QUANT_NO_VECTORIZE __attribute__((noinline, optimize("no-tree-vectorize")))
#else
#define KVFLOW_QUANT_NO_VECTORIZE __attribute__((noinline))
#endif

KVFLOW_QUANT_NO_VECTORIZE inline int32_t dot_i8(const int8_t* a, const int8_t* b, int64_t n) {
  int32_t s = 0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<int32_t>(a[i]) * static_cast<int32_t>(b[i]);
  return s;
}

// Integer dot products per block, scaled per block, as the VNNI kernels compute them.
inline void gemv_scalar_q8(const Weights& w, const Activations& a, const Output& out, int64_t n0, int64_t n1) {
  const int64_t Kp = a.Kp, K = w.K;
  int8_t code[32];  // a block's (q4_k: a sub-block's) integer codes, signed as they mean
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* r = w.row(n);
    for (int64_t m = 0; m < a.rows; ++m) {
      const int8_t* q = a.q.data() + m * Kp;
      const float* d = a.d.data() + m * (a.per_token ? 1 : Kp / 32);
      float acc = 0.f;
      if (w.format == Format::kInt8) {
        const int32_t dot = dot_i8(reinterpret_cast<const int8_t*>(r), q, K);
        out.put(m, n, d[0] * w.scales[n] * static_cast<float>(dot));
        continue;
      }
      if (w.format == Format::kQ4_K) {
        for (int64_t b = 0; b < K / 256; ++b) {
          const uint8_t* p = r + b * 144;
          float sc[8], mn[8];
          q4k_scales(p, sc, mn);
          for (int j = 0; j < 8; ++j) {
            const uint8_t* nib = p + 16 + (j / 2) * 32;
            for (int i = 0; i < 32; ++i) code[i] = static_cast<int8_t>(j % 2 ? nib[i] >> 4 : nib[i] & 0xF);
            const int64_t s = b * 8 + j;
            acc += sc[j] * d[s] * static_cast<float>(dot_i8(code, q + s * 32, 32)) - mn[j] * a.dsum[m * Kp / 32 + s];
          }
        }
      } else {
        for (int64_t b = 0; b < K / 32; ++b) {
          const uint8_t* p = r + b * layout(w.format).bytes;
          for (int i = 0; i < 32; ++i)
            code[i] = w.format == Format::kQ8_0 ? static_cast<int8_t>(p[2 + i])
                                                : static_cast<int8_t>((i < 16 ? p[2 + i] & 0xF : p[i - 14] >> 4) - 8);
          acc += half_at(p) * d[b] * static_cast<float>(dot_i8(code, q + b * 32, 32));
        }
      }
      out.put(m, n, acc);
    }
  }
}

// f(std::integral_constant<int, M>) for a pass of M = `rows` rows: each SIMD kernel is compiled per row count
// (its accumulators in registers).
template <typename F>
inline void for_rows(int64_t rows, F&& f) {
  static_assert(kGemvRows == 8, "for_rows covers 1..8 rows");
  switch (rows) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: TORCH_CHECK(false, "quant GEMV: ", rows, " rows in one pass");
  }
}

#if KVFLOW_QUANT_AVX2
// ----------------------------------------------------------------------------- AVX2 GEMV
// 256-bit kernels for q8_0 and q4_0 (q4_k: gemv_q4k_avx2 below), llama.cpp's arithmetic shape: one
// 32-value block at a time, its codes widened once for every activation row, an integer dot per block (q8)
// or fp32 multiply-adds (exact), scaled once per block. For the container's baseline (x86-64-v3: AVX2, no AVX-512) and edge
// boxes without AVX-512, which otherwise run the scalar loops: 7-10x those on this project's Zen 4
// (`kvflow bench quant-gemv --kernels avx512 avx2 scalar`), 0.7-0.95x the AVX-512 kernels there, so an
// AVX-512 build keeps those.
inline float h2f(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline float reduce256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Σ over eight int32 lanes of unsigned `u` times signed `s` bytes, four products a lane.
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));  // |pair sums| < 2^15 here
#endif
}

// A q4_0 block's 32 codes (0..15) as unsigned bytes in value order: low nibbles, then high ones.
inline __m256i q4_codes(const uint8_t* p) {
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2));
  return _mm256_and_si256(_mm256_inserti128_si256(_mm256_castsi128_si256(q), _mm_srli_epi16(q, 4), 1),
                          _mm256_set1_epi8(0x0F));
}

// q8 mode. q4_0: Σ (c − 8) q = Σ c q − 8 Σ q, the second term as each int32 lane's start value (a.init),
// exact as in the AVX-512 kernel.
// q8_0: signed by signed through |c| (a code of −128 reads as the unsigned byte 128) and q with c's sign.
template <int M>
void gemv_q8_avx2(const Weights& w, const Activations& a, const Output& out, int64_t n0, int64_t n1) {
  const int64_t nb = w.K / 32, Kp = a.Kp, nbp = Kp / 32;
  const bool q4 = w.format == Format::kQ4_0;
  const int64_t bytes = layout(w.format).bytes;
  const RowOrder order(n0, n1, interleaved_runs(w, true));
  for (int64_t i = 0; i < n1 - n0; ++i) {
    const int64_t n = order[i];
    const uint8_t* r = w.row(n);
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* p = r + b * bytes;
      const float dw = h2f(p);
      if (q4) {
        const __m256i codes = q4_codes(p);
        for (int m = 0; m < M; ++m) {
          const int64_t base = m * Kp + b * 32;
          const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + base));
          const __m256i init = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.init.data() + base / 4));
          acc[m] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a.d[m * nbp + b]),
                                   _mm256_cvtepi32_ps(_mm256_add_epi32(dot_u8s8(codes, y), init)), acc[m]);
        }
      } else {
        const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2));
        const __m256i magnitude = _mm256_sign_epi8(codes, codes);
        for (int m = 0; m < M; ++m) {
          const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + m * Kp + b * 32));
          acc[m] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a.d[m * nbp + b]),
                                   _mm256_cvtepi32_ps(dot_u8s8(magnitude, _mm256_sign_epi8(y, codes))), acc[m]);
        }
      }
    }
    for (int m = 0; m < M; ++m) out.put(m, n, reduce256(acc[m]));
  }
}

// Exact mode: each block's codes widened to fp32 in four vectors of eight, times the fp32 activations.
template <int M>
void gemv_exact_avx2(const Weights& w, const Activations& a, const Output& out, int64_t n0, int64_t n1) {
  const int64_t nb = w.K / 32, Kp = a.Kp;
  const bool q4 = w.format == Format::kQ4_0;
  const int64_t bytes = layout(w.format).bytes;
  const __m256i eight = _mm256_set1_epi32(8);
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const RowOrder order(n0, n1, interleaved_runs(w, false));
  for (int64_t i = 0; i < n1 - n0; ++i) {
    const int64_t n = order[i];
    const uint8_t* r = w.row(n);
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* p = r + b * bytes;
      __m256 wv[4];
      if (q4) {
        const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2));
        const __m128i lo = _mm_and_si128(q, low4), hi = _mm_and_si128(_mm_srli_epi16(q, 4), low4);
        wv[0] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(lo), eight));
        wv[1] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)), eight));
        wv[2] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(hi), eight));
        wv[3] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)), eight));
      } else {
        for (int i = 0; i < 4; ++i)
          wv[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 2 + 8 * i))));
      }
      const __m256 scale = _mm256_set1_ps(h2f(p));
      for (int m = 0; m < M; ++m) {
        const float* x = a.x.data() + m * Kp + b * 32;
        __m256 t = _mm256_mul_ps(wv[0], _mm256_loadu_ps(x));
        t = _mm256_fmadd_ps(wv[1], _mm256_loadu_ps(x + 8), t);
        t = _mm256_fmadd_ps(wv[2], _mm256_loadu_ps(x + 16), t);
        t = _mm256_fmadd_ps(wv[3], _mm256_loadu_ps(x + 24), t);
        acc[m] = _mm256_fmadd_ps(t, scale, acc[m]);
      }
    }
    for (int m = 0; m < M; ++m) out.put(m, n, reduce256(acc[m]));
  }
}

// q4_k (llama.cpp's Q4_K, the base of its Q4_K_M): super-blocks of 256 values, eight sub-blocks of 32 with
// a 6-bit scale and min each (q4k_scales: d·sc and dmin·m in fp32); a value is sc·c − mn, c a nibble. Both
// modes take the codes unsigned and the mins out as mn · Σx per sub-block (exact: the activations' block
// sums; q8: their d·Σq, a.dsum), as the AVX-512 kernels do.
template <bool Q8, int M>
void gemv_q4k_avx2(const Weights& w, const Activations& a, const Output& out, int64_t n0, int64_t n1) {
  const int64_t Kp = a.Kp, nbp = Kp / 32;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* r = w.row(n);
    __m256 acc[M], macc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps(), macc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < w.K / 256; ++b) {
      const uint8_t* p = r + b * 144;
      alignas(32) float sc[8], mn[8];
      q4k_scales(p, sc, mn);
      for (int pair = 0; pair < 4; ++pair) {  // 32 bytes: sub-block 2·pair in the low nibbles, the next in the high
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 + 32 * pair));
        const __m256i halves[2] = {_mm256_and_si256(bytes, low4), _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4)};
        for (int h = 0; h < 2; ++h) {
          const int j = 2 * pair + h;
          const int64_t k = b * 256 + 32 * j;
          if constexpr (Q8) {
            for (int m = 0; m < M; ++m) {
              const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + m * Kp + k));
              acc[m] = _mm256_fmadd_ps(_mm256_set1_ps(sc[j] * a.d[m * nbp + k / 32]),
                                       _mm256_cvtepi32_ps(dot_u8s8(halves[h], y)), acc[m]);
            }
          } else {
            const __m128i lo = _mm256_castsi256_si128(halves[h]), hi = _mm256_extracti128_si256(halves[h], 1);
            const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
            const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
            const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
            const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
            const __m256 scale = _mm256_set1_ps(sc[j]);
            for (int m = 0; m < M; ++m) {
              const float* x = a.x.data() + m * Kp + k;
              __m256 t = _mm256_mul_ps(w0, _mm256_loadu_ps(x));
              t = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + 8), t);
              t = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x + 16), t);
              t = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x + 24), t);
              acc[m] = _mm256_fmadd_ps(t, scale, acc[m]);
            }
          }
        }
      }
      const __m256 mins = _mm256_load_ps(mn);
      const float* sums = Q8 ? a.dsum.data() : a.block_sum.data();
      for (int m = 0; m < M; ++m) macc[m] = _mm256_fmadd_ps(mins, _mm256_loadu_ps(sums + m * nbp + b * 8), macc[m]);
    }
    for (int m = 0; m < M; ++m) out.put(m, n, reduce256(acc[m]) - reduce256(macc[m]));
  }
}

template <bool Q8>
void gemv_avx2(const Weights& w, const Activations& a, const Output& out, int64_t n0, int64_t n1) {
  for_rows(a.rows, [&](auto rows) {
    constexpr int M = decltype(rows)::value;
    if (w.format == Format::kQ4_K) return gemv_q4k_avx2<Q8, M>(w, a, out, n0, n1);
    Q8 ? gemv_q8_avx2<M>(w, a, out, n0, n1) : gemv_exact_avx2<M>(w, a, out, n0, n1);
  });
}
#endif  // KVFLOW_QUANT_AVX2

#if KVFLOW_QUANT_AVX512
// ----------------------------------------------------------------------------- AVX-512 GEMV
inline __m512 halves(float lo, float hi) { return _mm512_insertf32x8(_mm512_set1_ps(lo), _mm256_set1_ps(hi), 1); }

// The weight codes of two 32-value blocks (or sub-blocks) as 64 unsigned bytes in value order, and
// the scale of each int32 lane: the per-format part of the q8-mode GEMV.
template <int M>
inline void q8_accumulate(__m512i codes, __m512 lane_scale, const Activations& a, int64_t k, __m512* acc) {
  for (int m = 0; m < M; ++m) {
    const int64_t base = m * a.Kp + k;
    const __m512i dot = _mm512_dpbusd_epi32(_mm512_loadu_si512(a.init.data() + base / 4), codes,
                                            _mm512_loadu_si512(a.q.data() + base));
    acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(lane_scale, _mm512_loadu_ps(a.lane_d.data() + base / 4)),
                             acc[m]);
  }
}

template <int M>
void gemv_q8_avx512(const Weights& w, const Activations& a, const Output& out, int64_t n0, int64_t n1) {
  const __m512i low4 = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t K = w.K, nb = K / 32;
  const RowOrder order(n0, n1, interleaved_runs(w, true));
  for (int64_t i = 0; i < n1 - n0; ++i) {
    const int64_t n = order[i];
    const uint8_t* r = w.row(n);
    __m512 acc[M];
    __m256 macc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps(), macc[m] = _mm256_setzero_ps();
    switch (w.format) {
      case Format::kQ8_0:
        for (int64_t b = 0; b < nb; b += 2) {
          const uint8_t* p = r + b * 34;
          const bool pair = b + 1 < nb;
          const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2));
          const __m256i hi = pair ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 36)) : _mm256_setzero_si256();
          const __m512i codes = _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), flip);
          q8_accumulate<M>(codes, halves(h2f(p), pair ? h2f(p + 34) : 0.f), a, b * 32, acc);
        }
        break;
      case Format::kQ4_0:
        for (int64_t b = 0; b < nb; b += 2) {
          const uint8_t* p = r + b * 18;
          const bool pair = b + 1 < nb;
          const __m128i qa = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2));
          const __m128i qb = pair ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 20)) : _mm_setzero_si128();
          const __m256i q = _mm256_inserti128_si256(_mm256_castsi128_si256(qa), qb, 1);
          __m512i v = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(q), _mm256_srli_epi16(q, 4), 1), low4);
          v = _mm512_shuffle_i64x2(v, v, _MM_SHUFFLE(3, 1, 2, 0));  // [lo a, hi a, lo b, hi b]
          q8_accumulate<M>(v, halves(h2f(p), pair ? h2f(p + 18) : 0.f), a, b * 32, acc);
        }
        break;
      case Format::kQ4_K:
        for (int64_t b = 0; b < K / 256; ++b) {
          const uint8_t* p = r + b * 144;
          alignas(32) float sc[8], mn[8];
          q4k_scales(p, sc, mn);
          const __m512 scales = _mm512_castps256_ps512(_mm256_load_ps(sc));
          const __m256 mins = _mm256_load_ps(mn);
          for (int j = 0; j < 4; ++j) {
            const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 + 32 * j));
            const __m512i v = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(q), _mm256_srli_epi16(q, 4), 1), low4);
            const __m512i pick = _mm512_inserti64x4(_mm512_set1_epi32(2 * j), _mm256_set1_epi32(2 * j + 1), 1);
            q8_accumulate<M>(v, _mm512_permutexvar_ps(pick, scales), a, b * 256 + 64 * j, acc);
          }
          for (int m = 0; m < M; ++m)
            macc[m] = _mm256_fmadd_ps(mins, _mm256_loadu_ps(a.dsum.data() + m * a.Kp / 32 + b * 8), macc[m]);
        }
        break;
      case Format::kInt8: {
        __m512i iacc[M];
        for (int m = 0; m < M; ++m) iacc[m] = _mm512_setzero_si512();
        for (int64_t k = 0; k < K; k += 64) {
          const __mmask64 mask = K - k >= 64 ? ~0ull : (1ull << (K - k)) - 1;
          const __m512i codes = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, r + k), flip);
          for (int m = 0; m < M; ++m)
            iacc[m] = _mm512_dpbusd_epi32(iacc[m], codes, _mm512_loadu_si512(a.q.data() + m * a.Kp + k));
        }
        for (int m = 0; m < M; ++m) {
          const int32_t dot = _mm512_reduce_add_epi32(iacc[m]) - 128 * a.qsum[m];
          out.put(m, n, a.d[m] * w.scales[n] * static_cast<float>(dot));
        }
        continue;
      }
    }
    for (int m = 0; m < M; ++m) out.put(m, n, _mm512_reduce_add_ps(acc[m]) - reduce256(macc[m]));
  }
}

inline __m512 widen_i8(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)); }
inline __m512 widen_u8(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)); }

// Σ w·x over 32 values (two vectors of sixteen) of each row, times `scale`, into acc.
template <int M>
inline void exact_accumulate(__m512 w0, __m512 w1, __m512 scale, const Activations& a, int64_t k, __m512* acc) {
  for (int m = 0; m < M; ++m) {
    const float* x = a.x.data() + m * a.Kp + k;
    const __m512 t = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + 16), _mm512_mul_ps(w0, _mm512_loadu_ps(x)));
    acc[m] = _mm512_fmadd_ps(t, scale, acc[m]);
  }
}

#if defined(__AVX512BF16__)
// Exact mode on q4_0 for bf16 activations (what a bf16 model's layers pass): a block's codes c − 8 (small
// integers, exact in bf16) as bf16, then `vdpbf16ps` against the activations: 32 exact products per
// instruction summed in fp32. The same products as the fp32 path; only the fp32 summation order differs.
// The pair kernel below does two blocks per step; this table (bf16(c − 8) by nibble, for a cross-lane
// `vpermw`) serves the one-block step a row with an odd number of blocks ends on.
inline __m512i q4_0_bf16_values() {
  alignas(64) uint16_t table[32];
  for (int i = 0; i < 32; ++i) table[i] = bf16_round(static_cast<float>(i % 16 - 8));
  return _mm512_load_si512(table);
}

// One block alone (a row's odd last block), its activations in value order (`a.xb`).
template <int M>
inline void q4_0_exact_bf16_block(const uint8_t* p, const Activations& a, int64_t k, __m512i values, __m512* acc) {
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2));
  const __m256i nibbles = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(q, low4)),
                                                  _mm_and_si128(_mm_srli_epi16(q, 4), low4), 1);
  const __m512bh w = (__m512bh)_mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(nibbles), values);
  const __m512 scale = _mm512_set1_ps(h2f(p));
  for (int m = 0; m < M; ++m) {
    const __m512bh x = (__m512bh)_mm512_loadu_si512(a.xb.data() + m * a.Kp + k);
    acc[m] = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), w, x), scale, acc[m]);
  }
}

// Two blocks (a, b) per step with in-lane shuffles only: their codes broadcast to [a, a, b, b] by 128-bit
// lane, the high nibbles shifted down in lanes 1 and 3, each nibble looked up as the low and the high byte
// of bf16(c − 8) (`vpshufb`), and the bytes paired into words (`vpunpck{l,h}bw`). That leaves the values in
// a fixed order other than theirs, which the activations take once per call (`pair_order`) instead of
// every weight row paying a cross-lane permute; both dot products then land a's sums in fp32 lanes 0-7 and
// b's in 8-15, scaled together. 1.35x the one-block loop per `135m` matrix at one row (20 -> 27 GB/s of
// codes, standalone); the same exact products, summed in another fp32 order.
template <int M>
inline void q4_0_exact_bf16(const uint8_t* r, int64_t blocks, const Activations& a, __m512i values, __m512* acc) {
  alignas(64) static const struct Tables {
    uint8_t lo[64], hi[64];
    Tables() {
      for (int i = 0; i < 64; ++i) {
        const uint16_t v = bf16_round(static_cast<float>(i % 16 - 8));
        lo[i] = static_cast<uint8_t>(v & 0xFF), hi[i] = static_cast<uint8_t>(v >> 8);
      }
    }
  } tables;
  const __m512i lo_bytes = _mm512_load_si512(tables.lo), hi_bytes = _mm512_load_si512(tables.hi);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i shift = _mm512_set_epi64(0x0004000400040004, 0x0004000400040004, 0, 0,
                                         0x0004000400040004, 0x0004000400040004, 0, 0);
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) {
    const uint8_t* p = r + b * 18;
    const __m512i aa = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2)));
    const __m512i aabb = _mm512_mask_broadcast_i32x4(aa, 0xFF00, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 20)));
    const __m512i nibbles = _mm512_and_si512(_mm512_srlv_epi16(aabb, shift), low4);
    const __m512i lo = _mm512_shuffle_epi8(lo_bytes, nibbles), hi = _mm512_shuffle_epi8(hi_bytes, nibbles);
    const __m512bh w0 = (__m512bh)_mm512_unpacklo_epi8(lo, hi), w1 = (__m512bh)_mm512_unpackhi_epi8(lo, hi);
    uint16_t da, db;
    std::memcpy(&da, p, 2), std::memcpy(&db, p + 18, 2);
    const __m512 scale = _mm512_cvtph_ps(_mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_set1_epi16(static_cast<short>(da))), _mm_set1_epi16(static_cast<short>(db)), 1));
    for (int m = 0; m < M; ++m) {
      const uint16_t* x = a.xbp.data() + m * a.Kp + b * 32;
      const __m512 dot = _mm512_dpbf16_ps(
          _mm512_dpbf16_ps(_mm512_setzero_ps(), w0, (__m512bh)_mm512_loadu_si512(x)), w1,
          (__m512bh)_mm512_loadu_si512(x + 32));
      acc[m] = _mm512_fmadd_ps(dot, scale, acc[m]);
    }
  }
  if (b < blocks) q4_0_exact_bf16_block<M>(r + b * 18, a, b * 32, values, acc);
}

// The sums of 16 accumulators (one output row each) in one vector, in row order: a tree of in-register
// adds, where each row's own reduction would be a serial chain (~15 cycles a row, a third of a 576-wide
// q4_0 row's loop, measured).
inline __m512 reduce16(const __m512* v) {
  __m512 halves[8], quarters[4], pairs[2];
  for (int i = 0; i < 8; ++i)  // rows 2i, 2i+1: 8 partial sums each
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                              _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // rows 4i..4i+3: 4 each, one 128-bit lane a row
    quarters[i] = _mm512_add_ps(_mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], 0x88),
                                _mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // lane q: rows 8i+q and 8i+4+q, 2 each
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(quarters[2 * i], quarters[2 * i + 1]),
                             _mm512_unpackhi_ps(quarters[2 * i], quarters[2 * i + 1]));
  const __m512d a = _mm512_castps_pd(pairs[0]), b = _mm512_castps_pd(pairs[1]);
  const __m512 t = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  // lane 4q + j holds row q + 4j
  return _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), t);
}

// q4_0, exact, bf16 activations: rows 16 at a time, each row's loop as above, the 16 sums reduced together.
template <int M>
void gemv_q4_0_bf16(const Weights& w, const Activations& a, const Output& out, int64_t n0, int64_t n1) {
  const __m512i values = q4_0_bf16_values();
  const int64_t blocks = w.K / 32;
  for (int64_t g = n0; g < n1; g += 16) {
    const int rows = static_cast<int>(std::min<int64_t>(16, n1 - g));
    __m512 acc[M][16];
    for (int j = 0; j < 16; ++j) {
      __m512 row[M];
      for (int m = 0; m < M; ++m) row[m] = _mm512_setzero_ps();
      if (j < rows) q4_0_exact_bf16<M>(w.row(g + j), blocks, a, values, row);
      for (int m = 0; m < M; ++m) acc[m][j] = row[m];
    }
    for (int m = 0; m < M; ++m) {
      alignas(64) float sums[16];
      _mm512_store_ps(sums, reduce16(acc[m]));
      for (int j = 0; j < rows; ++j) out.put(m, g + j, sums[j]);
    }
  }
}
#endif

template <int M>
void gemv_exact_avx512(const Weights& w, const Activations& a, const Output& out, int64_t n0, int64_t n1) {
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m512i eight = _mm512_set1_epi32(8);
  const int64_t K = w.K;
#if defined(__AVX512BF16__)
  if (w.format == Format::kQ4_0 && !a.xbp.empty()) return gemv_q4_0_bf16<M>(w, a, out, n0, n1);
#endif
  const RowOrder order(n0, n1, interleaved_runs(w, false));
  for (int64_t i = 0; i < n1 - n0; ++i) {
    const int64_t n = order[i];
    const uint8_t* r = w.row(n);
    __m512 acc[M];
    __m256 macc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps(), macc[m] = _mm256_setzero_ps();
    float row_scale = 1.f;
    switch (w.format) {
      case Format::kQ8_0:
        for (int64_t b = 0; b < K / 32; ++b) {
          const uint8_t* p = r + b * 34;
          exact_accumulate<M>(widen_i8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2))),
                              widen_i8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 18))),
                              _mm512_set1_ps(h2f(p)), a, b * 32, acc);
        }
        break;
      case Format::kQ4_0:
        for (int64_t b = 0; b < K / 32; ++b) {
          const uint8_t* p = r + b * 18;
          const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2));
          const __m512 w0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_and_si128(q, low4)), eight));
          const __m512 w1 = _mm512_cvtepi32_ps(
              _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), low4)), eight));
          exact_accumulate<M>(w0, w1, _mm512_set1_ps(h2f(p)), a, b * 32, acc);
        }
        break;
      case Format::kQ4_K:
        for (int64_t b = 0; b < K / 256; ++b) {
          const uint8_t* p = r + b * 144;
          alignas(32) float sc[8], mn[8];
          q4k_scales(p, sc, mn);
          for (int j = 0; j < 4; ++j) {
            const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 + 32 * j));
            const __m128i q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32 + 32 * j));
            exact_accumulate<M>(widen_u8(_mm_and_si128(q0, low4)), widen_u8(_mm_and_si128(q1, low4)),
                                _mm512_set1_ps(sc[2 * j]), a, b * 256 + 64 * j, acc);
            exact_accumulate<M>(widen_u8(_mm_and_si128(_mm_srli_epi16(q0, 4), low4)),
                                widen_u8(_mm_and_si128(_mm_srli_epi16(q1, 4), low4)),
                                _mm512_set1_ps(sc[2 * j + 1]), a, b * 256 + 64 * j + 32, acc);
          }
          const __m256 mins = _mm256_load_ps(mn);
          for (int m = 0; m < M; ++m)
            macc[m] = _mm256_fmadd_ps(mins, _mm256_loadu_ps(a.block_sum.data() + m * a.Kp / 32 + b * 8), macc[m]);
        }
        break;
      case Format::kInt8:
        for (int64_t k = 0; k < K; k += 16) {
          const __mmask16 mask = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
          const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, r + k)));
          for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(a.x.data() + m * a.Kp + k), acc[m]);
        }
        row_scale = w.scales[n];
        break;
    }
    for (int m = 0; m < M; ++m) out.put(m, n, row_scale * _mm512_reduce_add_ps(acc[m]) - reduce256(macc[m]));
  }
}

template <bool Q8>
void gemv_avx512(const Weights& w, const Activations& a, const Output& out, int64_t n0, int64_t n1) {
  for_rows(a.rows, [&](auto rows) {
    constexpr int M = decltype(rows)::value;
    Q8 ? gemv_q8_avx512<M>(w, a, out, n0, n1) : gemv_exact_avx512<M>(w, a, out, n0, n1);
  });
}
#endif  // KVFLOW_QUANT_AVX512

constexpr bool kHasAvx512 = KVFLOW_QUANT_AVX512;

// The GEMV kernels: the best this build has for a format ("auto"), or one forced (tests, benchmarks).
enum class Kernel { kAuto, kAvx512, kAvx2, kScalar };

inline bool avx2_covers(Format f) { return f == Format::kQ8_0 || f == Format::kQ4_0 || f == Format::kQ4_K; }

// What this build compiled, best first.
inline std::vector<std::string> kernels_built() {
  std::vector<std::string> names;
  if (KVFLOW_QUANT_AVX512) names.push_back("avx512");
  if (KVFLOW_QUANT_AVX2) names.push_back("avx2");
  names.push_back("scalar");
  return names;
}

inline Kernel pick_kernel(const std::string& name, Format f) {
  if (name == "scalar") return Kernel::kScalar;
  if (name == "avx512") {
    TORCH_CHECK(KVFLOW_QUANT_AVX512, "quant GEMV: this build has no AVX-512 kernels");
    return Kernel::kAvx512;
  }
  if (name == "avx2") {
    TORCH_CHECK(KVFLOW_QUANT_AVX2 && avx2_covers(f), "quant GEMV: the AVX2 kernels cover q8_0, q4_0 and q4_k in "
                "builds with AVX2, FMA and F16C");
    return Kernel::kAvx2;
  }
  TORCH_CHECK(name == "auto", "quant GEMV: kernel is auto, avx512, avx2 or scalar, not ", name);
  // Auto: AVX-512 where built; else AVX2 for the formats it covers; else the scalar loops.
  if (KVFLOW_QUANT_AVX512) return Kernel::kAvx512;
  return KVFLOW_QUANT_AVX2 && avx2_covers(f) ? Kernel::kAvx2 : Kernel::kScalar;
}

inline int32_t code_offset(Format f) {
  switch (f) {
    case Format::kQ8_0: case Format::kInt8: return 128;
    case Format::kQ4_0: return 8;
    case Format::kQ4_K: return 0;
  }
  return 0;
}

// y[row0 : row0 + rows] of the GEMV, parallel over N.
inline void gemv(const Weights& w, const at::Tensor& x, int64_t row0, int64_t rows, bool q8, Kernel kernel,
                 const Output& out) {
  Activations a;
  load_rows(x, row0, rows, a);
  if (q8) {
    quantize_rows(a, w.format == Format::kInt8, code_offset(w.format));
  } else if (w.format == Format::kQ4_K) {
    block_sums(a);
  }
#if KVFLOW_QUANT_AVX512 && defined(__AVX512BF16__)
  if (!q8 && w.format == Format::kQ4_0 && kernel == Kernel::kAvx512 && !a.xb.empty()) pair_order(a);
#endif
  const Output o{out.f, out.h, out.N, row0};
  at::parallel_for(0, w.N, 16, [&](int64_t n0, int64_t n1) {
#if KVFLOW_QUANT_AVX512
    if (kernel == Kernel::kAvx512) {
      q8 ? gemv_avx512<true>(w, a, o, n0, n1) : gemv_avx512<false>(w, a, o, n0, n1);
      return;
    }
#endif
#if KVFLOW_QUANT_AVX2
    if (kernel == Kernel::kAvx2) {
      q8 ? gemv_avx2<true>(w, a, o, n0, n1) : gemv_avx2<false>(w, a, o, n0, n1);
      return;
    }
#endif
    q8 ? gemv_scalar_q8(w, a, o, n0, n1) : gemv_scalar_exact(w, a, o, n0, n1);
  });
}


// ----------------------------------------------------------------------------- batched GEMM
// Rows [n0, n1) of W dequantised into `f32` (fp32) or, where `b16` is given, rounded to bf16 there.
inline void dequantize_rows(const Weights& w, int64_t n0, int64_t n1, int64_t stride, float* f32, uint16_t* b16) {
  std::vector<float> row(b16 ? w.K : 0);
  for (int64_t n = n0; n < n1; ++n) {
    float* dst = b16 ? row.data() : f32 + (n - n0) * stride;
    dequantize_row(w.format, w.row(n), w.scales ? w.scales[n] : 1.f, w.K, dst);
    if (b16) {
      uint16_t* out = b16 + (n - n0) * stride;
      for (int64_t k = 0; k < w.K; ++k) out[k] = bf16_round(row[k]);
    }
  }
}

// y = x · Wᵀ by tiles of W dequantised into x's dtype, each multiplied by at::mm (oneDNN).
// `fill(n0, n1, f32, b16)` writes W's rows [n0, n1) from `f32` (fp32) or, where `b16` is given, as bf16 there,
// rows K apart; it runs in parallel on disjoint rows.
template <typename Fill>
inline at::Tensor tiled_mm(const at::Tensor& x, int64_t N, int64_t K, int64_t tile_rows, Fill&& fill) {
  const int64_t M = x.size(0), T = std::min(N, tile_rows);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor tile = at::empty({T, K}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += T) {
    const int64_t t = std::min(T, N - n0);
    at::parallel_for(0, t, 16, [&](int64_t i0, int64_t i1) {
      if (bf16) {
        fill(n0 + i0, n0 + i1, nullptr, reinterpret_cast<uint16_t*>(tile.data_ptr<at::BFloat16>()) + i0 * K);
      } else {
        fill(n0 + i0, n0 + i1, tile.data_ptr<float>() + i0 * K, nullptr);
      }
    });
    const at::Tensor part = tile.narrow(0, 0, t).t();
    if (t == N) at::mm_out(y, x, part);
    else y.narrow(1, n0, t).copy_(at::mm(x, part));
  }
  return y;
}

inline at::Tensor gemm_mm(const Weights& w, const at::Tensor& x, int64_t tile_rows) {
  return tiled_mm(x, w.N, w.K, tile_rows, [&](int64_t n0, int64_t n1, float* f32, uint16_t* b16) {
    dequantize_rows(w, n0, n1, w.K, f32, b16);
  });
}

// q8 mode above the GEMV's rows: the activation rows as the GEMV's integer arithmetic sees them
// (d·q per 32-block, or per token for int8), in x's dtype, for the dequantised-tile GEMM. So a row's
// result is the same arithmetic's whatever the number of rows in its step (up to fp32 summation
// order, and x's dtype where that is bf16).
inline at::Tensor q8_activations(const at::Tensor& x, bool per_token) {
  at::Tensor out = at::empty_like(x);
  const int64_t K = x.size(1);
  const bool f32 = x.scalar_type() == at::kFloat;
  at::parallel_for(0, x.size(0), 1, [&](int64_t m0, int64_t m1) {
    Activations a;
    for (int64_t m = m0; m < m1; ++m) {
      load_rows(x, m, 1, a);
      quantize_rows(a, per_token, 0);
      for (int64_t k = 0; k < K; ++k) {
        const float v = a.d[per_token ? 0 : k / 32] * static_cast<float>(a.q[k]);
        if (f32) out.data_ptr<float>()[m * K + k] = v; else out.data_ptr<at::BFloat16>()[m * K + k] = at::BFloat16(v);
      }
    }
  });
  return out;
}

// int8 weights with int8 activations (W8A8) above the GEMV's rows: each row's per-token int8 codes
// (quantize_group, as the GEMV rounds them) times the weight codes in oneDNN's int8 GEMM
// (at::_int_mm: VNNI `vpdpbusd`, twice bf16's multiply-adds per instruction), int32 exact, then
// scaled by the token's and the channel's scales in the GEMV's order, so a row's result is the
// GEMV's bit for bit whatever the rows in its step. This is what makes W8A8 pay off in a batch: the
// dequantised-tile GEMM above runs at bf16's speed at best.
// Row m of x (fp32 or bf16) as per-token int8 codes, exactly as quantize_group rounds them (max|x|
// is order-free, and x · (1/d) rounds to nearest even in both); returns d. `buf`: K floats of scratch.
// Row m of x (fp32 or bf16 [M, K]) as fp32: x's own memory, or the row widened into `buf` (K floats).
inline const float* row_as_fp32(const at::Tensor& x, int64_t m, int64_t K, float* buf) {
  if (x.scalar_type() == at::kFloat) return x.data_ptr<float>() + m * K;
  const uint16_t* src = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) + m * K;
  int64_t k = 0;
#if KVFLOW_QUANT_AVX512
  for (; k + 16 <= K; k += 16)  // bf16 is fp32's top half
    _mm512_storeu_ps(buf + k, _mm512_castsi512_ps(_mm512_slli_epi32(
                                  _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k))), 16)));
#endif
  for (; k < K; ++k) buf[k] = bf16_value(src[k]);
  return buf;
}

inline float quantize_token(const at::Tensor& x, int64_t m, int64_t K, float* buf, int8_t* q) {
  const float* row = row_as_fp32(x, m, K, buf);
#if KVFLOW_QUANT_AVX512
  __m512 mx = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(row + k)));
  const __mmask16 tail = static_cast<__mmask16>((1u << (K - k)) - 1);
  mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail, row + k)));
  const float d = _mm512_reduce_max_ps(mx) / 127.f;
  const __m512 id = _mm512_set1_ps(d > 0.f ? 1.f / d : 0.f);
  for (k = 0; k + 16 <= K; k += 16)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k),
                     _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(row + k), id))));
  _mm_mask_storeu_epi8(q + k, tail,
                       _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(tail, row + k), id))));
  return d;
#else
  return quantize_group(row, K, q);
#endif
}

// y[m, :] = d · s[n] · acc[m, n] (in the GEMV's order: (d · s) · acc), in y's dtype.
inline void scale_row(const int32_t* acc, float d, const float* s, int64_t N, float* f, at::BFloat16* h) {
  int64_t n = 0;
#if KVFLOW_QUANT_AVX512
  const __m512 dv = _mm512_set1_ps(d);
  for (; n + 16 <= N; n += 16) {
    const __m512 v = _mm512_mul_ps(_mm512_mul_ps(dv, _mm512_loadu_ps(s + n)),
                                   _mm512_cvtepi32_ps(_mm512_loadu_si512(acc + n)));
    if (f) {
      _mm512_storeu_ps(f + n, v);
    } else {
#if defined(__AVX512BF16__)  // round to nearest even, as at::BFloat16 (the values are finite)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(h + n), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
#else
      alignas(64) float tmp[16];
      _mm512_store_ps(tmp, v);
      for (int i = 0; i < 16; ++i) h[n + i] = at::BFloat16(tmp[i]);
#endif
    }
  }
#endif
  for (; n < N; ++n) {
    const float v = d * s[n] * static_cast<float>(acc[n]);
    if (f) f[n] = v; else h[n] = at::BFloat16(v);
  }
}

constexpr int64_t kInt8AccBytes = int64_t{8} << 20;

// The W8A8 GEMM's scratch (the activation codes, the int32 sums), kept per thread from call to call.
// Allocated afresh, a prefill step's ~200 pairs of multi-MB buffers made glibc trim its heap and map
// the pages again each time: 0.3-0.9 s of page faults per 2048-token `135m` step (which runs in
// ~0.8 s without them), measured with getrusage's minor faults. Raw memory, wrapped per call
// (at::from_blob), so a tensor made under torch's inference mode never meets a call outside it.
class ScratchBuffer {
 public:
  // At least `bytes` bytes (64-byte aligned), kept until a larger request.
  void* fit(int64_t bytes) {
    if (bytes > size_) {
      const int64_t rounded = (bytes + 63) / 64 * 64;
      data_.reset(std::aligned_alloc(64, static_cast<size_t>(rounded)));
      TORCH_CHECK(data_, "quant_linear: cannot allocate ", rounded, " bytes of scratch");
      size_ = rounded;
    }
    return data_.get();
  }

 private:
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  std::unique_ptr<void, Free> data_;
  int64_t size_ = 0;
};

struct Int8Scratch {
  ScratchBuffer codes, acc;
};

inline Int8Scratch& int8_scratch() {
  thread_local Int8Scratch scratch;
  return scratch;
}

inline at::Tensor gemm_int8(const Weights& w, const at::Tensor& x) {
  const int64_t M = x.size(0), N = w.N, K = w.K;
  Int8Scratch& scratch = int8_scratch();
  const at::Tensor codes = at::from_blob(scratch.codes.fit(M * K), {M, K}, at::kChar);
  std::vector<float> d(M);
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<float> buf(K);
    for (int64_t m = m0; m < m1; ++m) d[m] = quantize_token(x, m, K, buf.data(), codes.data_ptr<int8_t>() + m * K);
  });
  const at::Tensor weight = at::from_blob(const_cast<uint8_t*>(w.data), {N, K}, at::kChar);
  at::Tensor y = at::empty({M, N}, x.options());
  const bool f32 = y.scalar_type() == at::kFloat;
  // Output columns in slices whose int32 sums stay under kInt8AccBytes: a 64-row step of a 152k-word
  // LM head would otherwise sum into 39 MB, a fresh mapping (glibc maps allocations above 32 MB) whose
  // page faults cost more than its scaling, read back from memory rather than from the cache.
  const int64_t cols = std::min(N, std::max<int64_t>(64, kInt8AccBytes / (4 * M)) / 64 * 64);
  for (int64_t n0 = 0; n0 < N; n0 += cols) {
    const int64_t n = std::min(cols, N - n0);
    at::Tensor acc = at::from_blob(scratch.acc.fit(4 * M * cols), {M, n}, at::kInt);
    at::_int_mm_out(acc, codes, weight.narrow(0, n0, n).t());
    const int32_t* a = acc.data_ptr<int32_t>();
    at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m)
        scale_row(a + m * n, d[m], w.scales + n0, n, f32 ? y.data_ptr<float>() + m * N + n0 : nullptr,
                  f32 ? nullptr : y.data_ptr<at::BFloat16>() + m * N + n0);
    });
  }
  return y;
}

// ----------------------------------------------------------------------------- entry
// y = x · Wᵀ. `q8`: quantised activations (see the top; the GEMM multiplies the rows as the GEMV's
// integer arithmetic sees them, q8_activations). `path`: "auto" (GEMV up to
// kGemvRows rows, else the GEMM), "gemv" (any rows, kGemvRows per pass) or "mm" (the GEMM).
// `kernel`: the GEMV's kernels (pick_kernel; "scalar": the plain loops whatever the CPU has, and the GEMV
// for any rows).
inline at::Tensor quant_linear(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& scales,
                               const std::string& format_name, int64_t N, int64_t K, bool q8,
                               const std::string& path, const std::string& kernel_name, int64_t tile_rows) {
  const Format format = parse_format(format_name);
  const Layout lay = layout(format);
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == K, "quant_linear: x must be [M, ", K, "]");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "quant_linear: x must be float32 or bfloat16, not ", x_in.scalar_type());
  TORCH_CHECK(K % lay.block == 0, "quant_linear: ", format_name, " needs K a multiple of ", lay.block, ", not ", K);
  const int64_t row_bytes = K / lay.block * lay.bytes;
  TORCH_CHECK(weight.is_contiguous() && weight.element_size() == 1 && weight.numel() == N * row_bytes,
              "quant_linear: ", format_name, " weight must be ", N, " contiguous rows of ", row_bytes, " bytes");
  const bool int8 = format == Format::kInt8;
  TORCH_CHECK(!int8 || (scales.defined() && scales.scalar_type() == at::kFloat && scales.numel() == N &&
                        scales.is_contiguous()),
              "quant_linear: int8 needs fp32 scales [N]");
  const at::Tensor x = x_in.contiguous();
  const Weights w{format, static_cast<const uint8_t*>(weight.data_ptr()), int8 ? scales.data_ptr<float>() : nullptr,
                  N, K, row_bytes};
  const int64_t M = x.size(0);
  const Kernel kernel = pick_kernel(kernel_name, format);
  const bool scalar = kernel == Kernel::kScalar;
  const bool gemv_path = path == "gemv" || (path == "auto" && (M <= kGemvRows || scalar));
  if (!gemv_path) {
    TORCH_CHECK(path == "auto" || path == "mm", "quant_linear: unknown path ", path);
    if (q8 && int8) return gemm_int8(w, x);
    return gemm_mm(w, q8 ? q8_activations(x, int8) : x, tile_rows);
  }
  at::Tensor y = at::empty({M, N}, x.options());
  Output out;
  out.N = N;
  if (y.scalar_type() == at::kFloat) out.f = y.data_ptr<float>(); else out.h = y.data_ptr<at::BFloat16>();
  for (int64_t row0 = 0; row0 < M; row0 += kGemvRows) gemv(w, x, row0, std::min(kGemvRows, M - row0), q8, kernel, out);
  return y;
}

// W in fp32 [N, K] (tests and reference paths).
inline at::Tensor dequantize(const at::Tensor& weight, const at::Tensor& scales, const std::string& format_name,
                             int64_t N, int64_t K) {
  const Format format = parse_format(format_name);
  const Layout lay = layout(format);
  TORCH_CHECK(K % lay.block == 0 && weight.is_contiguous() && weight.numel() == N * (K / lay.block * lay.bytes),
              "dequantize: weight shape");
  const Weights w{format, static_cast<const uint8_t*>(weight.data_ptr()),
                  format == Format::kInt8 ? scales.data_ptr<float>() : nullptr, N, K, K / lay.block * lay.bytes};
  at::Tensor out = at::empty({N, K}, at::kFloat);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    dequantize_rows(w, n0, n1, K, out.data_ptr<float>() + n0 * K, nullptr);
  });
  return out;
}

}  // namespace kvflow_quant

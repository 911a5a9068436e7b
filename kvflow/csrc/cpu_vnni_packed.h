// Weights held in a VNNI-packed layout, one kernel for any number of rows: int8 W8A8 (below), and llama.cpp's
// q8_0 and q4_0 blocks with q8 activations (further down). y = x · Wᵀ.
//
// Why: the row-major codes ran a GEMV up to 8 rows and oneDNN's int8 GEMM (at::_int_mm) above, which
// takes the weight as a plain [K, N] view and reorders it into its own blocking on every call, and
// around which the activations' quantisation and the output scaling were two more passes. On `135m`'s
// layer shapes (`kvflow bench quant-gemv --formats int8 --rows R --threads 2`, 2-core Zen 4, weights from
// memory) this kernel is 1.3-1.5x the row-major GEMV at 1 row, 2.8-3.2x at 8 rows, 1.5-1.7x oneDNN's
// int8 GEMM at 64 rows and 1.15-1.2x at 256, bit for bit the same result (docs/benchmarks.md).
//
// Layout (`kvflow/model/quant/kernels.py` packs it; one owner: `pack_int8_vnni` there):
//   codes   int8  [P][K4][kPanelCols][4]  P = ceil(N / 32) panels of 32 output columns, K4 = ceil(K / 4);
//                                         element (p, k4, c, j) = W[32p + c, 4·k4 + j], zero beyond N or K
//   sums    int32 [P · 32]                Σ_k W[n, k], zero beyond N
// one byte tensor, the sums after the codes. Each 64-byte line of a panel's k4 row is what one
// `vpdpbusd` multiplies against four activation bytes broadcast to its 16 lanes.
//
// Arithmetic: each row is rounded to int8 per token exactly as the GEMV does (quantize_token, scale
// d = max|x| / 127), shifted to unsigned (+128) because vpdpbusd multiplies unsigned by signed bytes,
// and the shift comes back out of the int32 sums through the column sums (acc − 128 · Σ_k W[n, k]).
// The int32 result is exact, so y[m, n] = (d_m · s_n) · acc, in the GEMV's order, equals the row-major
// kernels' bit for bit whatever the rows in a call.
//
// Blocking: a tile is 8 rows × 32 columns (16 int32 accumulators; GCC 12 spilled 8 × 48 tiles to the stack);
// threads split the panels, and each walks its panels once per block of kRowBlock rows, so a
// block's activation codes and a thread's panels stay in its L2.
#pragma once

#include "cpu_quant.h"

#include <type_traits>

namespace kvflow_quant {

constexpr int64_t kPanelCols = 32;  // output columns per packed panel (two zmm of int32 sums)
constexpr int64_t kTileRows = 8;
constexpr int64_t kRowBlock = 256;
// Up to kFewRows rows (decode), each thread's panels are read kPanelRuns at a time from far-apart runs
// (visit_panels), as the row-major GEMV takes its rows (RowOrder in cpu_quant.h).
constexpr int64_t kFewRows = 2;
constexpr int kPanelRuns = 4;

// The order in which a thread's panels [p0, p1) meet M rows. At most kFewRows rows (decode): RUNS far-apart
// panels at a time, as the row-major GEMV takes its rows (more cache-line misses in flight), the leftovers one
// at a time. More rows: blocks of kRowBlock rows, each over every panel in tiles of `tile_rows`, so that a
// block's activation codes and the thread's panels stay in its L2. visit(runs, m, rows, panel ids) with
// runs a std::integral_constant: the number of ids.
template <int RUNS, typename Visit>
inline void visit_panels(int64_t p0, int64_t p1, int64_t M, int64_t tile_rows, const Visit& visit) {
  if (M <= kFewRows) {
    const int64_t run = (p1 - p0) / RUNS;
    for (int64_t i = 0; i < run; ++i) {
      int64_t ids[RUNS];
      for (int r = 0; r < RUNS; ++r) ids[r] = p0 + r * run + i;
      visit(std::integral_constant<int, RUNS>{}, int64_t{0}, M, ids);
    }
    p0 += RUNS * run;
  }
  for (int64_t r0 = 0; r0 < M; r0 += kRowBlock) {
    const int64_t r1 = std::min(M, r0 + kRowBlock);
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t m = r0; m < r1; m += tile_rows)
        visit(std::integral_constant<int, 1>{}, m, std::min(tile_rows, r1 - m), &p);
  }
}

// Bytes of a packed N × K weight (codes, then the column sums).
inline int64_t vnni_packed_bytes(int64_t N, int64_t K) {
  const int64_t panels = (N + kPanelCols - 1) / kPanelCols;
  return panels * ((K + 3) / 4) * kPanelCols * 4 + panels * kPanelCols * 4;
}

inline bool int8_vnni_built() { return KVFLOW_QUANT_AVX512 != 0; }

#if KVFLOW_QUANT_AVX512
// Sixteen outputs of row m (lanes masked to the columns that exist) into fp32 or bf16.
inline void store_outputs(__m512 v, __mmask16 mask, float* f, at::BFloat16* h) {
  if (f) {
    _mm512_mask_storeu_ps(f, mask, v);
    return;
  }
#if defined(__AVX512BF16__)  // round to nearest even, as at::BFloat16 (the values are finite)
  _mm256_mask_storeu_epi16(h, mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
#else
  alignas(64) float tmp[16];
  _mm512_store_ps(tmp, v);
  for (int i = 0; i < 16; ++i)
    if (mask >> i & 1) h[i] = at::BFloat16(tmp[i]);
#endif
}

// Rows [0, MR) of `a` (unsigned codes, `lda` bytes apart) times RUNS panels at once (panel[r], whose first
// column is n0[r]), scaled into y.
template <int MR, int RUNS>
inline void vnni_tile(const uint8_t* a, int64_t lda, const int8_t* const* panel, const int32_t* const* sums,
                      const int64_t* n0, int64_t K4, const float* d, const float* s, int64_t N, float* yf,
                      at::BFloat16* yh, int64_t ldy) {
  __m512i acc[MR][2 * RUNS];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < 2 * RUNS; ++j) acc[i][j] = _mm512_setzero_si512();
  for (int64_t k4 = 0; k4 < K4; ++k4) {
    __m512i b[2 * RUNS];
#pragma GCC unroll 4
    for (int r = 0; r < RUNS; ++r) {
      b[2 * r] = _mm512_loadu_si512(panel[r] + k4 * 128);
      b[2 * r + 1] = _mm512_loadu_si512(panel[r] + k4 * 128 + 64);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      int32_t four;
      std::memcpy(&four, a + i * lda + 4 * k4, 4);
      const __m512i av = _mm512_set1_epi32(four);
#pragma GCC unroll 8
      for (int j = 0; j < 2 * RUNS; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], av, b[j]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < 2 * RUNS; ++j) {
    const int64_t n = n0[j / 2] + 16 * (j % 2);
    if (n >= N) continue;
    const __mmask16 mask = N - n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (N - n)) - 1);
    const __m512i shift = _mm512_slli_epi32(_mm512_loadu_si512(sums[j / 2] + 16 * (j % 2)), 7);  // 128 · Σ_k W
    const __m512 sv = _mm512_maskz_loadu_ps(mask, s + n);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(d[i]), sv),
                                     _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][j], shift)));
      store_outputs(v, mask, yf ? yf + i * ldy + n : nullptr, yf ? nullptr : yh + i * ldy + n);
    }
  }
}

template <int RUNS>
inline void vnni_rows(int64_t rows, const uint8_t* a, int64_t lda, const int8_t* const* panel,
                      const int32_t* const* sums, const int64_t* n0, int64_t K4, const float* d, const float* s,
                      int64_t N, float* yf, at::BFloat16* yh, int64_t ldy) {
#define KVFLOW_VNNI_TILE(R) \
  case R: return vnni_tile<R, RUNS>(a, lda, panel, sums, n0, K4, d, s, N, yf, yh, ldy);
  if constexpr (RUNS > 1) {  // kFewRows rows at most: 8 · RUNS accumulators would not fit the registers
    static_assert(kFewRows == 2, "the runs' tiles cover 1..kFewRows rows");
    switch (rows) { KVFLOW_VNNI_TILE(2) KVFLOW_VNNI_TILE(1) }
  } else {
    switch (rows) {
      KVFLOW_VNNI_TILE(8) KVFLOW_VNNI_TILE(7) KVFLOW_VNNI_TILE(6) KVFLOW_VNNI_TILE(5)
      KVFLOW_VNNI_TILE(4) KVFLOW_VNNI_TILE(3) KVFLOW_VNNI_TILE(2) KVFLOW_VNNI_TILE(1)
    }
  }
#undef KVFLOW_VNNI_TILE
  TORCH_CHECK(false, "int8_vnni_linear: a tile of ", RUNS, " panels has 1..", RUNS > 1 ? kFewRows : kTileRows,
              " rows, not ", rows);
}
#endif

// The kernels' activation codes and scales (int8: unsigned per-token codes, K padded to whole fours; GGUF: signed
// per-block codes, their scales and offset sums), kept per thread from call to call like gemm_int8's scratch.
inline ScratchBuffer& vnni_codes_scratch() {
  thread_local ScratchBuffer scratch;
  return scratch;
}

// y = x · Wᵀ (x fp32 or bf16 [M, K], y in x's dtype) for W packed as above, with fp32 row scales `scales` [N].
inline at::Tensor int8_vnni_linear(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scales,
                                   int64_t N, int64_t K) {
  TORCH_CHECK(int8_vnni_built(), "int8_vnni_linear: this build has no AVX-512 VNNI kernels");
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == K, "int8_vnni_linear: x must be [M, ", K, "]");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "int8_vnni_linear: x must be float32 or bfloat16, not ", x_in.scalar_type());
  TORCH_CHECK(packed.is_contiguous() && packed.element_size() == 1 && packed.numel() == vnni_packed_bytes(N, K),
              "int8_vnni_linear: a packed ", N, "x", K, " weight is ", vnni_packed_bytes(N, K), " contiguous bytes");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == N,
              "int8_vnni_linear: scales must be fp32 [", N, "]");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K4 = (K + 3) / 4, lda = 4 * K4, panels = (N + kPanelCols - 1) / kPanelCols;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
#if KVFLOW_QUANT_AVX512
  uint8_t* codes = static_cast<uint8_t*>(vnni_codes_scratch().fit(M * lda + 4 * M));
  float* d = reinterpret_cast<float*>(codes + M * lda);  // lda is a multiple of 4
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    std::vector<float> buf(K);
    for (int64_t m = m0; m < m1; ++m) {
      uint8_t* row = codes + m * lda;
      d[m] = quantize_token(x, m, K, buf.data(), reinterpret_cast<int8_t*>(row));
      int64_t k = 0;
      for (; k + 64 <= K; k += 64)
        _mm512_storeu_si512(row + k, _mm512_xor_si512(_mm512_loadu_si512(row + k), _mm512_set1_epi8(char(0x80))));
      for (; k < K; ++k) row[k] ^= 0x80;
      for (; k < lda; ++k) row[k] = 0x80;  // code 0 (the weights there are zero too)
    }
  });
  const int8_t* w = static_cast<const int8_t*>(packed.data_ptr());
  const int32_t* sums = reinterpret_cast<const int32_t*>(w + panels * K4 * kPanelCols * 4);
  const float* s = scales.data_ptr<float>();
  float* yf = y.scalar_type() == at::kFloat ? y.data_ptr<float>() : nullptr;
  at::BFloat16* yh = yf ? nullptr : y.data_ptr<at::BFloat16>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    visit_panels<kPanelRuns>(p0, p1, M, kTileRows, [&](auto runs, int64_t m, int64_t rows, const int64_t* ids) {
      constexpr int R = decltype(runs)::value;
      const int8_t* panel[R];
      const int32_t* sum[R];
      int64_t n0[R];
      for (int r = 0; r < R; ++r)
        panel[r] = w + ids[r] * K4 * kPanelCols * 4, sum[r] = sums + ids[r] * kPanelCols, n0[r] = ids[r] * kPanelCols;
      vnni_rows<R>(rows, codes + m * lda, lda, panel, sum, n0, K4, d + m, s, N, yf ? yf + m * N : nullptr,
                   yf ? nullptr : yh + m * N, N);
    });
  });
#endif
  return y;
}

// ----------------------------------------------------------------------------- q8_0 and q4_0, q8 activations
// llama.cpp's q8_0 and q4_0 blocks (32 codes, one fp16 scale each) multiplied as llama.cpp does it
// (activations rounded to int8 per block of 32, `--quant-activations q8`), from a packed copy of the blocks:
//   codes   q8_0: uint8 [P][K4][kPanelCols][4], W code + 128 (xor 0x80);
//           q4_0: uint8 [P][K4 / 2][kPanelCols · 4], k4 step 2t in the low nibbles and 2t + 1 in the high ones,
//                 the code as stored (0..15, the weight being code − 8)
//   scales  fp16  [P][K/32][kPanelCols]   each block's d, zero beyond N
// the same bytes as the blocks (34 or 18 per 32 weights) in another order. The codes are vpdpbusd's unsigned
// operand, so the activations stay signed and the offset (128 or 8) comes out once per row and block
// (offset · Σ of the block's activation codes), not per column. Per block each output's int32 sum is exact;
// y = Σ_b (d_w · d_a) · sum_b is accumulated in fp32 over the blocks in order with one rounding per block, so
// a row's result does not depend on the other rows of its call. Against the row-major q8 GEMV (whose lanes sum
// partial blocks in another order) it differs by fp32 rounding only.
constexpr int64_t kQ8Block = 32;

enum class GgufPacked { kQ8_0, kQ4_0 };

inline int64_t gguf_vnni_code_bytes(GgufPacked f, int64_t panels, int64_t K) {
  return panels * K * kPanelCols / (f == GgufPacked::kQ4_0 ? 2 : 1);
}

inline int64_t gguf_vnni_packed_bytes(GgufPacked f, int64_t N, int64_t K) {
  const int64_t panels = (N + kPanelCols - 1) / kPanelCols;
  return gguf_vnni_code_bytes(f, panels, K) + panels * (K / kQ8Block) * kPanelCols * 2;
}

#if KVFLOW_QUANT_AVX512
// Rows [0, MR) of `a` (signed codes, `lda` apart; `shift`/`da`: per row and block, offset · Σ codes and d)
// times RUNS panels at once, scaled into y.
template <GgufPacked F, int MR, int RUNS>
inline void gguf_vnni_tile(const int8_t* a, int64_t lda, const int32_t* shift, const float* da, int64_t blocks,
                           const uint8_t* const* panel, const uint16_t* const* scales, const int64_t* n0,
                           int64_t N, float* yf, at::BFloat16* yh, int64_t ldy) {
  __m512 out[MR][2 * RUNS];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < 2 * RUNS; ++j) out[i][j] = _mm512_setzero_ps();
  const auto multiply = [&](__m512i (&acc)[MR][2 * RUNS], const __m512i (&w)[2 * RUNS], int64_t k4) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      int32_t four;
      std::memcpy(&four, a + i * lda + 4 * k4, 4);
      const __m512i av = _mm512_set1_epi32(four);
#pragma GCC unroll 8
      for (int j = 0; j < 2 * RUNS; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], w[j], av);
    }
  };
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i acc[MR][2 * RUNS];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < 2 * RUNS; ++j) acc[i][j] = _mm512_setzero_si512();
    if constexpr (F == GgufPacked::kQ8_0) {
#pragma GCC unroll 8
      for (int64_t k4 = b * 8; k4 < b * 8 + 8; ++k4) {
        __m512i w[2 * RUNS];
#pragma GCC unroll 4
        for (int r = 0; r < RUNS; ++r) {
          w[2 * r] = _mm512_loadu_si512(panel[r] + k4 * 128);
          w[2 * r + 1] = _mm512_loadu_si512(panel[r] + k4 * 128 + 64);
        }
        multiply(acc, w, k4);
      }
    } else {
      const __m512i low = _mm512_set1_epi8(0x0F);
#pragma GCC unroll 4
      for (int64_t t = b * 4; t < b * 4 + 4; ++t) {  // two k4 steps per 128 bytes
        __m512i lo[2 * RUNS], hi[2 * RUNS];
#pragma GCC unroll 4
        for (int r = 0; r < RUNS; ++r) {
#pragma GCC unroll 2
          for (int h = 0; h < 2; ++h) {
            const __m512i raw = _mm512_loadu_si512(panel[r] + t * 128 + 64 * h);
            lo[2 * r + h] = _mm512_and_si512(raw, low);
            hi[2 * r + h] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
          }
        }
        multiply(acc, lo, 2 * t);
        multiply(acc, hi, 2 * t + 1);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < RUNS; ++r) {
      const uint16_t* d = scales[r] + b * kPanelCols;
      const __m512 dw[2] = {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d))),
                            _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + 16)))};
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m512i sh = _mm512_set1_epi32(shift[i * blocks + b]);
        const __m512 dab = _mm512_set1_ps(da[i * blocks + b]);
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h)
          out[i][2 * r + h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][2 * r + h], sh)),
                                              _mm512_mul_ps(dw[h], dab), out[i][2 * r + h]);
      }
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < 2 * RUNS; ++j) {
    const int64_t n = n0[j / 2] + 16 * (j % 2);
    if (n >= N) continue;
    const __mmask16 mask = N - n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (N - n)) - 1);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
      store_outputs(out[i][j], mask, yf ? yf + i * ldy + n : nullptr, yf ? nullptr : yh + i * ldy + n);
  }
}

template <GgufPacked F, int RUNS>
inline void gguf_vnni_rows(int64_t rows, const int8_t* a, int64_t lda, const int32_t* shift, const float* da,
                           int64_t blocks, const uint8_t* const* panel, const uint16_t* const* scales,
                           const int64_t* n0, int64_t N, float* yf, at::BFloat16* yh, int64_t ldy) {
#define KVFLOW_GGUF_TILE(R) \
  case R: return gguf_vnni_tile<F, R, RUNS>(a, lda, shift, da, blocks, panel, scales, n0, N, yf, yh, ldy);
  if constexpr (RUNS > 1) {
    switch (rows) { KVFLOW_GGUF_TILE(2) KVFLOW_GGUF_TILE(1) }
  } else {
    switch (rows) { KVFLOW_GGUF_TILE(4) KVFLOW_GGUF_TILE(3) KVFLOW_GGUF_TILE(2) KVFLOW_GGUF_TILE(1) }
  }
#undef KVFLOW_GGUF_TILE
  TORCH_CHECK(false, "gguf_vnni_linear: a tile of ", RUNS, " panels has 1..", RUNS > 1 ? 2 : 4, " rows, not ", rows);
}

// Row m of x as int8 codes per block of 32, exactly as quantize_group rounds them (d = max|x| / 127, x · (1/d)
// to nearest even): codes into q; per block d and offset · Σ codes into d_out, shift_out.
inline void quantize_blocks(const at::Tensor& x, int64_t m, int64_t K, int32_t offset, float* buf, int8_t* q,
                            float* d_out, int32_t* shift_out) {
  const float* row = row_as_fp32(x, m, K, buf);
  for (int64_t b = 0; b < K / kQ8Block; ++b) {
    const __m512 v0 = _mm512_loadu_ps(row + b * 32), v1 = _mm512_loadu_ps(row + b * 32 + 16);
    const float d = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1))) / 127.f;
    const __m512 id = _mm512_set1_ps(d > 0.f ? 1.f / d : 0.f);
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * 32), _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * 32 + 16), _mm512_cvtsepi32_epi8(q1));
    d_out[b] = d;
    shift_out[b] = offset * _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
  }
}
#endif

inline GgufPacked parse_gguf_packed(const std::string& format) {
  if (format == "q8_0") return GgufPacked::kQ8_0;
  TORCH_CHECK(format == "q4_0", "gguf_vnni_linear: VNNI-packed blocks are q8_0 or q4_0, not ", format);
  return GgufPacked::kQ4_0;
}

// y = x · Wᵀ (x fp32 or bf16 [M, K], y in x's dtype) for q8_0 or q4_0 W packed as above, activations rounded
// per block of 32.
inline at::Tensor gguf_vnni_linear(const at::Tensor& x_in, const at::Tensor& packed, const std::string& format,
                                   int64_t N, int64_t K) {
  const GgufPacked f = parse_gguf_packed(format);
  TORCH_CHECK(int8_vnni_built(), "gguf_vnni_linear: this build has no AVX-512 VNNI kernels");
  TORCH_CHECK(K % kQ8Block == 0, "gguf_vnni_linear: K must be a multiple of 32, not ", K);
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == K, "gguf_vnni_linear: x must be [M, ", K, "]");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "gguf_vnni_linear: x must be float32 or bfloat16, not ", x_in.scalar_type());
  TORCH_CHECK(packed.is_contiguous() && packed.element_size() == 1 && packed.numel() == gguf_vnni_packed_bytes(f, N, K),
              "gguf_vnni_linear: a packed ", N, "x", K, " ", format, " weight is ", gguf_vnni_packed_bytes(f, N, K),
              " contiguous bytes");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), blocks = K / kQ8Block, panels = (N + kPanelCols - 1) / kPanelCols;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
#if KVFLOW_QUANT_AVX512
  int8_t* codes = static_cast<int8_t*>(vnni_codes_scratch().fit(M * K + 8 * M * blocks));
  float* da = reinterpret_cast<float*>(codes + M * K);  // K is a multiple of 32
  int32_t* shift = reinterpret_cast<int32_t*>(da + M * blocks);
  const int32_t offset = f == GgufPacked::kQ8_0 ? 128 : 8;
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    std::vector<float> buf(K);
    for (int64_t m = m0; m < m1; ++m)
      quantize_blocks(x, m, K, offset, buf.data(), codes + m * K, da + m * blocks, shift + m * blocks);
  });
  const uint8_t* w = static_cast<const uint8_t*>(packed.data_ptr());
  const int64_t panel_bytes = gguf_vnni_code_bytes(f, 1, K);
  const uint16_t* scales = reinterpret_cast<const uint16_t*>(w + panels * panel_bytes);
  float* yf = y.scalar_type() == at::kFloat ? y.data_ptr<float>() : nullptr;
  at::BFloat16* yh = yf ? nullptr : y.data_ptr<at::BFloat16>();
  constexpr int kRuns = 2;
  constexpr int64_t kRows = 4;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    visit_panels<kRuns>(p0, p1, M, kRows, [&](auto runs, int64_t m, int64_t rows, const int64_t* ids) {
      constexpr int R = decltype(runs)::value;
      const uint8_t* panel[R];
      const uint16_t* scale[R];
      int64_t n0[R];
      for (int r = 0; r < R; ++r)
        panel[r] = w + ids[r] * panel_bytes, scale[r] = scales + ids[r] * blocks * kPanelCols, n0[r] = ids[r] * kPanelCols;
      float* of = yf ? yf + m * N : nullptr;
      at::BFloat16* oh = yf ? nullptr : yh + m * N;
      if (f == GgufPacked::kQ8_0) {
        gguf_vnni_rows<GgufPacked::kQ8_0, R>(rows, codes + m * K, K, shift + m * blocks, da + m * blocks, blocks,
                                             panel, scale, n0, N, of, oh, N);
      } else {
        gguf_vnni_rows<GgufPacked::kQ4_0, R>(rows, codes + m * K, K, shift + m * blocks, da + m * blocks, blocks,
                                             panel, scale, n0, N, of, oh, N);
      }
    });
  });
#endif
  return y;
}

}  // namespace kvflow_quant

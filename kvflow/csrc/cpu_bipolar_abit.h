// The A-bit variant of bipolar weights on the CPU (kvflow/model/quant/bipolar.py, bitplane_linear_abit):
// each activation row is rounded per token onto the odd grid too, x ≈ sx · x', x' = 2u − (2^A − 1), and
// every product is a popcount of two bit planes: per group of G weights,
//   x'·v = Σ_j Σ_i 2^(i+j) · (G − 2·popcount(a_j ⊕ b_i)) = G·(2^A − 1)(2^n − 1) − 2·Σ_j Σ_i 2^(i+j)·popcount(a_j ⊕ b_i),
// an exact integer, and y = sx · Σ_g (s_g · x'·v_g + o_g · Σ x'_g), combined in fp64 as the reference does.
// This is the paper's decomposition with nothing but XOR and population counts: 64 weights per operation
// and plane pair (`vpopcntq` over 512 bits where the CPU has AVX512-VPOPCNTDQ, eight words per step),
// so its work grows with A·n where int8's `vpdpbusd` does 64 products per instruction whatever the bits.
// Groups must be whole 64-bit words (G a multiple of 64). Every row count takes the same loop (there is no
// dequantised form of rounded activations to hand to a GEMM).
#pragma once

#include "cpu_bipolar.h"

namespace kvflow_bipolar {

// The activation rows as bit planes: u per token as the reference rounds it (fp32: x / sx, + top, / 2,
// to nearest even, clamped), planes of 64-bit words in weight order, Σ x' per group, and sx.
struct BitRows {
  int64_t rows = 0, words = 0, groups = 0, bits = 0;
  std::vector<uint64_t> planes;  // [rows, bits, words]
  std::vector<double> sums;      // [rows, groups]
  std::vector<double> scale;     // [rows]
  const uint64_t* plane(int64_t m, int64_t j) const { return planes.data() + (m * bits + j) * words; }
};

inline void quantize_bit_rows(const at::Tensor& x, const Weights& w, int64_t bits, BitRows& a) {
  const int64_t M = x.size(0), K = w.K;
  a.rows = M, a.words = K / 64, a.groups = K / w.group, a.bits = bits;
  a.planes.assign(M * bits * a.words, 0);
  a.sums.assign(M * a.groups, 0.0);
  a.scale.assign(M, 0.0);
  const int top = (1 << bits) - 1;
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<float> row(K);
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t k = 0; k < K; ++k)
        row[k] = x.scalar_type() == at::kFloat ? x.data_ptr<float>()[m * K + k]
                                               : kvflow_quant::bf16_value(reinterpret_cast<const uint16_t*>(
                                                     x.data_ptr<at::BFloat16>())[m * K + k]);
      float mx = 0.f;
      for (int64_t k = 0; k < K; ++k) mx = std::max(mx, std::fabs(row[k]));
      const float sx = mx / static_cast<float>(top), safe = sx > 0.f ? sx : 1.f;
      a.scale[m] = sx;
      for (int64_t k = 0; k < K; ++k) {
        const float t = std::nearbyint((row[k] / safe + static_cast<float>(top)) / 2.f);
        const int u = static_cast<int>(std::min(std::max(t, 0.f), static_cast<float>(top)));
        for (int64_t j = 0; j < bits; ++j)
          if ((u >> j) & 1) a.planes[(m * bits + j) * a.words + k / 64] |= uint64_t{1} << (k % 64);
        a.sums[m * a.groups + k / w.group] += 2 * u - top;
      }
    }
  });
}

// P[word] = Σ_j Σ_i 2^(i+j) · popcount(a_j ⊕ b_i) over one 64-weight word, for every word of a row pair.
inline void word_products(const BitRows& a, int64_t m, const Weights& w, int64_t n, bool vector, int64_t* P) {
#if KVFLOW_QUANT_AVX512 && defined(__AVX512VPOPCNTDQ__)
  if (vector) {
    for (int64_t w0 = 0; w0 < a.words; w0 += 8) {
      const __mmask8 mask = a.words - w0 >= 8 ? 0xFF : static_cast<__mmask8>((1u << (a.words - w0)) - 1);
      __m512i acc = _mm512_setzero_si512();
      for (int64_t i = 0; i < w.bits; ++i) {
        const __m512i b = _mm512_maskz_loadu_epi64(mask, w.plane(n, i) + w0 * 8);
        for (int64_t j = 0; j < a.bits; ++j) {
          const __m512i pc = _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_maskz_loadu_epi64(mask, a.plane(m, j) + w0), b));
          acc = _mm512_add_epi64(acc, _mm512_sll_epi64(pc, _mm_cvtsi64_si128(i + j)));
        }
      }
      _mm512_mask_storeu_epi64(P + w0, mask, acc);
    }
    return;
  }
#endif
  (void)vector;
  for (int64_t word = 0; word < a.words; ++word) {
    int64_t p = 0;
    for (int64_t i = 0; i < w.bits; ++i) {
      const uint64_t b = plane_word<uint64_t>(w.plane(n, i), word * 64);
      for (int64_t j = 0; j < a.bits; ++j) p += static_cast<int64_t>(__builtin_popcountll(a.plane(m, j)[word] ^ b)) << (i + j);
    }
    P[word] = p;
  }
}

inline bool popcount_vector_built() {
#if KVFLOW_QUANT_AVX512 && defined(__AVX512VPOPCNTDQ__)
  return true;
#else
  return false;
#endif
}

// y = x · Wᵀ with x rounded to `act_bits` (2..8) bipolar codes per token, in x's dtype. `kernel`: "auto" or
// "popcnt" (AVX512-VPOPCNTDQ, eight words a step), "scalar" (one word at a time).
inline at::Tensor bipolar_linear_abit(const at::Tensor& x_in, const at::Tensor& planes, const at::Tensor& params,
                                      int64_t N, int64_t K, int64_t bits, int64_t group, int64_t act_bits,
                                      const std::string& kernel) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == K, "bipolar_linear_abit: x must be [M, ", K, "]");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "bipolar_linear_abit: x must be float32 or bfloat16, not ", x_in.scalar_type());
  TORCH_CHECK(act_bits >= 2 && act_bits <= 8, "bipolar_linear_abit: activation bits must be in [2, 8], not ", act_bits);
  const Weights w = weights_of(planes, params, N, K, bits, group);
  TORCH_CHECK(group % 64 == 0, "bipolar_linear_abit: the popcount kernel needs groups of whole 64-bit words, not ",
              group);
  TORCH_CHECK(kernel == "auto" || kernel == "popcnt" || kernel == "scalar",
              "bipolar_linear_abit: kernel is auto, popcnt or scalar, not ", kernel);
  TORCH_CHECK(kernel != "popcnt" || popcount_vector_built(), "bipolar_linear_abit: this build has no AVX512-VPOPCNTDQ");
  const bool vector = kernel != "scalar" && popcount_vector_built();
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0);
  BitRows a;
  quantize_bit_rows(x, w, act_bits, a);
  at::Tensor y = at::empty({M, N}, x.options());
  Output out;
  out.N = N;
  if (y.scalar_type() == at::kFloat) out.f = y.data_ptr<float>(); else out.h = y.data_ptr<at::BFloat16>();
  const double full = static_cast<double>(group) * ((1 << act_bits) - 1) * ((1 << bits) - 1);
  const int64_t per_group = group / 64;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<int64_t> P(a.words);
    for (int64_t n = n0; n < n1; ++n) {
      const float* s = w.scales(n);
      const float* o = w.offsets(n);
      for (int64_t m = 0; m < M; ++m) {
        word_products(a, m, w, n, vector, P.data());
        double dots = 0.0, sums = 0.0;
        for (int64_t g = 0; g < a.groups; ++g) {
          int64_t p = 0;
          for (int64_t word = g * per_group; word < (g + 1) * per_group; ++word) p += P[word];
          dots += (full - 2.0 * static_cast<double>(p)) * static_cast<double>(s[g]);
          sums += a.sums[m * a.groups + g] * static_cast<double>(o[g]);
        }
        out.put(m, n, static_cast<float>((dots + sums) * a.scale[m]));
      }
    }
  });
  return y;
}

}  // namespace kvflow_bipolar

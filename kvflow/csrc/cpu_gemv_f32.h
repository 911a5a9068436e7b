// fp32 linear layers for steps of a few rows (included by cpu_model.cpp; `linear` and the LM head
// of `CpuForward.logits` dispatch here).
//
// Why: a decode step of a small fp32 model multiplies one row by every weight matrix, a speculative
// verification step K + 1 rows. ATen's fp32 `linear` takes MKL's GEMV for one row but its GEMM for
// two or more, which repacks the weight on every call: on `tiny` a step over 5 positions cost 3x a
// step over one, where the weights are read once either way. This kernel streams each block of four
// weight rows once (four rows read in lockstep and prefetched ahead, the weight as loaded: no copy)
// and multiplies it with up to six input rows at a time while the block is in L1.
//
// Every output row is computed the same way whatever the number of rows: sixteen-lane fused
// multiply-adds along K in order, one fixed tree of horizontal adds, then the bias. So a row's result does not
// depend on the rows beside it: a verification step's row j is bit for bit what a one-row decode
// step of the same hidden state gives (ATen's GEMV and GEMM differ in their last bits), and the
// proposals and KV of a draft do not depend on which requests share its step.

constexpr int64_t kSmallRowsF32 = 8;  // fp32 steps of at most this many rows take linear_f32

#if defined(__AVX512F__)
constexpr bool kHasLinearF32 = true;

// The sums of the sixteen lanes of each of a, b, c, d, in one vector: a tree of shuffles and adds
// shared by the four (a third of the instructions of four `_mm512_reduce_add_ps`, which at `tiny`'s
// K = 256 cost as much as the sixteen multiply-adds along a row). Each sum's order depends on its
// own lanes only.
inline __m128 sum_lanes4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // Per 128-bit lane: ab = [a0+a2, b0+b2, a1+a3, b1+b3], likewise cd.
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  // Per 128-bit lane: [a, b, c, d] summed over the lane's four elements.
  const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));
  const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1));
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd), high);
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

// Rows [m0, m0 + MR) of x times weight rows [n0, n0 + 4) (the last ones repeated past N; the caller
// stores only n < N): y = x W^T + b.
// `ahead`: a later block of four rows (contiguous, 4 K floats) to prefetch while this one runs, or
// null. The four rows are read in lockstep, 64 bytes from each in turn; the hardware prefetchers do
// not follow that pattern, so without this a weight that is not in cache streams at a third of the
// bandwidth a sequential read gets (9 vs 17-27 GB/s for `tiny`'s LM head on one Zen 4 core). Each step
// prefetches the four cache lines of `ahead` the step consumes of this block, so a block is fetched
// whole while its predecessor is multiplied.
template <int MR>
inline void linear_f32_tile(const float* x, const float* const w[4], const float* bias, float* y, int64_t K,
                            int64_t N, int64_t n0, int64_t rows, const float* ahead) {
  __m512 acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int i = 0; i < 4; ++i) acc[m][i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (ahead) {
      const float* line = ahead + 4 * k;
      for (int i = 0; i < 4; ++i) _mm_prefetch(reinterpret_cast<const char*>(line + 16 * i), _MM_HINT_T0);
    }
    const __m512 w0 = _mm512_loadu_ps(w[0] + k), w1 = _mm512_loadu_ps(w[1] + k);
    const __m512 w2 = _mm512_loadu_ps(w[2] + k), w3 = _mm512_loadu_ps(w[3] + k);
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
      acc[m][0] = _mm512_fmadd_ps(w0, xv, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(w1, xv, acc[m][1]);
      acc[m][2] = _mm512_fmadd_ps(w2, xv, acc[m][2]);
      acc[m][3] = _mm512_fmadd_ps(w3, xv, acc[m][3]);
    }
  }
  if (k < K) {  // the last K % 16 columns, masked
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1u);
    __m512 wt[4];
    for (int i = 0; i < 4; ++i) wt[i] = _mm512_maskz_loadu_ps(mask, w[i] + k);
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * K + k);
      for (int i = 0; i < 4; ++i) acc[m][i] = _mm512_fmadd_ps(wt[i], xv, acc[m][i]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    float sums[4];
    _mm_storeu_ps(sums, sum_lanes4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]));
    for (int64_t i = 0; i < rows; ++i) y[m * N + n0 + i] = bias ? sums[i] + bias[n0 + i] : sums[i];
  }
}

// x [M, K] fp32 (M at most kSmallRowsF32, any M works), weight [N, K] fp32 row-major, bias [N] or
// undefined. Returns [M, N] fp32.
at::Tensor linear_f32(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias) {
  const at::Tensor x = x_in.contiguous();
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1) && x.scalar_type() == at::kFloat &&
                  weight.scalar_type() == at::kFloat && weight.is_contiguous(),
              "linear_f32: fp32 x [M, K] and a contiguous fp32 weight [N, K]");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(!bias.defined() || (bias.numel() == N && bias.scalar_type() == at::kFloat && bias.is_contiguous()),
              "linear_f32: bias [N] fp32");
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  if (M == 0 || N == 0) return y;
  // Prefetch the block about 8 KB ahead (at least the next one).
  const int64_t blocks_ahead = std::max<int64_t>(1, 8192 / (16 * K));
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t n0 = block * 4, rows = std::min<int64_t>(4, N - n0);
      const float* w[4];
      for (int64_t i = 0; i < 4; ++i) w[i] = wp + std::min(n0 + i, N - 1) * K;
      const int64_t n_ahead = n0 + 4 * blocks_ahead;
      const float* ahead = n_ahead + 4 <= N ? wp + n_ahead * K : nullptr;
      for (int64_t m0 = 0, mr; m0 < M; m0 += mr) {
        // Up to six rows a tile (24 accumulators, four weight vectors and one input vector fit the 32
        // registers); seven or eight as 4 + 3 or 4 + 4.
        mr = M - m0 <= 6 ? M - m0 : 4;
        const float* xr = xp + m0 * K;
        float* yr = yp + m0 * N;
        switch (mr) {
          case 1: linear_f32_tile<1>(xr, w, bp, yr, K, N, n0, rows, m0 == 0 ? ahead : nullptr); break;
          case 2: linear_f32_tile<2>(xr, w, bp, yr, K, N, n0, rows, m0 == 0 ? ahead : nullptr); break;
          case 3: linear_f32_tile<3>(xr, w, bp, yr, K, N, n0, rows, m0 == 0 ? ahead : nullptr); break;
          case 4: linear_f32_tile<4>(xr, w, bp, yr, K, N, n0, rows, m0 == 0 ? ahead : nullptr); break;
          case 5: linear_f32_tile<5>(xr, w, bp, yr, K, N, n0, rows, m0 == 0 ? ahead : nullptr); break;
          default: linear_f32_tile<6>(xr, w, bp, yr, K, N, n0, rows, m0 == 0 ? ahead : nullptr); break;
        }
      }
    }
  });
  return y;
}
#else
constexpr bool kHasLinearF32 = false;

at::Tensor linear_f32(const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "linear_f32: this build has no AVX-512");
}
#endif

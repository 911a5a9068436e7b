// Greedy decoding's argmax over each row of the logits, in C++ (included by cpu_model.cpp inside its
// anonymous namespace). The LM head's output stays in its own dtype: widening bf16 to fp32 is exact
// and keeps the order, so the argmax of the bf16 row is that of its fp32 copy, and the copy (rows x
// vocab fp32, 39 MB a step for 64 rows of a 152k vocabulary, freshly mapped each time) is never
// made. torch.argmax's rule is kept: the first index of the row's maximum, a NaN counting as the
// maximum (the first NaN's index).
#pragma once

#include <cmath>

template <typename T>
inline float argmax_value(const T* x, int64_t i) { return static_cast<float>(x[i]); }

// The first NaN of a row (n: none).
template <typename T>
inline int64_t first_nan(const T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (std::isnan(argmax_value(x, i))) return i;
  return n;
}

#ifdef __AVX512F__
template <typename T>
inline __m512 argmax_load16(const T* p);
template <>
inline __m512 argmax_load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <>
inline __m512 argmax_load16<c10::BFloat16>(const c10::BFloat16* p) {  // bf16 is fp32's top half
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
#endif

template <typename T>
inline int64_t row_argmax(const T* x, int64_t n) {
  int64_t best = 0, i = 0;
  float best_value = -std::numeric_limits<float>::infinity();
  bool nan = false;
#ifdef __AVX512F__
  if (n >= 16 && n < (int64_t{1} << 31)) {
    // Lane j keeps the largest of elements j, j + 16, ... and the first index it was seen at (a later
    // equal value does not replace it), so the row's first maximum is the smallest index among the
    // lanes that hold the maximum.
    const __m512i step = _mm512_set1_epi32(16);
    __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 top = argmax_load16(x);
    __m512i top_at = at;
    __mmask16 unordered = _mm512_cmp_ps_mask(top, top, _CMP_UNORD_Q);
    for (i = 16; i + 16 <= n; i += 16) {
      at = _mm512_add_epi32(at, step);
      const __m512 v = argmax_load16(x + i);
      unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      const __mmask16 greater = _mm512_cmp_ps_mask(v, top, _CMP_GT_OQ);
      top = _mm512_mask_mov_ps(top, greater, v);
      top_at = _mm512_mask_mov_epi32(top_at, greater, at);
    }
    nan = unordered != 0;
    best_value = _mm512_reduce_max_ps(top);
    const __mmask16 holds = _mm512_cmp_ps_mask(top, _mm512_set1_ps(best_value), _CMP_EQ_OQ);
    best = _mm512_mask_reduce_min_epi32(holds, top_at);
  }
#endif
  for (; i < n; ++i) {
    const float v = argmax_value(x, i);
    if (std::isnan(v)) nan = true;
    if (v > best_value) best_value = v, best = i;  // strictly: an earlier equal maximum stays
  }
  return nan ? first_nan(x, n) : best;
}

// int64 [rows]: each row's argmax of `logits` [rows, vocab] (fp32 or bf16; other dtypes: torch's).
inline at::Tensor argmax_rows(const at::Tensor& logits_in) {
  TORCH_CHECK(logits_in.dim() == 2, "argmax_rows: logits must be [rows, vocab]");
  TORCH_CHECK(logits_in.size(1) > 0, "argmax_rows: an empty vocabulary has no argmax");
  if (logits_in.scalar_type() != at::kFloat && logits_in.scalar_type() != at::kBFloat16) return logits_in.argmax(-1);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t rows = logits.size(0), n = logits.size(1);
  at::Tensor out = at::empty({rows}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  const bool f32 = logits.scalar_type() == at::kFloat;
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      o[r] = f32 ? row_argmax(logits.data_ptr<float>() + r * n, n)
                 : row_argmax(logits.data_ptr<c10::BFloat16>() + r * n, n);
  });
  return out;
}

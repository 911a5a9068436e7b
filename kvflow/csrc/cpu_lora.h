// Multi-LoRA in the C++ CPU forward (included by cpu_model.cpp): the per-step low-rank delta of every
// projection, read in place from the slot tensors kvflow/model/lora.py owns (A [S, W, K], B [S, W, N]).
//
// Why a kernel of its own: a decode step's adapter work is tiny (W x (K + N) multiply-adds per row and
// projection) but spread over 4 projections x layers x adapters. As ATen matmuls, per run or every slot at
// once, each call's fixed cost (oneDNN's bf16 set-up) was ~170 us against ~10 us of arithmetic, a quarter
// of a 135m decode step at 8 adapters. `lora_rows` does a piece of a run (up to kLoRARowsPerTask rows of
// one slot) in one pass: the shrink t = x · A[s]ᵀ in fp32 registers, A read once for all the rows; the
// expansion t · B[s] sixteen output columns at a time, B read once for all the rows; the delta added to
// the output and rounded once. Not a standalone header: cpu_model.cpp includes it after cpu_attention.h,
// whose load16 it uses.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <vector>

// Runs longer than this (prefill chunks) take ATen's GEMMs, which amortise their set-up over many rows.
constexpr int64_t kLoRAFusedMaxRows = 48;
// The fused kernel's unit of parallel work: a run's rows in pieces of at most this many.
constexpr int64_t kLoRARowsPerTask = 8;

// Column boundaries of a projection's shards ({0, q, q + kv, q + 2 kv} for the fused qkv, {0, N} for o):
// slot tensors stack the shards' adapters, ranks [j R, (j + 1) R) of A and B belonging to shard j, whose B
// is zero outside the shard's columns (lora.py: a block-diagonal B). The kernel reads only the blocks that
// are not zero: half of a slot's B for gate_up, a third for qkv.
using LoRAShards = std::vector<int64_t>;

#if defined(__AVX512F__)
// Sixteen values stored from fp32, rounded to nearest even with NaN kept a (quiet) NaN, as c10's
// conversions do; cpu_attention.h's load16 widens them.
template <typename T>
inline void lora_store16(T* p, __m512 v);
template <>
inline void lora_store16<float>(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
template <>
inline void lora_store16<c10::BFloat16>(c10::BFloat16* p, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}
template <>
inline void lora_store16<c10::Half>(c10::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

// Rows [r0, r0 + R) of one slot; the last K % 16 and N % 16 columns in scalar code.
template <typename T, int R>
void lora_rows(const T* x, T* out, const T* as, const T* bs, int64_t r0, int64_t width, int64_t K, int64_t N,
               const LoRAShards& cols, float* t) {
  const int64_t k16 = K / 16 * 16;
  for (int64_t w = 0; w < width; ++w) {  // shrink: t[r, w] = x[r] · A[s, w]
    const T* a_row = as + w * K;
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < k16; k += 16) {
      const __m512 av = load16(a_row + k);
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(av, load16(x + (r0 + r) * K + k), acc[r]);
    }
    for (int r = 0; r < R; ++r) {
      float sum = _mm512_reduce_add_ps(acc[r]);
      for (int64_t k = k16; k < K; ++k) sum += static_cast<float>(a_row[k]) * static_cast<float>(x[(r0 + r) * K + k]);
      t[r * width + w] = sum;
    }
  }
  // expand: out[r, n:n+16] += Σ_w t[r, w] · B[s, w, n:n+16] over each shard's own ranks and columns
  const int64_t shards = static_cast<int64_t>(cols.size()) - 1, rank = width / shards;
  for (int64_t j = 0; j < shards; ++j) {
    const int64_t w0 = j * rank, c0 = cols[j], c1 = cols[j + 1], c16 = c0 + (c1 - c0) / 16 * 16;
    for (int64_t n = c0; n < c16; n += 16) {
      __m512 acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t w = w0; w < w0 + rank; ++w) {
        const __m512 bv = load16(bs + w * N + n);
        for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(t[r * width + w]), bv, acc[r]);
      }
      for (int r = 0; r < R; ++r) {
        T* o = out + (r0 + r) * N + n;
        lora_store16(o, _mm512_add_ps(load16(o), acc[r]));
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int64_t n = c16; n < c1; ++n) {
        float sum = 0.f;
        for (int64_t w = w0; w < w0 + rank; ++w) sum += t[r * width + w] * static_cast<float>(bs[w * N + n]);
        T& o = out[(r0 + r) * N + n];
        o = static_cast<T>(static_cast<float>(o) + sum);
      }
    }
  }
}
#else
// Portable: the same order of work in scalar loops the compiler may vectorise.
template <typename T, int R>
void lora_rows(const T* x, T* out, const T* as, const T* bs, int64_t r0, int64_t width, int64_t K, int64_t N,
               const LoRAShards& cols, float* t) {
  for (int r = 0; r < R; ++r) {
    const T* xr = x + (r0 + r) * K;
    for (int64_t w = 0; w < width; ++w) {
      const T* a_row = as + w * K;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < K; ++k) acc += static_cast<float>(a_row[k]) * static_cast<float>(xr[k]);
      t[r * width + w] = acc;
    }
  }
  const int64_t shards = static_cast<int64_t>(cols.size()) - 1, rank = width / shards;
  std::vector<float> delta(N);
  for (int r = 0; r < R; ++r) {
    std::fill(delta.begin(), delta.end(), 0.f);
    for (int64_t j = 0; j < shards; ++j) {  // each shard's ranks add to its own columns only
      for (int64_t w = j * rank; w < (j + 1) * rank; ++w) {
        const float tw = t[r * width + w];
        const T* b_row = bs + w * N;
#pragma omp simd
        for (int64_t n = cols[j]; n < cols[j + 1]; ++n) delta[n] += tw * static_cast<float>(b_row[n]);
      }
    }
    T* o = out + (r0 + r) * N;
    for (int64_t n = 0; n < N; ++n) o[n] = static_cast<T>(static_cast<float>(o[n]) + delta[n]);
  }
}
#endif

// A piece of a run: rows [r0, r1) of `slot`, at most kLoRARowsPerTask of them.
template <typename T>
void lora_piece(const T* x, T* out, const T* a, const T* b, int64_t slot, int64_t r0, int64_t r1, int64_t width,
                int64_t K, int64_t N, const LoRAShards& cols) {
  static_assert(kLoRARowsPerTask == 8, "lora_piece dispatches 1..8 rows");
  float t[kLoRARowsPerTask * 64 * 3];  // [rows, W]; W <= 3 shards x 64 (max_lora_rank's ceiling, checked below)
  const T* as = a + slot * width * K;
  const T* bs = b + slot * width * N;
  switch (r1 - r0) {
    case 1: lora_rows<T, 1>(x, out, as, bs, r0, width, K, N, cols, t); break;
    case 2: lora_rows<T, 2>(x, out, as, bs, r0, width, K, N, cols, t); break;
    case 3: lora_rows<T, 3>(x, out, as, bs, r0, width, K, N, cols, t); break;
    case 4: lora_rows<T, 4>(x, out, as, bs, r0, width, K, N, cols, t); break;
    case 5: lora_rows<T, 5>(x, out, as, bs, r0, width, K, N, cols, t); break;
    case 6: lora_rows<T, 6>(x, out, as, bs, r0, width, K, N, cols, t); break;
    case 7: lora_rows<T, 7>(x, out, as, bs, r0, width, K, N, cols, t); break;
    default: lora_rows<T, 8>(x, out, as, bs, r0, width, K, N, cols, t); break;
  }
}

// LoRA: out[start:end] += (x[start:end] · A[slot]ᵀ) · B[slot] for each (slot, start, end) run of `runs`
// [R, 3] int64 (`cols`: the projection's shards, LoRAShards); tokens outside every run get the base alone. Short runs (decodes) go through lora_piece,
// all of them in one parallel loop; long runs (prefill chunks) through a pair of ATen matmuls each, the
// second added by addmm_ (one op, the sum rounded once).
inline void add_lora(at::Tensor& out, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                     const at::Tensor& runs, const LoRAShards& cols) {
  if (!runs.defined() || !a.defined()) return;
  RECORD_FUNCTION("kvflow::lora", std::vector<c10::IValue>());
  TORCH_CHECK(out.is_contiguous() && x.is_contiguous() && a.is_contiguous() && b.is_contiguous() &&
                  out.scalar_type() == x.scalar_type() && a.scalar_type() == x.scalar_type() &&
                  b.scalar_type() == x.scalar_type(),
              "add_lora: contiguous out, x, A and B of one dtype");
  const int64_t width = a.size(1), K = a.size(2), N = b.size(2);
  TORCH_CHECK(cols.size() >= 2 && cols.front() == 0 && cols.back() == N && width % (cols.size() - 1) == 0,
              "add_lora: shard columns from 0 to N, the stacked rank a multiple of the shards");
  const int64_t* r = runs.data_ptr<int64_t>();
  std::vector<std::array<int64_t, 3>> tasks;  // (slot, first row, end row) of lora_piece
  for (int64_t i = 0; i < runs.size(0); ++i) {
    const int64_t slot = r[3 * i], start = r[3 * i + 1], end = r[3 * i + 2];
    if (end - start > kLoRAFusedMaxRows || width > 3 * 64) {
      const int64_t n = end - start;
      out.narrow(0, start, n).addmm_(at::mm(x.narrow(0, start, n), a[slot].t()), b[slot]);
      continue;
    }
    for (int64_t s = start; s < end; s += kLoRARowsPerTask)
      tasks.push_back({slot, s, std::min(end, s + kLoRARowsPerTask)});
  }
  if (tasks.empty()) return;
  auto run_pieces = [&](auto zero) {
    using T = decltype(zero);
    const T* xp = x.data_ptr<T>();
    T* op = out.data_ptr<T>();
    const T* ap = a.data_ptr<T>();
    const T* bp = b.data_ptr<T>();
    at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const auto& [slot, r0, r1] = tasks[i];
        lora_piece<T>(xp, op, ap, bp, slot, r0, r1, width, K, N, cols);
      }
    });
  };
  switch (x.scalar_type()) {
    case at::kFloat: run_pieces(float{}); break;
    case at::kBFloat16: run_pieces(c10::BFloat16{}); break;
    case at::kHalf: run_pieces(c10::Half{}); break;
    default: TORCH_CHECK(false, "add_lora: LoRA in the C++ forward is fp32, bf16 or fp16");
  }
}

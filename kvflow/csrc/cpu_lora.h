// Multi-LoRA in the C++ CPU forward (included by cpu_model.cpp): the per-step low-rank delta of every
// projection, read in place from the slot tensors kvflow/model/lora.py owns (A [S, W, K], B [S, W, N]).
//
// Why a kernel of its own: a decode step's adapter work is tiny (rank x (K + N) multiply-adds per row and
// projection) but spread over 4 projections x layers x adapters. As ATen matmuls, per run or every slot at
// once, each call's fixed cost (oneDNN's bf16 setup and the strided B) was ~170 us against ~10 us of
// arithmetic, a quarter of a 135m decode step at 8 adapters. `lora_rows` does a run's rows in one pass: the
// slot's A and B are widened to fp32 once per piece of a run, each row's shrink t = A x stays in fp32, the
// expansion is W contiguous axpys over the output row, and the delta is added to the output rounded once.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <array>
#include <vector>

// Runs longer than this (prefill chunks) take ATen's GEMMs, which amortise their set-up over many rows.
constexpr int64_t kLoRAFusedMaxRows = 48;
// The fused kernel's unit of parallel work: a run's rows in pieces of at most this many.
constexpr int64_t kLoRARowsPerTask = 8;

template <typename T>
inline void widen_row(const T* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// out[r] += (x[r] · A[s]ᵀ) · B[s] for rows [r0, r1): x [T, K], out [T, N], A [S, W, K], B [S, W, N]
// (contiguous), `scratch` at least W·K + W·N + K + N floats.
template <typename T>
void lora_rows(const T* x, T* out, const T* a, const T* b, int64_t slot, int64_t r0, int64_t r1, int64_t width,
               int64_t K, int64_t N, float* scratch) {
  float* aw = scratch;             // A[s] [W, K]
  float* bt = aw + width * K;      // B[s] [W, N]
  float* xr = bt + width * N;      // a row of x [K]
  float* delta = xr + K;           // a row's delta [N]
  widen_row(a + slot * width * K, aw, width * K);
  widen_row(b + slot * width * N, bt, width * N);
  std::vector<float> t(width);
  for (int64_t r = r0; r < r1; ++r) {
    widen_row(x + r * K, xr, K);
    for (int64_t w = 0; w < width; ++w) {
      const float* aw_row = aw + w * K;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < K; ++k) acc += aw_row[k] * xr[k];
      t[w] = acc;
    }
    std::fill(delta, delta + N, 0.f);
    for (int64_t w = 0; w < width; ++w) {
      const float tw = t[w];
      const float* bt_row = bt + w * N;
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) delta[n] += tw * bt_row[n];
    }
    T* o = out + r * N;
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) o[n] = static_cast<T>(static_cast<float>(o[n]) + delta[n]);
  }
}

// LoRA: out[start:end] += (x[start:end] · A[slot]ᵀ) · B[slot] for each (slot, start, end) run of `runs`
// [R, 3] int64; tokens outside every run get the base alone. Short runs (decodes) go through lora_rows,
// all of them in one parallel loop; long runs (prefill chunks) through a pair of ATen matmuls each, the
// second added by addmm_ (one op, the sum rounded once).
inline void add_lora(at::Tensor& out, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                     const at::Tensor& runs) {
  if (!runs.defined() || !a.defined()) return;
  RECORD_FUNCTION("kvflow::lora", std::vector<c10::IValue>());
  TORCH_CHECK(out.is_contiguous() && x.is_contiguous() && a.is_contiguous() && b.is_contiguous() &&
                  out.scalar_type() == x.scalar_type() && a.scalar_type() == x.scalar_type() &&
                  b.scalar_type() == x.scalar_type(),
              "add_lora: contiguous out, x, A and B of one dtype");
  const int64_t width = a.size(1), K = a.size(2), N = b.size(2);
  const int64_t* r = runs.data_ptr<int64_t>();
  std::vector<std::array<int64_t, 3>> tasks;  // (slot, first row, end row) of lora_rows
  for (int64_t i = 0; i < runs.size(0); ++i) {
    const int64_t slot = r[3 * i], start = r[3 * i + 1], end = r[3 * i + 2];
    if (end - start > kLoRAFusedMaxRows) {
      const int64_t n = end - start;
      out.narrow(0, start, n).addmm_(at::mm(x.narrow(0, start, n), a[slot].t()), b[slot]);
      continue;
    }
    for (int64_t s = start; s < end; s += kLoRARowsPerTask)
      tasks.push_back({slot, s, std::min(end, s + kLoRARowsPerTask)});
  }
  if (tasks.empty()) return;
  const int64_t scratch_floats = width * K + width * N + K + N;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_lora", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(scratch_floats);
      for (int64_t i = begin; i < end; ++i) {
        const auto& [slot, r0, r1] = tasks[i];
        lora_rows<scalar_t>(xp, op, ap, bp, slot, r0, r1, width, K, N, scratch.data());
      }
    });
  });
}

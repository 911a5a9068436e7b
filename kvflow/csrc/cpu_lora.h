// Multi-LoRA in the C++ CPU forward (included by cpu_model.cpp): the per-step low-rank delta of every
// projection, read in place from the slot tensors kvflow/model/lora.py owns (A [S, W, K], B [N, S, W]).
#pragma once

#include <torch/extension.h>
#include <ATen/record_function.h>

#include <vector>

// LoRA: out[start:end] += (x[start:end] · A[slot]ᵀ) · B[:, slot]ᵀ for each (slot, start, end) run, the very
// ops of lora.py's SlotAdapter.add, so both paths agree bit for bit. Tokens outside every run: the base alone.
// With `onehot` [T, S] (a step using many slots or runs), every slot at once: t = x · A_allᵀ viewed as
// [T, S, W] and masked to each row's slot (exact zeros elsewhere), then out += t · B_allᵀ (B is [N, S, W]).
// The second product is added by addmm_ (one op, the sum rounded once).
inline void add_lora(at::Tensor& out, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                     const at::Tensor& runs, const at::Tensor& onehot) {
  if (!runs.defined() || !a.defined()) return;
  RECORD_FUNCTION("kvflow::lora", std::vector<c10::IValue>());
  if (onehot.defined()) {
    const int64_t slots = a.size(0), width = a.size(1);
    at::Tensor t = at::mm(x, a.view({slots * width, a.size(2)}).t()).view({-1, slots, width});
    t.mul_(onehot.unsqueeze(2));
    out.addmm_(t.view({-1, slots * width}), b.view({b.size(0), slots * width}).t());
    return;
  }
  const int64_t* r = runs.data_ptr<int64_t>();
  for (int64_t i = 0; i < runs.size(0); ++i) {
    const int64_t slot = r[3 * i], start = r[3 * i + 1], n = r[3 * i + 2] - start;
    out.narrow(0, start, n).addmm_(at::mm(x.narrow(0, start, n), a[slot].t()), b.select(1, slot).t());
  }
}

// Quantised projections in the C++ forward (included by cpu_model.cpp): a layer whose linear method is
// QuantizedLinear (q8_0, q4_0, q4_k, int8, bipolar) hands the forward its codes plus a spec, and each of its
// projections runs cpu_quant.h's kernels: the decode GEMV for up to kGemvRows rows (each weight row's
// blocks streamed once, AVX-512 VNNI where the CPU has it), the dequantised-tile GEMM above. The same
// call `QuantizedLinear.apply` makes on the PyTorch modules path, so both paths compute alike.
//
// int8 weights with int8 activations (W8A8), and q8_0 / q4_0 blocks with q8 activations, come VNNI-packed where
// the CPU has it (cpu_vnni_packed.h, formats "int8-vnni", "q8_0-vnni", "q4_0-vnni"): one kernel for every number
// of rows.
// Bipolar weights (cpu_bipolar.h) run their bit-plane GEMV and dequantised-tile GEMM the same way as the block
// formats, and with A-bit activations the popcount kernel (cpu_bipolar_abit.h).
//
// How Python passes one (kvflow/model/cpu_kernels.py, `quant_slots`): per projection a `spec` tensor,
// int64 [format, N, K, q8, bits, group] (format: 0 q8_0, 1 q4_0, 2 q4_k, 3 int8, as kvflow_quant::Format,
// 4 bipolar, 5 int8-vnni, 6 q8_0-vnni, 7 q4_0-vnni; bits and group: bipolar's, 0 for the others; for bipolar, q8 holds the activation
// bits, 0 for float activations), and int8's fp32 row scales or bipolar's fp32
// [N, 2, K/G] group scales and offsets (empty for the block formats), beside the codes (bipolar: its
// planes) in the weight's own slot.
#pragma once

#include "cpu_bipolar_abit.h"
#include "cpu_vnni_packed.h"
#include "cpu_quant.h"

struct QuantProjection {
  at::Tensor codes, scales;  // codes undefined: a float projection (the forward's `linear`)
  std::string format;
  int64_t N = 0, K = 0, bits = 0, group = 0;  // bits, group: bipolar's
  bool q8 = false;  // activations rounded to int8 (llama.cpp's blocks; int8 weights: W8A8)
  int64_t act_bits = 0;  // bipolar: activations rounded to this many bits (0: float)
  bool defined() const { return codes.defined(); }
};

// The projection of `codes` described by `spec` (undefined spec: none, a float projection).
inline QuantProjection quant_projection(const at::Tensor& spec, const at::Tensor& codes, const at::Tensor& scales) {
  QuantProjection p;
  if (!spec.defined() || spec.numel() == 0) return p;
  TORCH_CHECK(spec.scalar_type() == at::kLong && spec.numel() == 6, "CpuModel: a quantised projection's spec is int64 "
              "[format, N, K, q8, bits, group]");
  const int64_t* s = spec.data_ptr<int64_t>();
  static const char* const kNames[] = {"q8_0", "q4_0", "q4_k", "int8", "bipolar", "int8-vnni", "q8_0-vnni",
                                       "q4_0-vnni"};
  TORCH_CHECK(s[0] >= 0 && s[0] < 8, "CpuModel: unknown quantised format ", s[0]);
  p.format = kNames[s[0]];
  p.N = s[1], p.K = s[2], p.q8 = s[3] != 0, p.bits = s[4], p.group = s[5];
  p.codes = codes.contiguous();
  p.scales = scales.defined() && scales.numel() > 0 ? scales.contiguous() : at::Tensor();
  if (p.format == "bipolar") {
    p.act_bits = s[3], p.q8 = false;
    TORCH_CHECK(p.scales.defined() && (p.act_bits == 0 || (p.act_bits >= 2 && p.act_bits <= 8 && p.group % 64 == 0)),
                "CpuModel: bipolar projections take their group scales and offsets, and float activations or 2..8-bit "
                "ones (groups of whole 64s)");
    kvflow_bipolar::weights_of(p.codes, p.scales, p.N, p.K, p.bits, p.group);  // checks the shapes
    return p;
  }
  if (p.format == "int8-vnni") {
    TORCH_CHECK(p.q8 && kvflow_quant::int8_vnni_built() && p.codes.element_size() == 1 &&
                    p.codes.numel() == kvflow_quant::vnni_packed_bytes(p.N, p.K) && p.scales.defined() &&
                    p.scales.scalar_type() == at::kFloat && p.scales.numel() == p.N,
                "CpuModel: VNNI-packed int8 runs W8A8 on AVX-512 VNNI, with ", kvflow_quant::vnni_packed_bytes(p.N, p.K),
                " bytes of codes and fp32 scales [N]");
    return p;
  }
  if (p.format == "q8_0-vnni" || p.format == "q4_0-vnni") {
    const auto f = kvflow_quant::parse_gguf_packed(p.format.substr(0, 4));
    TORCH_CHECK(p.q8 && kvflow_quant::int8_vnni_built() && p.K % 32 == 0 && p.codes.element_size() == 1 &&
                    p.codes.numel() == kvflow_quant::gguf_vnni_packed_bytes(f, p.N, p.K),
                "CpuModel: VNNI-packed ", p.format, " runs q8 activations on AVX-512 VNNI, with ",
                kvflow_quant::gguf_vnni_packed_bytes(f, p.N, p.K), " bytes of codes and scales");
    return p;
  }
  const kvflow_quant::Layout lay = kvflow_quant::layout(kvflow_quant::parse_format(p.format));
  TORCH_CHECK(p.K % lay.block == 0 && p.codes.element_size() == 1 && p.codes.numel() == p.N * (p.K / lay.block) * lay.bytes,
              "CpuModel: ", p.format, " codes do not hold ", p.N, " rows of ", p.K, " values");
  TORCH_CHECK(p.format != "int8" || (p.scales.defined() && p.scales.scalar_type() == at::kFloat && p.scales.numel() == p.N),
              "CpuModel: int8 codes need fp32 scales [N]");
  return p;
}

// y = x · Wᵀ + b with the quantised kernels, in x's dtype (fp32 or bf16).
inline at::Tensor quant_project(const at::Tensor& x, const QuantProjection& p, const at::Tensor& bias) {
  RECORD_FUNCTION("kvflow::quant_linear", std::vector<c10::IValue>());
  at::Tensor y;
  if (p.format == "int8-vnni") {
    y = kvflow_quant::int8_vnni_linear(x, p.codes, p.scales, p.N, p.K);
  } else if (p.format == "q8_0-vnni" || p.format == "q4_0-vnni") {
    y = kvflow_quant::gguf_vnni_linear(x, p.codes, p.format.substr(0, 4), p.N, p.K);
  } else if (p.format != "bipolar") {
    y = kvflow_quant::quant_linear(x, p.codes, p.scales, p.format, p.N, p.K, p.q8, "auto", "auto", 1024);
  } else if (p.act_bits > 0) {
    y = kvflow_bipolar::bipolar_linear_abit(x, p.codes, p.scales, p.N, p.K, p.bits, p.group, p.act_bits, "auto");
  } else {
    y = kvflow_bipolar::bipolar_linear(x, p.codes, p.scales, p.N, p.K, p.bits, p.group, "auto", "auto", 1024);
  }
  if (bias.defined()) y.add_(bias);
  return y;
}

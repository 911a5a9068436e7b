// Python bindings of kvflow's quantised-weight CPU kernels (cpu_quant.h, cpu_vnni_packed.h, cpu_bipolar.h, cpu_bipolar_abit.h), built as their own
// extension by kvflow/model/quant/kernels.py.
#include <torch/extension.h>

#include "cpu_bipolar_abit.h"
#include "cpu_vnni_packed.h"
#include "cpu_quant.h"

namespace {

at::Tensor quant_linear_op(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scales,
                           const std::string& format, int64_t N, int64_t K, const std::string& mode,
                           const std::string& path, const std::string& kernel, int64_t tile_rows) {
  TORCH_CHECK(mode == "exact" || mode == "q8", "quant_linear: mode is exact or q8, not ", mode);
  return kvflow_quant::quant_linear(x, weight, scales.value_or(at::Tensor()), format, N, K, mode == "q8", path,
                                    kernel, tile_rows);
}

at::Tensor dequantize_op(const at::Tensor& weight, const std::optional<at::Tensor>& scales, const std::string& format,
                         int64_t N, int64_t K) {
  return kvflow_quant::dequantize(weight, scales.value_or(at::Tensor()), format, N, K);
}

at::Tensor bipolar_linear_op(const at::Tensor& x, const at::Tensor& planes, const at::Tensor& params, int64_t N,
                             int64_t K, int64_t bits, int64_t group, const std::string& path, const std::string& kernel,
                             int64_t tile_rows) {
  return kvflow_bipolar::bipolar_linear(x, planes, params, N, K, bits, group, path, kernel, tile_rows);
}

at::Tensor bipolar_linear_abit_op(const at::Tensor& x, const at::Tensor& planes, const at::Tensor& params, int64_t N,
                                  int64_t K, int64_t bits, int64_t group, int64_t act_bits, const std::string& kernel) {
  return kvflow_bipolar::bipolar_linear_abit(x, planes, params, N, K, bits, group, act_bits, kernel);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quant_linear", &quant_linear_op, pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("scales"),
        pybind11::arg("format"), pybind11::arg("N"), pybind11::arg("K"), pybind11::arg("mode") = "exact",
        pybind11::arg("path") = "auto", pybind11::arg("kernel") = "auto", pybind11::arg("tile_rows") = 1024,
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("dequantize", &dequantize_op, pybind11::arg("weight"), pybind11::arg("scales"), pybind11::arg("format"),
        pybind11::arg("N"), pybind11::arg("K"));
  m.def("bipolar_linear", &bipolar_linear_op, pybind11::arg("x"), pybind11::arg("planes"), pybind11::arg("params"),
        pybind11::arg("N"), pybind11::arg("K"), pybind11::arg("bits"), pybind11::arg("group"),
        pybind11::arg("path") = "auto", pybind11::arg("kernel") = "auto", pybind11::arg("tile_rows") = 1024,
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("bipolar_linear_abit", &bipolar_linear_abit_op, pybind11::arg("x"), pybind11::arg("planes"),
        pybind11::arg("params"), pybind11::arg("N"), pybind11::arg("K"), pybind11::arg("bits"), pybind11::arg("group"),
        pybind11::arg("act_bits"), pybind11::arg("kernel") = "auto", pybind11::call_guard<pybind11::gil_scoped_release>());
  m.attr("has_vpopcntdq") = kvflow_bipolar::popcount_vector_built();
  m.def("bipolar_dequantize", &kvflow_bipolar::dequantize, pybind11::arg("planes"), pybind11::arg("params"),
        pybind11::arg("N"), pybind11::arg("K"), pybind11::arg("bits"), pybind11::arg("group"));
  m.def("int8_vnni_linear", &kvflow_quant::int8_vnni_linear, pybind11::arg("x"), pybind11::arg("packed"),
        pybind11::arg("scales"), pybind11::arg("N"), pybind11::arg("K"), pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("gguf_vnni_linear", &kvflow_quant::gguf_vnni_linear, pybind11::arg("x"), pybind11::arg("packed"),
        pybind11::arg("format"), pybind11::arg("N"), pybind11::arg("K"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.attr("has_int8_vnni") = kvflow_quant::int8_vnni_built();
  m.attr("int8_vnni_panel") = kvflow_quant::kPanelCols;
  m.attr("has_avx512") = kvflow_quant::kHasAvx512;
  m.attr("kernels") = kvflow_quant::kernels_built();
  m.attr("gemv_rows") = kvflow_quant::kGemvRows;
}

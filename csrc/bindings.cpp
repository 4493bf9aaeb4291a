// Torch binding of the CUDA NormAct (csrc/norm_act.cu), built as dsm_fast._cuda by setup.py and loaded through
// dsm_fast.cuda_ext (auto falls back quietly when it is not built; an explicit request fails with the reason).
// The row passes run in CUDA; the (B, C)-sized algebra between them (s, scale, k̄, u, coef_x) runs in ATen on
// the same stream. Formulas: csrc/norm_act.cu and kernels/norm_act.py.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <vector>

#include "norm_act.h"

namespace {

constexpr double kNormEps = 1e-5;

dsm_fast::Storage storage_of(const at::Tensor& h) {
  switch (h.scalar_type()) {
    case at::kHalf: return dsm_fast::Storage::kFloat16;
    case at::kBFloat16: return dsm_fast::Storage::kBFloat16;
    case at::kFloat: return dsm_fast::Storage::kFloat32;
    case at::kDouble: return dsm_fast::Storage::kFloat64;
    default: TORCH_CHECK(false, "norm_act: h must be float16, bfloat16, float32 or float64, got ", h.scalar_type());
  }
}

void check_inputs(const at::Tensor& h, const at::Tensor& k) {
  TORCH_CHECK(h.is_cuda() && k.is_cuda() && h.device() == k.device(), "norm_act: h and k must be on one CUDA device");
  TORCH_CHECK(h.dim() == 4 && h.is_contiguous(), "norm_act: h must be a contiguous (B, C, H, W) tensor");
  TORCH_CHECK(k.dim() == 2 && k.size(0) == h.size(0) && k.size(1) == h.size(1) && k.is_contiguous(),
              "norm_act: k must be a contiguous (B, C) tensor");
  const auto acc = h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(k.scalar_type() == acc, "norm_act: k must be float64 for float64 h, else float32");
}

// μ, v, s = sqrt(V / (v + eps) + eps) with V = mean_c v_c (no eps on V), scale = s k: (B, C) each.
std::vector<at::Tensor> statistics(const at::Tensor& h, const at::Tensor& k) {
  auto mean = at::empty({h.size(0), h.size(1)}, k.options());
  auto var = at::empty_like(mean);
  dsm_fast::launch_row_stats(storage_of(h), h.data_ptr(), mean.data_ptr(), var.data_ptr(), h.size(0) * h.size(1),
                             h.size(2) * h.size(3), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto s = at::sqrt(var.mean(1, true) / (var + kNormEps) + kNormEps);
  return {mean, var, s, s * k};
}

// z = GELU(x̂ s k); h (B, C, H, W), k = g (1 + m) (B, C).
at::Tensor norm_act_forward(const at::Tensor& h, const at::Tensor& k) {
  check_inputs(h, k);
  const c10::cuda::CUDAGuard guard(h.device());
  const auto stats = statistics(h, k);
  auto out = at::empty_like(h);
  dsm_fast::launch_forward(storage_of(h), h.data_ptr(), stats[0].data_ptr(), stats[3].data_ptr(), out.data_ptr(),
                           h.size(0) * h.size(1), h.size(2) * h.size(3), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// (h̄, k̄) = Jᵀ ḡ of norm_act_forward.
std::vector<at::Tensor> norm_act_adjoint(const at::Tensor& h, const at::Tensor& k, const at::Tensor& grad_out) {
  check_inputs(h, k);
  TORCH_CHECK(grad_out.sizes() == h.sizes() && grad_out.scalar_type() == h.scalar_type() && grad_out.is_contiguous() &&
                  grad_out.device() == h.device(),
              "norm_act_adjoint: grad_out must be contiguous, with h's shape, dtype and device");
  const c10::cuda::CUDAGuard guard(h.device());
  const auto stats = statistics(h, k);
  const auto &mean = stats[0], &var = stats[1], &s = stats[2], &scale = stats[3];
  const int64_t rows = h.size(0) * h.size(1), n = h.size(2) * h.size(3);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  auto sum_abar = at::empty_like(mean);
  auto q = at::empty_like(mean);
  dsm_fast::launch_adjoint_reduce(storage_of(h), h.data_ptr(), grad_out.data_ptr(), mean.data_ptr(), scale.data_ptr(),
                                  sum_abar.data_ptr(), q.data_ptr(), rows, n, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // w = 1 / (v + eps), u = k Q / s;  coef_x = (−V w² u + mean_c w u) / n
  auto w = (var + kNormEps).reciprocal();
  auto u = k * q / s;
  auto coef_x = ((-var.mean(1, true) * w.square() * u + (w * u).mean(1, true)) / static_cast<double>(n)).contiguous();
  auto abar_mean = (sum_abar / static_cast<double>(n)).contiguous();
  auto grad_h = at::empty_like(h);
  dsm_fast::launch_adjoint_apply(storage_of(h), h.data_ptr(), grad_out.data_ptr(), mean.data_ptr(), scale.data_ptr(),
                                 abar_mean.data_ptr(), coef_x.data_ptr(), grad_h.data_ptr(), rows, n, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_h, s * q};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("norm_act_forward", &norm_act_forward, "z = GELU(x̂ s k): h (B, C, H, W) contiguous, k = g (1 + m) (B, C)",
        pybind11::arg("h"), pybind11::arg("k"));
  m.def("norm_act_adjoint", &norm_act_adjoint, "(h̄, k̄) = Jᵀ ḡ of norm_act_forward", pybind11::arg("h"),
        pybind11::arg("k"), pybind11::arg("grad_out"));
}

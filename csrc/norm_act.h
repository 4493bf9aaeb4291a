// Launchers of the CUDA NormAct kernels (csrc/norm_act.cu), callable from host C++ without CUDA types.
// Rows are (image, channel) pairs of n contiguous positions; statistics are float, or double for float64 data.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace dsm_fast {

enum class Storage { kFloat16, kBFloat16, kFloat32, kFloat64 };

// mean, var (rows,) ← per-row mean and variance of h (rows, n).
void launch_row_stats(Storage storage, const void* h, void* mean, void* var, int64_t rows, int64_t n,
                      cudaStream_t stream);
// out = GELU((h − mean_row) · scale_row), h and out (rows, n).
void launch_forward(Storage storage, const void* h, const void* mean, const void* scale, void* out, int64_t rows,
                    int64_t n, cudaStream_t stream);
// sum_abar = Σ ā, q = Σ ā x̂ per row, with ā = ḡ GELU'(x̂ · scale), x̂ = h − mean.
void launch_adjoint_reduce(Storage storage, const void* h, const void* grad_out, const void* mean, const void* scale,
                           void* sum_abar, void* q, int64_t rows, int64_t n, cudaStream_t stream);
// grad_h = scale (ā − abar_mean) + coef_x x̂.
void launch_adjoint_apply(Storage storage, const void* h, const void* grad_out, const void* mean, const void* scale,
                          const void* abar_mean, const void* coef_x, void* grad_h, int64_t rows, int64_t n,
                          cudaStream_t stream);

}  // namespace dsm_fast

// NormAct forward and adjoint kernels in CUDA (the same math as kernels/norm_act.py; see its module docstring).
//
// Per image b and channel c (one "row" of n = H·W contiguous positions), statistics in acc_t (float, or double
// for double data):
//   x̂ = h − μ,  v = mean x̂²,  V = mean_c v_c,  w = 1 / (v + eps),  s = sqrt(V w + eps),  scale = s k,
//   k = g (1 + m)
//   forward:  z = GELU(x̂ · scale)
//   adjoint:  ā = ḡ GELU'(a),  Q = Σ ā x̂,  k̄ = s Q,  u = k Q / s,
//             h̄ = scale (ā − mean ā) + (−V w² u + mean_c w u) / n · x̂
// Row reductions: one thread block per row; elementwise passes: a grid-stride loop over all rows·n elements.
// This file needs only the CUDA toolkit; csrc/bindings.cpp does the (B, C)-sized algebra with ATen and binds it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "norm_act.h"

namespace dsm_fast {
namespace {

constexpr int kThreads = 256;

// Storage ↔ statistics conversions, explicit (torch builds with the implicit half/bf16 conversions disabled).
template <typename acc_t>
__device__ __forceinline__ acc_t load(float x) { return static_cast<acc_t>(x); }
template <typename acc_t>
__device__ __forceinline__ acc_t load(double x) { return static_cast<acc_t>(x); }
template <typename acc_t>
__device__ __forceinline__ acc_t load(__half x) { return static_cast<acc_t>(__half2float(x)); }
template <typename acc_t>
__device__ __forceinline__ acc_t load(__nv_bfloat16 x) { return static_cast<acc_t>(__bfloat162float(x)); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t store(float x);
template <>
__device__ __forceinline__ float store<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half store<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 store<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <typename scalar_t>
__device__ __forceinline__ scalar_t store(double x) { return x; }

template <typename acc_t>
__device__ __forceinline__ acc_t gelu(acc_t a) {
  return acc_t(0.5) * a * (acc_t(1) + erf(a * acc_t(0.70710678118654752440)));
}

template <typename acc_t>
__device__ __forceinline__ acc_t gelu_derivative(acc_t a) {  // Φ(a) + a φ(a)
  return acc_t(0.5) * (acc_t(1) + erf(a * acc_t(0.70710678118654752440))) +
         a * exp(acc_t(-0.5) * a * a) * acc_t(0.39894228040143267794);
}

// Sum of `value` over the block (all threads get the result). shared: kThreads entries.
template <typename acc_t>
__device__ acc_t block_sum(acc_t value, acc_t* shared) {
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  acc_t total = shared[0];
  __syncthreads();
  return total;
}

// Grid (R): h (R, n) → mean, var (R,), two passes over the row.
template <typename scalar_t, typename acc_t>
__global__ void row_stats_kernel(const scalar_t* __restrict__ h, acc_t* __restrict__ mean, acc_t* __restrict__ var,
                                 int64_t n) {
  __shared__ acc_t shared[kThreads];
  const scalar_t* row = h + blockIdx.x * n;
  acc_t total = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) total += load<acc_t>(row[i]);
  const acc_t mu = block_sum(total, shared) / static_cast<acc_t>(n);
  acc_t squares = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const acc_t centred = load<acc_t>(row[i]) - mu;
    squares += centred * centred;
  }
  const acc_t v = block_sum(squares, shared) / static_cast<acc_t>(n);
  if (threadIdx.x == 0) {
    mean[blockIdx.x] = mu;
    var[blockIdx.x] = v;
  }
}

// out = GELU((h − μ_row) · scale_row) over all R·n elements.
template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ h, const acc_t* __restrict__ mean,
                               const acc_t* __restrict__ scale, scalar_t* __restrict__ out, int64_t n, int64_t total) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / n;
    out[i] = store<scalar_t>(gelu((load<acc_t>(h[i]) - mean[row]) * scale[row]));
  }
}

// Grid (R): Σ ā and Q = Σ ā x̂ per row.
template <typename scalar_t, typename acc_t>
__global__ void adjoint_reduce_kernel(const scalar_t* __restrict__ h, const scalar_t* __restrict__ grad_out,
                                      const acc_t* __restrict__ mean, const acc_t* __restrict__ scale,
                                      acc_t* __restrict__ sum_abar, acc_t* __restrict__ q, int64_t n) {
  __shared__ acc_t shared[kThreads];
  const int64_t offset = blockIdx.x * n;
  const acc_t mu = mean[blockIdx.x], sc = scale[blockIdx.x];
  acc_t total = 0, moment = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const acc_t xhat = load<acc_t>(h[offset + i]) - mu;
    const acc_t abar = load<acc_t>(grad_out[offset + i]) * gelu_derivative(xhat * sc);
    total += abar;
    moment += abar * xhat;
  }
  total = block_sum(total, shared);
  moment = block_sum(moment, shared);
  if (threadIdx.x == 0) {
    sum_abar[blockIdx.x] = total;
    q[blockIdx.x] = moment;
  }
}

// h̄ = scale (ā − mean ā) + coef_x x̂ over all R·n elements.
template <typename scalar_t, typename acc_t>
__global__ void adjoint_apply_kernel(const scalar_t* __restrict__ h, const scalar_t* __restrict__ grad_out,
                                     const acc_t* __restrict__ mean, const acc_t* __restrict__ scale,
                                     const acc_t* __restrict__ abar_mean, const acc_t* __restrict__ coef_x,
                                     scalar_t* __restrict__ grad_h, int64_t n, int64_t total) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / n;
    const acc_t xhat = load<acc_t>(h[i]) - mean[row];
    const acc_t abar = load<acc_t>(grad_out[i]) * gelu_derivative(xhat * scale[row]);
    grad_h[i] = store<scalar_t>(scale[row] * (abar - abar_mean[row]) + coef_x[row] * xhat);
  }
}

int elementwise_blocks(int64_t total) {
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>((total + kThreads - 1) / kThreads, 1), 65535));
}

// Calls fn(scalar_t{}, acc_t{}) with the storage and statistics types of `storage`.
template <typename Fn>
void dispatch(Storage storage, Fn fn) {
  switch (storage) {
    case Storage::kFloat16: fn(__half{}, float{}); break;
    case Storage::kBFloat16: fn(__nv_bfloat16{}, float{}); break;
    case Storage::kFloat32: fn(float{}, float{}); break;
    case Storage::kFloat64: fn(double{}, double{}); break;
  }
}

}  // namespace

void launch_row_stats(Storage storage, const void* h, void* mean, void* var, int64_t rows, int64_t n,
                      cudaStream_t stream) {
  dispatch(storage, [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    row_stats_kernel<scalar_t, acc_t><<<rows, kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(h), static_cast<acc_t*>(mean), static_cast<acc_t*>(var), n);
  });
}

void launch_forward(Storage storage, const void* h, const void* mean, const void* scale, void* out, int64_t rows,
                    int64_t n, cudaStream_t stream) {
  dispatch(storage, [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    forward_kernel<scalar_t, acc_t><<<elementwise_blocks(rows * n), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(h), static_cast<const acc_t*>(mean), static_cast<const acc_t*>(scale),
        static_cast<scalar_t*>(out), n, rows * n);
  });
}

void launch_adjoint_reduce(Storage storage, const void* h, const void* grad_out, const void* mean, const void* scale,
                           void* sum_abar, void* q, int64_t rows, int64_t n, cudaStream_t stream) {
  dispatch(storage, [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    adjoint_reduce_kernel<scalar_t, acc_t><<<rows, kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(h), static_cast<const scalar_t*>(grad_out), static_cast<const acc_t*>(mean),
        static_cast<const acc_t*>(scale), static_cast<acc_t*>(sum_abar), static_cast<acc_t*>(q), n);
  });
}

void launch_adjoint_apply(Storage storage, const void* h, const void* grad_out, const void* mean, const void* scale,
                          const void* abar_mean, const void* coef_x, void* grad_h, int64_t rows, int64_t n,
                          cudaStream_t stream) {
  dispatch(storage, [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    adjoint_apply_kernel<scalar_t, acc_t><<<elementwise_blocks(rows * n), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(h), static_cast<const scalar_t*>(grad_out), static_cast<const acc_t*>(mean),
        static_cast<const acc_t*>(scale), static_cast<const acc_t*>(abar_mean), static_cast<const acc_t*>(coef_x),
        static_cast<scalar_t*>(grad_h), n, rows * n);
  });
}

}  // namespace dsm_fast

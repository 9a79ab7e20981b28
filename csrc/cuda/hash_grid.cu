// SPDX-License-Identifier: Apache-2.0
// CUDA launches of the hash-grid encoding: one thread per (point, level). Per-point code:
// csrc/include/fastdream/hash_grid.h (the table gradient accumulates with atomicAdd there).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <type_traits>

#include "fastdream/hash_grid.h"
#include "fastdream/ops.h"

namespace fastdream {

namespace {
constexpr int kThreads = 256;
constexpr int kMaxLevels = 32;

struct Levels {
  HashLevel lv[kMaxLevels];
  int count;
};

Levels make_levels_cuda(const std::vector<int64_t>& resolutions, int64_t table_size) {
  TORCH_CHECK(resolutions.size() >= 1 && resolutions.size() <= kMaxLevels, "hash grid (CUDA): 1 to ", kMaxLevels,
              " levels");
  Levels out{};
  out.count = static_cast<int>(resolutions.size());
  for (size_t l = 0; l < resolutions.size(); ++l) {
    const int64_t r = resolutions[l];
    TORCH_CHECK(r >= 1 && r < 65536, "hash grid: resolution out of range: ", r);
    out.lv[l] = HashLevel{static_cast<int>(r), (r + 1) * (r + 1) * (r + 1) <= table_size};
  }
  return out;
}

int blocks_for(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

// Thread t handles point t / L at level t % L: neighbouring threads read neighbouring table slices' rows of
// the same point (the points are the coalesced dimension of the outputs).
template <typename T>
__global__ void forward_kernel(int64_t n, Levels levels, const T* __restrict__ x, const T* __restrict__ table,
                               int64_t S, int F, T bound, T* __restrict__ enc, T* __restrict__ jac) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int L = levels.count;
  if (t >= n * L) return;
  const int64_t i = t / L;
  const int l = static_cast<int>(t % L);
  T u[3], du[3];
  hash_point(x + 3 * i, bound, u, du);
  hash_level_forward(u, du, levels.lv[l], table + l * S * F, F, static_cast<uint32_t>(S - 1), enc + (i * L + l) * F,
                     jac != nullptr ? jac + (i * L + l) * F * 3 : nullptr);
}

template <typename T>
__global__ void backward_table_kernel(int64_t n, Levels levels, const T* __restrict__ x, int64_t S, int F, T bound,
                                      const T* __restrict__ grad_enc, const T* __restrict__ grad_jac,
                                      T* __restrict__ grad_table) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int L = levels.count;
  if (t >= n * L) return;
  const int64_t i = t / L;
  const int l = static_cast<int>(t % L);
  T u[3], du[3];
  hash_point(x + 3 * i, bound, u, du);
  hash_level_backward_table(u, du, levels.lv[l], F, static_cast<uint32_t>(S - 1),
                            grad_enc != nullptr ? grad_enc + (i * L + l) * F : nullptr,
                            grad_jac != nullptr ? grad_jac + (i * L + l) * F * 3 : nullptr, grad_table + l * S * F);
}

// float32 tables with F = 2 (the default): the two features of a vertex are one 8-byte word. The forward reads
// them with one float2 load, the backward adds them with one float2 atomic on sm_90+ (CUDA 12.1+: half the
// atomic operations of two scalar ones; each component is still an fp32 add, so results are unchanged up to
// the order of additions, which atomics leave free anyway). Used only when the pointers are 8-byte aligned.
__device__ __forceinline__ void atomic_add_float2(float* p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b));
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
#endif
}

__global__ void forward_f2_kernel(int64_t n, Levels levels, const float* __restrict__ x,
                                  const float* __restrict__ table, int64_t S, float bound, float* __restrict__ enc) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int L = levels.count;
  if (t >= n * L) return;
  const int64_t i = t / L;
  const int l = static_cast<int>(t % L);
  float u[3], du[3];
  hash_point(x + 3 * i, bound, u, du);
  uint32_t idx[8];
  float w[8];
  hash_level_cell<float>(u, levels.lv[l].res, levels.lv[l].dense, static_cast<uint32_t>(S - 1), idx, w, nullptr);
  const float2* table_l = reinterpret_cast<const float2*>(table + l * S * 2);
  float e0 = 0.f, e1 = 0.f;
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const float2 v = __ldg(table_l + idx[c]);
    e0 += w[c] * v.x;
    e1 += w[c] * v.y;
  }
  float* out = enc + (i * L + l) * 2;
  out[0] = e0;
  out[1] = e1;
}

__global__ void backward_table_f2_kernel(int64_t n, Levels levels, const float* __restrict__ x, int64_t S, float bound,
                                         const float* __restrict__ grad_enc, const float* __restrict__ grad_jac,
                                         float* __restrict__ grad_table) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int L = levels.count;
  if (t >= n * L) return;
  const int64_t i = t / L;
  const int l = static_cast<int>(t % L);
  float u[3], du[3];
  hash_point(x + 3 * i, bound, u, du);
  const HashLevel lv = levels.lv[l];
  uint32_t idx[8];
  float w[8], dw[8][3];
  hash_level_cell<float>(u, lv.res, lv.dense, static_cast<uint32_t>(S - 1), idx, w, grad_jac != nullptr ? dw : nullptr);
  float g0 = 0.f, g1 = 0.f;
  if (grad_enc != nullptr) {
    g0 = grad_enc[(i * L + l) * 2 + 0];
    g1 = grad_enc[(i * L + l) * 2 + 1];
  }
  float j[6] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (grad_jac != nullptr) {
    const float r = static_cast<float>(lv.res);
    const float* gj = grad_jac + (i * L + l) * 6;
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      j[k] = gj[k] * r * du[k];
      j[3 + k] = gj[3 + k] * r * du[k];
    }
  }
  float* grad_l = grad_table + l * S * 2;
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    float a = w[c] * g0, b = w[c] * g1;
    if (grad_jac != nullptr) {
      a += dw[c][0] * j[0] + dw[c][1] * j[1] + dw[c][2] * j[2];
      b += dw[c][0] * j[3] + dw[c][1] * j[4] + dw[c][2] * j[5];
    }
    if (a != 0.f || b != 0.f) atomic_add_float2(grad_l + static_cast<int64_t>(idx[c]) * 2, a, b);
  }
}

bool aligned8(const void* p) { return reinterpret_cast<uintptr_t>(p) % 8 == 0; }

template <typename T>
__global__ void backward_x_kernel(int64_t n, Levels levels, const T* __restrict__ x, const T* __restrict__ table,
                                  int64_t S, int F, T bound, const T* __restrict__ grad, T* __restrict__ grad_x) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const int L = levels.count;
  T u[3], du[3], g[3] = {T(0), T(0), T(0)};
  hash_point(x + 3 * i, bound, u, du);
  for (int l = 0; l < L; ++l) {
    hash_level_backward_x(u, du, levels.lv[l], table + l * S * F, F, static_cast<uint32_t>(S - 1),
                          grad + (i * L + l) * F, g);
  }
  grad_x[3 * i + 0] = g[0];
  grad_x[3 * i + 1] = g[1];
  grad_x[3 * i + 2] = g[2];
}
}  // namespace

torch::Tensor hash_encode_forward_cuda(torch::Tensor x, torch::Tensor table, std::vector<int64_t> resolutions,
                                       double bound) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Levels lv = make_levels_cuda(resolutions, table.size(1));
  const int64_t n = x.size(0), S = table.size(1), F = table.size(2);
  auto enc = torch::empty({n, lv.count * F}, x.options());
  if (n == 0) return enc;
  if (x.scalar_type() == torch::kFloat && F == 2 && aligned8(table.data_ptr())) {
    forward_f2_kernel<<<blocks_for(n * lv.count), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        n, lv, x.data_ptr<float>(), table.data_ptr<float>(), S, static_cast<float>(bound), enc.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return enc;
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hash_encode_forward_cuda", [&] {
    forward_kernel<scalar_t><<<blocks_for(n * lv.count), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        n, lv, x.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(), S, static_cast<int>(F), static_cast<scalar_t>(bound),
        enc.data_ptr<scalar_t>(), nullptr);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return enc;
}

std::tuple<torch::Tensor, torch::Tensor> hash_encode_jacobian_forward_cuda(torch::Tensor x, torch::Tensor table,
                                                                           std::vector<int64_t> resolutions,
                                                                           double bound) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Levels lv = make_levels_cuda(resolutions, table.size(1));
  const int64_t n = x.size(0), S = table.size(1), F = table.size(2);
  auto enc = torch::empty({n, lv.count * F}, x.options());
  auto jac = torch::empty({n, lv.count * F, 3}, x.options());
  if (n == 0) return {enc, jac};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hash_encode_jacobian_forward_cuda", [&] {
    forward_kernel<scalar_t><<<blocks_for(n * lv.count), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        n, lv, x.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(), S, static_cast<int>(F), static_cast<scalar_t>(bound),
        enc.data_ptr<scalar_t>(), jac.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {enc, jac};
}

std::tuple<torch::Tensor, torch::Tensor> hash_encode_backward_cuda(torch::Tensor grad, torch::Tensor x,
                                                                   torch::Tensor table,
                                                                   std::vector<int64_t> resolutions, double bound,
                                                                   bool need_x) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Levels lv = make_levels_cuda(resolutions, table.size(1));
  const int64_t n = x.size(0), S = table.size(1), F = table.size(2);
  auto grad_table = torch::zeros_like(table);
  auto grad_x = torch::zeros_like(x);
  if (n == 0) return {grad_table, grad_x};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hash_encode_backward_cuda", [&] {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (F == 2) {
        backward_table_f2_kernel<<<blocks_for(n * lv.count), kThreads, 0, stream>>>(
            n, lv, x.data_ptr<float>(), S, static_cast<float>(bound), grad.data_ptr<float>(), nullptr,
            grad_table.data_ptr<float>());
      }
    }
    if (!(std::is_same_v<scalar_t, float> && F == 2)) {
      backward_table_kernel<scalar_t><<<blocks_for(n * lv.count), kThreads, 0, stream>>>(
          n, lv, x.data_ptr<scalar_t>(), S, static_cast<int>(F), static_cast<scalar_t>(bound),
          grad.data_ptr<scalar_t>(), nullptr, grad_table.data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (need_x) {
      backward_x_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
          n, lv, x.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(), S, static_cast<int>(F),
          static_cast<scalar_t>(bound), grad.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_table, grad_x};
}

torch::Tensor hash_encode_jacobian_backward_cuda(torch::Tensor grad_enc, torch::Tensor grad_jac, torch::Tensor x,
                                                 std::vector<int64_t> resolutions, double bound, int64_t table_size) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Levels lv = make_levels_cuda(resolutions, table_size);
  const int64_t n = x.size(0), F = grad_enc.size(1) / lv.count;
  auto grad_table = torch::zeros({lv.count, table_size, F}, x.options());
  if (n == 0) return grad_table;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hash_encode_jacobian_backward_cuda", [&] {
    auto stream = at::cuda::getCurrentCUDAStream();
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (F == 2) {
        backward_table_f2_kernel<<<blocks_for(n * lv.count), kThreads, 0, stream>>>(
            n, lv, x.data_ptr<float>(), table_size, static_cast<float>(bound), grad_enc.data_ptr<float>(),
            grad_jac.data_ptr<float>(), grad_table.data_ptr<float>());
      }
    }
    if (!(std::is_same_v<scalar_t, float> && F == 2)) {
      backward_table_kernel<scalar_t><<<blocks_for(n * lv.count), kThreads, 0, stream>>>(
          n, lv, x.data_ptr<scalar_t>(), table_size, static_cast<int>(F), static_cast<scalar_t>(bound),
          grad_enc.data_ptr<scalar_t>(), grad_jac.data_ptr<scalar_t>(), grad_table.data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_table;
}

}  // namespace fastdream

// SPDX-License-Identifier: Apache-2.0
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "fastdream/ops.h"
#include "fastdream/shading.h"

namespace fastdream {

namespace {
constexpr int kThreads = 256;

// light, ambient and diffuse packed as 9 floats on the device: read by every thread, never copied to the
// host (no synchronisation per call).
struct Lights {
  const float* p;
};

Lights lights_of(const torch::Tensor& light, const torch::Tensor& ambient, const torch::Tensor& diffuse,
                 torch::Tensor& keep) {
  keep = torch::cat({light.reshape(-1), ambient.reshape(-1), diffuse.reshape(-1)}).contiguous();
  return Lights{keep.data_ptr<float>()};
}

__global__ void shade_forward_kernel(int64_t n, const float* __restrict__ rho, const float* __restrict__ nor,
                                     const float* __restrict__ pos, Lights L, int mode, float* __restrict__ out) {
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  shade_forward_one(load_vec3(rho + 3 * i), load_vec3(nor + 3 * i), load_vec3(pos + 3 * i), load_vec3(L.p),
                    load_vec3(L.p + 3), load_vec3(L.p + 6), mode, out + 3 * i);
}

__global__ void shade_backward_kernel(int64_t n, const float* __restrict__ g, const float* __restrict__ rho,
                                      const float* __restrict__ nor, const float* __restrict__ pos, Lights L, int mode,
                                      float* __restrict__ g_rho, float* __restrict__ g_n) {
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  shade_backward_one(load_vec3(g + 3 * i), load_vec3(rho + 3 * i), load_vec3(nor + 3 * i), load_vec3(pos + 3 * i),
                     load_vec3(L.p), load_vec3(L.p + 3), load_vec3(L.p + 6), mode, g_rho + 3 * i, g_n + 3 * i);
}

int blocks_for(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }
}  // namespace

torch::Tensor shade_forward_cuda(torch::Tensor albedo, torch::Tensor normals, torch::Tensor positions,
                                 torch::Tensor light, torch::Tensor ambient, torch::Tensor diffuse, int64_t mode) {
  const c10::cuda::CUDAGuard guard(albedo.device());
  auto out = torch::empty_like(albedo);
  const int64_t n = albedo.size(0);
  if (n == 0) return out;
  torch::Tensor keep;
  Lights L = lights_of(light, ambient, diffuse, keep);
  shade_forward_kernel<<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      n, albedo.data_ptr<float>(), normals.data_ptr<float>(), positions.data_ptr<float>(), L, static_cast<int>(mode),
      out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<torch::Tensor, torch::Tensor> shade_backward_cuda(torch::Tensor grad, torch::Tensor albedo,
                                                             torch::Tensor normals, torch::Tensor positions,
                                                             torch::Tensor light, torch::Tensor ambient,
                                                             torch::Tensor diffuse, int64_t mode) {
  const c10::cuda::CUDAGuard guard(albedo.device());
  auto g_rho = torch::empty_like(albedo);
  auto g_n = torch::empty_like(normals);
  const int64_t n = albedo.size(0);
  if (n == 0) return {g_rho, g_n};
  torch::Tensor keep;
  Lights L = lights_of(light, ambient, diffuse, keep);
  shade_backward_kernel<<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      n, grad.data_ptr<float>(), albedo.data_ptr<float>(), normals.data_ptr<float>(), positions.data_ptr<float>(), L,
      static_cast<int>(mode), g_rho.data_ptr<float>(), g_n.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {g_rho, g_n};
}

}  // namespace fastdream

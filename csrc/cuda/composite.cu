// SPDX-License-Identifier: Apache-2.0
// Compositing on the GPU: one thread per ray, forward and backward; the per-ray code in fastdream/composite.h.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "fastdream/composite.h"
#include "fastdream/ops.h"

namespace fastdream {

namespace {
constexpr int kThreads = 128;

__global__ void composite_forward_kernel(int64_t n_rays, int64_t n_samples, int channels,
                                         const int64_t* __restrict__ offsets, const float* __restrict__ sigmas,
                                         const float* __restrict__ colors, const float* __restrict__ t_starts,
                                         const float* __restrict__ t_ends, float eps, float* __restrict__ color,
                                         float* __restrict__ opacity, float* __restrict__ depth,
                                         float* __restrict__ weights) {
  int64_t ray = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (ray >= n_rays) return;
  int64_t b, e;
  ray_range(offsets, ray, n_samples, &b, &e);
  composite_forward_ray(b, e, channels, sigmas, colors, t_starts, t_ends, eps, color + ray * channels, opacity + ray,
                        depth + ray, weights);
}

__global__ void composite_backward_kernel(int64_t n_rays, int64_t n_samples, int channels,
                                          const int64_t* __restrict__ offsets, const float* __restrict__ grad_color,
                                          const float* __restrict__ grad_opacity, const float* __restrict__ grad_depth,
                                          const float* __restrict__ grad_weights, const float* __restrict__ sigmas,
                                          const float* __restrict__ colors, const float* __restrict__ t_starts,
                                          const float* __restrict__ t_ends, float eps, const float* __restrict__ color,
                                          const float* __restrict__ opacity, const float* __restrict__ depth,
                                          const float* __restrict__ weights, float* __restrict__ g_sigmas,
                                          float* __restrict__ g_colors) {
  int64_t ray = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (ray >= n_rays) return;
  int64_t b, e;
  ray_range(offsets, ray, n_samples, &b, &e);
  composite_backward_ray(b, e, channels, grad_color + ray * channels, grad_opacity[ray], grad_depth[ray], grad_weights,
                         sigmas, colors, t_starts, t_ends, eps, color + ray * channels, opacity[ray], depth[ray],
                         weights, g_sigmas, g_colors);
}

int blocks_for(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }
}  // namespace

std::vector<torch::Tensor> composite_forward_cuda(torch::Tensor sigmas, torch::Tensor colors, torch::Tensor t_starts,
                                                  torch::Tensor t_ends, torch::Tensor offsets, double early_stop_eps) {
  const c10::cuda::CUDAGuard guard(sigmas.device());
  const int64_t r = offsets.numel() - 1, s = sigmas.numel();
  const int ch = static_cast<int>(colors.size(1));
  auto color = torch::empty({r, ch}, sigmas.options());
  auto opacity = torch::empty({r}, sigmas.options());
  auto depth = torch::empty({r}, sigmas.options());
  auto weights = torch::zeros({s}, sigmas.options());  // zeros: samples outside every ray range
  if (r == 0) return {color, opacity, depth, weights};
  composite_forward_kernel<<<blocks_for(r), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      r, s, ch, offsets.data_ptr<int64_t>(), sigmas.data_ptr<float>(), colors.data_ptr<float>(),
      t_starts.data_ptr<float>(), t_ends.data_ptr<float>(), static_cast<float>(early_stop_eps), color.data_ptr<float>(),
      opacity.data_ptr<float>(), depth.data_ptr<float>(), weights.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {color, opacity, depth, weights};
}

std::vector<torch::Tensor> composite_backward_cuda(torch::Tensor grad_color, torch::Tensor grad_opacity,
                                                   torch::Tensor grad_depth, torch::Tensor grad_weights,
                                                   torch::Tensor sigmas, torch::Tensor colors, torch::Tensor t_starts,
                                                   torch::Tensor t_ends, torch::Tensor offsets, torch::Tensor color,
                                                   torch::Tensor opacity, torch::Tensor depth, torch::Tensor weights,
                                                   double early_stop_eps) {
  const c10::cuda::CUDAGuard guard(sigmas.device());
  const int64_t r = offsets.numel() - 1, s = sigmas.numel();
  const int ch = static_cast<int>(colors.size(1));
  auto g_sigmas = torch::zeros_like(sigmas);
  auto g_colors = torch::zeros_like(colors);
  if (r == 0) return {g_sigmas, g_colors};
  composite_backward_kernel<<<blocks_for(r), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      r, s, ch, offsets.data_ptr<int64_t>(), grad_color.data_ptr<float>(), grad_opacity.data_ptr<float>(),
      grad_depth.data_ptr<float>(), grad_weights.data_ptr<float>(), sigmas.data_ptr<float>(), colors.data_ptr<float>(),
      t_starts.data_ptr<float>(), t_ends.data_ptr<float>(), static_cast<float>(early_stop_eps), color.data_ptr<float>(),
      opacity.data_ptr<float>(), depth.data_ptr<float>(), weights.data_ptr<float>(), g_sigmas.data_ptr<float>(),
      g_colors.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {g_sigmas, g_colors};
}

}  // namespace fastdream

// SPDX-License-Identifier: Apache-2.0
// Ray marching on the GPU: a counting kernel, an exclusive prefix sum on the device, one read of the total to
// allocate (the only host round-trip), a filling kernel. One thread per ray; the per-ray code in
// fastdream/raymarch.h.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "fastdream/ops.h"
#include "fastdream/raymarch.h"

namespace fastdream {

namespace {
constexpr int kThreads = 128;

__global__ void march_count_kernel(int64_t n_rays, const float* __restrict__ o, const float* __restrict__ d,
                                   const float* __restrict__ u, MarchParams p, int64_t* __restrict__ counts) {
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n_rays) return;
  counts[i] = march_one<false>(i, load_vec3(o + 3 * i), load_vec3(d + 3 * i), u[i], p, MarchOutput{}, 0);
}

__global__ void march_fill_kernel(int64_t n_rays, const float* __restrict__ o, const float* __restrict__ d,
                                  const float* __restrict__ u, MarchParams p, const int64_t* __restrict__ offsets,
                                  MarchOutput out) {
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n_rays || offsets[i + 1] == offsets[i]) return;
  march_one<true>(i, load_vec3(o + 3 * i), load_vec3(d + 3 * i), u[i], p, out, offsets[i]);
}

int blocks_for(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }
}  // namespace

std::vector<torch::Tensor> march_rays_cuda(torch::Tensor rays_o, torch::Tensor rays_d, torch::Tensor jitter,
                                           torch::Tensor occupied, int64_t grid_resolution, double grid_scale,
                                           double grid_bound, double step, double cone_angle, double max_step,
                                           int64_t max_samples, double bound) {
  const c10::cuda::CUDAGuard guard(rays_o.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const MarchParams p = make_march_params(occupied_ptr(occupied), grid_resolution, grid_scale, grid_bound, step,
                                          cone_angle, max_step, max_samples, bound);
  const int64_t r = rays_o.size(0);
  auto iopts = rays_o.options().dtype(torch::kInt64);
  auto offsets = torch::zeros({r + 1}, iopts);
  int64_t total = 0;
  if (r > 0) {
    auto counts = torch::empty({r}, iopts);
    march_count_kernel<<<blocks_for(r), kThreads, 0, stream>>>(r, rays_o.data_ptr<float>(), rays_d.data_ptr<float>(),
                                                               jitter.data_ptr<float>(), p, counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    offsets.narrow(0, 1, r).copy_(counts.cumsum(0));
    total = offsets[r].item<int64_t>();  // the one host round-trip: the output size
  }
  auto fopts = rays_o.options();
  auto ray_indices = torch::empty({total}, iopts);
  auto t_starts = torch::empty({total}, fopts);
  auto t_ends = torch::empty({total}, fopts);
  auto positions = torch::empty({total, 3}, fopts);
  auto directions = torch::empty({total, 3}, fopts);
  if (total > 0) {
    const MarchOutput out{ray_indices.data_ptr<int64_t>(), t_starts.data_ptr<float>(), t_ends.data_ptr<float>(),
                          positions.data_ptr<float>(), directions.data_ptr<float>()};
    march_fill_kernel<<<blocks_for(r), kThreads, 0, stream>>>(r, rays_o.data_ptr<float>(), rays_d.data_ptr<float>(),
                                                              jitter.data_ptr<float>(), p, offsets.data_ptr<int64_t>(),
                                                              out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {ray_indices, t_starts, t_ends, positions, directions, offsets};
}

}  // namespace fastdream

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
  march_fill_one(i, load_vec3(o + 3 * i), load_vec3(d + 3 * i), u[i], p, offsets, out);
}

int blocks_for(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

// The first pass and the prefix sum, on the device: offsets[r + 1] = samples of rays 0..r (offsets[0] stays 0).
void count_into_offsets(const torch::Tensor& o, const torch::Tensor& d, const torch::Tensor& u, const MarchParams& p,
                        torch::Tensor& offsets, cudaStream_t stream) {
  const int64_t r = o.size(0);
  auto counts = torch::empty({r}, offsets.options());
  march_count_kernel<<<blocks_for(r), kThreads, 0, stream>>>(r, o.data_ptr<float>(), d.data_ptr<float>(),
                                                             u.data_ptr<float>(), p, counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  offsets.narrow(0, 1, r).copy_(counts.cumsum(0));
}

// The second pass: each ray's samples at out[offsets[ray]...offsets[ray + 1]).
void fill_samples(const torch::Tensor& o, const torch::Tensor& d, const torch::Tensor& u, const MarchParams& p,
                  const torch::Tensor& offsets, std::vector<torch::Tensor>& out, cudaStream_t stream) {
  const int64_t r = o.size(0);
  const MarchOutput dst{out[0].data_ptr<int64_t>(), out[1].data_ptr<float>(), out[2].data_ptr<float>(),
                        out[3].data_ptr<float>(), out[4].data_ptr<float>()};
  march_fill_kernel<<<blocks_for(r), kThreads, 0, stream>>>(r, o.data_ptr<float>(), d.data_ptr<float>(),
                                                            u.data_ptr<float>(), p, offsets.data_ptr<int64_t>(), dst);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ray_indices [rows] int64, t_starts, t_ends [rows], positions, directions [rows, 3] float32.
std::vector<torch::Tensor> sample_tensors(const torch::Tensor& like, int64_t rows, bool zeroed) {
  auto f = like.options();
  auto i = f.dtype(torch::kInt64);
  if (zeroed)
    return {torch::zeros({rows}, i), torch::zeros({rows}, f), torch::zeros({rows}, f), torch::zeros({rows, 3}, f),
            torch::zeros({rows, 3}, f)};
  return {torch::empty({rows}, i), torch::empty({rows}, f), torch::empty({rows}, f), torch::empty({rows, 3}, f),
          torch::empty({rows, 3}, f)};
}
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
  auto offsets = torch::zeros({r + 1}, rays_o.options().dtype(torch::kInt64));
  int64_t total = 0;
  if (r > 0) {
    count_into_offsets(rays_o, rays_d, jitter, p, offsets, stream);
    total = offsets[r].item<int64_t>();  // the one host round-trip: the output size
  }
  auto out = sample_tensors(rays_o, total, false);
  if (total > 0) fill_samples(rays_o, rays_d, jitter, p, offsets, out, stream);
  out.push_back(offsets);
  return out;
}

// No host round-trip: the outputs have `capacity` rows (zeros past the samples), the offsets are clamped to it on
// the device, and the total is returned as a device tensor. Every step is a kernel or a stream-ordered ATen op, so
// the whole march can be captured in a CUDA graph.
std::vector<torch::Tensor> march_rays_padded_cuda(torch::Tensor rays_o, torch::Tensor rays_d, torch::Tensor jitter,
                                                  torch::Tensor occupied, int64_t grid_resolution, double grid_scale,
                                                  double grid_bound, double step, double cone_angle, double max_step,
                                                  int64_t max_samples, double bound, int64_t capacity) {
  const c10::cuda::CUDAGuard guard(rays_o.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const MarchParams p = make_march_params(occupied_ptr(occupied), grid_resolution, grid_scale, grid_bound, step,
                                          cone_angle, max_step, max_samples, bound);
  const int64_t r = rays_o.size(0);
  auto offsets = torch::zeros({r + 1}, rays_o.options().dtype(torch::kInt64));
  auto total = torch::zeros({1}, offsets.options());
  auto out = sample_tensors(rays_o, capacity, true);
  if (r > 0) {
    count_into_offsets(rays_o, rays_d, jitter, p, offsets, stream);
    total.copy_(offsets.narrow(0, r, 1));
    offsets.clamp_max_(capacity);
    if (capacity > 0) fill_samples(rays_o, rays_d, jitter, p, offsets, out, stream);
  }
  out.push_back(offsets);
  out.push_back(total);
  return out;
}

}  // namespace fastdream

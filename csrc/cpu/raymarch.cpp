// SPDX-License-Identifier: Apache-2.0
// Ray marching on the CPU: two passes over the rays (count, then fill at the exclusive prefix sum of the counts),
// the per-ray code in fastdream/raymarch.h.
#include "fastdream/raymarch.h"

#include <ATen/Parallel.h>

#include "fastdream/ops.h"

namespace fastdream {

namespace {
constexpr int64_t kGrain = 64;  // rays per task: a ray is up to a few hundred steps
}

const uint8_t* occupied_ptr(const torch::Tensor& occupied) {
  return occupied.numel() > 0 ? reinterpret_cast<const uint8_t*>(occupied.data_ptr<bool>()) : nullptr;
}

void check_march_inputs(const torch::Tensor& rays_o, const torch::Tensor& rays_d, const torch::Tensor& jitter,
                        const torch::Tensor& occupied, int64_t grid_resolution) {
  const int64_t r = rays_o.size(0);
  TORCH_CHECK(
      rays_o.dim() == 2 && rays_o.size(1) == 3 && rays_o.scalar_type() == torch::kFloat32 && rays_o.is_contiguous(),
      "march_rays: rays_o must be a contiguous float32 [R, 3] tensor");
  TORCH_CHECK(rays_d.sizes() == rays_o.sizes() && rays_d.scalar_type() == torch::kFloat32 && rays_d.is_contiguous(),
              "march_rays: rays_d must be a contiguous float32 [R, 3] tensor");
  TORCH_CHECK(
      jitter.dim() == 1 && jitter.size(0) == r && jitter.scalar_type() == torch::kFloat32 && jitter.is_contiguous(),
      "march_rays: jitter must be a contiguous float32 [R] tensor");
  TORCH_CHECK(occupied.scalar_type() == torch::kBool && occupied.is_contiguous() &&
                  (occupied.numel() == 0 || occupied.numel() == grid_resolution * grid_resolution * grid_resolution),
              "march_rays: occupied must be a contiguous bool [res^3] tensor (or empty)");
  TORCH_CHECK(
      rays_d.device() == rays_o.device() && jitter.device() == rays_o.device() && occupied.device() == rays_o.device(),
      "march_rays: every tensor must be on the same device");
}

std::vector<torch::Tensor> march_rays(torch::Tensor rays_o, torch::Tensor rays_d, torch::Tensor jitter,
                                      torch::Tensor occupied, int64_t grid_resolution, double grid_scale,
                                      double grid_bound, double step, double cone_angle, double max_step,
                                      int64_t max_samples, double bound) {
  check_march_inputs(rays_o, rays_d, jitter, occupied, grid_resolution);
#ifdef FD_WITH_CUDA
  if (rays_o.is_cuda())
    return march_rays_cuda(rays_o, rays_d, jitter, occupied, grid_resolution, grid_scale, grid_bound, step, cone_angle,
                           max_step, max_samples, bound);
#endif
  TORCH_CHECK(rays_o.device().is_cpu(), "march_rays: CUDA tensors but the CUDA part is not compiled");
  const MarchParams p = make_march_params(occupied_ptr(occupied), grid_resolution, grid_scale, grid_bound, step,
                                          cone_angle, max_step, max_samples, bound);
  const int64_t r = rays_o.size(0);
  const float* o = rays_o.data_ptr<float>();
  const float* d = rays_d.data_ptr<float>();
  const float* u = jitter.data_ptr<float>();

  auto offsets = torch::zeros({r + 1}, rays_o.options().dtype(torch::kInt64));
  int64_t* off = offsets.data_ptr<int64_t>();
  at::parallel_for(0, r, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      off[i + 1] = march_one<false>(i, load_vec3(o + 3 * i), load_vec3(d + 3 * i), u[i], p, MarchOutput{}, 0);
    }
  });
  for (int64_t i = 0; i < r; ++i) off[i + 1] += off[i];
  const int64_t total = off[r];

  auto fopts = rays_o.options();
  auto ray_indices = torch::empty({total}, fopts.dtype(torch::kInt64));
  auto t_starts = torch::empty({total}, fopts);
  auto t_ends = torch::empty({total}, fopts);
  auto positions = torch::empty({total, 3}, fopts);
  auto directions = torch::empty({total, 3}, fopts);
  const MarchOutput out{ray_indices.data_ptr<int64_t>(), t_starts.data_ptr<float>(), t_ends.data_ptr<float>(),
                        positions.data_ptr<float>(), directions.data_ptr<float>()};
  at::parallel_for(0, r, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (off[i + 1] > off[i]) march_one<true>(i, load_vec3(o + 3 * i), load_vec3(d + 3 * i), u[i], p, out, off[i]);
    }
  });
  return {ray_indices, t_starts, t_ends, positions, directions, offsets};
}

}  // namespace fastdream

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

namespace {
// Both passes on the CPU: the counts into offsets[1..R] (then their inclusive prefix sum, so offsets[r] is where
// ray r starts), clamped to `capacity` when it is >= 0, and the samples written into `out`. Returns the total.
struct CpuMarch {
  const float* o;
  const float* d;
  const float* u;
  MarchParams p;
  int64_t r;

  int64_t count(int64_t* off) const {
    off[0] = 0;
    at::parallel_for(0, r, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        off[i + 1] = march_one<false>(i, load_vec3(o + 3 * i), load_vec3(d + 3 * i), u[i], p, MarchOutput{}, 0);
      }
    });
    for (int64_t i = 0; i < r; ++i) off[i + 1] += off[i];
    return off[r];
  }

  void fill(const int64_t* off, MarchOutput out) const {
    at::parallel_for(0, r, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        march_fill_one(i, load_vec3(o + 3 * i), load_vec3(d + 3 * i), u[i], p, off, out);
      }
    });
  }
};

std::vector<torch::Tensor> sample_tensors(const torch::Tensor& like, int64_t rows) {
  auto fopts = like.options();
  return {torch::empty({rows}, fopts.dtype(torch::kInt64)), torch::empty({rows}, fopts), torch::empty({rows}, fopts),
          torch::empty({rows, 3}, fopts), torch::empty({rows, 3}, fopts)};
}

MarchOutput output_of(std::vector<torch::Tensor>& t) {
  return MarchOutput{t[0].data_ptr<int64_t>(), t[1].data_ptr<float>(), t[2].data_ptr<float>(), t[3].data_ptr<float>(),
                     t[4].data_ptr<float>()};
}
}  // namespace

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
  const CpuMarch m{rays_o.data_ptr<float>(), rays_d.data_ptr<float>(), jitter.data_ptr<float>(),
                   make_march_params(occupied_ptr(occupied), grid_resolution, grid_scale, grid_bound, step, cone_angle,
                                     max_step, max_samples, bound),
                   rays_o.size(0)};
  auto offsets = torch::zeros({m.r + 1}, rays_o.options().dtype(torch::kInt64));
  const int64_t total = m.count(offsets.data_ptr<int64_t>());
  auto out = sample_tensors(rays_o, total);
  m.fill(offsets.data_ptr<int64_t>(), output_of(out));
  out.push_back(offsets);
  return out;
}

std::vector<torch::Tensor> march_rays_padded(torch::Tensor rays_o, torch::Tensor rays_d, torch::Tensor jitter,
                                             torch::Tensor occupied, int64_t grid_resolution, double grid_scale,
                                             double grid_bound, double step, double cone_angle, double max_step,
                                             int64_t max_samples, double bound, int64_t capacity) {
  check_march_inputs(rays_o, rays_d, jitter, occupied, grid_resolution);
  TORCH_CHECK(capacity >= 0, "march_rays_padded: capacity must be >= 0, got ", capacity);
#ifdef FD_WITH_CUDA
  if (rays_o.is_cuda())
    return march_rays_padded_cuda(rays_o, rays_d, jitter, occupied, grid_resolution, grid_scale, grid_bound, step,
                                  cone_angle, max_step, max_samples, bound, capacity);
#endif
  TORCH_CHECK(rays_o.device().is_cpu(), "march_rays_padded: CUDA tensors but the CUDA part is not compiled");
  const CpuMarch m{rays_o.data_ptr<float>(), rays_d.data_ptr<float>(), jitter.data_ptr<float>(),
                   make_march_params(occupied_ptr(occupied), grid_resolution, grid_scale, grid_bound, step, cone_angle,
                                     max_step, max_samples, bound),
                   rays_o.size(0)};
  auto offsets = torch::zeros({m.r + 1}, rays_o.options().dtype(torch::kInt64));
  int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t total = m.count(off);
  for (int64_t i = 0; i <= m.r; ++i) off[i] = off[i] < capacity ? off[i] : capacity;
  auto out = sample_tensors(rays_o, capacity);
  m.fill(off, output_of(out));
  const int64_t kept = off[m.r];
  for (auto& t : out) t.narrow(0, kept, capacity - kept).zero_();  // the padding rows
  out.push_back(offsets);
  out.push_back(torch::full({1}, total, rays_o.options().dtype(torch::kInt64)));
  return out;
}

}  // namespace fastdream

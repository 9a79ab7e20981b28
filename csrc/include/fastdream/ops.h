// SPDX-License-Identifier: Apache-2.0
// Declarations of the host entry points bound in csrc/bindings.cpp. Each takes tensors already checked in
// Python (fastdream/ops/) and dispatches to the CPU loop or, when compiled, the CUDA launch.
#pragma once

#include <torch/extension.h>

#include <tuple>
#include <vector>

namespace fastdream {

bool cuda_compiled();

// shading (csrc/cpu/shading.cpp, csrc/cuda/shading.cu)
torch::Tensor shade_forward(torch::Tensor albedo, torch::Tensor normals, torch::Tensor positions, torch::Tensor light,
                            torch::Tensor ambient, torch::Tensor diffuse, int64_t mode);
std::tuple<torch::Tensor, torch::Tensor> shade_backward(torch::Tensor grad, torch::Tensor albedo, torch::Tensor normals,
                                                        torch::Tensor positions, torch::Tensor light,
                                                        torch::Tensor ambient, torch::Tensor diffuse, int64_t mode);

// hash-grid encoding (csrc/cpu/hash_grid.cpp, csrc/cuda/hash_grid.cu)
torch::Tensor hash_encode_forward(torch::Tensor x, torch::Tensor table, std::vector<int64_t> resolutions, double bound);
std::tuple<torch::Tensor, torch::Tensor> hash_encode_backward(torch::Tensor grad, torch::Tensor x, torch::Tensor table,
                                                              std::vector<int64_t> resolutions, double bound,
                                                              bool need_x);
std::tuple<torch::Tensor, torch::Tensor> hash_encode_jacobian_forward(torch::Tensor x, torch::Tensor table,
                                                                      std::vector<int64_t> resolutions, double bound);
torch::Tensor hash_encode_jacobian_backward(torch::Tensor grad_enc, torch::Tensor grad_jac, torch::Tensor x,
                                            std::vector<int64_t> resolutions, double bound, int64_t table_size);
// ray marching (csrc/cpu/raymarch.cpp, csrc/cuda/raymarch.cu): rays_o, rays_d [R, 3] float32, jitter [R] float32
// in [0, 1), occupied [res^3] bool or empty (no grid). Returns ray_indices [S] int64, t_starts [S], t_ends [S],
// positions [S, 3], directions [S, 3], offsets [R + 1] int64.
std::vector<torch::Tensor> march_rays(torch::Tensor rays_o, torch::Tensor rays_d, torch::Tensor jitter,
                                      torch::Tensor occupied, int64_t grid_resolution, double grid_scale,
                                      double grid_bound, double step, double cone_angle, double max_step,
                                      int64_t max_samples, double bound);
// The same with a fixed output size (CUDA graphs: no host round-trip): ray_indices, t_starts, t_ends, positions,
// directions padded with zeros to `capacity` rows, offsets [R + 1] clamped to `capacity` (samples past it are
// dropped, the last rays' first), and total [1] int64: how many samples the rays have (may exceed `capacity`).
std::vector<torch::Tensor> march_rays_padded(torch::Tensor rays_o, torch::Tensor rays_d, torch::Tensor jitter,
                                             torch::Tensor occupied, int64_t grid_resolution, double grid_scale,
                                             double grid_bound, double step, double cone_angle, double max_step,
                                             int64_t max_samples, double bound, int64_t capacity);

// compositing (csrc/cpu/composite.cpp, csrc/cuda/composite.cu): sigmas [S], colors [S, C], t_starts [S],
// t_ends [S] float32, offsets [R + 1] int64. Forward returns color [R, C] (no background), opacity [R], depth [R],
// weights [S]; backward returns grad_sigmas [S], grad_colors [S, C].
std::vector<torch::Tensor> composite_forward(torch::Tensor sigmas, torch::Tensor colors, torch::Tensor t_starts,
                                             torch::Tensor t_ends, torch::Tensor offsets, double early_stop_eps);
std::vector<torch::Tensor> composite_backward(torch::Tensor grad_color, torch::Tensor grad_opacity,
                                              torch::Tensor grad_depth, torch::Tensor grad_weights,
                                              torch::Tensor sigmas, torch::Tensor colors, torch::Tensor t_starts,
                                              torch::Tensor t_ends, torch::Tensor offsets, torch::Tensor color,
                                              torch::Tensor opacity, torch::Tensor depth, torch::Tensor weights,
                                              double early_stop_eps);

// Shared by the CPU and CUDA entry points (csrc/cpu/raymarch.cpp, csrc/cpu/composite.cpp).
void check_march_inputs(const torch::Tensor& rays_o, const torch::Tensor& rays_d, const torch::Tensor& jitter,
                        const torch::Tensor& occupied, int64_t grid_resolution);
const uint8_t* occupied_ptr(const torch::Tensor& occupied);
void check_composite_inputs(const torch::Tensor& sigmas, const torch::Tensor& colors, const torch::Tensor& t_starts,
                            const torch::Tensor& t_ends, const torch::Tensor& offsets);

#ifdef FD_WITH_CUDA
std::vector<torch::Tensor> march_rays_cuda(torch::Tensor rays_o, torch::Tensor rays_d, torch::Tensor jitter,
                                           torch::Tensor occupied, int64_t grid_resolution, double grid_scale,
                                           double grid_bound, double step, double cone_angle, double max_step,
                                           int64_t max_samples, double bound);
std::vector<torch::Tensor> march_rays_padded_cuda(torch::Tensor rays_o, torch::Tensor rays_d, torch::Tensor jitter,
                                                  torch::Tensor occupied, int64_t grid_resolution, double grid_scale,
                                                  double grid_bound, double step, double cone_angle, double max_step,
                                                  int64_t max_samples, double bound, int64_t capacity);
std::vector<torch::Tensor> composite_forward_cuda(torch::Tensor sigmas, torch::Tensor colors, torch::Tensor t_starts,
                                                  torch::Tensor t_ends, torch::Tensor offsets, double early_stop_eps);
std::vector<torch::Tensor> composite_backward_cuda(torch::Tensor grad_color, torch::Tensor grad_opacity,
                                                   torch::Tensor grad_depth, torch::Tensor grad_weights,
                                                   torch::Tensor sigmas, torch::Tensor colors, torch::Tensor t_starts,
                                                   torch::Tensor t_ends, torch::Tensor offsets, torch::Tensor color,
                                                   torch::Tensor opacity, torch::Tensor depth, torch::Tensor weights,
                                                   double early_stop_eps);
torch::Tensor shade_forward_cuda(torch::Tensor albedo, torch::Tensor normals, torch::Tensor positions,
                                 torch::Tensor light, torch::Tensor ambient, torch::Tensor diffuse, int64_t mode);
std::tuple<torch::Tensor, torch::Tensor> shade_backward_cuda(torch::Tensor grad, torch::Tensor albedo,
                                                             torch::Tensor normals, torch::Tensor positions,
                                                             torch::Tensor light, torch::Tensor ambient,
                                                             torch::Tensor diffuse, int64_t mode);
torch::Tensor hash_encode_forward_cuda(torch::Tensor x, torch::Tensor table, std::vector<int64_t> resolutions,
                                       double bound);
std::tuple<torch::Tensor, torch::Tensor> hash_encode_backward_cuda(torch::Tensor grad, torch::Tensor x,
                                                                   torch::Tensor table,
                                                                   std::vector<int64_t> resolutions, double bound,
                                                                   bool need_x);
std::tuple<torch::Tensor, torch::Tensor> hash_encode_jacobian_forward_cuda(torch::Tensor x, torch::Tensor table,
                                                                           std::vector<int64_t> resolutions,
                                                                           double bound);
torch::Tensor hash_encode_jacobian_backward_cuda(torch::Tensor grad_enc, torch::Tensor grad_jac, torch::Tensor x,
                                                 std::vector<int64_t> resolutions, double bound, int64_t table_size);
// '' when this build's kernels can run on CUDA device `device`, else the CUDA error (csrc/cuda/probe.cu).
std::string cuda_kernel_image_error(int64_t device);
#endif

}  // namespace fastdream

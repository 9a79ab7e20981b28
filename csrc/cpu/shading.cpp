// SPDX-License-Identifier: Apache-2.0
#include "fastdream/shading.h"

#include <ATen/Parallel.h>

#include "fastdream/ops.h"

namespace fastdream {

namespace {
constexpr int64_t kGrain = 2048;

Vec3 vec3_of(const torch::Tensor& t) {
  auto c = t.to(torch::kCPU).contiguous();
  const float* p = c.data_ptr<float>();
  return load_vec3(p);
}
}  // namespace

torch::Tensor shade_forward(torch::Tensor albedo, torch::Tensor normals, torch::Tensor positions, torch::Tensor light,
                            torch::Tensor ambient, torch::Tensor diffuse, int64_t mode) {
#ifdef FD_WITH_CUDA
  if (albedo.is_cuda()) return shade_forward_cuda(albedo, normals, positions, light, ambient, diffuse, mode);
#endif
  TORCH_CHECK(albedo.device().is_cpu(), "shade_forward: CUDA tensors but the CUDA part is not compiled");
  auto out = torch::empty_like(albedo);
  const int64_t n = albedo.size(0);
  const float* rho = albedo.data_ptr<float>();
  const float* nor = normals.data_ptr<float>();
  const float* pos = positions.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const Vec3 l = vec3_of(light), a = vec3_of(ambient), d = vec3_of(diffuse);
  const int m = static_cast<int>(mode);
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      shade_forward_one(load_vec3(rho + 3 * i), load_vec3(nor + 3 * i), load_vec3(pos + 3 * i), l, a, d, m, o + 3 * i);
    }
  });
  return out;
}

std::tuple<torch::Tensor, torch::Tensor> shade_backward(torch::Tensor grad, torch::Tensor albedo, torch::Tensor normals,
                                                        torch::Tensor positions, torch::Tensor light,
                                                        torch::Tensor ambient, torch::Tensor diffuse, int64_t mode) {
#ifdef FD_WITH_CUDA
  if (albedo.is_cuda()) return shade_backward_cuda(grad, albedo, normals, positions, light, ambient, diffuse, mode);
#endif
  TORCH_CHECK(albedo.device().is_cpu(), "shade_backward: CUDA tensors but the CUDA part is not compiled");
  auto g_rho = torch::empty_like(albedo);
  auto g_n = torch::empty_like(normals);
  const int64_t n = albedo.size(0);
  const float* g = grad.data_ptr<float>();
  const float* rho = albedo.data_ptr<float>();
  const float* nor = normals.data_ptr<float>();
  const float* pos = positions.data_ptr<float>();
  float* gr = g_rho.data_ptr<float>();
  float* gn = g_n.data_ptr<float>();
  const Vec3 l = vec3_of(light), a = vec3_of(ambient), d = vec3_of(diffuse);
  const int m = static_cast<int>(mode);
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      shade_backward_one(load_vec3(g + 3 * i), load_vec3(rho + 3 * i), load_vec3(nor + 3 * i), load_vec3(pos + 3 * i),
                         l, a, d, m, gr + 3 * i, gn + 3 * i);
    }
  });
  return {g_rho, g_n};
}

}  // namespace fastdream

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

#ifdef FD_WITH_CUDA
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
#endif

}  // namespace fastdream

// SPDX-License-Identifier: Apache-2.0
// Declarations of the host entry points bound in csrc/bindings.cpp. Each takes tensors already checked in
// Python (fastdream/ops/) and dispatches to the CPU loop or, when compiled, the CUDA launch.
#pragma once

#include <torch/extension.h>

#include <tuple>

namespace fastdream {

bool cuda_compiled();

// shading (csrc/cpu/shading.cpp, csrc/cuda/shading.cu)
torch::Tensor shade_forward(torch::Tensor albedo, torch::Tensor normals, torch::Tensor positions, torch::Tensor light,
                            torch::Tensor ambient, torch::Tensor diffuse, int64_t mode);
std::tuple<torch::Tensor, torch::Tensor> shade_backward(torch::Tensor grad, torch::Tensor albedo, torch::Tensor normals,
                                                        torch::Tensor positions, torch::Tensor light,
                                                        torch::Tensor ambient, torch::Tensor diffuse, int64_t mode);

#ifdef FD_WITH_CUDA
torch::Tensor shade_forward_cuda(torch::Tensor albedo, torch::Tensor normals, torch::Tensor positions,
                                 torch::Tensor light, torch::Tensor ambient, torch::Tensor diffuse, int64_t mode);
std::tuple<torch::Tensor, torch::Tensor> shade_backward_cuda(torch::Tensor grad, torch::Tensor albedo,
                                                             torch::Tensor normals, torch::Tensor positions,
                                                             torch::Tensor light, torch::Tensor ambient,
                                                             torch::Tensor diffuse, int64_t mode);
#endif

}  // namespace fastdream

// SPDX-License-Identifier: Apache-2.0
// Python bindings of fastdream._C. Only binding happens here; the code lives in csrc/cpu and csrc/cuda.
#include <torch/extension.h>

#include "fastdream/ops.h"

namespace fastdream {
bool cuda_compiled() {
#ifdef FD_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace fastdream

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdream compiled kernels (C++ CPU loops and, when compiled, CUDA launches)";
  m.def("cuda_compiled", &fastdream::cuda_compiled, "Whether the CUDA part was compiled");
  m.def("shade_forward", &fastdream::shade_forward);
  m.def("shade_backward", &fastdream::shade_backward);
  m.def("hash_encode_forward", &fastdream::hash_encode_forward);
  m.def("hash_encode_backward", &fastdream::hash_encode_backward);
  m.def("hash_encode_jacobian_forward", &fastdream::hash_encode_jacobian_forward);
  m.def("hash_encode_jacobian_backward", &fastdream::hash_encode_jacobian_backward);
  m.def("march_rays", &fastdream::march_rays, "Ray marching: count, prefix sum, fill (packed samples)");
  m.def("march_rays_padded", &fastdream::march_rays_padded,
        "Ray marching into a fixed number of rows, no host round-trip (CUDA graphs)");
  m.def("composite_forward", &fastdream::composite_forward, "Front-to-back compositing of packed samples");
  m.def("composite_backward", &fastdream::composite_backward, "Compositing backward, transmittance recomputed");
#ifdef FD_WITH_CUDA
  m.def("cuda_kernel_image_error", &fastdream::cuda_kernel_image_error,
        "'' when the CUDA kernels can run on the device of this index, else the CUDA error");
#endif
}

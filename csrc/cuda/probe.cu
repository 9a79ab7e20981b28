// SPDX-License-Identifier: Apache-2.0
// Whether this build's CUDA code can run on a device. The kernels are compiled for the architectures of
// TORCH_CUDA_ARCH_LIST (machine code, plus PTX where asked); on a GPU outside them every launch fails with "no
// kernel image is available". Every .cu file of the extension is compiled with the same architectures, so one
// probe kernel answers for all of them: fastdream.backends asks once per device and, when the answer is no, runs
// the ops elsewhere and says why instead of failing mid-run.
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <string>

#include "fastdream/ops.h"

namespace fastdream {

namespace {
__global__ void probe_kernel() {}
}  // namespace

std::string cuda_kernel_image_error(int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, probe_kernel);
  if (err == cudaSuccess) return "";
  (void)cudaGetLastError();  // not a sticky error: cleared, so that torch's next check does not report it
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

}  // namespace fastdream

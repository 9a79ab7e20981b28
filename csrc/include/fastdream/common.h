// SPDX-License-Identifier: Apache-2.0
// Shared definitions for code compiled both by the host compiler (CPU loops) and by nvcc (CUDA kernels).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FD_HD __host__ __device__ __forceinline__
#else
#define FD_HD inline
#endif

namespace fastdream {

struct Vec3 {
  float x, y, z;
};

FD_HD Vec3 make_vec3(float x, float y, float z) { return Vec3{x, y, z}; }
FD_HD Vec3 load_vec3(const float* p) { return Vec3{p[0], p[1], p[2]}; }
FD_HD void store_vec3(float* p, Vec3 v) {
  p[0] = v.x;
  p[1] = v.y;
  p[2] = v.z;
}
FD_HD Vec3 operator+(Vec3 a, Vec3 b) { return Vec3{a.x + b.x, a.y + b.y, a.z + b.z}; }
FD_HD Vec3 operator-(Vec3 a, Vec3 b) { return Vec3{a.x - b.x, a.y - b.y, a.z - b.z}; }
FD_HD Vec3 operator*(Vec3 a, Vec3 b) { return Vec3{a.x * b.x, a.y * b.y, a.z * b.z}; }
FD_HD Vec3 operator*(Vec3 a, float s) { return Vec3{a.x * s, a.y * s, a.z * s}; }
FD_HD float dot(Vec3 a, Vec3 b) { return a.x * b.x + a.y * b.y + a.z * b.z; }

}  // namespace fastdream

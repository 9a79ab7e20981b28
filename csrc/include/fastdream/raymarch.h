// SPDX-License-Identifier: Apache-2.0
// Ray marching of one ray through the bounding sphere, skipping empty occupancy-grid cells. Written once for
// the CPU loop (csrc/cpu/raymarch.cpp) and the CUDA kernels (csrc/cuda/raymarch.cu).
//
// The float32 arithmetic follows the PyTorch reference (fastdream/ops/raymarch.py) operation by operation, in
// the same order and without fused multiply-adds on the CPU, so that both produce the same samples bit for bit:
// a sample count that differs by one at the far end of a ray would shift every packed sample behind it.
#pragma once

#include "fastdream/common.h"

namespace fastdream {

struct MarchParams {
  const uint8_t* occupied;  // [res^3] bool grid, nullptr: every cell occupied
  int grid_resolution;
  float grid_scale;  // res / (2 * grid_bound)
  float grid_bound;
  float step;        // minimum step
  float cone_angle;  // step grows as t * cone_angle
  float max_step;
  int64_t max_samples;  // per ray
  float radius2;        // bound^2 of the bounding sphere, rounded from double like the reference's scalar
};

// Host-side: the float32 parameters from the doubles Python passes (rounded like the reference's scalars).
inline MarchParams make_march_params(const uint8_t* occupied, int64_t grid_resolution, double grid_scale,
                                     double grid_bound, double step, double cone_angle, double max_step,
                                     int64_t max_samples, double bound) {
  MarchParams p;
  p.occupied = occupied;
  p.grid_resolution = static_cast<int>(grid_resolution);
  p.grid_scale = static_cast<float>(grid_scale);
  p.grid_bound = static_cast<float>(grid_bound);
  p.step = static_cast<float>(step);
  p.cone_angle = static_cast<float>(cone_angle);
  p.max_step = static_cast<float>(max_step);
  p.max_samples = max_samples;
  p.radius2 = static_cast<float>(bound * bound);
  return p;
}

// Finite test that neither --use_fast_math nor the host compiler folds away (NaN compares false).
FD_HD bool finite_float(float x) { return fabsf(x) <= 3.402823466e38f; }

// Unit direction (a zero, NaN or infinite direction gives NaN components: the ray then misses).
FD_HD Vec3 normalize_direction(Vec3 d) {
  float n = sqrtf(d.x * d.x + d.y * d.y + d.z * d.z);
  return Vec3{d.x / n, d.y / n, d.z / n};
}

// Entry and exit distances through the sphere |x|^2 = radius2 along a unit direction; t_near >= 0.
// The discriminant is radius2 - |q|^2 with q = o - (o.d) d, the ray's closest point to the centre: the textbook
// (o.d)^2 - (|o|^2 - radius2) cancels catastrophically in float32 once |o| is ~1e3 x the radius.
FD_HD bool ray_sphere_one(Vec3 o, Vec3 d, float radius2, float* t_near, float* t_far) {
  float b = o.x * d.x + o.y * d.y + o.z * d.z;
  float qx = o.x - b * d.x;
  float qy = o.y - b * d.y;
  float qz = o.z - b * d.z;
  float disc = radius2 - (qx * qx + qy * qy + qz * qz);
  float sq = sqrtf(fmaxf(disc, 0.0f));
  float tn = fmaxf(-b - sq, 0.0f);
  float tf = -b + sq;
  *t_near = tn;
  *t_far = tf;
  return disc >= 0.0f && tf > tn && finite_float(tn) && finite_float(tf);
}

FD_HD float march_step_at(float t, const MarchParams& p) { return fminf(fmaxf(t * p.cone_angle, p.step), p.max_step); }

// Whether a point lies in an occupied cell; points outside the grid's cube (and NaN) are empty.
FD_HD bool occupied_at(Vec3 x, const MarchParams& p) {
  if (p.occupied == nullptr) return true;
  const float res = static_cast<float>(p.grid_resolution);
  float f[3] = {(x.x + p.grid_bound) * p.grid_scale, (x.y + p.grid_bound) * p.grid_scale,
                (x.z + p.grid_bound) * p.grid_scale};
  int64_t ijk[3];
  for (int k = 0; k < 3; ++k) {
    if (!(f[k] >= 0.0f && f[k] <= res)) return false;
    ijk[k] = static_cast<int64_t>(fminf(floorf(f[k]), res - 1.0f));
  }
  const int64_t r = p.grid_resolution;
  return p.occupied[(ijk[0] * r + ijk[1]) * r + ijk[2]] != 0;
}

// Where the samples of one ray go; with kWrite false only the count is returned (first pass).
struct MarchOutput {
  int64_t* ray_indices;  // [S]
  float* t_starts;       // [S]
  float* t_ends;         // [S]
  float* positions;      // [S, 3]
  float* directions;     // [S, 3]
};

// Marches ray `ray` (origin o, raw direction d_raw, jitter u in [0, 1)). Returns its number of samples and,
// when kWrite, writes them at out[first...].
template <bool kWrite>
FD_HD int64_t march_one(int64_t ray, Vec3 o, Vec3 d_raw, float u, const MarchParams& p, MarchOutput out,
                        int64_t first) {
  Vec3 d = normalize_direction(d_raw);
  float t_near, t_far;
  if (!ray_sphere_one(o, d, p.radius2, &t_near, &t_far) || p.max_samples <= 0) return 0;
  float t = t_near + u * march_step_at(t_near, p);
  int64_t n = 0;
  while (t < t_far) {
    float t1 = fminf(t + march_step_at(t, p), t_far);
    // Far from the origin (|o| ~ 1e5 bound) t + dt can round back to t: stop rather than loop forever or emit
    // zero-length samples (the reference does the same).
    if (!(t1 > t)) break;
    float mid = (t + t1) * 0.5f;
    Vec3 x = o + d * mid;
    if (occupied_at(x, p)) {
      if (kWrite) {
        const int64_t i = first + n;
        out.ray_indices[i] = ray;
        out.t_starts[i] = t;
        out.t_ends[i] = t1;
        store_vec3(out.positions + 3 * i, x);
        store_vec3(out.directions + 3 * i, d);
      }
      if (++n >= p.max_samples) break;
    }
    t = t1;
  }
  return n;
}

// Second pass for ray `ray`: writes its samples at out[offsets[ray]...offsets[ray + 1]). The range may be shorter
// than the ray's count (a padded march cut at its capacity): the ray then keeps its first samples, front to back.
FD_HD void march_fill_one(int64_t ray, Vec3 o, Vec3 d_raw, float u, const MarchParams& p, const int64_t* offsets,
                          MarchOutput out) {
  const int64_t first = offsets[ray], n = offsets[ray + 1] - first;
  if (n <= 0) return;
  MarchParams q = p;
  q.max_samples = n < p.max_samples ? n : p.max_samples;
  march_one<true>(ray, o, d_raw, u, q, out, first);
}

}  // namespace fastdream

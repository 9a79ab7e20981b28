// SPDX-License-Identifier: Apache-2.0
// Multi-resolution hash-grid encoding (instant-NGP) of one point, written once for the CPU loop and the CUDA
// kernel. See fastdream/ops/hash_grid.py for the scheme and the reference it must match.
//
// Layout: x [N, 3], table [L, S, F] (S = 2^T), enc [N, L*F], jac [N, L*F, 3], contiguous, all of one scalar type T
// (float, or double for float64 gradchecks).
#pragma once

#include "fastdream/common.h"

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

namespace fastdream {

constexpr uint32_t kHashPrimeY = 2654435761u;
constexpr uint32_t kHashPrimeZ = 805459861u;

// Normalised coordinate u in [0, 1] of a world coordinate, as the reference computes it in float32:
// u = (x + bound) / (2 bound), NaN and -inf -> 0, +inf -> 1, clamped. `inside` is where du/dx != 0
// (torch.clamp's inclusive gradient mask; false for non-finite x).
template <typename T>
FD_HD T hash_normalise(T x, T bound, T two_bound, bool* inside) {
  T u = (x + bound) / two_bound;
  *inside = (u >= T(0)) && (u <= T(1));
  if (!(u >= T(0))) u = T(0);  // NaN too
  if (u > T(1)) u = T(1);
  return u;
}

FD_HD float hash_floor(float v) { return floorf(v); }
FD_HD double hash_floor(double v) { return floor(v); }

FD_HD uint32_t hash_grid_index(uint32_t i, uint32_t j, uint32_t k, uint32_t res, bool dense, uint32_t mask) {
  if (dense) {
    const uint32_t s = res + 1;
    return i + j * s + k * s * s;
  }
  return (i ^ (j * kHashPrimeY) ^ (k * kHashPrimeZ)) & mask;
}

// The cell of one level around normalised position u: the 8 vertex indices, trilinear weights and (when
// dw != nullptr) d w / d(grid position). Corner c has offsets (c & 1, (c >> 1) & 1, (c >> 2) & 1).
template <typename T>
FD_HD void hash_level_cell(const T u[3], int res, bool dense, uint32_t mask, uint32_t idx[8], T w[8], T (*dw)[3]) {
  uint32_t i0[3];
  T fr[3];
  for (int d = 0; d < 3; ++d) {
    const T p = u[d] * static_cast<T>(res);
    T p0 = hash_floor(p);
    if (p0 > static_cast<T>(res - 1)) p0 = static_cast<T>(res - 1);
    i0[d] = static_cast<uint32_t>(p0);
    fr[d] = p - p0;
  }
  for (int c = 0; c < 8; ++c) {
    const uint32_t bx = c & 1, by = (c >> 1) & 1, bz = (c >> 2) & 1;
    idx[c] = hash_grid_index(i0[0] + bx, i0[1] + by, i0[2] + bz, static_cast<uint32_t>(res), dense, mask);
    const T wx = bx ? fr[0] : T(1) - fr[0];
    const T wy = by ? fr[1] : T(1) - fr[1];
    const T wz = bz ? fr[2] : T(1) - fr[2];
    w[c] = wx * wy * wz;
    if (dw != nullptr) {
      dw[c][0] = (bx ? T(1) : T(-1)) * wy * wz;
      dw[c][1] = (by ? T(1) : T(-1)) * wx * wz;
      dw[c][2] = (bz ? T(1) : T(-1)) * wx * wy;
    }
  }
}

// Per-point normalisation shared by every level: u and d u / d x (0 outside the cube).
template <typename T>
FD_HD void hash_point(const T* x, T bound, T u[3], T du[3]) {
  const T two_bound = T(2) * bound;
  for (int d = 0; d < 3; ++d) {
    bool inside;
    u[d] = hash_normalise(x[d], bound, two_bound, &inside);
    du[d] = inside ? T(1) / two_bound : T(0);
  }
}

// A table entry as a number (the extension is built with __CUDA_NO_HALF_CONVERSIONS__: explicit for __half).
FD_HD float table_value(float v) { return v; }
FD_HD double table_value(double v) { return v; }
#if defined(__CUDACC__)
FD_HD float table_value(__half v) { return __half2float(v); }
#endif

struct HashLevel {
  int res;
  bool dense;
};

// Forward of one point at one level: enc_l [F] and, when jac_l != nullptr, jac_l [F, 3]. The table's type TT
// is T, or (CUDA, T = float) __half: fp16 reads, converted to T before any arithmetic. kF > 0 fixes F at compile
// time (the CPU loops' F = 2: unrolled loops, accumulators in registers); kF = 0 reads F at run time.
template <typename T, typename TT = T, int kF = 0>
FD_HD void hash_level_forward(const T u[3], const T du[3], HashLevel lv, const TT* table_l, int F_run, uint32_t mask,
                              T* enc_l, T* jac_l) {
  const int F = kF > 0 ? kF : F_run;
  uint32_t idx[8];
  T w[8], dw[8][3];
  if (jac_l != nullptr) {  // two calls: a maybe-null pointer to dw would keep dw out of registers on the GPU
    hash_level_cell<T>(u, lv.res, lv.dense, mask, idx, w, dw);
  } else {
    hash_level_cell<T>(u, lv.res, lv.dense, mask, idx, w, nullptr);
  }
  const T r = static_cast<T>(lv.res);
  for (int f = 0; f < F; ++f) {
    T e = T(0), j0 = T(0), j1 = T(0), j2 = T(0);
    for (int c = 0; c < 8; ++c) {
      const T v = static_cast<T>(table_value(table_l[static_cast<int64_t>(idx[c]) * F + f]));
      e += w[c] * v;
      if (jac_l != nullptr) {
        j0 += dw[c][0] * v;
        j1 += dw[c][1] * v;
        j2 += dw[c][2] * v;
      }
    }
    enc_l[f] = e;
    if (jac_l != nullptr) {
      jac_l[3 * f + 0] = j0 * r * du[0];
      jac_l[3 * f + 1] = j1 * r * du[1];
      jac_l[3 * f + 2] = j2 * r * du[2];
    }
  }
}

// Adds to grad_x [3] the gradient of <grad_l, enc_l> w.r.t. x (one point, one level). kF: as in hash_level_forward.
template <typename T, typename TT = T, int kF = 0>
FD_HD void hash_level_backward_x(const T u[3], const T du[3], HashLevel lv, const TT* table_l, int F_run, uint32_t mask,
                                 const T* grad_l, T* grad_x) {
  const int F = kF > 0 ? kF : F_run;
  uint32_t idx[8];
  T w[8], dw[8][3];
  hash_level_cell<T>(u, lv.res, lv.dense, mask, idx, w, dw);
  T g0 = T(0), g1 = T(0), g2 = T(0);
  for (int c = 0; c < 8; ++c) {
    T s = T(0);
    for (int f = 0; f < F; ++f)
      s += grad_l[f] * static_cast<T>(table_value(table_l[static_cast<int64_t>(idx[c]) * F + f]));
    g0 += dw[c][0] * s;
    g1 += dw[c][1] * s;
    g2 += dw[c][2] * s;
  }
  const T r = static_cast<T>(lv.res);
  grad_x[0] += g0 * r * du[0];
  grad_x[1] += g1 * r * du[1];
  grad_x[2] += g2 * r * du[2];
}

// Accumulation into the table gradient: atomic on the GPU; on the host the caller owns the level's slice
// (the CPU loop partitions the work by level), so a plain add is race-free.
template <typename T>
FD_HD void hash_accumulate(T* p, T v) {
#if defined(__CUDA_ARCH__)
  atomicAdd(p, v);
#else
  *p += v;
#endif
}

// Scatters one point's gradient into grad_table_l [S, F] for one level: grad_l [F] is the gradient of the
// encoding, grad_jac_l [F, 3] (may be nullptr) the gradient of the Jacobian. kF: as in hash_level_forward.
template <typename T, int kF = 0>
FD_HD void hash_level_backward_table(const T u[3], const T du[3], HashLevel lv, int F_run, uint32_t mask,
                                     const T* grad_l, const T* grad_jac_l, T* grad_table_l) {
  const int F = kF > 0 ? kF : F_run;
  uint32_t idx[8];
  T w[8], dw[8][3];
  if (grad_jac_l != nullptr) {  // two calls, as in hash_level_forward
    hash_level_cell<T>(u, lv.res, lv.dense, mask, idx, w, dw);
  } else {
    hash_level_cell<T>(u, lv.res, lv.dense, mask, idx, w, nullptr);
  }
  const T r = static_cast<T>(lv.res);
  const T s0 = r * du[0], s1 = r * du[1], s2 = r * du[2];
  for (int c = 0; c < 8; ++c) {
    T* dst = grad_table_l + static_cast<int64_t>(idx[c]) * F;
    for (int f = 0; f < F; ++f) {
      T v = grad_l != nullptr ? w[c] * grad_l[f] : T(0);
      if (grad_jac_l != nullptr) {
        v += dw[c][0] * s0 * grad_jac_l[3 * f + 0] + dw[c][1] * s1 * grad_jac_l[3 * f + 1] +
             dw[c][2] * s2 * grad_jac_l[3 * f + 2];
      }
      if (v != T(0)) hash_accumulate(dst + f, v);
    }
  }
}

}  // namespace fastdream

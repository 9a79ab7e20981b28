// SPDX-License-Identifier: Apache-2.0
// Multi-resolution hash-grid encoding (instant-NGP) of one point, written once for the CPU loop and the CUDA
// kernel. See fastdream/ops/hash_grid.py for the scheme and the reference it must match.
//
// Layout: x [N, 3], table [L, S, F] (S = 2^T), enc [N, L*F], jac [N, L*F, 3], all float32 and contiguous.
#pragma once

#include "fastdream/common.h"

namespace fastdream {

constexpr uint32_t kHashPrimeY = 2654435761u;
constexpr uint32_t kHashPrimeZ = 805459861u;

// Normalised coordinate u in [0, 1] of a world coordinate, as the reference computes it in float32:
// u = (x + bound) / (2 bound), NaN and -inf -> 0, +inf -> 1, clamped. `inside` is where du/dx != 0
// (torch.clamp's inclusive gradient mask; false for non-finite x).
FD_HD float hash_normalise(float x, float bound, float two_bound, bool* inside) {
  float u = (x + bound) / two_bound;
  *inside = (u >= 0.0f) && (u <= 1.0f);
  if (!(u >= 0.0f)) u = 0.0f;  // NaN too
  if (u > 1.0f) u = 1.0f;
  return u;
}

FD_HD uint32_t hash_grid_index(uint32_t i, uint32_t j, uint32_t k, uint32_t res, bool dense, uint32_t mask) {
  if (dense) {
    const uint32_t s = res + 1;
    return i + j * s + k * s * s;
  }
  return (i ^ (j * kHashPrimeY) ^ (k * kHashPrimeZ)) & mask;
}

// The cell of one level around normalised position u: the 8 vertex indices, trilinear weights and (when
// dw != nullptr) d w / d(grid position). Corner c has offsets (c & 1, (c >> 1) & 1, (c >> 2) & 1).
FD_HD void hash_level_cell(const float u[3], int res, bool dense, uint32_t mask, uint32_t idx[8], float w[8],
                           float (*dw)[3]) {
  uint32_t i0[3];
  float fr[3];
  for (int d = 0; d < 3; ++d) {
    const float p = u[d] * static_cast<float>(res);
    float p0 = floorf(p);
    if (p0 > static_cast<float>(res - 1)) p0 = static_cast<float>(res - 1);
    i0[d] = static_cast<uint32_t>(p0);
    fr[d] = p - p0;
  }
  for (int c = 0; c < 8; ++c) {
    const uint32_t bx = c & 1, by = (c >> 1) & 1, bz = (c >> 2) & 1;
    idx[c] = hash_grid_index(i0[0] + bx, i0[1] + by, i0[2] + bz, static_cast<uint32_t>(res), dense, mask);
    const float wx = bx ? fr[0] : 1.0f - fr[0];
    const float wy = by ? fr[1] : 1.0f - fr[1];
    const float wz = bz ? fr[2] : 1.0f - fr[2];
    w[c] = wx * wy * wz;
    if (dw != nullptr) {
      dw[c][0] = (bx ? 1.0f : -1.0f) * wy * wz;
      dw[c][1] = (by ? 1.0f : -1.0f) * wx * wz;
      dw[c][2] = (bz ? 1.0f : -1.0f) * wx * wy;
    }
  }
}

// Per-point normalisation shared by every level: u and d u / d x (0 outside the cube).
FD_HD void hash_point(const float* x, float bound, float u[3], float du[3]) {
  const float two_bound = 2.0f * bound;
  for (int d = 0; d < 3; ++d) {
    bool inside;
    u[d] = hash_normalise(x[d], bound, two_bound, &inside);
    du[d] = inside ? 1.0f / two_bound : 0.0f;
  }
}

struct HashLevel {
  int res;
  bool dense;
};

// Forward of one point at one level: enc_l [F] and, when jac_l != nullptr, jac_l [F, 3].
FD_HD void hash_level_forward(const float u[3], const float du[3], HashLevel lv, const float* table_l, int F,
                              uint32_t mask, float* enc_l, float* jac_l) {
  uint32_t idx[8];
  float w[8], dw[8][3];
  hash_level_cell(u, lv.res, lv.dense, mask, idx, w, jac_l != nullptr ? dw : nullptr);
  const float r = static_cast<float>(lv.res);
  for (int f = 0; f < F; ++f) {
    float e = 0.0f, j0 = 0.0f, j1 = 0.0f, j2 = 0.0f;
    for (int c = 0; c < 8; ++c) {
      const float v = table_l[static_cast<int64_t>(idx[c]) * F + f];
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

// Adds to grad_x [3] the gradient of <grad_l, enc_l> w.r.t. x (one point, one level).
FD_HD void hash_level_backward_x(const float u[3], const float du[3], HashLevel lv, const float* table_l, int F,
                                 uint32_t mask, const float* grad_l, float* grad_x) {
  uint32_t idx[8];
  float w[8], dw[8][3];
  hash_level_cell(u, lv.res, lv.dense, mask, idx, w, dw);
  float g0 = 0.0f, g1 = 0.0f, g2 = 0.0f;
  for (int c = 0; c < 8; ++c) {
    float s = 0.0f;
    for (int f = 0; f < F; ++f) s += grad_l[f] * table_l[static_cast<int64_t>(idx[c]) * F + f];
    g0 += dw[c][0] * s;
    g1 += dw[c][1] * s;
    g2 += dw[c][2] * s;
  }
  const float r = static_cast<float>(lv.res);
  grad_x[0] += g0 * r * du[0];
  grad_x[1] += g1 * r * du[1];
  grad_x[2] += g2 * r * du[2];
}

// Accumulation into the table gradient: atomic on the GPU; on the host the caller owns the level's slice
// (the CPU loop partitions the work by level), so a plain add is race-free.
FD_HD void hash_accumulate(float* p, float v) {
#if defined(__CUDA_ARCH__)
  atomicAdd(p, v);
#else
  *p += v;
#endif
}

// Scatters one point's gradient into grad_table_l [S, F] for one level: grad_l [F] is the gradient of the
// encoding, grad_jac_l [F, 3] (may be nullptr) the gradient of the Jacobian.
FD_HD void hash_level_backward_table(const float u[3], const float du[3], HashLevel lv, int F, uint32_t mask,
                                     const float* grad_l, const float* grad_jac_l, float* grad_table_l) {
  uint32_t idx[8];
  float w[8], dw[8][3];
  hash_level_cell(u, lv.res, lv.dense, mask, idx, w, grad_jac_l != nullptr ? dw : nullptr);
  const float r = static_cast<float>(lv.res);
  const float s0 = r * du[0], s1 = r * du[1], s2 = r * du[2];
  for (int c = 0; c < 8; ++c) {
    float* dst = grad_table_l + static_cast<int64_t>(idx[c]) * F;
    for (int f = 0; f < F; ++f) {
      float v = grad_l != nullptr ? w[c] * grad_l[f] : 0.0f;
      if (grad_jac_l != nullptr) {
        v += dw[c][0] * s0 * grad_jac_l[3 * f + 0] + dw[c][1] * s1 * grad_jac_l[3 * f + 1] +
             dw[c][2] * s2 * grad_jac_l[3 * f + 2];
      }
      if (v != 0.0f) hash_accumulate(dst + f, v);
    }
  }
}

}  // namespace fastdream

// SPDX-License-Identifier: Apache-2.0
// Lambertian shading of one sample, written once for the CPU loop and the CUDA kernel.
//   c = rho * (diffuse * max(0, n . (light - p) / |light - p|) + ambient)
// Modes: albedo (c = rho), shaded, textureless (rho replaced by white).
#pragma once

#include "fastdream/common.h"

namespace fastdream {

enum ShadeMode : int { kAlbedo = 0, kShaded = 1, kTextureless = 2 };

// Unit vector from the sample towards the light. The epsilon keeps a light placed exactly on a sample
// finite (the direction is then zero and the sample gets ambient light only).
FD_HD Vec3 light_direction(Vec3 p, Vec3 light) {
  Vec3 l = light - p;
  const float d2 = dot(l, l);
  float inv = 1.0f / sqrtf(d2 < 1e-12f ? 1e-12f : d2);  // a NaN distance stays NaN (fmaxf would drop it)
  return l * inv;
}

// max(0, c) that keeps NaN (fmaxf would turn a NaN normal into a silently dark sample; the trainer must see it).
FD_HD float clamp_cosine(float c) { return c <= 0.0f ? 0.0f : c; }

FD_HD void shade_forward_one(Vec3 rho, Vec3 n, Vec3 p, Vec3 light, Vec3 ambient, Vec3 diffuse, int mode, float* out) {
  if (mode == kAlbedo) {
    store_vec3(out, rho);
    return;
  }
  float lam = clamp_cosine(dot(n, light_direction(p, light)));
  Vec3 shade = diffuse * lam + ambient;
  store_vec3(out, mode == kTextureless ? shade : rho * shade);
}

// Gradients to rho and n (positions, light and light colours are treated as constants).
FD_HD void shade_backward_one(Vec3 grad, Vec3 rho, Vec3 n, Vec3 p, Vec3 light, Vec3 ambient, Vec3 diffuse, int mode,
                              float* grad_rho, float* grad_n) {
  if (mode == kAlbedo) {
    store_vec3(grad_rho, grad);
    store_vec3(grad_n, make_vec3(0.f, 0.f, 0.f));
    return;
  }
  Vec3 l = light_direction(p, light);
  float cos_theta = dot(n, l);
  float lam = clamp_cosine(cos_theta);
  Vec3 shade = diffuse * lam + ambient;
  Vec3 r = mode == kTextureless ? make_vec3(1.f, 1.f, 1.f) : rho;
  store_vec3(grad_rho, mode == kTextureless ? make_vec3(0.f, 0.f, 0.f) : grad * shade);
  // d lam / d n = l where the surface faces the light, 0 elsewhere (subgradient 0 at the kink). A NaN cosine
  // passes the gradient through, like torch.relu's backward in the reference.
  float g_lam = cos_theta <= 0.0f ? 0.0f : dot(grad * r, diffuse);
  store_vec3(grad_n, l * g_lam);
}

}  // namespace fastdream

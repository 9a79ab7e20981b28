// SPDX-License-Identifier: Apache-2.0
// Front-to-back compositing of the packed samples of one ray, forward and backward, written once for the CPU
// loop (csrc/cpu/composite.cpp) and the CUDA kernels (csrc/cuda/composite.cu).
//
//   alpha_i = 1 - exp(-sigma_i delta_i), T_i = prod_{j<i} exp(-sigma_j delta_j), w_i = T_i alpha_i
//   color = sum w_i c_i, opacity = sum w_i, depth = sum w_i t_mid_i; the ray stops where T_i < eps.
//
// The backward keeps no per-sample transmittance. For a loss L = sum_i w_i g_i (g_i gathers the output
// gradients: <dL/dcolor, c_i> + dL/dopacity + dL/ddepth t_mid_i + dL/dw_i),
//   dL/dsigma_k = delta_k (T_{k+1} g_k - sum_{i>k} w_i g_i),
// and it walks the ray front to back again, recomputing T, with the suffix sum taken as total - prefix, the
// total coming from the forward's outputs (instant-NGP, nerfacc).
#pragma once

#include "fastdream/common.h"

namespace fastdream {

// Samples [begin, end) of one ray, clamped to [0, n_samples) so that bad offsets cannot read out of bounds.
FD_HD void ray_range(const int64_t* offsets, int64_t ray, int64_t n_samples, int64_t* begin, int64_t* end) {
  int64_t b = offsets[ray], e = offsets[ray + 1];
  b = b < 0 ? 0 : (b > n_samples ? n_samples : b);
  e = e < b ? b : (e > n_samples ? n_samples : e);
  *begin = b;
  *end = e;
}

FD_HD void composite_forward_ray(int64_t begin, int64_t end, int channels, const float* sigmas, const float* colors,
                                 const float* t_starts, const float* t_ends, float eps, float* color, float* opacity,
                                 float* depth, float* weights) {
  for (int c = 0; c < channels; ++c) color[c] = 0.0f;
  float trans = 1.0f, acc = 0.0f, dep = 0.0f;
  int64_t i = begin;
  for (; i < end; ++i) {
    if (trans < eps) break;
    const float delta = t_ends[i] - t_starts[i];
    const float e = expf(-sigmas[i] * delta);
    const float w = trans * (1.0f - e);
    weights[i] = w;
    for (int c = 0; c < channels; ++c) color[c] += w * colors[i * channels + c];
    acc += w;
    dep += w * ((t_starts[i] + t_ends[i]) * 0.5f);
    trans *= e;
  }
  for (; i < end; ++i) weights[i] = 0.0f;
  *opacity = acc;
  *depth = dep;
}

// The gradient term g_i of sample i (see the top of the file).
FD_HD float composite_sample_gradient(int64_t i, int channels, const float* grad_color, float grad_opacity,
                                      float grad_depth, const float* grad_weights, const float* colors,
                                      const float* t_starts, const float* t_ends) {
  float g = grad_opacity + grad_depth * ((t_starts[i] + t_ends[i]) * 0.5f) + grad_weights[i];
  for (int c = 0; c < channels; ++c) g += grad_color[c] * colors[i * channels + c];
  return g;
}

// composite_backward_ray when a gradient term is NaN/inf: the suffix sums sum_{i>k} w_i g_i are taken one by one,
// from the back (the forward's weights), so that a NaN/inf at sample j reaches d/dsigma_k for k <= j only, as in
// the reference; total - prefix would carry it to every sample of the ray. Three walks instead of one: rare.
FD_HD void composite_backward_ray_nonfinite(int64_t begin, int64_t end, int channels, const float* grad_color,
                                            float grad_opacity, float grad_depth, const float* grad_weights,
                                            const float* sigmas, const float* colors, const float* t_starts,
                                            const float* t_ends, float eps, const float* weights, float* g_sigmas,
                                            float* g_colors) {
  float trans = 1.0f;
  int64_t stop = begin;  // the forward's first sample not composited
  for (; stop < end && !(trans < eps); ++stop) trans *= expf(-sigmas[stop] * (t_ends[stop] - t_starts[stop]));
  float suffix = 0.0f;
  for (int64_t i = stop - 1; i >= begin; --i) {  // g_sigmas[i] holds sum_{j>i} w_j g_j for now
    g_sigmas[i] = suffix;
    suffix += weights[i] * composite_sample_gradient(i, channels, grad_color, grad_opacity, grad_depth, grad_weights,
                                                     colors, t_starts, t_ends);
  }
  trans = 1.0f;
  for (int64_t i = begin; i < stop; ++i) {
    const float delta = t_ends[i] - t_starts[i];
    const float e = expf(-sigmas[i] * delta);
    const float w = trans * (1.0f - e);
    const float g = composite_sample_gradient(i, channels, grad_color, grad_opacity, grad_depth, grad_weights, colors,
                                              t_starts, t_ends);
    for (int c = 0; c < channels; ++c) g_colors[i * channels + c] = w * grad_color[c];
    g_sigmas[i] = delta * (trans * e * g - g_sigmas[i]);
    trans *= e;
  }
  for (int64_t i = stop; i < end; ++i) {
    g_sigmas[i] = 0.0f;
    for (int c = 0; c < channels; ++c) g_colors[i * channels + c] = 0.0f;
  }
}

// grad_color [channels] of this ray; grad_weights/weights/g_sigmas/g_colors indexed by sample.
FD_HD void composite_backward_ray(int64_t begin, int64_t end, int channels, const float* grad_color, float grad_opacity,
                                  float grad_depth, const float* grad_weights, const float* sigmas, const float* colors,
                                  const float* t_starts, const float* t_ends, float eps, const float* color,
                                  float opacity, float depth, const float* weights, float* g_sigmas, float* g_colors) {
  float total = grad_opacity * opacity + grad_depth * depth;
  for (int c = 0; c < channels; ++c) total += grad_color[c] * color[c];
  for (int64_t i = begin; i < end; ++i) total += grad_weights[i] * weights[i];
  if (!(fabsf(total) <= 3.402823466e38f)) {  // NaN or inf (fast math keeps NaN comparisons false)
    composite_backward_ray_nonfinite(begin, end, channels, grad_color, grad_opacity, grad_depth, grad_weights, sigmas,
                                     colors, t_starts, t_ends, eps, weights, g_sigmas, g_colors);
    return;
  }
  float trans = 1.0f, prefix = 0.0f;
  int64_t i = begin;
  for (; i < end; ++i) {
    if (trans < eps) break;
    const float delta = t_ends[i] - t_starts[i];
    const float e = expf(-sigmas[i] * delta);
    const float w = trans * (1.0f - e);
    float g = grad_opacity + grad_depth * ((t_starts[i] + t_ends[i]) * 0.5f) + grad_weights[i];
    for (int c = 0; c < channels; ++c) {
      g += grad_color[c] * colors[i * channels + c];
      g_colors[i * channels + c] = w * grad_color[c];
    }
    prefix += w * g;
    g_sigmas[i] = delta * (trans * e * g - (total - prefix));
    trans *= e;
  }
  for (; i < end; ++i) {
    g_sigmas[i] = 0.0f;
    for (int c = 0; c < channels; ++c) g_colors[i * channels + c] = 0.0f;
  }
}

}  // namespace fastdream

// SPDX-License-Identifier: Apache-2.0
// Compositing on the CPU: one task per block of rays, the per-ray code in fastdream/composite.h.
#include "fastdream/composite.h"

#include <ATen/Parallel.h>

#include <algorithm>

#include "fastdream/ops.h"

namespace fastdream {

namespace {
// A task gets at least kMinRays rays and about kSamplesPerTask samples: a sample costs a few nanoseconds, so
// smaller tasks spend more on waking threads than they save (milliseconds on a busy machine).
constexpr int64_t kMinRays = 128;
constexpr int64_t kSamplesPerTask = 1 << 17;

int64_t grain_for(int64_t n_rays, int64_t n_samples) {
  const int64_t by_samples = n_samples > 0 ? n_rays * kSamplesPerTask / n_samples : n_rays;
  return std::max<int64_t>(kMinRays, by_samples);
}

void check_f32(const torch::Tensor& t, const char* name, const torch::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous(), "composite: ", name,
              " must be a contiguous float32 tensor");
  TORCH_CHECK(t.device() == like.device(), "composite: ", name, " is on ", t.device(), ", expected ", like.device());
}
}  // namespace

void check_composite_inputs(const torch::Tensor& sigmas, const torch::Tensor& colors, const torch::Tensor& t_starts,
                            const torch::Tensor& t_ends, const torch::Tensor& offsets) {
  const int64_t s = sigmas.numel();
  check_f32(sigmas, "sigmas", sigmas);
  check_f32(colors, "colors", sigmas);
  check_f32(t_starts, "t_starts", sigmas);
  check_f32(t_ends, "t_ends", sigmas);
  TORCH_CHECK(
      sigmas.dim() == 1 && colors.dim() == 2 && colors.size(0) == s && t_starts.numel() == s && t_ends.numel() == s,
      "composite: expected sigmas [S], colors [S, C], t_starts [S], t_ends [S]");
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() >= 1 && offsets.scalar_type() == torch::kInt64 &&
                  offsets.is_contiguous() && offsets.device() == sigmas.device(),
              "composite: offsets must be a contiguous int64 [R + 1] tensor on the samples' device");
}

std::vector<torch::Tensor> composite_forward(torch::Tensor sigmas, torch::Tensor colors, torch::Tensor t_starts,
                                             torch::Tensor t_ends, torch::Tensor offsets, double early_stop_eps) {
  check_composite_inputs(sigmas, colors, t_starts, t_ends, offsets);
#ifdef FD_WITH_CUDA
  if (sigmas.is_cuda()) return composite_forward_cuda(sigmas, colors, t_starts, t_ends, offsets, early_stop_eps);
#endif
  TORCH_CHECK(sigmas.device().is_cpu(), "composite_forward: CUDA tensors but the CUDA part is not compiled");
  const int64_t r = offsets.numel() - 1, s = sigmas.numel();
  const int ch = static_cast<int>(colors.size(1));
  auto color = torch::empty({r, ch}, sigmas.options());
  auto opacity = torch::empty({r}, sigmas.options());
  auto depth = torch::empty({r}, sigmas.options());
  auto weights = torch::zeros({s}, sigmas.options());  // zeros: samples outside every ray range
  const int64_t* off = offsets.data_ptr<int64_t>();
  const float *sig = sigmas.data_ptr<float>(), *col = colors.data_ptr<float>();
  const float *ts = t_starts.data_ptr<float>(), *te = t_ends.data_ptr<float>();
  float *o_col = color.data_ptr<float>(), *o_op = opacity.data_ptr<float>(), *o_dep = depth.data_ptr<float>();
  float* o_w = weights.data_ptr<float>();
  const float eps = static_cast<float>(early_stop_eps);
  at::parallel_for(0, r, grain_for(r, s), [&](int64_t begin, int64_t end) {
    for (int64_t ray = begin; ray < end; ++ray) {
      int64_t b, e;
      ray_range(off, ray, s, &b, &e);
      composite_forward_ray(b, e, ch, sig, col, ts, te, eps, o_col + ray * ch, o_op + ray, o_dep + ray, o_w);
    }
  });
  return {color, opacity, depth, weights};
}

std::vector<torch::Tensor> composite_backward(torch::Tensor grad_color, torch::Tensor grad_opacity,
                                              torch::Tensor grad_depth, torch::Tensor grad_weights,
                                              torch::Tensor sigmas, torch::Tensor colors, torch::Tensor t_starts,
                                              torch::Tensor t_ends, torch::Tensor offsets, torch::Tensor color,
                                              torch::Tensor opacity, torch::Tensor depth, torch::Tensor weights,
                                              double early_stop_eps) {
  check_composite_inputs(sigmas, colors, t_starts, t_ends, offsets);
  const int64_t r = offsets.numel() - 1, s = sigmas.numel();
  const int ch = static_cast<int>(colors.size(1));
  check_f32(grad_color, "grad_color", sigmas);
  check_f32(grad_opacity, "grad_opacity", sigmas);
  check_f32(grad_depth, "grad_depth", sigmas);
  check_f32(grad_weights, "grad_weights", sigmas);
  check_f32(color, "color", sigmas);
  check_f32(opacity, "opacity", sigmas);
  check_f32(depth, "depth", sigmas);
  check_f32(weights, "weights", sigmas);
  TORCH_CHECK(grad_color.numel() == r * ch && color.numel() == r * ch && grad_opacity.numel() == r &&
                  grad_depth.numel() == r && opacity.numel() == r && depth.numel() == r && grad_weights.numel() == s &&
                  weights.numel() == s,
              "composite_backward: gradients and saved outputs do not match the samples' shapes");
#ifdef FD_WITH_CUDA
  if (sigmas.is_cuda())
    return composite_backward_cuda(grad_color, grad_opacity, grad_depth, grad_weights, sigmas, colors, t_starts, t_ends,
                                   offsets, color, opacity, depth, weights, early_stop_eps);
#endif
  TORCH_CHECK(sigmas.device().is_cpu(), "composite_backward: CUDA tensors but the CUDA part is not compiled");
  auto g_sigmas = torch::zeros_like(sigmas);
  auto g_colors = torch::zeros_like(colors);
  const int64_t* off = offsets.data_ptr<int64_t>();
  const float *gc = grad_color.data_ptr<float>(), *go = grad_opacity.data_ptr<float>();
  const float *gd = grad_depth.data_ptr<float>(), *gw = grad_weights.data_ptr<float>();
  const float *sig = sigmas.data_ptr<float>(), *col = colors.data_ptr<float>();
  const float *ts = t_starts.data_ptr<float>(), *te = t_ends.data_ptr<float>();
  const float *o_col = color.data_ptr<float>(), *o_op = opacity.data_ptr<float>(), *o_dep = depth.data_ptr<float>();
  const float* o_w = weights.data_ptr<float>();
  float *g_sig = g_sigmas.data_ptr<float>(), *g_col = g_colors.data_ptr<float>();
  const float eps = static_cast<float>(early_stop_eps);
  at::parallel_for(0, r, grain_for(r, s), [&](int64_t begin, int64_t end) {
    for (int64_t ray = begin; ray < end; ++ray) {
      int64_t b, e;
      ray_range(off, ray, s, &b, &e);
      composite_backward_ray(b, e, ch, gc + ray * ch, go[ray], gd[ray], gw, sig, col, ts, te, eps, o_col + ray * ch,
                             o_op[ray], o_dep[ray], o_w, g_sig, g_col);
    }
  });
  return {g_sigmas, g_colors};
}

}  // namespace fastdream

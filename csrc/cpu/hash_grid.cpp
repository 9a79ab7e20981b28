// SPDX-License-Identifier: Apache-2.0
// CPU loops of the hash-grid encoding. Per-point code: csrc/include/fastdream/hash_grid.h.
// Forward passes and the backward to x run in parallel over points; the backward to the table runs in
// parallel over levels (each thread owns whole level slices of the gradient: no atomics, deterministic).
#include "fastdream/hash_grid.h"

#include <ATen/Parallel.h>

#include <vector>

#include "fastdream/ops.h"

namespace fastdream {

namespace {
constexpr int64_t kGrain = 512;

std::vector<HashLevel> make_levels(const std::vector<int64_t>& resolutions, int64_t table_size) {
  std::vector<HashLevel> lv;
  lv.reserve(resolutions.size());
  for (int64_t r : resolutions) {
    TORCH_CHECK(r >= 1 && r < 65536, "hash grid: resolution out of range: ", r);
    lv.push_back(HashLevel{static_cast<int>(r), (r + 1) * (r + 1) * (r + 1) <= table_size});
  }
  return lv;
}

void check_inputs(const char* fn, const torch::Tensor& x, int64_t levels) {
  TORCH_CHECK(x.device().is_cpu(), fn, ": CUDA tensors but the CUDA part is not compiled");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == 3 && x.scalar_type() == torch::kFloat && x.is_contiguous(), fn,
              ": x must be a contiguous float32 [N, 3] tensor");
  TORCH_CHECK(levels >= 1, fn, ": at least one level");
}

void check_table(const char* fn, const torch::Tensor& table, int64_t levels) {
  TORCH_CHECK(
      table.dim() == 3 && table.size(0) == levels && table.scalar_type() == torch::kFloat && table.is_contiguous(), fn,
      ": table must be a contiguous float32 [L, S, F] tensor with L = len(resolutions)");
  const int64_t s = table.size(1);
  TORCH_CHECK(s > 0 && (s & (s - 1)) == 0, fn, ": the table size must be a power of two");
}

// Forward of every point: enc [N, L*F] and optionally jac [N, L*F, 3].
void forward_loop(const torch::Tensor& x, const torch::Tensor& table, const std::vector<HashLevel>& lv, double bound,
                  torch::Tensor& enc, torch::Tensor* jac) {
  const int64_t n = x.size(0), L = table.size(0), S = table.size(1), F = table.size(2);
  const float* xp = x.data_ptr<float>();
  const float* tp = table.data_ptr<float>();
  float* ep = enc.data_ptr<float>();
  float* jp = jac != nullptr ? jac->data_ptr<float>() : nullptr;
  const uint32_t mask = static_cast<uint32_t>(S - 1);
  const float b = static_cast<float>(bound);
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float u[3], du[3];
      hash_point(xp + 3 * i, b, u, du);
      for (int64_t l = 0; l < L; ++l) {
        hash_level_forward(u, du, lv[l], tp + l * S * F, static_cast<int>(F), mask, ep + (i * L + l) * F,
                           jp != nullptr ? jp + (i * L + l) * F * 3 : nullptr);
      }
    }
  });
}

// grad_table [L, S, F] from the gradient of the encoding (may be undefined) and of the Jacobian (may be
// undefined).
torch::Tensor backward_table_loop(const torch::Tensor& x, const torch::Tensor& grad_enc, const torch::Tensor& grad_jac,
                                  const std::vector<HashLevel>& lv, double bound, int64_t S, int64_t F) {
  const int64_t n = x.size(0), L = static_cast<int64_t>(lv.size());
  auto grad_table = torch::zeros({L, S, F}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* ge = grad_enc.defined() ? grad_enc.data_ptr<float>() : nullptr;
  const float* gj = grad_jac.defined() ? grad_jac.data_ptr<float>() : nullptr;
  float* gt = grad_table.data_ptr<float>();
  const uint32_t mask = static_cast<uint32_t>(S - 1);
  const float b = static_cast<float>(bound);
  at::parallel_for(0, L, 1, [&](int64_t lb, int64_t le) {
    for (int64_t l = lb; l < le; ++l) {
      for (int64_t i = 0; i < n; ++i) {
        float u[3], du[3];
        hash_point(xp + 3 * i, b, u, du);
        hash_level_backward_table(u, du, lv[l], static_cast<int>(F), mask,
                                  ge != nullptr ? ge + (i * L + l) * F : nullptr,
                                  gj != nullptr ? gj + (i * L + l) * F * 3 : nullptr, gt + l * S * F);
      }
    }
  });
  return grad_table;
}
}  // namespace

torch::Tensor hash_encode_forward(torch::Tensor x, torch::Tensor table, std::vector<int64_t> resolutions,
                                  double bound) {
#ifdef FD_WITH_CUDA
  if (x.is_cuda()) return hash_encode_forward_cuda(x, table, resolutions, bound);
#endif
  const int64_t L = static_cast<int64_t>(resolutions.size());
  check_inputs("hash_encode_forward", x, L);
  check_table("hash_encode_forward", table, L);
  const auto lv = make_levels(resolutions, table.size(1));
  auto enc = torch::empty({x.size(0), L * table.size(2)}, x.options());
  forward_loop(x, table, lv, bound, enc, nullptr);
  return enc;
}

std::tuple<torch::Tensor, torch::Tensor> hash_encode_jacobian_forward(torch::Tensor x, torch::Tensor table,
                                                                      std::vector<int64_t> resolutions, double bound) {
#ifdef FD_WITH_CUDA
  if (x.is_cuda()) return hash_encode_jacobian_forward_cuda(x, table, resolutions, bound);
#endif
  const int64_t L = static_cast<int64_t>(resolutions.size());
  check_inputs("hash_encode_jacobian_forward", x, L);
  check_table("hash_encode_jacobian_forward", table, L);
  const auto lv = make_levels(resolutions, table.size(1));
  auto enc = torch::empty({x.size(0), L * table.size(2)}, x.options());
  auto jac = torch::empty({x.size(0), L * table.size(2), 3}, x.options());
  forward_loop(x, table, lv, bound, enc, &jac);
  return {enc, jac};
}

std::tuple<torch::Tensor, torch::Tensor> hash_encode_backward(torch::Tensor grad, torch::Tensor x, torch::Tensor table,
                                                              std::vector<int64_t> resolutions, double bound,
                                                              bool need_x) {
#ifdef FD_WITH_CUDA
  if (x.is_cuda()) return hash_encode_backward_cuda(grad, x, table, resolutions, bound, need_x);
#endif
  const int64_t L = static_cast<int64_t>(resolutions.size());
  check_inputs("hash_encode_backward", x, L);
  check_table("hash_encode_backward", table, L);
  const int64_t n = x.size(0), S = table.size(1), F = table.size(2);
  TORCH_CHECK(
      grad.sizes() == torch::IntArrayRef({n, L * F}) && grad.is_contiguous() && grad.scalar_type() == torch::kFloat,
      "hash_encode_backward: grad must be a contiguous float32 [N, L*F] tensor");
  const auto lv = make_levels(resolutions, S);
  auto grad_table = backward_table_loop(x, grad, torch::Tensor(), lv, bound, S, F);
  auto grad_x = torch::zeros_like(x);
  if (need_x) {
    const float* xp = x.data_ptr<float>();
    const float* tp = table.data_ptr<float>();
    const float* gp = grad.data_ptr<float>();
    float* gx = grad_x.data_ptr<float>();
    const uint32_t mask = static_cast<uint32_t>(S - 1);
    const float b = static_cast<float>(bound);
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        float u[3], du[3];
        hash_point(xp + 3 * i, b, u, du);
        for (int64_t l = 0; l < L; ++l) {
          hash_level_backward_x(u, du, lv[l], tp + l * S * F, static_cast<int>(F), mask, gp + (i * L + l) * F,
                                gx + 3 * i);
        }
      }
    });
  }
  return {grad_table, grad_x};
}

torch::Tensor hash_encode_jacobian_backward(torch::Tensor grad_enc, torch::Tensor grad_jac, torch::Tensor x,
                                            std::vector<int64_t> resolutions, double bound, int64_t table_size) {
#ifdef FD_WITH_CUDA
  if (x.is_cuda()) return hash_encode_jacobian_backward_cuda(grad_enc, grad_jac, x, resolutions, bound, table_size);
#endif
  const int64_t L = static_cast<int64_t>(resolutions.size());
  check_inputs("hash_encode_jacobian_backward", x, L);
  TORCH_CHECK(table_size > 0 && (table_size & (table_size - 1)) == 0,
              "hash_encode_jacobian_backward: the table size must be a power of two");
  const int64_t n = x.size(0);
  TORCH_CHECK(grad_enc.dim() == 2 && grad_enc.size(0) == n && grad_enc.size(1) % L == 0 && grad_enc.is_contiguous() &&
                  grad_enc.scalar_type() == torch::kFloat,
              "hash_encode_jacobian_backward: grad_enc must be a contiguous float32 [N, L*F] tensor");
  const int64_t F = grad_enc.size(1) / L;
  TORCH_CHECK(grad_jac.sizes() == torch::IntArrayRef({n, L * F, 3}) && grad_jac.is_contiguous() &&
                  grad_jac.scalar_type() == torch::kFloat,
              "hash_encode_jacobian_backward: grad_jac must be a contiguous float32 [N, L*F, 3] tensor");
  const auto lv = make_levels(resolutions, table_size);
  return backward_table_loop(x, grad_enc, grad_jac, lv, bound, table_size, F);
}

}  // namespace fastdream

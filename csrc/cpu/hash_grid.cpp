// SPDX-License-Identifier: Apache-2.0
// CPU loops of the hash-grid encoding. Per-point code: csrc/include/fastdream/hash_grid.h.
// Forward passes and the backward to x run in parallel over points; the backward to the table runs in
// parallel over levels (each thread owns whole level slices of the gradient: no atomics, deterministic).
#include "fastdream/hash_grid.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "fastdream/ops.h"

namespace fastdream {

namespace {
constexpr int64_t kChunk = 2048;

// Software prefetch of the table rows one point's cell reads (or the gradient rows it adds to) at one level,
// kPrefetch points ahead of the point being computed. A fine level's rows lie in random places of a table larger
// than the caches, and a loop that waits for each gather runs at memory latency. The values computed are unchanged.
constexpr int64_t kPrefetch = 8;

inline void prefetch_line(const void* p) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  // An asm statement: GCC 12 at -O1 and above deleted every __builtin_prefetch of these addresses (its
  // interprocedural mod/ref analysis; -fno-ipa-modref kept them), and the loops ran without any.
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#elif defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p);
#else
  (void)p;
#endif
}

template <typename T>
inline void prefetch_cell(const T u[3], HashLevel lv, uint32_t mask, const T* rows, int64_t F) {
  uint32_t idx[8];
  T w[8];
  hash_level_cell<T>(u, lv.res, lv.dense, mask, idx, w, nullptr);
  for (int c = 0; c < 8; ++c) prefetch_line(rows + static_cast<int64_t>(idx[c]) * F);
}

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
  TORCH_CHECK(x.dim() == 2 && x.size(1) == 3 && x.is_contiguous() &&
                  (x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kDouble),
              fn, ": x must be a contiguous float32 or float64 [N, 3] tensor");
  TORCH_CHECK(levels >= 1, fn, ": at least one level");
}

void check_same_type(const char* fn, const char* name, const torch::Tensor& t, const torch::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.is_contiguous() && t.device() == x.device(), fn, ": ", name,
              " must be contiguous, on x's device and of x's dtype");
}

void check_table(const char* fn, const torch::Tensor& table, const torch::Tensor& x, int64_t levels) {
  check_same_type(fn, "table", table, x);
  TORCH_CHECK(table.dim() == 3 && table.size(0) == levels, fn,
              ": table must be an [L, S, F] tensor with L = len(resolutions)");
  const int64_t s = table.size(1);
  TORCH_CHECK(s > 0 && (s & (s - 1)) == 0, fn, ": the table size must be a power of two");
}

// Forward of every point: enc [N, L*F] and optionally jac [N, L*F, 3]. kF: F at compile time (0: at run time).
template <typename T, int kF>
void forward_loop_f(const torch::Tensor& x, const torch::Tensor& table, const std::vector<HashLevel>& lv, double bound,
                    torch::Tensor& enc, torch::Tensor* jac) {
  const int64_t n = x.size(0), L = table.size(0), S = table.size(1), F = table.size(2);
  const T* xp = x.data_ptr<T>();
  const T* tp = table.data_ptr<T>();
  T* ep = enc.data_ptr<T>();
  T* jp = jac != nullptr ? jac->data_ptr<T>() : nullptr;
  const uint32_t mask = static_cast<uint32_t>(S - 1);
  const T b = static_cast<T>(bound);
  // Chunks of points, level by level inside a chunk: one level's table (a few MB) stays in cache while
  // the chunk's points gather from it, instead of all L tables competing for it point after point.
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<T> u(3 * kChunk), du(3 * kChunk);
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t i0 = c * kChunk, i1 = std::min(n, i0 + kChunk);
      for (int64_t i = i0; i < i1; ++i) hash_point(xp + 3 * i, b, &u[3 * (i - i0)], &du[3 * (i - i0)]);
      for (int64_t l = 0; l < L; ++l) {
        const T* tl = tp + l * S * F;
        // Whether the Jacobian is wanted, as a constant in each loop: the encode-only loop has no test per point.
        const auto points = [&](auto with_jac) {
          for (int64_t i = i0; i < i1; ++i) {
            if (i + kPrefetch < i1) prefetch_cell(&u[3 * (i + kPrefetch - i0)], lv[l], mask, tl, F);
            T* jac_i = decltype(with_jac)::value ? jp + (i * L + l) * F * 3 : nullptr;
            hash_level_forward<T, T, kF>(&u[3 * (i - i0)], &du[3 * (i - i0)], lv[l], tl, static_cast<int>(F), mask,
                                         ep + (i * L + l) * F, jac_i);
          }
        };
        if (jp != nullptr) {
          points(std::true_type{});
        } else {
          points(std::false_type{});
        }
      }
    }
  });
}

// grad_table [L, S, F] from the gradient of the encoding (may be undefined) and of the Jacobian (may be
// undefined).
template <typename T, int kF>
void backward_table_loop_f(const torch::Tensor& x, const torch::Tensor& grad_enc, const torch::Tensor& grad_jac,
                           const std::vector<HashLevel>& lv, double bound, torch::Tensor& grad_table) {
  const int64_t n = x.size(0), L = grad_table.size(0), S = grad_table.size(1), F = grad_table.size(2);
  const T* xp = x.data_ptr<T>();
  const T* ge = grad_enc.defined() ? grad_enc.data_ptr<T>() : nullptr;
  const T* gj = grad_jac.defined() ? grad_jac.data_ptr<T>() : nullptr;
  T* gt = grad_table.data_ptr<T>();
  const uint32_t mask = static_cast<uint32_t>(S - 1);
  const T b = static_cast<T>(bound);
  // Whether a Jacobian gradient comes, as a constant in each loop (as in forward_loop_f).
  const auto levels = [&](auto with_jac) {
    at::parallel_for(0, L, 1, [&](int64_t lb, int64_t le) {
      std::vector<T> u(3 * kChunk), du(3 * kChunk);
      for (int64_t l = lb; l < le; ++l) {
        T* gl = gt + l * S * F;
        for (int64_t i0 = 0; i0 < n; i0 += kChunk) {  // chunks: the prefetch reads a later point's position
          const int64_t i1 = std::min(n, i0 + kChunk);
          for (int64_t i = i0; i < i1; ++i) hash_point(xp + 3 * i, b, &u[3 * (i - i0)], &du[3 * (i - i0)]);
          for (int64_t i = i0; i < i1; ++i) {
            if (i + kPrefetch < i1) prefetch_cell(&u[3 * (i + kPrefetch - i0)], lv[l], mask, gl, F);
            const T* gj_i = decltype(with_jac)::value ? gj + (i * L + l) * F * 3 : nullptr;
            hash_level_backward_table<T, kF>(&u[3 * (i - i0)], &du[3 * (i - i0)], lv[l], static_cast<int>(F), mask,
                                             ge != nullptr ? ge + (i * L + l) * F : nullptr, gj_i, gl);
          }
        }
      }
    });
  };
  if (gj != nullptr) {
    levels(std::true_type{});
  } else {
    levels(std::false_type{});
  }
}

template <typename T, int kF>
void backward_x_loop_f(const torch::Tensor& grad, const torch::Tensor& x, const torch::Tensor& table,
                       const std::vector<HashLevel>& lv, double bound, torch::Tensor& grad_x) {
  const int64_t n = x.size(0), L = table.size(0), S = table.size(1), F = table.size(2);
  const T* xp = x.data_ptr<T>();
  const T* tp = table.data_ptr<T>();
  const T* gp = grad.data_ptr<T>();
  T* gx = grad_x.data_ptr<T>();
  const uint32_t mask = static_cast<uint32_t>(S - 1);
  const T b = static_cast<T>(bound);
  const int64_t chunks = (n + kChunk - 1) / kChunk;  // level by level inside a chunk, as in forward_loop
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<T> u(3 * kChunk), du(3 * kChunk);
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t i0 = c * kChunk, i1 = std::min(n, i0 + kChunk);
      for (int64_t i = i0; i < i1; ++i) hash_point(xp + 3 * i, b, &u[3 * (i - i0)], &du[3 * (i - i0)]);
      for (int64_t l = 0; l < L; ++l) {
        const T* tl = tp + l * S * F;
        for (int64_t i = i0; i < i1; ++i) {
          if (i + kPrefetch < i1) prefetch_cell(&u[3 * (i + kPrefetch - i0)], lv[l], mask, tl, F);
          hash_level_backward_x<T, T, kF>(&u[3 * (i - i0)], &du[3 * (i - i0)], lv[l], tl, static_cast<int>(F), mask,
                                          gp + (i * L + l) * F, gx + 3 * i);
        }
      }
    }
  });
}

// The loops above with F = 2 (the field's, and the default) fixed at compile time, any other F read at run time.
template <typename T>
void forward_loop(const torch::Tensor& x, const torch::Tensor& table, const std::vector<HashLevel>& lv, double bound,
                  torch::Tensor& enc, torch::Tensor* jac) {
  if (table.size(2) == 2) {
    forward_loop_f<T, 2>(x, table, lv, bound, enc, jac);
  } else {
    forward_loop_f<T, 0>(x, table, lv, bound, enc, jac);
  }
}

template <typename T>
void backward_table_loop(const torch::Tensor& x, const torch::Tensor& grad_enc, const torch::Tensor& grad_jac,
                         const std::vector<HashLevel>& lv, double bound, torch::Tensor& grad_table) {
  if (grad_table.size(2) == 2) {
    backward_table_loop_f<T, 2>(x, grad_enc, grad_jac, lv, bound, grad_table);
  } else {
    backward_table_loop_f<T, 0>(x, grad_enc, grad_jac, lv, bound, grad_table);
  }
}

template <typename T>
void backward_x_loop(const torch::Tensor& grad, const torch::Tensor& x, const torch::Tensor& table,
                     const std::vector<HashLevel>& lv, double bound, torch::Tensor& grad_x) {
  if (table.size(2) == 2) {
    backward_x_loop_f<T, 2>(grad, x, table, lv, bound, grad_x);
  } else {
    backward_x_loop_f<T, 0>(grad, x, table, lv, bound, grad_x);
  }
}
}  // namespace

torch::Tensor hash_encode_forward(torch::Tensor x, torch::Tensor table, std::vector<int64_t> resolutions,
                                  double bound) {
#ifdef FD_WITH_CUDA
  if (x.is_cuda()) return hash_encode_forward_cuda(x, table, resolutions, bound);
#endif
  const int64_t L = static_cast<int64_t>(resolutions.size());
  check_inputs("hash_encode_forward", x, L);
  check_table("hash_encode_forward", table, x, L);
  const auto lv = make_levels(resolutions, table.size(1));
  auto enc = torch::empty({x.size(0), L * table.size(2)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hash_encode_forward",
                             [&] { forward_loop<scalar_t>(x, table, lv, bound, enc, nullptr); });
  return enc;
}

std::tuple<torch::Tensor, torch::Tensor> hash_encode_jacobian_forward(torch::Tensor x, torch::Tensor table,
                                                                      std::vector<int64_t> resolutions, double bound) {
#ifdef FD_WITH_CUDA
  if (x.is_cuda()) return hash_encode_jacobian_forward_cuda(x, table, resolutions, bound);
#endif
  const int64_t L = static_cast<int64_t>(resolutions.size());
  check_inputs("hash_encode_jacobian_forward", x, L);
  check_table("hash_encode_jacobian_forward", table, x, L);
  const auto lv = make_levels(resolutions, table.size(1));
  auto enc = torch::empty({x.size(0), L * table.size(2)}, x.options());
  auto jac = torch::empty({x.size(0), L * table.size(2), 3}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hash_encode_jacobian_forward",
                             [&] { forward_loop<scalar_t>(x, table, lv, bound, enc, &jac); });
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
  check_table("hash_encode_backward", table, x, L);
  check_same_type("hash_encode_backward", "grad", grad, x);
  const int64_t n = x.size(0), S = table.size(1), F = table.size(2);
  TORCH_CHECK(grad.sizes() == torch::IntArrayRef({n, L * F}), "hash_encode_backward: grad must be [N, L*F]");
  const auto lv = make_levels(resolutions, S);
  auto grad_table = torch::zeros_like(table);
  auto grad_x = torch::zeros_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hash_encode_backward", [&] {
    backward_table_loop<scalar_t>(x, grad, torch::Tensor(), lv, bound, grad_table);
    if (need_x) backward_x_loop<scalar_t>(grad, x, table, lv, bound, grad_x);
  });
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
  check_same_type("hash_encode_jacobian_backward", "grad_enc", grad_enc, x);
  check_same_type("hash_encode_jacobian_backward", "grad_jac", grad_jac, x);
  const int64_t n = x.size(0);
  TORCH_CHECK(grad_enc.dim() == 2 && grad_enc.size(0) == n && grad_enc.size(1) % L == 0,
              "hash_encode_jacobian_backward: grad_enc must be [N, L*F]");
  const int64_t F = grad_enc.size(1) / L;
  TORCH_CHECK(grad_jac.sizes() == torch::IntArrayRef({n, L * F, 3}),
              "hash_encode_jacobian_backward: grad_jac must be [N, L*F, 3]");
  const auto lv = make_levels(resolutions, table_size);
  auto grad_table = torch::zeros({L, table_size, F}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hash_encode_jacobian_backward",
                             [&] { backward_table_loop<scalar_t>(x, grad_enc, grad_jac, lv, bound, grad_table); });
  return grad_table;
}

}  // namespace fastdream

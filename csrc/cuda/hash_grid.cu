// SPDX-License-Identifier: Apache-2.0
// CUDA launches of the hash-grid encoding: one thread per (point, level). Per-point code:
// csrc/include/fastdream/hash_grid.h (the table gradient accumulates with atomicAdd there).
//
// Table reads: the table is float32 (or float64), or, for float32 positions, float16: fp16 reads (half the bytes
// of every gather; the default 16-level table is 32 MiB in fp16, which fits an H100's 50 MiB L2, against 64 MiB
// in fp32), converted to fp32 before any arithmetic. The gradient of the table is always float32 (fp32 atomics),
// whatever the table's read type: fastdream/ops/hash_grid.py passes an fp16 copy of the fp32 master table.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "fastdream/hash_grid.h"
#include "fastdream/ops.h"

namespace fastdream {

namespace {
constexpr int kThreads = 256;
constexpr int kMaxLevels = 32;

struct Levels {
  HashLevel lv[kMaxLevels];
  int count;
};

Levels make_levels_cuda(const std::vector<int64_t>& resolutions, int64_t table_size) {
  TORCH_CHECK(resolutions.size() >= 1 && resolutions.size() <= kMaxLevels, "hash grid (CUDA): 1 to ", kMaxLevels,
              " levels");
  Levels out{};
  out.count = static_cast<int>(resolutions.size());
  for (size_t l = 0; l < resolutions.size(); ++l) {
    const int64_t r = resolutions[l];
    TORCH_CHECK(r >= 1 && r < 65536, "hash grid: resolution out of range: ", r);
    out.lv[l] = HashLevel{static_cast<int>(r), (r + 1) * (r + 1) * (r + 1) <= table_size};
  }
  return out;
}

int blocks_for(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

// Thread t handles point t / L at level t % L: neighbouring threads read neighbouring table slices' rows of
// the same point (the points are the coalesced dimension of the outputs).
template <typename T, typename TT>
__global__ void forward_kernel(int64_t n, Levels levels, const T* __restrict__ x, const TT* __restrict__ table,
                               int64_t S, int F, T bound, T* __restrict__ enc, T* __restrict__ jac) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int L = levels.count;
  if (t >= n * L) return;
  const int64_t i = t / L;
  const int l = static_cast<int>(t % L);
  T u[3], du[3];
  hash_point(x + 3 * i, bound, u, du);
  hash_level_forward(u, du, levels.lv[l], table + l * S * F, F, static_cast<uint32_t>(S - 1), enc + (i * L + l) * F,
                     jac != nullptr ? jac + (i * L + l) * F * 3 : nullptr);
}

template <typename T>
__global__ void backward_table_kernel(int64_t n, Levels levels, const T* __restrict__ x, int64_t S, int F, T bound,
                                      const T* __restrict__ grad_enc, const T* __restrict__ grad_jac,
                                      T* __restrict__ grad_table) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int L = levels.count;
  if (t >= n * L) return;
  const int64_t i = t / L;
  const int l = static_cast<int>(t % L);
  T u[3], du[3];
  hash_point(x + 3 * i, bound, u, du);
  hash_level_backward_table(u, du, levels.lv[l], F, static_cast<uint32_t>(S - 1),
                            grad_enc != nullptr ? grad_enc + (i * L + l) * F : nullptr,
                            grad_jac != nullptr ? grad_jac + (i * L + l) * F * 3 : nullptr, grad_table + l * S * F);
}

// The float2 and float4 atomicAdd overloads: sm_90+ device code, declared by CUDA 12.1 and later (an older nvcc
// would fail the whole build on them; it gets the scalar atomics instead).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && \
    (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 1))
#define FD_VECTOR_ATOMICS 1
#else
#define FD_VECTOR_ATOMICS 0
#endif

// float32 tables with F = 2 (the default): the two features of a vertex are one 8-byte word. The forward reads
// them with one float2 load, the backward adds them with one float2 atomic on sm_90+ (CUDA 12.1+: half the
// atomic operations of two scalar ones; each component is still an fp32 add, so results are unchanged up to
// the order of additions, which atomics leave free anyway). Used only when the pointers are 8-byte aligned.
__device__ __forceinline__ void atomic_add_float2(float* p, float a, float b) {
#if FD_VECTOR_ATOMICS
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b));
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
#endif
}

// Four floats (two vertices' F = 2 features) in one atomic on sm_90+ (CUDA 12.1+); two float2 ones before.
__device__ __forceinline__ void atomic_add_float4(float* p, float4 v) {
#if FD_VECTOR_ATOMICS
  atomicAdd(reinterpret_cast<float4*>(p), v);
#else
  atomic_add_float2(p, v.x, v.y);
  atomic_add_float2(p + 2, v.z, v.w);
#endif
}

__device__ __forceinline__ float2 load_pair(const float* p) { return __ldg(reinterpret_cast<const float2*>(p)); }
__device__ __forceinline__ float2 load_pair(const __half* p) {
  return __half22float2(__ldg(reinterpret_cast<const __half2*>(p)));
}

template <typename TT>
__global__ void forward_f2_kernel(int64_t n, Levels levels, const float* __restrict__ x, const TT* __restrict__ table,
                                  int64_t S, float bound, float* __restrict__ enc) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int L = levels.count;
  if (t >= n * L) return;
  const int64_t i = t / L;
  const int l = static_cast<int>(t % L);
  float u[3], du[3];
  hash_point(x + 3 * i, bound, u, du);
  uint32_t idx[8];
  float w[8];
  hash_level_cell<float>(u, levels.lv[l].res, levels.lv[l].dense, static_cast<uint32_t>(S - 1), idx, w, nullptr);
  const TT* table_l = table + l * S * 2;
  float e0 = 0.f, e1 = 0.f;
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const float2 v = load_pair(table_l + static_cast<int64_t>(idx[c]) * 2);
    e0 += w[c] * v.x;
    e1 += w[c] * v.y;
  }
  float* out = enc + (i * L + l) * 2;
  out[0] = e0;
  out[1] = e1;
}

// The table gradient of one point at one level (F = 2, fp32): vertex indices and the two features' gradients per
// corner, from the encoding's gradient (grad_enc, may be nullptr) and the Jacobian's (grad_jac, may be nullptr).
__device__ __forceinline__ void f2_corner_grads(int64_t i, int l, int L, const HashLevel lv, const float* x,
                                                uint32_t mask, float bound, const float* __restrict__ grad_enc,
                                                const float* __restrict__ grad_jac, uint32_t idx[8], float a[8],
                                                float b[8]) {
  float u[3], du[3];
  hash_point(x + 3 * i, bound, u, du);
  float w[8], dw[8][3];
  // Two calls, not one with `grad_jac != nullptr ? dw : nullptr`: a pointer that may be null keeps dw out of
  // registers (a 96-byte stack frame and 22 local loads and stores per thread in all three F = 2 backward kernels,
  // seen in their sm_90 code in session 10).
  if (grad_jac != nullptr) {
    hash_level_cell<float>(u, lv.res, lv.dense, mask, idx, w, dw);
  } else {
    hash_level_cell<float>(u, lv.res, lv.dense, mask, idx, w, nullptr);
  }
  float g0 = 0.f, g1 = 0.f;
  if (grad_enc != nullptr) {
    g0 = grad_enc[(i * L + l) * 2 + 0];
    g1 = grad_enc[(i * L + l) * 2 + 1];
  }
  float j[6] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (grad_jac != nullptr) {
    const float r = static_cast<float>(lv.res);
    const float* gj = grad_jac + (i * L + l) * 6;
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      j[k] = gj[k] * r * du[k];
      j[3 + k] = gj[3 + k] * r * du[k];
    }
  }
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    a[c] = w[c] * g0;
    b[c] = w[c] * g1;
    if (grad_jac != nullptr) {
      a[c] += dw[c][0] * j[0] + dw[c][1] * j[1] + dw[c][2] * j[2];
      b[c] += dw[c][0] * j[3] + dw[c][1] * j[4] + dw[c][2] * j[5];
    }
  }
}

__global__ void backward_table_f2_kernel(int64_t n, Levels levels, const float* __restrict__ x, int64_t S, float bound,
                                         const float* __restrict__ grad_enc, const float* __restrict__ grad_jac,
                                         float* __restrict__ grad_table, bool pair16) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int L = levels.count;
  if (t >= n * L) return;
  const int64_t i = t / L;
  const int l = static_cast<int>(t % L);
  uint32_t idx[8];
  float a[8], b[8];
  f2_corner_grads(i, l, L, levels.lv[l], x, static_cast<uint32_t>(S - 1), bound, grad_enc, grad_jac, idx, a, b);
  float* grad_l = grad_table + l * S * 2;
  // Corners c and c + 1 differ in x only. Dense levels index them i and i + 1; hashed levels i ^ h and (i + 1) ^ h
  // (x has prime 1), which are the two halves of one 16-byte pair {2k, 2k + 1} whenever i is even. Such a pair
  // takes one float4 atomic instead of two float2 ones (sm_90+; the grad table and each level's slice are
  // 16-byte aligned: checked by the launcher): about 6 atomics per point and level instead of 8.
#pragma unroll
  for (int c = 0; c < 8; c += 2) {
    const uint32_t i0 = idx[c], i1 = idx[c + 1];
    if (pair16 && (i0 ^ i1) == 1u) {
      const bool lo0 = (i0 & 1u) == 0u;
      const float4 v = lo0 ? make_float4(a[c], b[c], a[c + 1], b[c + 1]) : make_float4(a[c + 1], b[c + 1], a[c], b[c]);
      if (v.x != 0.f || v.y != 0.f || v.z != 0.f || v.w != 0.f)
        atomic_add_float4(grad_l + static_cast<int64_t>(i0 & ~1u) * 2, v);
      continue;
    }
    if (a[c] != 0.f || b[c] != 0.f) atomic_add_float2(grad_l + static_cast<int64_t>(i0) * 2, a[c], b[c]);
    if (a[c + 1] != 0.f || b[c + 1] != 0.f)
      atomic_add_float2(grad_l + static_cast<int64_t>(i1) * 2, a[c + 1], b[c + 1]);
  }
}

// The warp kernels' layout: warp w takes level w % L and points 32 (w / L) ... 32 (w / L) + 31. Warps wholly past
// the last point are inactive (they return whole); lanes past n in an active warp still take part.
struct WarpLane {
  int64_t point;
  int lane, level;
  bool active;
};

__device__ __forceinline__ WarpLane warp_lane(int64_t n, int L) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t warp = t >> 5;
  const int lane = static_cast<int>(threadIdx.x & 31);
  return WarpLane{(warp / L) * 32 + lane, lane, static_cast<int>(warp % L), (warp / L) * 32 < n};
}

// f2_corner_grads for one lane of the warp kernels below: a lane past n takes a vertex index no level has
// (0xFFFFFFFF) and a zero gradient, so that it can still take part in the warp's shuffles.
__device__ __forceinline__ void lane_corner_grads(int64_t i, int64_t n, int l, int L, const HashLevel lv,
                                                  const float* x, uint32_t mask, float bound,
                                                  const float* __restrict__ grad_enc,
                                                  const float* __restrict__ grad_jac, uint32_t idx[8], float a[8],
                                                  float b[8]) {
  if (i < n) {
    f2_corner_grads(i, l, L, lv, x, mask, bound, grad_enc, grad_jac, idx, a, b);
    return;
  }
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    idx[c] = 0xFFFFFFFFu;
    a[c] = b[c] = 0.f;
  }
}

// The same gradient with warp aggregation, for points that come ray by ray (the renderer's order). A warp takes
// 32 consecutive points at one level (warp w: level w % L, points 32 (w / L) ...), so along a ray neighbouring
// lanes often share a vertex, at the coarse levels nearly always. Per corner, runs of lanes with the same vertex
// are summed with a segmented suffix scan over shuffles and the run's first lane adds the sum: one atomic per run
// instead of one per lane. Lanes past n take a vertex index no level has (0xFFFFFFFF) and a zero gradient.
// The default for F = 2 fp32 until 2026-11-28 (FASTDREAM_HASH_BACKWARD=warp now): on an H100 (benchmarks/RESULTS.md),
// forward+backward of 2^20 points in the renderer's ray order took 1.73 ms against 2.15 for the plain kernel below;
// on independent uniform points (no runs, and no paired atomics) 3.49 against 2.89 ms. FASTDREAM_HASH_BACKWARD=plain
// selects backward_table_f2_kernel.
__global__ void backward_table_f2_warp_kernel(int64_t n, Levels levels, const float* __restrict__ x, int64_t S,
                                              float bound, const float* __restrict__ grad_enc,
                                              const float* __restrict__ grad_jac, float* __restrict__ grad_table) {
  const int L = levels.count;
  const WarpLane w = warp_lane(n, L);
  if (!w.active) return;  // whole warps only: every lane below takes part in the shuffles
  const int lane = w.lane, l = w.level;
  uint32_t idx[8];
  float a[8], b[8];
  lane_corner_grads(w.point, n, l, L, levels.lv[l], x, static_cast<uint32_t>(S - 1), bound, grad_enc, grad_jac, idx, a,
                    b);
  float* grad_l = grad_table + l * S * 2;
  constexpr unsigned kAll = 0xFFFFFFFFu;
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const uint32_t key = idx[c];
    const uint32_t prev = __shfl_up_sync(kAll, key, 1);
    const bool head = lane == 0 || prev != key;
    const unsigned heads = __ballot_sync(kAll, head);
    const unsigned after = lane == 31 ? 0u : heads & (kAll << (lane + 1));  // run starts past this lane
    const int run_end = after ? __ffs(after) - 1 : 32;                      // first lane of the next run
    float va = a[c], vb = b[c];
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const float na = __shfl_down_sync(kAll, va, d);
      const float nb = __shfl_down_sync(kAll, vb, d);
      if (lane + d < run_end) {
        va += na;
        vb += nb;
      }
    }
    if (head && key != 0xFFFFFFFFu && (va != 0.f || vb != 0.f))
      atomic_add_float2(grad_l + static_cast<int64_t>(key) * 2, va, vb);
  }
}

// Adds one point's (or one run's) gradient of a corner pair c, c + 1 (keys k0, k1; v = {a_c, b_c, a_c+1, b_c+1}):
// one float4 atomic when the two vertices are the halves of one 16-byte pair, else up to two float2 ones.
__device__ __forceinline__ void add_corner_pair(float* grad_l, uint32_t k0, uint32_t k1, float4 v, bool pair16) {
  if (k0 == 0xFFFFFFFFu) return;  // a lane past n
  if (pair16 && (k0 ^ k1) == 1u) {
    const float4 o = (k0 & 1u) == 0u ? v : make_float4(v.z, v.w, v.x, v.y);
    if (o.x != 0.f || o.y != 0.f || o.z != 0.f || o.w != 0.f)
      atomic_add_float4(grad_l + static_cast<int64_t>(k0 & ~1u) * 2, o);
    return;
  }
  if (v.x != 0.f || v.y != 0.f) atomic_add_float2(grad_l + static_cast<int64_t>(k0) * 2, v.x, v.y);
  if (v.z != 0.f || v.w != 0.f) atomic_add_float2(grad_l + static_cast<int64_t>(k1) * 2, v.z, v.w);
}

// FASTDREAM_HASH_BACKWARD=hybrid: the warp kernel's thread layout, deciding per warp and corner pair (c, c + 1:
// the two vertices along x, which share runs since a run is one cell) whether aggregation pays. The ballot of run
// heads is warp-uniform, so the choice costs no divergence: with more than `max_heads` runs of 32 lanes (the fine
// levels along a ray, or unordered points) every lane adds its own pair; otherwise the runs are summed (one
// segmented scan of four floats per pair: the warp kernel's shuffles, half its ballots) and their first lanes add. Both
// paths add a pair with one float4 atomic when its vertices share a 16-byte pair, as the plain kernel does,
// which the warp kernel never does. The default since 2026-11-28: on an H200, 2^20 of the renderer's own samples
// (bench_hash_grid.py's ``march``) took 1.71 ms forward+backward against the warp kernel's 1.94, and 2.36 against
// 2.61 with the Jacobian (normals), and it was no slower in any of the six timed cases; on an H100 (session 21) it
// was 0.83-0.92x the warp kernel without the Jacobian and 0.93-0.94x with it, in all three layouts.
__global__ void backward_table_f2_hybrid_kernel(int64_t n, Levels levels, const float* __restrict__ x, int64_t S,
                                                float bound, const float* __restrict__ grad_enc,
                                                const float* __restrict__ grad_jac, float* __restrict__ grad_table,
                                                bool pair16, int max_heads) {
  const int L = levels.count;
  const WarpLane w = warp_lane(n, L);
  if (!w.active) return;  // whole warps only: every lane below takes part in the shuffles
  const int lane = w.lane, l = w.level;
  uint32_t idx[8];
  float a[8], b[8];
  lane_corner_grads(w.point, n, l, L, levels.lv[l], x, static_cast<uint32_t>(S - 1), bound, grad_enc, grad_jac, idx, a,
                    b);
  float* grad_l = grad_table + l * S * 2;
  constexpr unsigned kAll = 0xFFFFFFFFu;
#pragma unroll
  for (int c = 0; c < 8; c += 2) {
    const uint32_t k0 = idx[c], k1 = idx[c + 1];
    const uint32_t p0 = __shfl_up_sync(kAll, k0, 1), p1 = __shfl_up_sync(kAll, k1, 1);
    const bool head = lane == 0 || p0 != k0 || p1 != k1;
    const unsigned heads = __ballot_sync(kAll, head);
    float4 v = make_float4(a[c], b[c], a[c + 1], b[c + 1]);
    if (__popc(heads) > max_heads) {  // warp-uniform
      add_corner_pair(grad_l, k0, k1, v, pair16);
      continue;
    }
    const unsigned after = lane == 31 ? 0u : heads & (kAll << (lane + 1));
    const int run_end = after ? __ffs(after) - 1 : 32;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const float nx = __shfl_down_sync(kAll, v.x, d), ny = __shfl_down_sync(kAll, v.y, d);
      const float nz = __shfl_down_sync(kAll, v.z, d), nw = __shfl_down_sync(kAll, v.w, d);
      if (lane + d < run_end) {
        v.x += nx;
        v.y += ny;
        v.z += nz;
        v.w += nw;
      }
    }
    if (head) add_corner_pair(grad_l, k0, k1, v, pair16);
  }
}

// Threads for the warp-aggregated kernel: L whole warps per 32 points.
int64_t warp_threads(int64_t n, int L) { return ((n + 31) / 32) * 32 * L; }

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// FASTDREAM_HASH_BACKWARD: unset or "hybrid" (default), "warp" or "plain" (FASTDREAM_HASH_MAX_HEADS, default 24:
// the most runs per warp and corner pair for which the hybrid kernel still aggregates). Anything else is an
// error, raised before any launch.
enum class TableBackward { kWarp, kPlain, kHybrid };

TableBackward table_backward() {
  const char* v = std::getenv("FASTDREAM_HASH_BACKWARD");
  if (v == nullptr || std::strcmp(v, "") == 0 || std::strcmp(v, "hybrid") == 0) return TableBackward::kHybrid;
  if (std::strcmp(v, "warp") == 0) return TableBackward::kWarp;
  if (std::strcmp(v, "plain") == 0) return TableBackward::kPlain;
  TORCH_CHECK(false, "FASTDREAM_HASH_BACKWARD must be hybrid, warp or plain, not '", v, "'");
  return TableBackward::kHybrid;  // not reached
}

int hybrid_max_heads() {
  const char* v = std::getenv("FASTDREAM_HASH_MAX_HEADS");
  if (v == nullptr || *v == '\0') return 24;
  char* end = nullptr;
  const long h = std::strtol(v, &end, 10);
  TORCH_CHECK(end != v && *end == '\0' && h >= 0 && h <= 32,
              "FASTDREAM_HASH_MAX_HEADS must be an integer in 0..32, not '", v, "'");
  return static_cast<int>(h);
}

// The table gradient for F = 2, fp32, by the kernel FASTDREAM_HASH_BACKWARD selects. grad_enc or grad_jac may be
// nullptr.
void launch_backward_table_f2(int64_t n, const Levels& lv, const float* x, int64_t S, float bound,
                              const float* grad_enc, const float* grad_jac, torch::Tensor& grad_table,
                              cudaStream_t stream) {
  const TableBackward kind = table_backward();
  const int max_heads = kind == TableBackward::kHybrid ? hybrid_max_heads() : 0;
  float* g = grad_table.data_ptr<float>();
  const bool pair16 = aligned(g, 16) && S % 2 == 0;  // every level's slice 16-byte aligned too
  switch (kind) {
    case TableBackward::kWarp:
      backward_table_f2_warp_kernel<<<blocks_for(warp_threads(n, lv.count)), kThreads, 0, stream>>>(
          n, lv, x, S, bound, grad_enc, grad_jac, g);
      break;
    case TableBackward::kHybrid:
      backward_table_f2_hybrid_kernel<<<blocks_for(warp_threads(n, lv.count)), kThreads, 0, stream>>>(
          n, lv, x, S, bound, grad_enc, grad_jac, g, pair16, max_heads);
      break;
    case TableBackward::kPlain:
      backward_table_f2_kernel<<<blocks_for(n * lv.count), kThreads, 0, stream>>>(n, lv, x, S, bound, grad_enc,
                                                                                  grad_jac, g, pair16);
      break;
  }
}

bool is_half_table(const torch::Tensor& x, const torch::Tensor& table, const char* fn) {
  const bool half = table.scalar_type() == torch::kHalf;
  TORCH_CHECK(table.scalar_type() == x.scalar_type() || (half && x.scalar_type() == torch::kFloat), fn,
              ": the table must have the positions' dtype, or be float16 with float32 positions");
  return half;
}

template <typename T, typename TT>
__global__ void backward_x_kernel(int64_t n, Levels levels, const T* __restrict__ x, const TT* __restrict__ table,
                                  int64_t S, int F, T bound, const T* __restrict__ grad, T* __restrict__ grad_x) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const int L = levels.count;
  T u[3], du[3], g[3] = {T(0), T(0), T(0)};
  hash_point(x + 3 * i, bound, u, du);
  for (int l = 0; l < L; ++l) {
    hash_level_backward_x(u, du, levels.lv[l], table + l * S * F, F, static_cast<uint32_t>(S - 1),
                          grad + (i * L + l) * F, g);
  }
  grad_x[3 * i + 0] = g[0];
  grad_x[3 * i + 1] = g[1];
  grad_x[3 * i + 2] = g[2];
}
}  // namespace

torch::Tensor hash_encode_forward_cuda(torch::Tensor x, torch::Tensor table, std::vector<int64_t> resolutions,
                                       double bound) {
  const c10::cuda::CUDAGuard guard(x.device());
  const bool half = is_half_table(x, table, "hash_encode_forward");
  const Levels lv = make_levels_cuda(resolutions, table.size(1));
  const int64_t n = x.size(0), S = table.size(1), F = table.size(2);
  auto enc = torch::empty({n, lv.count * F}, x.options());
  if (n == 0) return enc;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int blocks = blocks_for(n * lv.count);
  if (half) {
    const __half* tp = reinterpret_cast<const __half*>(table.data_ptr<at::Half>());
    if (F == 2 && aligned(tp, 4)) {
      forward_f2_kernel<__half><<<blocks, kThreads, 0, stream>>>(n, lv, x.data_ptr<float>(), tp, S,
                                                                 static_cast<float>(bound), enc.data_ptr<float>());
    } else {
      forward_kernel<float, __half><<<blocks, kThreads, 0, stream>>>(n, lv, x.data_ptr<float>(), tp, S,
                                                                     static_cast<int>(F), static_cast<float>(bound),
                                                                     enc.data_ptr<float>(), nullptr);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return enc;
  }
  if (x.scalar_type() == torch::kFloat && F == 2 && aligned(table.data_ptr(), 8)) {
    forward_f2_kernel<float><<<blocks, kThreads, 0, stream>>>(n, lv, x.data_ptr<float>(), table.data_ptr<float>(), S,
                                                              static_cast<float>(bound), enc.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return enc;
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hash_encode_forward_cuda", [&] {
    forward_kernel<scalar_t, scalar_t><<<blocks, kThreads, 0, stream>>>(
        n, lv, x.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(), S, static_cast<int>(F), static_cast<scalar_t>(bound),
        enc.data_ptr<scalar_t>(), nullptr);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return enc;
}

std::tuple<torch::Tensor, torch::Tensor> hash_encode_jacobian_forward_cuda(torch::Tensor x, torch::Tensor table,
                                                                           std::vector<int64_t> resolutions,
                                                                           double bound) {
  const c10::cuda::CUDAGuard guard(x.device());
  const bool half = is_half_table(x, table, "hash_encode_jacobian_forward");
  const Levels lv = make_levels_cuda(resolutions, table.size(1));
  const int64_t n = x.size(0), S = table.size(1), F = table.size(2);
  auto enc = torch::empty({n, lv.count * F}, x.options());
  auto jac = torch::empty({n, lv.count * F, 3}, x.options());
  if (n == 0) return {enc, jac};
  auto stream = at::cuda::getCurrentCUDAStream();
  const int blocks = blocks_for(n * lv.count);
  if (half) {
    forward_kernel<float, __half><<<blocks, kThreads, 0, stream>>>(
        n, lv, x.data_ptr<float>(), reinterpret_cast<const __half*>(table.data_ptr<at::Half>()), S, static_cast<int>(F),
        static_cast<float>(bound), enc.data_ptr<float>(), jac.data_ptr<float>());
  } else {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hash_encode_jacobian_forward_cuda", [&] {
      forward_kernel<scalar_t, scalar_t><<<blocks, kThreads, 0, stream>>>(
          n, lv, x.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(), S, static_cast<int>(F),
          static_cast<scalar_t>(bound), enc.data_ptr<scalar_t>(), jac.data_ptr<scalar_t>());
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {enc, jac};
}

std::tuple<torch::Tensor, torch::Tensor> hash_encode_backward_cuda(torch::Tensor grad, torch::Tensor x,
                                                                   torch::Tensor table,
                                                                   std::vector<int64_t> resolutions, double bound,
                                                                   bool need_x) {
  const c10::cuda::CUDAGuard guard(x.device());
  const bool half = is_half_table(x, table, "hash_encode_backward");
  const Levels lv = make_levels_cuda(resolutions, table.size(1));
  const int64_t n = x.size(0), S = table.size(1), F = table.size(2);
  auto grad_table = torch::zeros(table.sizes(), x.options());  // the positions' dtype: fp32 for an fp16 table
  auto grad_x = torch::zeros_like(x);
  if (n == 0) return {grad_table, grad_x};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hash_encode_backward_cuda", [&] {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (F == 2) {
        launch_backward_table_f2(n, lv, x.data_ptr<float>(), S, static_cast<float>(bound), grad.data_ptr<float>(),
                                 nullptr, grad_table, stream);
      }
    }
    if (!(std::is_same_v<scalar_t, float> && F == 2)) {
      backward_table_kernel<scalar_t><<<blocks_for(n * lv.count), kThreads, 0, stream>>>(
          n, lv, x.data_ptr<scalar_t>(), S, static_cast<int>(F), static_cast<scalar_t>(bound),
          grad.data_ptr<scalar_t>(), nullptr, grad_table.data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (need_x) {
      if (half) {
        backward_x_kernel<float, __half><<<blocks_for(n), kThreads, 0, stream>>>(
            n, lv, x.data_ptr<float>(), reinterpret_cast<const __half*>(table.data_ptr<at::Half>()), S,
            static_cast<int>(F), static_cast<float>(bound), grad.data_ptr<float>(), grad_x.data_ptr<float>());
      } else {
        backward_x_kernel<scalar_t, scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
            n, lv, x.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(), S, static_cast<int>(F),
            static_cast<scalar_t>(bound), grad.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_table, grad_x};
}

torch::Tensor hash_encode_jacobian_backward_cuda(torch::Tensor grad_enc, torch::Tensor grad_jac, torch::Tensor x,
                                                 std::vector<int64_t> resolutions, double bound, int64_t table_size) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Levels lv = make_levels_cuda(resolutions, table_size);
  const int64_t n = x.size(0), F = grad_enc.size(1) / lv.count;
  auto grad_table = torch::zeros({lv.count, table_size, F}, x.options());
  if (n == 0) return grad_table;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hash_encode_jacobian_backward_cuda", [&] {
    auto stream = at::cuda::getCurrentCUDAStream();
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (F == 2) {
        launch_backward_table_f2(n, lv, x.data_ptr<float>(), table_size, static_cast<float>(bound),
                                 grad_enc.data_ptr<float>(), grad_jac.data_ptr<float>(), grad_table, stream);
      }
    }
    if (!(std::is_same_v<scalar_t, float> && F == 2)) {
      backward_table_kernel<scalar_t><<<blocks_for(n * lv.count), kThreads, 0, stream>>>(
          n, lv, x.data_ptr<scalar_t>(), table_size, static_cast<int>(F), static_cast<scalar_t>(bound),
          grad_enc.data_ptr<scalar_t>(), grad_jac.data_ptr<scalar_t>(), grad_table.data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_table;
}

}  // namespace fastdream

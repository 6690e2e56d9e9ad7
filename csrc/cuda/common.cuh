// Device helpers shared by carfast's CUDA kernels (csrc/cuda/*.cu): element conversion, the
// consumer's epilogue, warp reductions, the per-row scoring, the block size and the dtype dispatch of the
// launchers. CUDA headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "kernels.h"

namespace carfast {
namespace cuda {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kThreads = 256;               // threads per block of every kernel here
constexpr int kWarps = kThreads / kWarp;

// The element type a DType names, as a tag: with_dtype(d, f) returns f(Elem<T>{}) for that T, so each
// launcher picks its template instance in one place, e.g.
//   with_dtype(x.dtype, [&](auto e) { return launch_typed<typename decltype(e)::type>(x, stream); })
template <typename T>
struct Elem {
  using type = T;
};

template <typename F>
cudaError_t with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat16: return f(Elem<__half>{});
    case DType::kBFloat16: return f(Elem<__nv_bfloat16>{});
    default: return f(Elem<float>{});
  }
}

// min / max usable on both sides without --expt-relaxed-constexpr
__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a < b ? b : a; }

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// E(v) = act(v * scale + shift + residual), rounded as the reference rounds it (epilogue.py: a
// multiply, then an add, then the residual add): the _rn intrinsics keep nvcc from fusing them into
// an FMA, so E(z) - E(z - 0) is exactly 0 and E matches PyTorch's float32 epilogue bit for bit.
// relu / relu6 leave NaN as NaN, as torch.relu and clamp(0, 6) do.
__device__ __forceinline__ float epilogue(float v, float scale, float shift, float residual, int act) {
  v = __fadd_rn(__fadd_rn(__fmul_rn(v, scale), shift), residual);
  if (act == 1) return v < 0.0f ? 0.0f : v;
  if (act == 2) return v < 0.0f ? 0.0f : (v > 6.0f ? 6.0f : v);
  return v;
}

// Butterfly sums: every lane ends with the same value (each step adds the same two numbers in
// either order, and float addition is commutative), the same on every run.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int k = kWarp / 2; k > 0; k >>= 1) v += __shfl_xor_sync(kFullMask, v, k);
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int k = kWarp / 2; k > 0; k >>= 1) v += __shfl_xor_sync(kFullMask, v, k);
  return v;
}

// Whether (v, i) ranks above (best, bi) for top-1: NaN above every number (torch.argmax treats NaN
// as the maximum), then the larger value, then the lower index. A total order, so a reduction by it
// gives the same answer in any order.
__device__ __forceinline__ bool ranks_above(float v, int i, float best, int bi) {
  const bool vn = v != v, bn = best != best;
  if (vn || bn) return vn && (!bn || i < bi);
  return v > best || (v == best && i < bi);
}

struct RowScore {
  bool correct;  // top-1 == label
  double loss;   // cross-entropy in float64
};

// Top-1 and cross-entropy of one row of C logits, by a whole warp (all 32 lanes call it);
// logit(c) returns logit c as float. Every lane returns the same result. The loss is
// log(sum_c exp(x_c - max)) - (x_label - max) in float64, as F.cross_entropy(x.double()).
template <typename Logit>
__device__ __forceinline__ RowScore warp_score_row(const Logit& logit, int C, int label) {
  const int lane = threadIdx.x % kWarp;
  float best = -INFINITY;
  int bi = INT_MAX;
  for (int c = lane; c < C; c += kWarp) {
    const float v = logit(c);
    if (ranks_above(v, c, best, bi)) {
      best = v;
      bi = c;
    }
  }
#pragma unroll
  for (int k = kWarp / 2; k > 0; k >>= 1) {
    const float ov = __shfl_xor_sync(kFullMask, best, k);
    const int oi = __shfl_xor_sync(kFullMask, bi, k);
    if (ranks_above(ov, oi, best, bi)) {
      best = ov;
      bi = oi;
    }
  }
  const double m = static_cast<double>(best);
  double s = 0.0;
  for (int c = lane; c < C; c += kWarp) s += exp(static_cast<double>(logit(c)) - m);
  s = warp_sum(s);
  RowScore r;
  r.correct = bi == label;
  r.loss = log(s) - (static_cast<double>(logit(label)) - m);
  return r;
}

}  // namespace cuda
}  // namespace carfast

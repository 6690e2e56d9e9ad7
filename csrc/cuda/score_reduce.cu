// CUDA kernel of carfast::score_reduce (schema: csrc/ops.cpp; contract and plain-PyTorch reference:
// carfast/ops/score_reduce.py, score_reduce_ref).
//
//   logits [P, C] (float32 / float16 / bfloat16, any strides), labels [P], slots [P] non-decreasing
//   -> counts [S, C] int64, loss_sums [S, C] float64, correct [P] bool
//
// One block of 256 threads per slot s. Its pairs are the segment [start, end) of the sorted slots,
// found by binary search (no offsets array, no extra launch). The segment goes by chunks of 256
// pairs: a warp per pair scores its row (top-1 with ties to the lowest class, cross-entropy in
// float64: common.cuh, warp_score_row) into shared memory; then thread c, for each class c it owns,
// adds the chunk's pairs of label c in pair order to counts[s, c] and loss_sums[s, c], which only it
// touches. Fixed order everywhere: the results repeat bit for bit.
#include "common.cuh"
#include "kernels.h"

namespace carfast {
namespace cuda {
namespace {

constexpr int kChunk = 256;  // pairs per chunk

// First index i in [0, P) with slots[i] >= s (P if none).
__device__ int64_t lower_bound(const int64_t* slots, int64_t P, int64_t s) {
  int64_t lo = 0, hi = P;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (slots[mid] < s) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) score_reduce_kernel(const ScoreReduceArgs x) {
  extern __shared__ float4 smem4[];
  double* loss_s = reinterpret_cast<double*>(smem4);           // [kChunk]
  int64_t* range_s = reinterpret_cast<int64_t*>(loss_s + kChunk);  // [2] start, end
  int* lab_s = reinterpret_cast<int*>(range_s + 2);              // [kChunk]
  bool* corr_s = reinterpret_cast<bool*>(lab_s + kChunk);        // [kChunk]

  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const int64_t s = blockIdx.x, C = x.C;
  if (tid < 2) range_s[tid] = lower_bound(x.slots, x.P, s + tid);
  int64_t* counts = x.counts + s * C;
  double* loss_sums = x.loss_sums + s * C;
  for (int64_t c = tid; c < C; c += kThreads) {
    counts[c] = 0;
    loss_sums[c] = 0.0;
  }
  __syncthreads();
  const int64_t start = range_s[0], end = range_s[1];
  const T* logits = static_cast<const T*>(x.logits);

  for (int64_t base = start; base < end; base += kChunk) {
    const int len = static_cast<int>(min64(kChunk, end - base));
    for (int r = warp; r < len; r += kWarps) {
      const int64_t row = base + r;
      const T* lg = logits + row * x.row_stride;
      const int label = static_cast<int>(x.labels[row]);
      auto logit = [&](int c) { return to_float(lg[c * x.col_stride]); };
      const RowScore res = warp_score_row(logit, static_cast<int>(C), label);
      if (lane == 0) {
        loss_s[r] = res.loss;
        corr_s[r] = res.correct;
        lab_s[r] = label;
        x.correct[row] = res.correct;
      }
    }
    __syncthreads();
    for (int64_t c = tid; c < C; c += kThreads) {
      int64_t count = 0;
      double loss = 0.0;
      bool any = false;
      for (int i = 0; i < len; ++i) {
        if (lab_s[i] == c) {
          count += corr_s[i] ? 1 : 0;
          loss += loss_s[i];
          any = true;
        }
      }
      if (any) {
        counts[c] += count;
        loss_sums[c] += loss;
      }
    }
    __syncthreads();  // before the next chunk overwrites the shared rows
  }
}

constexpr size_t kSharedBytes = sizeof(double) * kChunk + sizeof(int64_t) * 2 + sizeof(int) * kChunk + kChunk;

template <typename T>
cudaError_t launch_typed(const ScoreReduceArgs& x, cudaStream_t stream) {
  score_reduce_kernel<T><<<static_cast<unsigned>(x.S), kThreads, kSharedBytes, stream>>>(x);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_score_reduce(const ScoreReduceArgs& args, cudaStream_t stream) {
  if (args.S == 0 || args.C == 0) return cudaSuccess;
  return with_dtype(args.dtype, [&](auto e) { return launch_typed<typename decltype(e)::type>(args, stream); });
}

}  // namespace cuda
}  // namespace carfast

// Raw-pointer launchers of carfast's CUDA kernels (csrc/cuda/*.cu), called by the torch binding
// (csrc/cuda/bindings.cpp). Plain CUDA: no torch types, so each .cu compiles with nvcc alone.
//
// Every launcher enqueues its kernels on `stream` and returns cudaGetLastError() (the launch error,
// if any); it does not synchronise. Pointers are device pointers in the layouts stated beside them;
// the binding checks shapes, dtypes, devices and index ranges before calling, and allocates outputs.
// The kernels are deterministic: fixed-order reductions, no floating-point atomics.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../conv_geometry.h"

namespace carfast {
namespace cuda {

// Element type of a tensor the kernels read or write in more than one precision.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Conv settings and sizes shared by the consumer ops (a [N, K, H, W] -> z [N, O, Ho, Wo]).
using carfast::ConvGeometry;

// ---------------------------------------------------------------------------------------------
// carfast::ablated_consumer (ablated_consumer.cu)
//   out[p] = act((z[n] - U_k(a[n, k])) * scale + shift + residual[n]),  k = filters[p], n = images[p]
struct AblatedConsumerArgs {
  ConvGeometry g;
  int64_t P;                   // pairs
  int act;                     // 0 identity, 1 relu, 2 relu6
  DType in_dtype;              // of a, z and residual
  DType out_dtype;
  const void* a;               // [N, K, H, W], element strides a_stride
  int64_t a_stride[4];
  const float* weight;         // [K, kh, kw, O] float32 contiguous (the weight permuted, o innermost)
  const void* z;               // [N, O, Ho, Wo], element strides z_stride
  int64_t z_stride[4];
  const void* residual;        // [N, O, Ho, Wo] or null, element strides r_stride
  int64_t r_stride[4];
  const float* scale;          // [O] float32
  const float* shift;          // [O] float32
  const int64_t* filters;      // [P] in [0, K)
  const int64_t* images;       // [P] in [0, N)
  void* out;                   // [P, Ho, Wo, O] contiguous: [P, O, Ho, Wo] in channels_last
};

// Dynamic shared memory one block needs (the binding compares it with the device's limit).
size_t ablated_consumer_shared_bytes(const AblatedConsumerArgs& args);
cudaError_t launch_ablated_consumer(const AblatedConsumerArgs& args, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// carfast::closed_form_score and carfast::closed_form_logits (closed_form_score.cu)
//   logits'[j, n] = logits[n] + sum_{o, y, x} (E(z[n] - U_k(a[n, k])) - E(z[n]))[o, y, x] * tail[:, o, y, x]
//   with k = filters[j]; closed_form_score reduces logits'[j, n] to counts / loss sums / correct
//   where it is computed, closed_form_logits writes it out.
struct ClosedFormArgs {
  ConvGeometry g;
  int64_t C;                   // classes
  int64_t J;                   // filters
  int act;
  const float* a;              // [N, K, H, W] contiguous
  const float* weight;         // [K, O, kh, kw] contiguous (the weight with dims 0 and 1 swapped)
  const float* z;              // [N, O, Ho, Wo] contiguous
  const float* residual;       // [N, O, Ho, Wo] contiguous, or null
  const float* scale;          // [O]
  const float* shift;          // [O]
  const float* tail;           // [C, O, Ho, Wo] contiguous
  const float* logits;         // [N, C] contiguous
  const int64_t* filters;      // [J] in [0, K)
  const int64_t* labels;       // [N] in [0, C) (closed_form_score only)
  // closed_form_logits: out_logits [J, N, C]; closed_form_score: counts [J, C], loss_sums [J, C],
  // correct [J, N] (and out_logits null)
  float* out_logits;
  int64_t* counts;
  double* loss_sums;
  bool* correct;
};

// How the launch is cut, chosen from the sizes and the device (see closed_form_score.cu).
struct ClosedFormPlan {
  bool score;                  // closed_form_score (true) or closed_form_logits (false)
  int tile_images;             // images per block (TN)
  int64_t tiles;               // ceil(N / TN)
  bool a_in_shared;            // the owned channels staged in shared memory (else read from global)
  bool w_in_shared;            // the filter's weight slice staged in shared memory
  size_t shared_bytes;         // dynamic shared memory per block
  size_t workspace_bytes;      // scratch for the per-tile partials (closed_form_score); 0 for logits
};

// sm_count: the device's multiprocessors; max_shared: its opt-in shared memory per block.
// score: true for closed_form_score, false for closed_form_logits.
ClosedFormPlan closed_form_plan(const ClosedFormArgs& args, bool score, int sm_count, size_t max_shared);
// workspace: plan.workspace_bytes of device memory (any content), 16-byte aligned.
cudaError_t launch_closed_form(const ClosedFormArgs& args, const ClosedFormPlan& plan, void* workspace,
                               cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// carfast::score_reduce (score_reduce.cu)
struct ScoreReduceArgs {
  int64_t P, C, S;             // pairs, classes, slots
  DType dtype;                 // of logits
  const void* logits;          // [P, C], element strides row_stride, col_stride
  int64_t row_stride, col_stride;
  const int64_t* labels;       // [P] in [0, C)
  const int64_t* slots;        // [P] in [0, S), non-decreasing
  int64_t* counts;             // [S, C]
  double* loss_sums;           // [S, C]
  bool* correct;               // [P]
};

cudaError_t launch_score_reduce(const ScoreReduceArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace carfast

// Kernels that check the CPU emulation itself (tests/ops/test_cuda_emu_runtime.py, test_emulator_*): the
// barrier, the warp collectives, and the faults and bad launches the emulator must report. Plain CUDA
// in the kernels' style; built only into the emulation (tests/ops/cuda_emu/), not into carfast.
#include <cuda_runtime.h>

#include <cstdint>

namespace carfast_emu_selftest {

// out[b * n + t] = what thread (t + 1) % n of block b wrote to shared memory: needs the barrier.
template <bool kBarrier>
__global__ void rotate_kernel(int64_t* out) {
  extern __shared__ int s[];
  const int n = blockDim.x, t = threadIdx.x;
  s[t] = 1000 * static_cast<int>(blockIdx.x) + t;
  if (kBarrier) __syncthreads();
  out[blockIdx.x * n + t] = s[(t + 1) % n];
}

// Per thread 12 values: an int and a double through __shfl_xor_sync for lane masks 1, 2, 4, 8, 16,
// then __any_sync and __ballot_sync of (t % m == 0).
__global__ void warp_kernel(int64_t* out, int m) {
  const int t = threadIdx.x;
  int64_t* o = out + t * 12;
  for (int k = 0; k < 5; ++k) {
    o[k] = __shfl_xor_sync(0xffffffffu, 7 * t + 3, 1 << k);
    o[5 + k] = static_cast<int64_t>(2.0 * __shfl_xor_sync(0xffffffffu, 0.5 * t, 1 << k));
  }
  o[10] = __any_sync(0xffffffffu, t % m == 0);
  o[11] = __ballot_sync(0xffffffffu, t % m == 0);
}

// Threads past 64 exit before the barrier, which the others then pass (exited threads do not count).
__global__ void early_exit_kernel(int64_t* out) {
  extern __shared__ int s[];
  const int t = threadIdx.x;
  if (t >= 64) return;
  s[t] = t;
  __syncthreads();
  out[t] = s[63 - t];
}

// Faults: the emulator must report each of them.
__global__ void divergent_barrier_kernel(int64_t* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void deadlock_kernel(int64_t* out) {  // half a warp in a shuffle, the rest at the barrier
  int v = threadIdx.x;
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  __syncthreads();
  out[threadIdx.x] = v;
}

__global__ void exited_lane_kernel(int64_t* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

__global__ void misaligned_kernel(int64_t* out) {
  extern __shared__ float4 s4[];
  float* f = reinterpret_cast<float*>(s4);
  f[threadIdx.x] = 1.0f;
  __syncthreads();
  if (threadIdx.x == 0) {
    const float4 v = *reinterpret_cast<const float4*>(f + 1);
    out[0] = static_cast<int64_t>(v.x);
  }
}

__global__ void shared_overflow_kernel(int64_t* out) {  // launched with blockDim.x ints of shared memory
  extern __shared__ int s[];
  s[blockDim.x + threadIdx.x] = 1;
  out[threadIdx.x] = 1;
}

}  // namespace carfast_emu_selftest

// which: 0 rotate with barrier, 1 rotate without, 2 warp collectives, 3 early exit, 4 divergent barrier,
// 5 deadlock, 6 exited lane in a collective, 7 misaligned float4, 8 shared overflow, 9 2048 threads per
// block, 10 64 KiB of dynamic shared memory without the opt-in, 11 the same after cudaFuncSetAttribute.
// n: threads per block (3 blocks for 0 and 1). Returns cudaGetLastError() after the launch.
cudaError_t carfast_emu_selftest_launch(int which, int64_t* out, int n) {
  using namespace carfast_emu_selftest;
  const size_t ints = sizeof(int) * n;
  switch (which) {
    case 0: rotate_kernel<true><<<3, n, ints>>>(out); break;
    case 1: rotate_kernel<false><<<3, n, ints>>>(out); break;
    case 2: warp_kernel<<<1, n>>>(out, 3); break;
    case 3: early_exit_kernel<<<1, n, ints>>>(out); break;
    case 4: divergent_barrier_kernel<<<1, n>>>(out); break;
    case 5: deadlock_kernel<<<1, n>>>(out); break;
    case 6: exited_lane_kernel<<<1, n>>>(out); break;
    case 7: misaligned_kernel<<<1, n, sizeof(float) * n + 16>>>(out); break;
    case 8: shared_overflow_kernel<<<1, n, ints>>>(out); break;
    case 9: rotate_kernel<true><<<1, 2048, sizeof(int) * 2048>>>(out); break;
    case 10: rotate_kernel<true><<<1, n, 64 * 1024>>>(out); break;
    case 11: {
      const cudaError_t err =
          cudaFuncSetAttribute(rotate_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
      if (err != cudaSuccess) return err;
      rotate_kernel<true><<<1, n, 64 * 1024>>>(out);
      break;
    }
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

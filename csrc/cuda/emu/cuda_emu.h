// CPU shim of the CUDA that carfast's kernels (csrc/cuda/*.cu) use, so that the very same sources compile
// with g++ and run on the CPU: the CUDA execution model at the level the kernels rely on, nothing more.
// How it runs, its limits and how to test with it: csrc/cuda/README.md.
//
// The .cu files reach this header through the stub <cuda_runtime.h>, <cuda_fp16.h> and <cuda_bf16.h> of
// csrc/cuda/emu/include. Two constructs a C++ compiler cannot parse are rewritten at build time by
// tests/ops/cuda_emu/sources.py (translate), one line each, so line numbers stay those of the .cu file:
//   kernel<<<grid, block, smem, stream>>>(args)  ->  ::carfast_emu::launch(kernel, LaunchConfig(...), args)
//   extern __shared__ T name[];                  ->  T* name = ::carfast_emu::dynamic_shared<T>();
//
// A launch (launch.cpp) checks the configuration as the driver does, then runs the blocks one after
// another; a block's threads are cooperative fibers that switch only at __syncthreads and at warp
// collectives, in a chosen order, so barriers and shuffles have their real semantics and a missing
// barrier gives wrong results instead of passing by luck.
#pragma once

#include <math.h>  // exp, log, fmaf, INFINITY in the global namespace, as device code sees them

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define CARFAST_CUDA_EMU 1

// ---------------------------------------------------------------------------------------------
// Qualifiers: everything is host code here.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// static __shared__ arrays (the kernels use none, only extern ones, which the build rewrites): one per
// process, which is right because blocks run one at a time
#define __shared__ static

// ---------------------------------------------------------------------------------------------
// Vector and index types.
struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

namespace carfast_emu {
namespace detail {
// Records a misaligned vector access (the GPU faults on one): out of line, so the compiler cannot
// assume the alignment the type promises and drop the check.
void check_aligned(const void* p, size_t alignment, const char* what);
}  // namespace detail
}  // namespace carfast_emu

// float4 loads and stores must be 16-byte aligned on the GPU ("misaligned address"); copies check it.
struct alignas(16) float4 {
  float x, y, z, w;
  float4() = default;
  float4(const float4& o) {
    carfast_emu::detail::check_aligned(&o, 16, "float4 load");
    copy_from(o);
  }
  float4& operator=(const float4& o) {
    carfast_emu::detail::check_aligned(this, 16, "float4 store");
    carfast_emu::detail::check_aligned(&o, 16, "float4 load");
    copy_from(o);
    return *this;
  }

 private:
  void copy_from(const float4& o) {  // element by element: no aligned vector move of a misaligned one
    const volatile float* s = &o.x;
    x = s[0];
    y = s[1];
    z = s[2];
    w = s[3];
  }
};

// ---------------------------------------------------------------------------------------------
// Half types: storage only. torch's build gives nvcc -D__CUDA_NO_HALF_OPERATORS__,
// -D__CUDA_NO_HALF_CONVERSIONS__ and -D__CUDA_NO_BFLOAT16_CONVERSIONS__, so the kernels convert
// explicitly; without operators or implicit conversions here, a kernel that does not fails to build.
struct __half {
  unsigned short __x;
};
struct __nv_bfloat16 {
  unsigned short __x;
};

namespace carfast_emu {
inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
}  // namespace carfast_emu

inline float __half2float(__half h) {  // exact
  const uint32_t sign = static_cast<uint32_t>(h.__x & 0x8000u) << 16;
  const uint32_t e = (h.__x >> 10) & 0x1fu, m = h.__x & 0x3ffu;
  if (e == 0) {  // zero or subnormal: m * 2^-24, exact in float
    const float v = static_cast<float>(m) * 0x1p-24f;
    return carfast_emu::bits_float(carfast_emu::float_bits(v) | sign);
  }
  if (e == 31) return carfast_emu::bits_float(sign | 0x7f800000u | (m << 13));  // inf, NaN
  return carfast_emu::bits_float(sign | ((e + 112u) << 23) | (m << 13));        // rebias 15 -> 127
}

// Round to nearest, ties to even, as the GPU's cvt.rn.f16.f32; NaN becomes 0x7fff as on the GPU.
inline __half __float2half_rn(float f) {
  const uint32_t u = carfast_emu::float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u, mag = u & 0x7fffffffu;
  uint32_t h;
  if (mag > 0x7f800000u) {
    h = 0x7fffu;
  } else if (mag >= 0x477ff000u) {  // >= 65520, the midpoint above 65504 (odd): inf
    h = sign | 0x7c00u;
  } else if (mag >= 0x38800000u) {  // >= 2^-14: normal; carries run into the exponent as they should
    h = sign | (((mag + 0xfffu + ((mag >> 13) & 1u)) >> 13) - (112u << 10));
  } else {  // subnormal half: m = round(|f| * 2^24), from the float's significand and exponent
    const uint32_t e = mag >> 23;
    const uint32_t shift = 126u - e;  // >= 14 here
    uint32_t m = 0;
    if (e != 0 && shift < 25) {
      const uint32_t sig = (mag & 0x7fffffu) | 0x800000u;
      const uint32_t rest = sig & ((1u << shift) - 1u), half = 1u << (shift - 1);
      m = sig >> shift;
      if (rest > half || (rest == half && (m & 1u))) ++m;  // m may reach 0x400: the smallest normal
    }
    h = sign | m;
  }
  __half r;
  r.__x = static_cast<unsigned short>(h);
  return r;
}

inline float __bfloat162float(__nv_bfloat16 b) { return carfast_emu::bits_float(static_cast<uint32_t>(b.__x) << 16); }

// Round to nearest, ties to even; NaN becomes 0x7fff as on the GPU.
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t u = carfast_emu::float_bits(f);
  __nv_bfloat16 r;
  r.__x = (u & 0x7fffffffu) > 0x7f800000u ? 0x7fffu
                                          : static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  return r;
}

// ---------------------------------------------------------------------------------------------
// Arithmetic intrinsics. The build passes -ffp-contract=off, so a*b+c is never fused behind the
// kernels' back and the _rn operations round each on its own, as they do on the GPU; fmaf (from
// math.h, also what the kernels call) and __fmaf_rn are the correctly rounded fused multiply-add.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return ::fmaf(a, b, c); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a < b ? b : a; }

// ---------------------------------------------------------------------------------------------
// Runtime types and host API.
enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorIllegalAddress = 700,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
};
typedef cudaError cudaError_t;
typedef struct CUstream_st* cudaStream_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t err);

namespace carfast_emu {

namespace detail {
// The running thread's coordinates, set by the scheduler before it resumes a thread's fiber.
extern uint3 g_thread_idx, g_block_idx;
extern dim3 g_block_dim, g_grid_dim;
extern unsigned char* g_dynamic_shared;  // the running block's dynamic shared memory

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value);
void sync_threads(const char* file, int line);
enum class WarpOp : int { kShflXor = 1, kAny = 2, kBallot = 3 };
uint64_t warp_collective(WarpOp op, unsigned mask, int arg, uint64_t value, const char* file, int line);
void unsupported(const char* what, const char* file, int line);
}  // namespace detail

// What a <<<grid, block, smem, stream>>> names; file, line and kernel name come from the rewrite.
struct LaunchConfig {
  const char* file;
  int line;
  const char* kernel;
  dim3 grid, block;
  size_t shared_bytes;
  cudaStream_t stream;
  LaunchConfig(const char* f, int l, const char* k, dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr)
      : file(f), line(l), kernel(k), grid(g), block(b), shared_bytes(s), stream(st) {}
};

namespace detail {
// Runs body(ctx) once per thread of every block (launch.cpp); the launch error goes to cudaGetLastError.
void launch(const void* kernel, const LaunchConfig& cfg, void (*body)(void*), void* ctx);
}  // namespace detail

// kernel<<<...>>>(args): the arguments are converted to the kernel's parameter types once, at the launch
// (as the GPU copies them to its parameter space); every thread then calls the kernel with its own copy.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), const LaunchConfig& cfg, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  struct Call {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...> params;
  };
  Call call{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
  detail::launch(reinterpret_cast<const void*>(kernel), cfg,
                 [](void* c) {
                   Call& k = *static_cast<Call*>(c);
                   std::apply(k.kernel, k.params);
                 },
                 &call);
}

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(detail::g_dynamic_shared);
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "warp shuffles move up to 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}

template <typename T>
T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

}  // namespace carfast_emu

template <class T>
cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attr, int value) {
  return carfast_emu::detail::func_set_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}

#define threadIdx (::carfast_emu::detail::g_thread_idx)
#define blockIdx (::carfast_emu::detail::g_block_idx)
#define blockDim (::carfast_emu::detail::g_block_dim)
#define gridDim (::carfast_emu::detail::g_grid_dim)

// ---------------------------------------------------------------------------------------------
// Barrier and warp collectives: each is a switch point, where the thread waits until its block (or its
// warp) has arrived. The call site (GCC's __builtin_FILE / __builtin_LINE as default arguments) names
// the barrier, so threads waiting at different __syncthreads are reported.
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  carfast_emu::detail::sync_threads(file, line);
}

// Lane i receives lane (i ^ lane_mask)'s value; full 32-lane warps and width 32 only.
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
                         int line = __builtin_LINE()) {
  if (width != 32) carfast_emu::detail::unsupported("__shfl_xor_sync with width != 32", file, line);
  return carfast_emu::from_bits<T>(carfast_emu::detail::warp_collective(
      carfast_emu::detail::WarpOp::kShflXor, mask, lane_mask, carfast_emu::to_bits(var), file, line));
}

inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return static_cast<int>(
      carfast_emu::detail::warp_collective(carfast_emu::detail::WarpOp::kAny, mask, 0, pred != 0, file, line));
}

inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return static_cast<unsigned>(
      carfast_emu::detail::warp_collective(carfast_emu::detail::WarpOp::kBallot, mask, 0, pred != 0, file, line));
}

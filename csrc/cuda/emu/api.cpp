// C entry points of the CPU emulation of carfast's CUDA kernels, called through ctypes by
// tests/ops/cuda_emu/emulator.py: the counterpart of csrc/cuda/bindings.cpp without torch. The Python side does
// what the binding does with tensors (dtype and layout conversions, output allocation); these functions
// fill the launchers' argument structs from the raw pointers as the binding does, run the binding's
// shared-memory check against the emulated device, and call the launchers of kernels.h as it calls them.
//
// Every launching entry point returns 0, a cudaError_t (the launch's, or a fault inside a kernel), or
// kTooMuchShared (the binding's shared-memory check failed; nothing launched); carfast_emu_message()
// then says what went wrong.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "kernels.h"
#include "emu_control.h"

#define CARFAST_EMU_API extern "C" __attribute__((visibility("default")))

cudaError_t carfast_emu_selftest_launch(int which, int64_t* out, int n);  // selftest.cu

namespace {

using carfast::cuda::ConvGeometry;
using carfast::cuda::DType;

constexpr int kTooMuchShared = -1;

// geometry: the 15 sizes of ConvGeometry in its order (N, K, H, W, O, kh, kw, Ho, Wo, sy, sx, py, px, dy, dx)
ConvGeometry conv_geometry(const int64_t* v) {
  static_assert(sizeof(ConvGeometry) == 15 * sizeof(int64_t), "ConvGeometry is the 15 sizes, nothing else");
  ConvGeometry g{};
  std::memcpy(&g, v, sizeof g);
  return g;
}

// A launcher's arguments `Args` with the geometry and the activation set, the rest zero.
template <typename Args>
Args args_for(const int64_t* geometry, int act) {
  Args x{};
  x.g = conv_geometry(geometry);
  x.act = act;
  return x;
}

int too_much_shared(size_t need, size_t have) {
  carfast_emu::set_message("a block needs " + std::to_string(need) + " bytes of shared memory, the device has " +
                           std::to_string(have));
  return kTooMuchShared;
}

}  // namespace

// order: 0 forward, 1 reverse, 2 shuffled (seeded); poison: the byte shared memory is filled with;
// shared_optin: the emulated device's sharedMemPerBlockOptin (at most 232448, an H100's).
CARFAST_EMU_API void carfast_emu_configure(int order, uint64_t seed, int poison, int64_t shared_optin) {
  auto lock = carfast_emu::lock_device();
  carfast_emu::configure(static_cast<carfast_emu::Order>(order), seed, static_cast<unsigned char>(poison),
                         static_cast<size_t>(shared_optin));
}

CARFAST_EMU_API const char* carfast_emu_message() { return carfast_emu::message().c_str(); }

CARFAST_EMU_API int carfast_emu_launch_count() { return static_cast<int>(carfast_emu::launches().size()); }

// out: grid x, y, z, block x, y, z, dynamic shared bytes, configuration error; *kernel: its name.
CARFAST_EMU_API void carfast_emu_launch_info(int i, int64_t* out, const char** kernel) {
  const carfast_emu::LaunchRecord& r = carfast_emu::launches().at(i);
  for (int k = 0; k < 3; ++k) {
    out[k] = r.grid[k];
    out[3 + k] = r.block[k];
  }
  out[6] = r.shared_bytes;
  out[7] = r.error;
  *kernel = r.kernel;
}

// ---------------------------------------------------------------------------------------------
// carfast::ablated_consumer: a, z, residual in in_dtype with element strides, weight [K, kh, kw, O]
// float32, out [P, Ho, Wo, O] in out_dtype (bindings.cpp, ablated_consumer_cuda)
CARFAST_EMU_API int carfast_emu_ablated_consumer(const int64_t* geometry, int64_t P, int act, int in_dtype,
                                                 int out_dtype, const void* a, const int64_t* a_stride,
                                                 const float* weight, const void* z, const int64_t* z_stride,
                                                 const void* residual, const int64_t* r_stride, const float* scale,
                                                 const float* shift, const int64_t* filters, const int64_t* images,
                                                 void* out) {
  auto lock = carfast_emu::lock_device();
  carfast_emu::begin_call();
  auto x = args_for<carfast::cuda::AblatedConsumerArgs>(geometry, act);
  x.P = P;
  x.in_dtype = static_cast<DType>(in_dtype);
  x.out_dtype = static_cast<DType>(out_dtype);
  x.a = a;
  x.z = z;
  x.residual = residual;
  for (int d = 0; d < 4; ++d) {
    x.a_stride[d] = a_stride[d];
    x.z_stride[d] = z_stride[d];
    x.r_stride[d] = residual != nullptr ? r_stride[d] : 0;
  }
  x.weight = weight;
  x.scale = scale;
  x.shift = shift;
  x.filters = filters;
  x.images = images;
  x.out = out;
  const size_t need = carfast::cuda::ablated_consumer_shared_bytes(x), have = carfast_emu::shared_optin();
  if (need > have) return too_much_shared(need, have);
  return carfast_emu::end_call(carfast::cuda::launch_ablated_consumer(x, nullptr));
}

// ---------------------------------------------------------------------------------------------
// carfast::closed_form_logits (score 0: out_logits [J, N, C]) and closed_form_score (score 1: counts,
// loss_sums [J, C], correct [J, N]); every tensor float32 contiguous, weight [K, O, kh, kw]
// (bindings.cpp, closed_form_inputs and run_closed_form). mode 0: only the plan, into plan_out
// (tile_images, tiles, a_in_shared, w_in_shared, shared_bytes, workspace_bytes); mode 1: plan and launch
// with `workspace` (plan_out's workspace_bytes of memory).
CARFAST_EMU_API int carfast_emu_closed_form(const int64_t* geometry, int64_t C, int64_t J, int act, const float* a,
                                            const float* weight, const float* z, const float* residual,
                                            const float* scale, const float* shift, const float* tail,
                                            const float* logits, const int64_t* filters, const int64_t* labels,
                                            float* out_logits, int64_t* counts, double* loss_sums, bool* correct,
                                            int score, int sm_count, int mode, void* workspace, int64_t* plan_out) {
  auto lock = carfast_emu::lock_device();
  carfast_emu::begin_call();
  auto x = args_for<carfast::cuda::ClosedFormArgs>(geometry, act);
  x.C = C;
  x.J = J;
  x.a = a;
  x.weight = weight;
  x.z = z;
  x.residual = residual;
  x.scale = scale;
  x.shift = shift;
  x.tail = tail;
  x.logits = logits;
  x.filters = filters;
  x.labels = labels;
  x.out_logits = out_logits;
  x.counts = counts;
  x.loss_sums = loss_sums;
  x.correct = correct;
  const size_t have = carfast_emu::shared_optin();
  const carfast::cuda::ClosedFormPlan plan = carfast::cuda::closed_form_plan(x, score != 0, sm_count, have);
  if (plan_out != nullptr) {
    plan_out[0] = plan.tile_images;
    plan_out[1] = plan.tiles;
    plan_out[2] = plan.a_in_shared;
    plan_out[3] = plan.w_in_shared;
    plan_out[4] = static_cast<int64_t>(plan.shared_bytes);
    plan_out[5] = static_cast<int64_t>(plan.workspace_bytes);
  }
  if (plan.shared_bytes > have) return too_much_shared(plan.shared_bytes, have);
  if (mode == 0) return 0;
  return carfast_emu::end_call(carfast::cuda::launch_closed_form(x, plan, workspace, nullptr));
}

// ---------------------------------------------------------------------------------------------
// carfast::score_reduce: logits [P, C] in dtype with element strides (bindings.cpp, score_reduce_cuda)
CARFAST_EMU_API int carfast_emu_score_reduce(int64_t P, int64_t C, int64_t S, int dtype, const void* logits,
                                             int64_t row_stride, int64_t col_stride, const int64_t* labels,
                                             const int64_t* slots, int64_t* counts, double* loss_sums,
                                             bool* correct) {
  auto lock = carfast_emu::lock_device();
  carfast_emu::begin_call();
  carfast::cuda::ScoreReduceArgs x{};
  x.P = P;
  x.C = C;
  x.S = S;
  x.dtype = static_cast<DType>(dtype);
  x.logits = logits;
  x.row_stride = row_stride;
  x.col_stride = col_stride;
  x.labels = labels;
  x.slots = slots;
  x.counts = counts;
  x.loss_sums = loss_sums;
  x.correct = correct;
  return carfast_emu::end_call(carfast::cuda::launch_score_reduce(x, nullptr));
}

// ---------------------------------------------------------------------------------------------
// Checks of the emulation itself

// which, out, n: see selftest.cu.
CARFAST_EMU_API int carfast_emu_selftest(int which, int64_t* out, int n) {
  auto lock = carfast_emu::lock_device();
  carfast_emu::begin_call();
  return carfast_emu::end_call(carfast_emu_selftest_launch(which, out, n));
}

// kind 0: float32 -> float16, 1: float16 -> float32, 2: float32 -> bfloat16, 3: bfloat16 -> float32, with the
// shim's conversions (cuda_emu.h); n elements.
CARFAST_EMU_API void carfast_emu_convert(int kind, const void* in, void* out, int64_t n) {
  const float* f = static_cast<const float*>(in);
  for (int64_t i = 0; i < n; ++i) {
    switch (kind) {
      case 0: static_cast<__half*>(out)[i] = __float2half_rn(f[i]); break;
      case 1: static_cast<float*>(out)[i] = __half2float(static_cast<const __half*>(in)[i]); break;
      case 2: static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(f[i]); break;
      default: static_cast<float*>(out)[i] = __bfloat162float(static_cast<const __nv_bfloat16*>(in)[i]); break;
    }
  }
}

// out[i] = fmaf(a[i], b[i], c[i]) (kind 0) or __fmaf_rn (kind 1) or __fadd_rn(__fmul_rn(a, b), c) (kind 2)
CARFAST_EMU_API void carfast_emu_fma(int kind, const float* a, const float* b, const float* c, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = kind == 0 ? fmaf(a[i], b[i], c[i]) : kind == 1 ? __fmaf_rn(a[i], b[i], c[i])
                                                            : __fadd_rn(__fmul_rn(a[i], b[i]), c[i]);
  }
}

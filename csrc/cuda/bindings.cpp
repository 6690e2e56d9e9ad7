// CUDA kernels of carfast's ops, registered with the dispatcher: TORCH_LIBRARY_IMPL(carfast, CUDA, m).
// The ops are defined in carfast._C (csrc/ops.cpp); this file is part of carfast._C_cuda, which
// carfast/extensions.py imports after it.
//
// Per op: check the arguments (messages as csrc/check.h's: op, argument, expected, got, fix), bring the
// inputs to the layouts the raw-pointer launchers of csrc/cuda/kernels.h take, allocate the outputs
// with torch, launch on the current stream of the inputs' device and check the launch.
//
// Index arguments (filters, images, labels, slots) are checked on the device and copied to the host
// in one small transfer per call (a synchronisation of the stream): a bad index then raises an error
// naming the argument, where the kernel would read out of bounds.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../check.h"
#include "../closed_form_checks.h"
#include "kernels.h"

namespace carfast {
namespace {

using cuda::DType;

#define CHECK_LAUNCH(op, err)                                                                     \
  TORCH_CHECK((err) == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err), \
              "; fix: rerun with CUDA_LAUNCH_BLOCKING=1 to locate it, and report it with the shapes")

std::optional<DType> kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: return std::nullopt;
  }
}

// One index argument: every value must lie in [0, hi).
struct IndexRange {
  const char* name;   // as in the schema
  at::Tensor values;  // int64, on the device
  int64_t hi;
  const char* what;   // "input channels of `a`"
};

// Checks the ranges (and, if `sorted` is given, that it is non-decreasing) with one copy to the host.
void check_indices(const char* op, const std::vector<IndexRange>& ranges, const at::Tensor* sorted = nullptr,
                   const char* sorted_name = "") {
  std::vector<at::Tensor> parts;
  for (const IndexRange& r : ranges) {
    if (r.values.numel() == 0) continue;
    parts.push_back(r.values.min().view({1}));
    parts.push_back(r.values.max().view({1}));
  }
  const bool check_sorted = sorted != nullptr && sorted->numel() > 1;
  if (check_sorted) {
    parts.push_back((sorted->slice(0, 1) < sorted->slice(0, 0, -1)).any().to(at::kLong).view({1}));
  }
  if (parts.empty()) return;
  const at::Tensor host = at::cat(parts).cpu();
  const int64_t* v = host.data_ptr<int64_t>();
  for (const IndexRange& r : ranges) {
    if (r.values.numel() == 0) continue;
    const int64_t lo = v[0], hi = v[1];
    v += 2;
    CHECK_ARG(op, lo >= 0 && hi < r.hi, "`", r.name, "` must hold ", r.what, " in [0, ", r.hi,
              "), got values from ", lo, " to ", hi, "; fix: pass ", r.what, " only");
  }
  if (check_sorted) {
    CHECK_ARG(op, v[0] == 0, "`", sorted_name, "` must be non-decreasing (pairs grouped by ", sorted_name,
              "); fix: sort the pairs by ", sorted_name);
  }
}

// The conv settings and sizes, checked as the CPU kernel checks them (csrc/conv_checks.h), in the
// plain struct the launchers take.
cuda::ConvGeometry conv_geometry(const char* op, const at::Tensor& a, const at::Tensor& weight, const at::Tensor& z,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  return check_conv(op, a, weight, z, stride, padding, dilation);
}

// ---------------------------------------------------------------------------------------------
// carfast::ablated_consumer

at::Tensor ablated_consumer_cuda(const at::Tensor& a, const at::Tensor& weight, const at::Tensor& z,
                                 const at::Tensor& scale, const at::Tensor& shift,
                                 const std::optional<at::Tensor>& residual_opt, int64_t act, const at::Tensor& filters,
                                 const at::Tensor& images, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, std::optional<at::ScalarType> out_dtype) {
  constexpr const char* OP = "carfast::ablated_consumer";
  const bool res = residual_opt.has_value() && residual_opt->defined();
  CHECK_CUDA(OP, a);
  check_same_device(OP, NAMED(a), {NAMED(weight), NAMED(z), NAMED(scale), NAMED(shift), NAMED(filters),
                                   NAMED(images)});
  CHECK_FLOAT_16_32(OP, a);
  check_floating(OP, {NAMED(weight), NAMED(z), NAMED(scale), NAMED(shift)});
  check_dtype(OP, at::kLong, {NAMED(filters), NAMED(images)});
  CHECK_ARG(OP, act >= 0 && act <= 2, "`act` must be 0 (identity), 1 (relu) or 2 (relu6), got ", act,
            "; fix: pass carfast.ops.epilogue.ACTIVATIONS[name]");
  const cuda::ConvGeometry g = conv_geometry(OP, a, weight, z, stride, padding, dilation);
  CHECK_SHAPE(OP, scale, ({g.O}), "[O]", "one value per output channel of the consumer");
  CHECK_SHAPE(OP, shift, ({g.O}), "[O]", "one value per output channel of the consumer");
  CHECK_DIM(OP, filters, 1, "[P]");
  const int64_t P = filters.size(0);
  CHECK_SHAPE(OP, images, ({P}), "[P]", "one image per pair, like `filters`");
  if (res) {
    const at::Tensor& residual = *residual_opt;
    CHECK_SAME_DEVICE(OP, residual, a);
    CHECK_FLOATING(OP, residual);
    CHECK_SHAPE(OP, residual, ({g.N, g.O, g.Ho, g.Wo}), "[N, O, Ho, Wo]",
                "pass the residual added after the affine, shaped like `z`, or None");
  }
  const at::ScalarType want = out_dtype.value_or(a.scalar_type());
  CHECK_ARG(OP, c10::isFloatingType(want), "`out_dtype` must be a floating-point dtype, got ", want,
            "; fix: pass torch.float32, torch.float16 or torch.bfloat16");
  check_indices(OP, {{"filters", filters, g.K, "input channels of `a`"}, {"images", images, g.N, "images of `a`"}});

  const c10::cuda::CUDAGuard guard(a.device());
  // a, z and residual are read in one dtype: a's when they share it, else float32 (exact for the
  // half types, and what the reference computes in)
  at::Tensor a_k = a, z_k = z, r_k = res ? *residual_opt : at::Tensor();
  if (z.scalar_type() != a.scalar_type() || (res && r_k.scalar_type() != a.scalar_type())) {
    a_k = a.to(at::kFloat);
    z_k = z.to(at::kFloat);
    if (res) r_k = r_k.to(at::kFloat);
  }
  const std::optional<DType> out_k = kernel_dtype(want);  // else: float32, cast after (as the reference)
  const at::TensorOptions out_opts = a.options().dtype(out_k ? want : at::kFloat);
  // channels_last as the fake kernel makes it: NCHW strides where those are channels_last too (O = 1)
  at::Tensor out = at::empty({P, g.O, g.Ho, g.Wo}, out_opts);
  if (!out.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    out = at::empty({P, g.O, g.Ho, g.Wo}, out_opts.memory_format(at::MemoryFormat::ChannelsLast));
  }
  if (out.numel() > 0) {
    const at::Tensor wt = weight.to(at::kFloat).permute({1, 2, 3, 0}).contiguous();  // [K, kh, kw, O]
    const at::Tensor scale_f = scale.to(at::kFloat).contiguous(), shift_f = shift.to(at::kFloat).contiguous();
    const at::Tensor filters_c = filters.contiguous(), images_c = images.contiguous();
    cuda::AblatedConsumerArgs x{};
    x.g = g;
    x.P = P;
    x.act = static_cast<int>(act);
    x.in_dtype = *kernel_dtype(a_k.scalar_type());
    x.out_dtype = out_k.value_or(DType::kFloat32);
    x.a = a_k.data_ptr();
    x.z = z_k.data_ptr();
    x.residual = res ? r_k.data_ptr() : nullptr;
    for (int d = 0; d < 4; ++d) {
      x.a_stride[d] = a_k.stride(d);
      x.z_stride[d] = z_k.stride(d);
      x.r_stride[d] = res ? r_k.stride(d) : 0;
    }
    x.weight = wt.data_ptr<float>();
    x.scale = scale_f.data_ptr<float>();
    x.shift = shift_f.data_ptr<float>();
    x.filters = filters_c.data_ptr<int64_t>();
    x.images = images_c.data_ptr<int64_t>();
    x.out = out.data_ptr();
    const size_t need = cuda::ablated_consumer_shared_bytes(x);
    const size_t have = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
    CHECK_ARG(OP, need <= have, "a block needs ", need, " bytes of shared memory for input rows of width ", g.W,
              " and a ", g.kh, "x", g.kw, " kernel, the device has ", have,
              "; fix: use backend='torch' for this layer");
    CHECK_LAUNCH(OP, cuda::launch_ablated_consumer(x, at::cuda::getCurrentCUDAStream()));
  }
  return out_k ? out : out.to(want);
}

// ---------------------------------------------------------------------------------------------
// carfast::closed_form_logits and carfast::closed_form_score

// The inputs in the kernel's layouts, kept alive while it runs.
struct ClosedFormInputs {
  cuda::ClosedFormArgs args{};
  at::Tensor a, weight, z, residual, scale, shift, tail, logits, filters, labels;
};

ClosedFormInputs closed_form_inputs(const char* op, const at::Tensor& a, const at::Tensor& weight, const at::Tensor& z,
                                    const at::Tensor& scale, const at::Tensor& shift,
                                    const std::optional<at::Tensor>& residual_opt, int64_t act, const at::Tensor& tail,
                                    const at::Tensor& logits, const at::Tensor& filters, const at::Tensor* labels_opt,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const bool res = residual_opt.has_value() && residual_opt->defined();
  CHECK_CUDA(op, a);
  // the checks the CPU kernel makes too (csrc/closed_form_checks.h)
  const cuda::ConvGeometry g = check_closed_form(op, a, weight, z, scale, shift, residual_opt, act, tail, logits,
                                                 filters, stride, padding, dilation);
  const int64_t C = logits.size(1);
  CHECK_ARG(op, g.O * g.Ho * g.Wo < (int64_t{1} << 31) && g.H * g.W < (int64_t{1} << 31),
            "the consumer's output per image (", g.O, " x ", g.Ho, " x ", g.Wo, ") and input channel (", g.H, " x ",
            g.W, ") must each have fewer than 2^31 elements; fix: use backend='torch' for this layer");
  std::vector<IndexRange> ranges{{"filters", filters, g.K, "input channels of `a`"}};
  if (labels_opt != nullptr) {
    const at::Tensor& labels = *labels_opt;
    CHECK_SAME_DEVICE(op, labels, a);
    CHECK_INT64(op, labels);
    CHECK_SHAPE(op, labels, ({g.N}), "[N]", "one label per image of `a`");
    CHECK_ARG(op, C >= 1 || g.N == 0 || filters.size(0) == 0, "`logits` must have at least one class, got shape ",
              logits.sizes(), "; fix: pass the intact logits [N, classes]");
    ranges.push_back({"labels", labels, C, "class indices of `logits`"});
  }
  check_indices(op, ranges);

  ClosedFormInputs in;
  in.a = a.contiguous();
  in.weight = weight.transpose(0, 1).contiguous();  // [K, O, kh, kw]
  in.z = z.contiguous();
  in.residual = res ? residual_opt->contiguous() : at::Tensor();
  in.scale = scale.contiguous();
  in.shift = shift.contiguous();
  in.tail = tail.contiguous();
  in.logits = logits.contiguous();
  in.filters = filters.contiguous();
  cuda::ClosedFormArgs& x = in.args;
  x.g = g;
  x.C = C;
  x.J = filters.size(0);
  x.act = static_cast<int>(act);
  x.a = in.a.data_ptr<float>();
  x.weight = in.weight.data_ptr<float>();
  x.z = in.z.data_ptr<float>();
  x.residual = res ? in.residual.data_ptr<float>() : nullptr;
  x.scale = in.scale.data_ptr<float>();
  x.shift = in.shift.data_ptr<float>();
  x.tail = in.tail.data_ptr<float>();
  x.logits = in.logits.data_ptr<float>();
  x.filters = in.filters.data_ptr<int64_t>();
  if (labels_opt != nullptr) {
    in.labels = labels_opt->contiguous();
    x.labels = in.labels.data_ptr<int64_t>();
  }
  return in;
}

// Plans the launch for the current device, checks its shared memory, launches on its current stream.
void run_closed_form(const char* op, ClosedFormInputs& in, bool score) {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  const size_t have = props->sharedMemPerBlockOptin;
  const cuda::ClosedFormPlan plan = cuda::closed_form_plan(in.args, score, props->multiProcessorCount, have);
  CHECK_ARG(op, plan.shared_bytes <= have, "a block needs ", plan.shared_bytes, " bytes of shared memory for ",
            in.args.C, " classes, the device has ", have, "; fix: use backend='cpu' or 'torch' for this layer");
  const at::Tensor workspace =
      at::empty({static_cast<int64_t>(plan.workspace_bytes)}, in.a.options().dtype(at::kByte));
  CHECK_LAUNCH(op, cuda::launch_closed_form(in.args, plan, workspace.data_ptr(), at::cuda::getCurrentCUDAStream()));
}

at::Tensor closed_form_logits_cuda(const at::Tensor& a, const at::Tensor& weight, const at::Tensor& z,
                                   const at::Tensor& scale, const at::Tensor& shift,
                                   const std::optional<at::Tensor>& residual, int64_t act, const at::Tensor& tail,
                                   const at::Tensor& logits, const at::Tensor& filters, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* OP = "carfast::closed_form_logits";
  ClosedFormInputs in = closed_form_inputs(OP, a, weight, z, scale, shift, residual, act, tail, logits, filters,
                                           nullptr, stride, padding, dilation);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty({in.args.J, in.args.g.N, in.args.C}, logits.options());
  in.args.out_logits = out.data_ptr<float>();
  run_closed_form(OP, in, /*score=*/false);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> closed_form_score_cuda(
    const at::Tensor& a, const at::Tensor& weight, const at::Tensor& z, const at::Tensor& scale,
    const at::Tensor& shift, const std::optional<at::Tensor>& residual, int64_t act, const at::Tensor& tail,
    const at::Tensor& logits, const at::Tensor& filters, const at::Tensor& labels, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* OP = "carfast::closed_form_score";
  ClosedFormInputs in = closed_form_inputs(OP, a, weight, z, scale, shift, residual, act, tail, logits, filters,
                                           &labels, stride, padding, dilation);
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t J = in.args.J, N = in.args.g.N, C = in.args.C;
  at::Tensor counts = at::empty({J, C}, logits.options().dtype(at::kLong));
  at::Tensor loss_sums = at::empty({J, C}, logits.options().dtype(at::kDouble));
  at::Tensor correct = at::empty({J, N}, logits.options().dtype(at::kBool));
  in.args.counts = counts.data_ptr<int64_t>();
  in.args.loss_sums = loss_sums.data_ptr<double>();
  in.args.correct = correct.data_ptr<bool>();
  run_closed_form(OP, in, /*score=*/true);
  return {counts, loss_sums, correct};
}

// ---------------------------------------------------------------------------------------------
// carfast::score_reduce

std::tuple<at::Tensor, at::Tensor, at::Tensor> score_reduce_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                                 const at::Tensor& slots, int64_t num_slots) {
  constexpr const char* OP = "carfast::score_reduce";
  CHECK_CUDA(OP, logits);
  CHECK_SAME_DEVICE(OP, labels, logits);
  CHECK_SAME_DEVICE(OP, slots, logits);
  CHECK_FLOAT_16_32(OP, logits);
  CHECK_INT64(OP, labels);
  CHECK_INT64(OP, slots);
  CHECK_DIM(OP, logits, 2, "[P, C]");
  const int64_t P = logits.size(0), C = logits.size(1);
  CHECK_SHAPE(OP, labels, ({P}), "[P]", "one label per row of `logits`");
  CHECK_SHAPE(OP, slots, ({P}), "[P]", "one slot per row of `logits`");
  CHECK_ARG(OP, num_slots >= 0, "`num_slots` must be >= 0, got ", num_slots, "; fix: pass the number of slots S");
  CHECK_ARG(OP, C >= 1 || P == 0, "`logits` must have at least one class, got shape ", logits.sizes(),
            "; fix: pass [P, C] logits with C >= 1");
  check_indices(OP, {{"labels", labels, C, "class indices of `logits`"}, {"slots", slots, num_slots, "slots"}},
                &slots, "slots");

  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor counts = at::empty({num_slots, C}, logits.options().dtype(at::kLong));
  at::Tensor loss_sums = at::empty({num_slots, C}, logits.options().dtype(at::kDouble));
  at::Tensor correct = at::empty({P}, logits.options().dtype(at::kBool));
  const at::Tensor labels_c = labels.contiguous(), slots_c = slots.contiguous();
  cuda::ScoreReduceArgs x{};
  x.P = P;
  x.C = C;
  x.S = num_slots;
  x.dtype = *kernel_dtype(logits.scalar_type());
  x.logits = logits.data_ptr();
  x.row_stride = logits.stride(0);
  x.col_stride = logits.stride(1);
  x.labels = labels_c.data_ptr<int64_t>();
  x.slots = slots_c.data_ptr<int64_t>();
  x.counts = counts.data_ptr<int64_t>();
  x.loss_sums = loss_sums.data_ptr<double>();
  x.correct = correct.data_ptr<bool>();
  CHECK_LAUNCH(OP, cuda::launch_score_reduce(x, at::cuda::getCurrentCUDAStream()));
  return {counts, loss_sums, correct};
}

}  // namespace
}  // namespace carfast

TORCH_LIBRARY_IMPL(carfast, CUDA, m) {
  m.impl("ablated_consumer", &carfast::ablated_consumer_cuda);
  m.impl("closed_form_logits", &carfast::closed_form_logits_cuda);
  m.impl("closed_form_score", &carfast::closed_form_score_cuda);
  m.impl("score_reduce", &carfast::score_reduce_cuda);
}

// The argument checks of carfast::closed_form_logits (and closed_form_score, which adds labels), shared by
// the CPU kernel (csrc/cpu/closed_form_logits.cpp) and the CUDA binding (csrc/cuda/bindings.cpp), so both
// accept the same arguments and raise the same messages: every tensor on `a`'s device, the dtypes
// (float32, filters int64), `act`, the ranks, the conv settings (conv_checks.h) and the shapes of scale,
// shift, residual, tail and logits. Each caller checks the device kind of `a` (CHECK_CPU / CHECK_CUDA),
// the filter indices and its own kernel's limits.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>

#include "check.h"
#include "conv_checks.h"

namespace carfast {

inline ConvGeometry check_closed_form(const char* op, const at::Tensor& a, const at::Tensor& weight, const at::Tensor& z,
                                   const at::Tensor& scale, const at::Tensor& shift,
                                   const std::optional<at::Tensor>& residual_opt, int64_t act, const at::Tensor& tail,
                                   const at::Tensor& logits, const at::Tensor& filters, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_same_device(op, NAMED(a), {NAMED(weight), NAMED(z), NAMED(scale), NAMED(shift), NAMED(tail), NAMED(logits),
                                   NAMED(filters)});
  check_dtype(op, at::kFloat, {NAMED(a), NAMED(weight), NAMED(z), NAMED(scale), NAMED(shift), NAMED(tail),
                               NAMED(logits)});
  CHECK_INT64(op, filters);
  CHECK_ARG(op, act >= 0 && act <= 2, "`act` must be 0 (identity), 1 (relu) or 2 (relu6), got ", act,
            "; fix: pass carfast.ops.closed_form_logits.ACTIVATIONS[name]");
  CHECK_DIM(op, tail, 4, "[classes, O, Ho, Wo]");
  CHECK_DIM(op, logits, 2, "[N, classes]");
  CHECK_DIM(op, filters, 1, "[J]");
  const ConvGeometry s = check_conv(op, a, weight, z, stride, padding, dilation);
  const int64_t C = logits.size(1);
  CHECK_SHAPE(op, scale, ({s.O}), "[O]", "one value per output channel of the consumer");
  CHECK_SHAPE(op, shift, ({s.O}), "[O]", "one value per output channel of the consumer");
  if (residual_opt.has_value() && residual_opt->defined()) {
    const at::Tensor& residual = *residual_opt;
    CHECK_SAME_DEVICE(op, residual, a);
    CHECK_FLOAT32(op, residual);
    CHECK_SHAPE(op, residual, ({s.N, s.O, s.Ho, s.Wo}), "[N, O, Ho, Wo]",
                "pass the residual added after the affine, shaped like `z`, or None");
  }
  CHECK_SHAPE(op, tail, ({C, s.O, s.Ho, s.Wo}), "[classes, O, Ho, Wo]",
              "pass the linear part of the tail, classes = logits.size(1)");
  CHECK_SHAPE(op, logits, ({s.N, C}), "[N, classes]", "pass the intact logits of the same images");
  return s;
}

}  // namespace carfast

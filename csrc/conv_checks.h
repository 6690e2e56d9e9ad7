// The argument checks of a conv consumer, shared by every backend of the consumer ops (the CPU kernel
// csrc/cpu/closed_form_logits.cpp and the CUDA binding csrc/cuda/bindings.cpp), so the ops accept the
// same settings and raise the same messages on every device.
//
// Checks the conv settings (stride, padding, dilation: two ints each), the ranks of `a`, `weight` and
// `z`, that the weight has groups=1 and its window fits the padded input, and that `z` is the output
// those settings give; returns the sizes. Each caller checks its other arguments (devices, dtypes,
// scale, shift, residual, ...) itself.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <vector>

#include "check.h"
#include "conv_geometry.h"

namespace carfast {

// `op` names the op in the messages, e.g. "carfast::closed_form_logits". The parameters are named as in
// the ops' schemas, since the CHECK_* macros spell the argument's name from them.
inline ConvGeometry check_conv(const char* op, const at::Tensor& a, const at::Tensor& weight, const at::Tensor& z,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  CHECK_LEN(op, stride, 2);
  CHECK_LEN(op, padding, 2);
  CHECK_LEN(op, dilation, 2);
  CHECK_ARG(op, stride[0] >= 1 && stride[1] >= 1, "`stride` must be >= 1, got ", stride,
            "; fix: pass the consumer's stride");
  CHECK_ARG(op, padding[0] >= 0 && padding[1] >= 0, "`padding` must be >= 0, got ", padding,
            "; fix: pass the consumer's (zero) padding");
  CHECK_ARG(op, dilation[0] >= 1 && dilation[1] >= 1, "`dilation` must be >= 1, got ", dilation,
            "; fix: pass the consumer's dilation");
  CHECK_DIM(op, a, 4, "[N, K, H, W]");
  CHECK_DIM(op, weight, 4, "[O, K, kh, kw]");
  CHECK_DIM(op, z, 4, "[N, O, Ho, Wo]");
  ConvGeometry s{};
  s.N = a.size(0);
  s.K = a.size(1);
  s.H = a.size(2);
  s.W = a.size(3);
  s.O = weight.size(0);
  s.kh = weight.size(2);
  s.kw = weight.size(3);
  CHECK_ARG(op, weight.size(1) == s.K, "`weight` must be [O, K, kh, kw] with K = a.size(1) = ", s.K,
            " (groups=1), got shape ", weight.sizes(),
            "; fix: pass the consumer's full weight (for grouped convs, carfast.ops.consumer_delta.owned_weight)");
  // the last window start along each axis, counted from the first: >= 0 when one window fits
  const int64_t span_y = s.H + 2 * padding[0] - dilation[0] * (s.kh - 1) - 1;
  const int64_t span_x = s.W + 2 * padding[1] - dilation[1] * (s.kw - 1) - 1;
  CHECK_ARG(op, s.kh >= 1 && s.kw >= 1 && span_y >= 0 && span_x >= 0, "the kernel window ", weight.sizes().slice(2),
            " with padding ", padding, " and dilation ", dilation, " does not fit the input ", a.sizes().slice(2),
            "; fix: check the conv settings passed for this consumer");
  s.sy = stride[0];
  s.sx = stride[1];
  s.py = padding[0];
  s.px = padding[1];
  s.dy = dilation[0];
  s.dx = dilation[1];
  s.Ho = span_y / s.sy + 1;
  s.Wo = span_x / s.sx + 1;
  CHECK_SHAPE(op, z, ({s.N, s.O, s.Ho, s.Wo}), "[N, O, Ho, Wo]", "pass the consumer's output for these conv settings");
  return s;
}

}  // namespace carfast

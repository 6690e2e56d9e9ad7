// Small argument checks shared by carfast's C++ kernels.
//
// Every message names the op, the argument, what was expected, what came and how to fix it, e.g.
//   carfast::closed_form_logits: `a` must be float32, got Double; fix: pass `a.float()`
// `op` is a string literal such as "carfast::closed_form_logits"; `x` is the argument itself, so its
// name is spelled exactly as in the schema.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define CHECK_CPU(op, x)                                                                          \
  TORCH_CHECK((x).device().is_cpu(), op ": `" #x "` must be a CPU tensor, got one on ",           \
              (x).device(), "; fix: pass `" #x ".cpu()` or choose the backend for that device")

#define CHECK_FLOAT32(op, x)                                                                      \
  TORCH_CHECK((x).scalar_type() == at::kFloat, op ": `" #x "` must be float32, got ",            \
              (x).scalar_type(), "; fix: pass `" #x ".float()`")

#define CHECK_INT64(op, x)                                                                        \
  TORCH_CHECK((x).scalar_type() == at::kLong, op ": `" #x "` must be int64, got ",               \
              (x).scalar_type(), "; fix: pass `" #x ".long()`")

#define CHECK_DIM(op, x, d, layout)                                                               \
  TORCH_CHECK((x).dim() == (d), op ": `" #x "` must be ", (d), "-D ", layout, ", got shape ",     \
              (x).sizes(), "; fix: pass a tensor of that shape")

// `want` is a braced list, e.g. CHECK_SHAPE(op, z, ({N, O, Ho, Wo}), "[N, O, Ho, Wo]", "...")
#define CHECK_SHAPE(op, x, want, layout, why)                                                     \
  do {                                                                                            \
    const std::vector<int64_t> want_ = std::vector<int64_t> want;                                 \
    TORCH_CHECK((x).sizes() == at::IntArrayRef(want_), op ": `" #x "` must have shape ", layout,  \
                " = ", at::IntArrayRef(want_), ", got ", (x).sizes(), "; fix: ", why);            \
  } while (0)

#define CHECK_LEN(op, x, n)                                                                       \
  TORCH_CHECK((x).size() == static_cast<size_t>(n), op ": `" #x "` must list ", (n),              \
              " ints (one per spatial dim), got ", (x).size(), "; fix: pass `(h, w)`")

#define CHECK_ARG(op, cond, ...) TORCH_CHECK((cond), op ": ", __VA_ARGS__)

// Small argument checks shared by carfast's C++ kernels.
//
// Every message names the op, the argument, what was expected, what came and how to fix it, e.g.
//   carfast::closed_form_logits: `a` must be float32, got Double; fix: pass `a.float()`
// `op` is the op's name, such as "carfast::closed_form_logits" (a string literal, or a `const char*`
// where one check serves several ops); `x` is the argument itself, so its name is spelled exactly as in
// the schema.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>

#define CHECK_CPU(op, x)                                                                           \
  TORCH_CHECK((x).device().is_cpu(), op, ": `" #x "` must be a CPU tensor, got one on ",           \
              (x).device(), "; fix: pass `" #x ".cpu()` or choose the backend for that device")

#define CHECK_CUDA(op, x)                                                                          \
  TORCH_CHECK((x).device().is_cuda(), op, ": `" #x "` must be a CUDA tensor, got one on ",         \
              (x).device(), "; fix: pass `" #x ".cuda()` or choose the backend for that device")

// every tensor argument of an op on one device; `ref` is the one the others follow (e.g. `a`)
#define CHECK_SAME_DEVICE(op, x, ref)                                                              \
  TORCH_CHECK((x).device() == (ref).device(), op, ": `" #x "` must be on ", (ref).device(),        \
              " like `" #ref "`, got ", (x).device(), "; fix: pass `" #x ".to(" #ref ".device)`")

// float32, float16 or bfloat16: the dtypes the CUDA kernels read directly
#define CHECK_FLOAT_16_32(op, x)                                                                   \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||                 \
                  (x).scalar_type() == at::kBFloat16,                                              \
              op, ": `" #x "` must be float32, float16 or bfloat16, got ", (x).scalar_type(),      \
              "; fix: pass `" #x ".float()`")

#define CHECK_FLOATING(op, x)                                                                      \
  TORCH_CHECK(c10::isFloatingType((x).scalar_type()), op, ": `" #x "` must be a floating-point "   \
              "tensor, got ", (x).scalar_type(), "; fix: pass `" #x ".float()`")

#define CHECK_FLOAT32(op, x)                                                                       \
  TORCH_CHECK((x).scalar_type() == at::kFloat, op, ": `" #x "` must be float32, got ",             \
              (x).scalar_type(), "; fix: pass `" #x ".float()`")

#define CHECK_INT64(op, x)                                                                         \
  TORCH_CHECK((x).scalar_type() == at::kLong, op, ": `" #x "` must be int64, got ",                \
              (x).scalar_type(), "; fix: pass `" #x ".long()`")

#define CHECK_DIM(op, x, d, layout)                                                                \
  TORCH_CHECK((x).dim() == (d), op, ": `" #x "` must be ", (d), "-D ", layout, ", got shape ",     \
              (x).sizes(), "; fix: pass a tensor of that shape")

// `want` is a braced list, e.g. CHECK_SHAPE(op, z, ({N, O, Ho, Wo}), "[N, O, Ho, Wo]", "...")
#define CHECK_SHAPE(op, x, want, layout, why)                                                      \
  do {                                                                                             \
    const std::vector<int64_t> want_ = std::vector<int64_t> want;                                  \
    TORCH_CHECK((x).sizes() == at::IntArrayRef(want_), op, ": `" #x "` must have shape ", layout,  \
                " = ", at::IntArrayRef(want_), ", got ", (x).sizes(), "; fix: ", why);             \
  } while (0)

#define CHECK_LEN(op, x, n)                                                                        \
  TORCH_CHECK((x).size() == static_cast<size_t>(n), op, ": `" #x "` must list ", (n),              \
              " ints (one per spatial dim), got ", (x).size(), "; fix: pass `(h, w)`")

#define CHECK_ARG(op, cond, ...) TORCH_CHECK((cond), op, ": ", __VA_ARGS__)

// The same checks over a list of arguments, each with its name as the schema spells it: NAMED(weight).
namespace carfast {

struct Named {
  const char* name;
  const at::Tensor& t;
};
#define NAMED(x) ::carfast::Named{#x, (x)}

// every tensor of `xs` on `ref`'s device (the message CHECK_SAME_DEVICE gives)
inline void check_same_device(const char* op, Named ref, std::initializer_list<Named> xs) {
  for (const Named& x : xs) {
    TORCH_CHECK(x.t.device() == ref.t.device(), op, ": `", x.name, "` must be on ", ref.t.device(), " like `",
                ref.name, "`, got ", x.t.device(), "; fix: pass `", x.name, ".to(", ref.name, ".device)`");
  }
}

// every tensor of `xs` of dtype `want`, at::kFloat or at::kLong (the message CHECK_FLOAT32 / CHECK_INT64 give)
inline void check_dtype(const char* op, at::ScalarType want, std::initializer_list<Named> xs) {
  const bool is_long = want == at::kLong;
  for (const Named& x : xs) {
    TORCH_CHECK(x.t.scalar_type() == want, op, ": `", x.name, "` must be ", is_long ? "int64" : "float32", ", got ",
                x.t.scalar_type(), "; fix: pass `", x.name, is_long ? ".long()" : ".float()", "`");
  }
}

// every tensor of `xs` floating-point (the message CHECK_FLOATING gives)
inline void check_floating(const char* op, std::initializer_list<Named> xs) {
  for (const Named& x : xs) {
    TORCH_CHECK(c10::isFloatingType(x.t.scalar_type()), op, ": `", x.name, "` must be a floating-point tensor, got ",
                x.t.scalar_type(), "; fix: pass `", x.name, ".float()`");
  }
}

}  // namespace carfast

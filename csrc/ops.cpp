// The `carfast` operator library: schemas only, shared by every backend.
//
// Each backend registers its kernels in its own file with TORCH_LIBRARY_IMPL(carfast, <Key>, m)
// (csrc/cpu/*.cpp for CPU; csrc/cuda/bindings.cpp for CUDA). The fake (meta) kernels used by torch.compile and
// torch.library.opcheck live in Python next to each op's reference (carfast/ops/<op>.py);
// set_python_module tells the dispatcher which module to import to find them.
#include <torch/library.h>

TORCH_LIBRARY(carfast, m) {
  // Ablated logits for every (filter, image) pair of a conv consumer with an elementwise epilogue
  // and an affine tail; contract: carfast.ops.closed_form_logits.closed_form_logits_ref.
  //   a [N, K, H, W], weight [O, K, kh, kw], z [N, O, Ho, Wo], scale/shift [O],
  //   residual [N, O, Ho, Wo] or None, act 0 identity / 1 relu / 2 relu6, tail [classes, O, Ho, Wo],
  //   logits [N, classes], filters [J] int64  ->  [J, N, classes]
  // Each op's fake kernel (and, for ops without a C++ CPU kernel, the reference as its CPU kernel) is
  // registered by the Python module named before its def (set_python_module applies to later defs).
  m.set_python_module("carfast.ops.closed_form_logits");
  m.def(
      "closed_form_logits(Tensor a, Tensor weight, Tensor z, Tensor scale, Tensor shift, "
      "Tensor? residual, int act, Tensor tail, Tensor logits, Tensor filters, int[] stride, "
      "int[] padding, int[] dilation) -> Tensor");

  // E(z[n] - U_k(a[n, k])) for pairs (k, n) = (filters[p], images[p]): the consumer's output after its
  // epilogue with one input channel removed; contract: carfast.ops.ablated_consumer.ablated_consumer_ref.
  //   a [N, K, H, W], weight [O, K, kh, kw], z [N, O, Ho, Wo], scale/shift [O], residual or None,
  //   filters/images [P] int64  ->  [P, O, Ho, Wo] channels_last, dtype out_dtype (default a's)
  m.set_python_module("carfast.ops.ablated_consumer");
  m.def(
      "ablated_consumer(Tensor a, Tensor weight, Tensor z, Tensor scale, Tensor shift, Tensor? residual, "
      "int act, Tensor filters, Tensor images, int[] stride, int[] padding, int[] dilation, "
      "ScalarType? out_dtype) -> Tensor");
  // closed_form_logits fused with score_reduce; contract: carfast.ops.closed_form_score.closed_form_score_ref.
  //   (closed_form_logits' arguments), labels [N] int64  ->  counts [J, C] int64, loss_sums [J, C]
  //   float64, correct [J, N] bool
  m.set_python_module("carfast.ops.closed_form_score");
  m.def(
      "closed_form_score(Tensor a, Tensor weight, Tensor z, Tensor scale, Tensor shift, Tensor? residual, "
      "int act, Tensor tail, Tensor logits, Tensor filters, Tensor labels, int[] stride, int[] padding, "
      "int[] dilation) -> (Tensor, Tensor, Tensor)");
  // Per-(slot, class) correct counts and loss sums of pairs grouped by slot (non-decreasing);
  // contract: carfast.ops.score_reduce.score_reduce_ref.
  //   logits [P, C], labels [P] int64, slots [P] int64  ->  counts [S, C] int64, loss_sums [S, C]
  //   float64, correct [P] bool
  m.set_python_module("carfast.ops.score_reduce");
  m.def("score_reduce(Tensor logits, Tensor labels, Tensor slots, int num_slots) -> (Tensor, Tensor, Tensor)");
}

// The `carfast` operator library: schemas only, shared by every backend.
//
// Each backend registers its kernels in its own file with TORCH_LIBRARY_IMPL(carfast, <Key>, m)
// (csrc/cpu/*.cpp for CPU; csrc/cuda/* later). The fake (meta) kernels used by torch.compile and
// torch.library.opcheck live in Python next to each op's reference (carfast/ops/<op>.py);
// set_python_module tells the dispatcher which module to import to find them.
#include <torch/library.h>

TORCH_LIBRARY(carfast, m) {
  // Ablated logits for every (filter, image) pair of a conv consumer with an elementwise epilogue
  // and an affine tail; contract: carfast.ops.closed_form_logits.closed_form_logits_ref.
  //   a [N, K, H, W], weight [O, K, kh, kw], z [N, O, Ho, Wo], scale/shift [O],
  //   residual [N, O, Ho, Wo] or None, act 0 identity / 1 relu / 2 relu6, tail [classes, O, Ho, Wo],
  //   logits [N, classes], filters [J] int64  ->  [J, N, classes]
  m.set_python_module("carfast.ops.closed_form_logits");
  m.def(
      "closed_form_logits(Tensor a, Tensor weight, Tensor z, Tensor scale, Tensor shift, "
      "Tensor? residual, int act, Tensor tail, Tensor logits, Tensor filters, int[] stride, "
      "int[] padding, int[] dilation) -> Tensor");
}

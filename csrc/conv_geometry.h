// The sizes and settings of a conv consumer, a [N, K, H, W] -> z [N, O, Ho, Wo]: one plain struct (no torch
// types) that the argument checks fill (conv_checks.h) and every backend's kernels read (the CPU kernel,
// the CUDA kernels through cuda/kernels.h, and their emulator, which passes the 15 fields in this order).
#pragma once

#include <cstdint>

namespace carfast {

struct ConvGeometry {
  int64_t N, K, H, W;              // a
  int64_t O, kh, kw;               // weight [O, K, kh, kw]
  int64_t Ho, Wo;                  // z
  int64_t sy, sx, py, px, dy, dx;  // stride, padding, dilation
};

}  // namespace carfast

// CUDA kernel of carfast::ablated_consumer (schema: csrc/ops.cpp; contract and plain-PyTorch reference:
// carfast/ops/ablated_consumer.py, ablated_consumer_ref).
//
// For pair p, with k = filters[p] and n = images[p]:
//   out[p, o, y, x] = act((z[n, o, y, x] - delta[o, y, x]) * scale[o] + shift[o] + residual[n, o, y, x])
//   delta = U_k(a[n, k])             the consumer's conv restricted to input channel k
// in float32 whatever the input and output dtypes (float32, float16, bfloat16).
//
// Grid: one block per (pair, tile of TQ output positions, tile of OT output channels), pair-major so
// the blocks of one pair run together and share its channel in L2. A block of 256 threads:
//   1. stages in shared memory the filter's weight slice for its channels, w_s [kh*kw][OT] (float32,
//      zero past O), and the rows of the owned channel a[n, k] that its positions read, a_s [rows][W]
//      (converted to float32 once);
//   2. computes delta: thread (qi, og) owns position q0 + qi and the 16 channels og*16 .. og*16 + 15;
//      per kernel tap it reads one pixel and four float4 of weights (a broadcast: the warp's lanes
//      share og) for 16 FMAs. Taps outside the input are the zero padding and are skipped;
//   3. applies the epilogue with z and residual read at the thread's position (lanes over consecutive
//      positions: coalesced for NCHW tensors; any strides work) and writes the result into the
//      shared transpose buffer r_s [TQ][OT + 1] (+1: no bank conflicts either way);
//   4. stores r_s in channels_last order, lanes over channels: out [P, Ho, Wo, O] written in
//      contiguous runs of OT values per position, converted to out_dtype.
// Each output is written by one thread from a fixed-order sum over the taps: deterministic.
#include "common.cuh"
#include "kernels.h"

#include <algorithm>

namespace carfast {
namespace cuda {
namespace {

constexpr int kChannelsPerThread = 16;

// How the output is cut into blocks (the same on the host, for the launch, and in the kernel).
struct Tiling {
  int OT;           // output channels per block: a multiple of 16, at most 64
  int TQ;           // output positions per block: 256 / (OT / 16)
  int rows_max;     // most input rows a block reads
  int64_t q_tiles;  // ceil(Ho * Wo / TQ)
  int64_t o_tiles;  // ceil(O / OT)
  int64_t block0;   // first block of this launch (grids over 2^31 - 1 blocks are cut into launches)
};

Tiling make_tiling(const AblatedConsumerArgs& x) {
  const ConvGeometry& g = x.g;
  Tiling t{};
  t.OT = static_cast<int>(std::min<int64_t>(64, (g.O + kChannelsPerThread - 1) / kChannelsPerThread *
                                                    kChannelsPerThread));
  t.TQ = kThreads / (t.OT / kChannelsPerThread);
  // TQ consecutive positions span at most (TQ - 1) / Wo + 2 output rows
  const int64_t out_rows = std::min<int64_t>(g.Ho, (t.TQ - 1) / std::max<int64_t>(g.Wo, 1) + 2);
  t.rows_max = static_cast<int>(std::min<int64_t>(g.H, (out_rows - 1) * g.sy + (g.kh - 1) * g.dy + 1));
  t.q_tiles = (g.Ho * g.Wo + t.TQ - 1) / t.TQ;
  t.o_tiles = (g.O + t.OT - 1) / t.OT;
  return t;
}

size_t shared_bytes(const AblatedConsumerArgs& x, const Tiling& t) {
  const int64_t taps = x.g.kh * x.g.kw;
  return sizeof(float) * static_cast<size_t>(taps * t.OT + int64_t{t.rows_max} * x.g.W +
                                             int64_t{t.TQ} * (t.OT + 1));
}

template <typename T, typename TO>
__global__ void __launch_bounds__(kThreads) ablated_consumer_kernel(const AblatedConsumerArgs x, const Tiling t) {
  extern __shared__ float4 smem4[];
  const ConvGeometry& g = x.g;
  const int tid = threadIdx.x;
  const int OT = t.OT, TQ = t.TQ;
  const int64_t block = t.block0 + blockIdx.x;
  const int64_t tiles = t.q_tiles * t.o_tiles;
  const int64_t p = block / tiles;
  const int64_t q0 = (block % tiles) / t.o_tiles * TQ;  // first output position of the block
  const int64_t o0 = (block % tiles) % t.o_tiles * OT;  // first output channel of the block
  const int64_t k = x.filters[p], n = x.images[p];
  const int64_t H = g.H, W = g.W, O = g.O, Wo = g.Wo, npos = g.Ho * g.Wo;
  const int taps = static_cast<int>(g.kh * g.kw);

  float* w_s = reinterpret_cast<float*>(smem4);  // [taps][OT]
  float* a_s = w_s + taps * OT;                  // [rows][W]
  float* r_s = a_s + t.rows_max * W;             // [TQ][OT + 1]

  // 1. weight slice and the input rows of the owned channel
  for (int e = tid; e < taps * OT; e += kThreads) {
    const int64_t o = o0 + e % OT;
    w_s[e] = o < O ? x.weight[(k * taps + e / OT) * O + o] : 0.0f;
  }
  const int64_t qlast = min64(q0 + TQ, npos) - 1;
  const int64_t r0 = max64(0, q0 / Wo * g.sy - g.py);
  const int64_t r1 = min64(H, qlast / Wo * g.sy - g.py + (g.kh - 1) * g.dy + 1);
  const T* __restrict__ a = static_cast<const T*>(x.a) + n * x.a_stride[0] + k * x.a_stride[1];
  for (int64_t e = tid; e < (r1 - r0) * W; e += kThreads) {
    a_s[e] = to_float(a[(r0 + e / W) * x.a_stride[2] + (e % W) * x.a_stride[3]]);
  }
  __syncthreads();

  // 2-3. delta, then the epilogue, for position q and channels og*16 .. og*16 + 15 of the block
  const int qi = tid % TQ, og = tid / TQ;
  const int64_t q = q0 + qi;
  if (q < npos) {
    const int64_t oy = q / Wo, ox = q % Wo;
    float acc[kChannelsPerThread];
#pragma unroll
    for (int c = 0; c < kChannelsPerThread; ++c) acc[c] = 0.0f;
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      const int64_t iy = oy * g.sy - g.py + ky * g.dy;
      if (iy < 0 || iy >= H) continue;
      const float* arow = a_s + (iy - r0) * W;
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        const int64_t ix = ox * g.sx - g.px + kx * g.dx;
        if (ix < 0 || ix >= W) continue;
        const float av = arow[ix];
        const float4* wv = reinterpret_cast<const float4*>(w_s + (ky * g.kw + kx) * OT + og * kChannelsPerThread);
#pragma unroll
        for (int c4 = 0; c4 < kChannelsPerThread / 4; ++c4) {
          const float4 w4 = wv[c4];
          acc[4 * c4 + 0] = fmaf(w4.x, av, acc[4 * c4 + 0]);
          acc[4 * c4 + 1] = fmaf(w4.y, av, acc[4 * c4 + 1]);
          acc[4 * c4 + 2] = fmaf(w4.z, av, acc[4 * c4 + 2]);
          acc[4 * c4 + 3] = fmaf(w4.w, av, acc[4 * c4 + 3]);
        }
      }
    }
    const T* __restrict__ z = static_cast<const T*>(x.z) + n * x.z_stride[0] + oy * x.z_stride[2] + ox * x.z_stride[3];
    const T* __restrict__ res = x.residual == nullptr ? nullptr
        : static_cast<const T*>(x.residual) + n * x.r_stride[0] + oy * x.r_stride[2] + ox * x.r_stride[3];
    float* rrow = r_s + qi * (OT + 1) + og * kChannelsPerThread;
#pragma unroll
    for (int c = 0; c < kChannelsPerThread; ++c) {
      const int64_t o = o0 + og * kChannelsPerThread + c;
      if (o < O) {
        const float zv = to_float(z[o * x.z_stride[1]]);
        const float rv = res == nullptr ? 0.0f : to_float(res[o * x.r_stride[1]]);
        rrow[c] = epilogue(__fsub_rn(zv, acc[c]), x.scale[o], x.shift[o], rv, x.act);
      }
    }
  }
  __syncthreads();

  // 4. channels_last store: lanes over channels
  TO* __restrict__ out = static_cast<TO*>(x.out);
  for (int e = tid; e < TQ * OT; e += kThreads) {
    const int qe = e / OT, oe = e % OT;
    if (q0 + qe < npos && o0 + oe < O) {
      out[(p * npos + q0 + qe) * O + o0 + oe] = from_float<TO>(r_s[qe * (OT + 1) + oe]);
    }
  }
}

template <typename T, typename TO>
cudaError_t launch_typed(const AblatedConsumerArgs& x, cudaStream_t stream) {
  Tiling t = make_tiling(x);
  const size_t smem = shared_bytes(x, t);
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(ablated_consumer_kernel<T, TO>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const int64_t blocks = x.P * t.q_tiles * t.o_tiles;
  constexpr int64_t kMaxBlocks = (int64_t{1} << 31) - 1;
  for (t.block0 = 0; t.block0 < blocks; t.block0 += kMaxBlocks) {
    const unsigned grid = static_cast<unsigned>(std::min(kMaxBlocks, blocks - t.block0));
    ablated_consumer_kernel<T, TO><<<grid, kThreads, smem, stream>>>(x, t);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_in(const AblatedConsumerArgs& x, cudaStream_t stream) {
  return with_dtype(x.out_dtype, [&](auto out) { return launch_typed<T, typename decltype(out)::type>(x, stream); });
}

}  // namespace

size_t ablated_consumer_shared_bytes(const AblatedConsumerArgs& args) {
  return shared_bytes(args, make_tiling(args));
}

cudaError_t launch_ablated_consumer(const AblatedConsumerArgs& args, cudaStream_t stream) {
  if (args.P == 0 || args.g.O == 0 || args.g.Ho * args.g.Wo == 0) return cudaSuccess;
  return with_dtype(args.in_dtype, [&](auto in) { return launch_in<typename decltype(in)::type>(args, stream); });
}

}  // namespace cuda
}  // namespace carfast

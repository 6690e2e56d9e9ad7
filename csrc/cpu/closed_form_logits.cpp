// CPU kernel of carfast::closed_form_logits (schema: csrc/ops.cpp; contract and plain-PyTorch
// reference: carfast/ops/closed_form_logits.py, closed_form_logits_ref).
//
// For every (filter j, image n), with k = filters[j]:
//   delta = U_k(a[n, k])                   (the consumer restricted to input channel k)
//   out[j, n] = logits[n] + sum_{p, c} (E(z - delta) - E(z))[n, c, p] * tail[:, c, p]
//   E(v) = act(v * scale[c] + shift[c] + residual[n, c, p])
// computed as d = act(pre - delta * scale) - act(pre), pre = z * scale + shift + residual formed
// once per image, with scale folded into the weight; delta = 0 gives pre - 0 = pre, so d = 0 exactly.
//
// Free zeros. A channel a[n, k] without a nonzero pixel returns logits[n] bit for bit, with no work.
// Otherwise the output positions that some nonzero pixel reaches through some kernel tap (stride,
// zero padding, dilation) are marked; at every other position delta = 0 and d = 0 exactly, so the
// epilogue and the tail skip them. The marks are the nonzero mask of the channel dilated by the
// kernel footprint, in two separable OR passes over 64-bit row masks (a byte per pixel for rows
// wider than 64): no branch per pixel.
//
// delta itself is a direct convolution of the zero-padded channel with weight[:, k] in registers:
// QB output positions of a row x NB registers of output channels, each weight register loaded once
// per tap for QB positions, each pixel broadcast once for NB registers. Zero pixels are multiplied
// like the others (a zero adds exactly 0); row blocks holding no marked position are skipped.
//
// Layouts prepared once per call so the inner loops run over the output channels contiguously and
// vectorise (O is padded with zeros to Op, a multiple of the SIMD width VL; a padded channel has
// delta = 0, so d = 0 exactly, and a zero tail):
//   weight      [O, K, kh, kw]       -> wt     [K, kh, kw, Op]          (times scale[o])
//   z, residual [N, O, Ho, Wo]       -> zc, rc [N, Ho*Wo, Op]           (channels last)
//   tail        [classes, O, Ho, Wo] -> tailB  [Op/VL, Ho*Wo, classes, VL]
// The tail term costs P * O * classes multiply-adds per pair and reads the whole tail. It is done
// for JB filters of one image at a time with JB x CB accumulator registers (CB classes at a time),
// so each tail vector loaded serves JB pairs and each vector of d serves CB classes. tailB keeps O,
// the long axis (64 on ResNet layer3), innermost rather than classes (10), grouped by register so
// one register's slice of the tail streams contiguously.
//
// Parallel over (image, block of JB filters), image-major, with at::parallel_for: in PyTorch's CPU
// builds that is OpenMP (ATen/ParallelOpenMP.h expands to `#pragma omp parallel` here, hence
// -fopenmp), and it honours torch.set_num_threads. Each thread owns its scratch buffers. A pair's
// result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../check.h"
#include "../closed_form_checks.h"

namespace carfast {
namespace {

#define OP "carfast::closed_form_logits"

// One SIMD register of floats (GCC/Clang vector extension; the width follows the -march flags).
#if defined(__AVX512F__)
constexpr int64_t VL = 16;
constexpr int64_t JB = 8;  // filters per block: tail with 8 x 2 accumulators + 8 + 1 of the 32 registers
constexpr int kMaxQB = 4;  // conv: 4 x 4 accumulators + 4 + 1
#elif defined(__AVX__)
constexpr int64_t VL = 8;
constexpr int64_t JB = 4;  // 4 x 2 + 4 + 1 of the 16 registers
constexpr int kMaxQB = 2;  // 2 x 4 + 4 + 1
#else
constexpr int64_t VL = 4;
constexpr int64_t JB = 4;
constexpr int kMaxQB = 2;
#endif
constexpr int kMaxNB = 4;  // conv: registers of output channels per block

typedef float vecf __attribute__((vector_size(VL * sizeof(float))));
inline vecf loadu(const float* p) {
  vecf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void storeu(float* p, vecf v) { std::memcpy(p, &v, sizeof v); }
// x in every lane. x - 0 == x for every x (0 + x is not: 0 + (-0) = +0), so this folds to one broadcast.
inline vecf splat(float x) { return x - vecf{}; }
inline float hsum(vecf v) {
  float s = 0.0f;
  for (int64_t i = 0; i < VL; ++i) s += v[i];
  return s;
}

struct Geometry : ConvGeometry {  // a, weight, z, the conv settings (conv_geometry.h), and:
  int64_t Op;              // O padded up to a multiple of VL
  int64_t P;               // Ho * Wo
  int64_t C, J;            // classes, filters
  int64_t Hp, Wp;          // H + 2 py, W + 2 px: the zero-padded channel
};

struct Inputs {            // contiguous, in the layouts above
  const float* a;          // [N, K, H, W]
  const float* wt;         // [K, kh, kw, Op]
  const float* zc;         // [N, P, Op]
  const float* rc;         // [N, P, Op] or null
  const float* scale;      // [Op]
  const float* shift;      // [Op]
  const float* tailB;      // [Op/VL, P, C, VL]
  const float* logits;     // [N, C]
  const int64_t* filters;  // [J]
  float* out;              // [J, N, C]
};

template <int ACT>
inline float activate(float v) {
  if (ACT == 1) return std::max(v, 0.0f);                   // NaN stays NaN, as torch.relu
  if (ACT == 2) return std::min(std::max(v, 0.0f), 6.0f);   // as clamp(0, 6)
  return v;
}

// activate on a register, by bit masks (a vector comparison gives -1 / 0 per lane): a lane below
// 0 becomes +0, above 6 (relu6) becomes 6; NaN compares false both ways and stays NaN.
// (A cast between vector types of one size reinterprets the bits.)
typedef int32_t veci __attribute__((vector_size(VL * sizeof(float))));
template <int ACT>
inline vecf activate(vecf x) {
  if (ACT == 0) return x;
  veci xi = (veci)x & ~(x < vecf{});
  if (ACT == 2) {
    const vecf six = splat(6.0f);
    const veci over = (vecf)xi > six;
    xi = (xi & ~over) | ((veci)six & over);
  }
  return (vecf)xi;
}

// The tail term for the JN filters of a block:
//   acc[jj, cls] (a register of lanes, summed at the end) += d[p, c, jj] * tail[cls, c, p]
// over the touched positions p = U[i] and the channels c of one register block cb. d is
// [P, Op/VL, JB, VL] (the JN registers of a position and channel block lie side by side: one address
// serves them all); acc is [JN, C] registers in memory. tail_chunk covers positions U[i0, i1) and classes
// [cls0, cls0 + CB) with JN x CB accumulators in registers: per position, JN registers of d and CB
// of tail are loaded for JN * CB multiply-adds. Positions go by small groups (kPB) so that the
// group's d and tail stay in L1 across the class chunks.
constexpr int64_t kPB = 16;

template <int JN, int CB>
void tail_chunk(const float* __restrict d, const int32_t* __restrict U, int64_t i0, int64_t i1,
                const float* __restrict tailB, int64_t P, int64_t C, int64_t Op, int64_t cb, int64_t cls0,
                vecf* __restrict acc_mem) {
  vecf acc[JN][CB];
  for (int jj = 0; jj < JN; ++jj)
    for (int b = 0; b < CB; ++b) acc[jj][b] = acc_mem[jj * C + cls0 + b];
  const int64_t OB = Op / VL;
  const float* __restrict db = d + cb * JB * VL;
  const float* __restrict tb = tailB + (cb * P * C + cls0) * VL;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t p = U[i];
    vecf dv[JN];
    const float* __restrict dp = db + p * OB * JB * VL;
    for (int jj = 0; jj < JN; ++jj) dv[jj] = loadu(dp + jj * VL);
    const float* __restrict tp = tb + p * C * VL;
    for (int b = 0; b < CB; ++b) {
      const vecf tv = loadu(tp + b * VL);
      for (int jj = 0; jj < JN; ++jj) acc[jj][b] += dv[jj] * tv;
    }
  }
  for (int jj = 0; jj < JN; ++jj)
    for (int b = 0; b < CB; ++b) acc_mem[jj * C + cls0 + b] = acc[jj][b];
}

// The most classes per chunk for JN filters: JN * CB accumulators + JN + 1 registers in use.
constexpr int max_cb(int jn) {
  return std::min(8, ((VL == 16 ? 32 : 16) - 3 - jn) / jn);
}

using TailFn = void (*)(const float*, const int32_t*, int64_t, int64_t, const float*, int64_t, int64_t,
                        int64_t, int64_t, int64_t, vecf*);
template <int JN, int CB>
TailFn tail_fn_cb(int cb) {
  if constexpr (CB <= 1) {
    return tail_chunk<JN, 1>;
  } else {
    return cb == CB ? tail_chunk<JN, CB> : tail_fn_cb<JN, CB - 1>(cb);
  }
}

template <int JN>
void tail_sums_jn(const float* d, const int32_t* U, int64_t nU, const float* tailB, int64_t P, int64_t C,
                  int64_t Op, vecf* acc_mem, float* sums) {
  constexpr int kCB = max_cb(JN);
  static_assert(kCB >= 1, "too many filters per block for the registers");
  std::fill(acc_mem, acc_mem + JN * C, vecf{});
  for (int64_t cb = 0; cb * VL < Op; ++cb) {
    for (int64_t i0 = 0; i0 < nU; i0 += kPB) {
      const int64_t i1 = std::min(nU, i0 + kPB);
      for (int64_t cls0 = 0; cls0 < C;) {
        const int64_t left = C - cls0;
        const int64_t chunks = (left + kCB - 1) / kCB;
        const int64_t n = (left + chunks - 1) / chunks;  // even chunks: 10 classes by 5 -> 5 + 5
        tail_fn_cb<JN, kCB>(static_cast<int>(n))(d, U, i0, i1, tailB, P, C, Op, cb, cls0, acc_mem);
        cls0 += n;
      }
    }
  }
  for (int64_t i = 0; i < JN * C; ++i) sums[i] = hsum(acc_mem[i]);
}

// sums[jj * C + cls] = sum_{i < nU, c} d[U[i], c, jj] * tail[cls, c, U[i]] for jj < jn.
void tail_sums(int64_t jn, const float* d, const int32_t* U, int64_t nU, const float* tailB, int64_t P,
               int64_t C, int64_t Op, vecf* acc_mem, float* sums) {
  static_assert(JB <= 8, "tail_sums dispatches JN = 1..8");
  switch (jn) {
    case 1: tail_sums_jn<1>(d, U, nU, tailB, P, C, Op, acc_mem, sums); break;
    case 2: tail_sums_jn<2>(d, U, nU, tailB, P, C, Op, acc_mem, sums); break;
    case 3: tail_sums_jn<3>(d, U, nU, tailB, P, C, Op, acc_mem, sums); break;
    case 4: tail_sums_jn<4>(d, U, nU, tailB, P, C, Op, acc_mem, sums); break;
#if defined(__AVX512F__)
    case 5: tail_sums_jn<5>(d, U, nU, tailB, P, C, Op, acc_mem, sums); break;
    case 6: tail_sums_jn<6>(d, U, nU, tailB, P, C, Op, acc_mem, sums); break;
    case 7: tail_sums_jn<7>(d, U, nU, tailB, P, C, Op, acc_mem, sums); break;
    case 8: tail_sums_jn<8>(d, U, nU, tailB, P, C, Op, acc_mem, sums); break;
#endif
    default: TORCH_INTERNAL_ASSERT(false, OP ": bad filter block ", jn);
  }
}

// d[q, c0 : c0 + NB * VL] = act(pre[q] - delta[q]) - y0[q] for the QB output positions q of a row
// block and one filter, where delta[q] = sum_{ky, kx} ap[ky * dy, q * sx + kx * dx] * wk[ky, kx, :]
// (wk holds weight * scale: delta is the conv output times scale). ap points at the padded
// channel's pixel under the block's first position and first tap; wk at wt[k] + c0 as [kh, kw, Op];
// pre / y0 at the block's first position + c0 as [QB, Op]; drow at the d register of the first
// position, channel block c0 / VL and this filter (d is [P, Op/VL, JB, VL]: positions dq apart,
// channel blocks JB * VL apart).
template <int ACT, int QB, int NB>
void conv_block(const float* __restrict ap, int64_t Wp, int64_t sx, int64_t kh, int64_t kw, int64_t dy,
                int64_t dx, const float* __restrict wk, int64_t Op, const float* __restrict pre,
                const float* __restrict y0, float* __restrict drow, int64_t dq) {
  vecf acc[QB][NB];
  for (int q = 0; q < QB; ++q)
    for (int b = 0; b < NB; ++b) acc[q][b] = vecf{};
  for (int64_t ky = 0; ky < kh; ++ky) {
    const float* __restrict row = ap + ky * dy * Wp;
    for (int64_t kx = 0; kx < kw; ++kx) {
      const float* __restrict wv = wk + (ky * kw + kx) * Op;
      vecf w[NB];
      for (int b = 0; b < NB; ++b) w[b] = loadu(wv + b * VL);
      const float* __restrict px = row + kx * dx;
      for (int q = 0; q < QB; ++q) {
        const vecf v = splat(px[q * sx]);
        for (int b = 0; b < NB; ++b) acc[q][b] += v * w[b];
      }
    }
  }
  for (int q = 0; q < QB; ++q) {
    for (int b = 0; b < NB; ++b) {
      const int64_t at = q * Op + b * VL;
      const vecf v = loadu(pre + at) - acc[q][b];
      storeu(drow + q * dq + b * JB * VL, activate<ACT>(v) - loadu(y0 + at));
    }
  }
}

using ConvFn = void (*)(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const float*,
                        int64_t, const float*, const float*, float*, int64_t);
template <int ACT, int QB>
ConvFn conv_fn(int nb) {
  return nb == 4 ? conv_block<ACT, QB, 4> : nb == 3 ? conv_block<ACT, QB, 3>
       : nb == 2 ? conv_block<ACT, QB, 2> : conv_block<ACT, QB, 1>;
}
template <int ACT>
ConvFn conv_fn(int qb, int nb) {
  static_assert(kMaxQB <= 4, "conv_fn dispatches QB = 1..4");
  return qb >= 4 ? conv_fn<ACT, 4>(nb) : qb == 3 ? conv_fn<ACT, 3>(nb) : qb == 2 ? conv_fn<ACT, 2>(nb) : conv_fn<ACT, 1>(nb);
}

// The private kernel: tasks [begin, end) of the N * ceil(J / JB) (image, filter block) tasks.
// Geometry and pointers come by value so that the compiler knows stores to scratch do not alias them.
template <int ACT, bool RES>
void closed_form_logits_tasks(int64_t begin, int64_t end, const Geometry g, const Inputs in) {
  const int64_t N = g.N, K = g.K, H = g.H, W = g.W, Op = g.Op, kh = g.kh, kw = g.kw, Ho = g.Ho, Wo = g.Wo,
                P = g.P, C = g.C, J = g.J, T = g.kh * g.kw, sy = g.sy, sx = g.sx, py = g.py, px = g.px,
                dy = g.dy, dx = g.dx, Hp = g.Hp, Wp = g.Wp;
  const int64_t blocks = (J + JB - 1) / JB;
  const float* __restrict wt = in.wt;
  const float* __restrict scale = in.scale;
  const float* __restrict shift = in.shift;

  // Scratch. The padding of apad / nzpad is written once, as zeros; only the interior changes.
  std::vector<float> apad_buf(static_cast<size_t>(JB * Hp * Wp), 0.0f);  // [JB, Hp, Wp] padded channels
  const bool narrow = Wp <= 64;                                          // rows fit a 64-bit mask
  std::vector<uint64_t> rowbits_buf(narrow ? Hp : 0, 0), xbits_buf(narrow ? Hp : 0, 0);  // [Hp]
  std::vector<uint8_t> nzpad_buf(narrow ? 0 : Hp * Wp, 0);               // [Hp, Wp] a != 0
  std::vector<uint8_t> rowor_buf(narrow ? 0 : Hp * Wo, 0);               // [Hp, Wo] OR over kx
  std::vector<uint8_t> mark_buf(static_cast<size_t>(P), 0);   // bit jj: filter jj of the block touches p
  std::vector<int32_t> U_buf(static_cast<size_t>(P));         // positions some filter touches, U[0, nU), ascending
  std::vector<float> d_buf(static_cast<size_t>(JB * P * Op), 0.0f);  // [P, Op/VL, JB, VL]: d, rows in U
  std::vector<float> pre_buf(static_cast<size_t>(P * Op)), y0_buf(static_cast<size_t>(P * Op));
  std::vector<float> sums(static_cast<size_t>(JB * C));
  std::vector<vecf> acc_buf(static_cast<size_t>(JB * C));           // [JB, C] tail accumulators
  int64_t pre_n = -1;                                         // the image pre and y0 hold
  float* __restrict apad = apad_buf.data();
  uint64_t* __restrict rowbits = rowbits_buf.data();
  uint64_t* __restrict xbits = xbits_buf.data();
  uint8_t* __restrict nzpad = nzpad_buf.data();
  uint8_t* __restrict rowor = rowor_buf.data();
  uint8_t* __restrict mark = mark_buf.data();
  int32_t* __restrict U = U_buf.data();
  float* __restrict d = d_buf.data();
  float* __restrict pre = pre_buf.data();                     // [P, Op] z * scale + shift + residual
  float* __restrict y0 = y0_buf.data();                       // [P, Op] act(pre) = E(z)
  static_assert(JB <= 8, "mark holds one bit per filter of the block");

  for (int64_t t = begin; t < end; ++t) {
    const int64_t n = t / blocks, j0 = (t % blocks) * JB, jn = std::min(JB, J - j0);
    const float* __restrict ln = in.logits + n * C;
    bool hit[JB] = {};

    // 1. per filter: the padded channel, and the output positions its nonzero pixels reach
    for (int64_t jj = 0; jj < jn; ++jj) {
      const float* __restrict an = in.a + (n * K + in.filters[j0 + jj]) * H * W;
      float* __restrict apj = apad + jj * Hp * Wp;
      const uint8_t bit = static_cast<uint8_t>(1u << jj);
      if (narrow) {
        // rows of the nonzero mask as 64-bit masks: OR over kx is kw shifts, over ky kh ORs
        uint64_t any = 0;
        for (int64_t iy = 0; iy < H; ++iy) {
          float* __restrict dst = apj + (iy + py) * Wp + px;
          const float* __restrict src = an + iy * W;
          uint64_t bits = 0;
          for (int64_t ix = 0; ix < W; ++ix) {
            dst[ix] = src[ix];
            bits |= static_cast<uint64_t>(src[ix] != 0.0f) << (ix + px);
          }
          rowbits[iy + py] = bits;
          any |= bits;
        }
        if (!any) continue;  // free zeros: the whole channel
        hit[jj] = true;
        for (int64_t y = 0; y < Hp; ++y) {
          uint64_t m = 0;
          for (int64_t kx = 0; kx < kw; ++kx) m |= rowbits[y] >> (kx * dx);
          xbits[y] = m;  // bit x: a tap kx sees a nonzero at padded column x + kx * dx
        }
        for (int64_t oy = 0; oy < Ho; ++oy) {
          uint64_t m = 0;
          for (int64_t ky = 0; ky < kh; ++ky) m |= xbits[oy * sy + ky * dy];
          if (!m) continue;
          for (int64_t ox = 0; ox < Wo; ++ox)
            mark[oy * Wo + ox] |= static_cast<uint8_t>(((m >> (ox * sx)) & 1u) * bit);
        }
      } else {
        // the same with a byte per pixel
        uint8_t any = 0;
        for (int64_t iy = 0; iy < H; ++iy) {
          float* __restrict dst = apj + (iy + py) * Wp + px;
          uint8_t* __restrict nz = nzpad + (iy + py) * Wp + px;
          const float* __restrict src = an + iy * W;
          for (int64_t ix = 0; ix < W; ++ix) {
            dst[ix] = src[ix];
            nz[ix] = src[ix] != 0.0f;
            any |= nz[ix];
          }
        }
        if (!any) continue;  // free zeros: the whole channel
        hit[jj] = true;
        for (int64_t y = 0; y < Hp; ++y) {
          for (int64_t ox = 0; ox < Wo; ++ox) {
            uint8_t m = 0;
            for (int64_t kx = 0; kx < kw; ++kx) m |= nzpad[y * Wp + ox * sx + kx * dx];
            rowor[y * Wo + ox] = m;
          }
        }
        for (int64_t oy = 0; oy < Ho; ++oy) {
          for (int64_t ox = 0; ox < Wo; ++ox) {
            uint8_t m = 0;
            for (int64_t ky = 0; ky < kh; ++ky) m |= rowor[(oy * sy + ky * dy) * Wo + ox];
            mark[oy * Wo + ox] |= static_cast<uint8_t>(m * bit);
          }
        }
      }
    }
    int64_t nU = 0;
    for (int64_t p = 0; p < P; ++p) {
      if (mark[p]) U[nU++] = static_cast<int32_t>(p);
    }

    if (nU > 0) {
      // 2. pre and E(z) of image n, once per image per thread (tasks are image-major)
      if (n != pre_n) {
        for (int64_t p = 0; p < P; ++p) {
          const float* __restrict zrow = in.zc + (n * P + p) * Op;
          const float* __restrict rrow = RES ? in.rc + (n * P + p) * Op : nullptr;
          float* __restrict prow = pre + p * Op;
          float* __restrict yrow = y0 + p * Op;
#pragma omp simd
          for (int64_t c = 0; c < Op; ++c) {
            float v = zrow[c] * scale[c] + shift[c];  // the reference's order: (z * s + sh) + r
            if (RES) v += rrow[c];
            prow[c] = v;
            yrow[c] = activate<ACT>(v);
          }
        }
        pre_n = n;
      }
      // 3. d = act(pre - delta * scale) - act(pre), by row blocks of up to kMaxQB positions. A block
      //    with no marked position is skipped (its rows are never read); a block this filter does not
      //    reach has delta = 0, so d = 0: written as such.
      for (int64_t jj = 0; jj < jn; ++jj) {
        if (!hit[jj]) continue;
        const uint8_t bit = static_cast<uint8_t>(1u << jj);
        const float* __restrict apj = apad + jj * Hp * Wp;
        const float* __restrict wk = wt + in.filters[j0 + jj] * T * Op;
        const int64_t OB = Op / VL, dq = OB * JB * VL;
        float* __restrict dj = d + jj * VL;  // d[p, cb, jj] at dj + p * dq + cb * JB * VL
        for (int64_t oy = 0; oy < Ho; ++oy) {
          for (int64_t ox0 = 0; ox0 < Wo;) {
            const int64_t qb = std::min<int64_t>(kMaxQB, Wo - ox0);
            const int64_t p0 = oy * Wo + ox0;
            uint8_t bits = 0;
            for (int64_t q = 0; q < qb; ++q) bits |= mark[p0 + q];
            if (bits & bit) {
              const float* __restrict ab = apj + oy * sy * Wp + ox0 * sx;
              for (int64_t c0 = 0; c0 < Op;) {
                const int64_t nb = std::min<int64_t>(kMaxNB, (Op - c0) / VL);
                conv_fn<ACT>(static_cast<int>(qb), static_cast<int>(nb))(
                    ab, Wp, sx, kh, kw, dy, dx, wk + c0, Op, pre + p0 * Op + c0, y0 + p0 * Op + c0,
                    dj + p0 * dq + (c0 / VL) * JB * VL, dq);
                c0 += nb * VL;
              }
            } else if (bits) {
              for (int64_t q = 0; q < qb; ++q)
                for (int64_t cb = 0; cb < OB; ++cb) storeu(dj + (p0 + q) * dq + cb * JB * VL, vecf{});
            }
            ox0 += qb;
          }
        }
      }
      // 4. sums_jj = sum_{p in U, c} d_jj[p, c] * tail[:, c, p]
      tail_sums(jn, d, U, nU, in.tailB, P, C, Op, acc_buf.data(), sums.data());
      for (int64_t i = 0; i < nU; ++i) mark[U[i]] = 0;
    }

    for (int64_t jj = 0; jj < jn; ++jj) {
      float* __restrict o = in.out + ((j0 + jj) * N + n) * C;
      if (!hit[jj]) {  // all-zero channel: exactly the intact logits
        std::memcpy(o, ln, static_cast<size_t>(C) * sizeof(float));
        continue;
      }
      for (int64_t cls = 0; cls < C; ++cls) o[cls] = ln[cls] + sums[jj * C + cls];
    }
  }
}

template <int ACT>
void launch_act(bool res, const Geometry& g, const Inputs& in) {
  const int64_t tasks = g.N * ((g.J + JB - 1) / JB);
  // Tens of microseconds per task at ResNet sizes; the grain keeps tiny calls on one thread.
  const int64_t work = JB * (g.P * g.kh * g.kw * g.Op + g.P * g.Op * (g.C + 4)) + 1;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / work);
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    if (res) {
      closed_form_logits_tasks<ACT, true>(begin, end, g, in);
    } else {
      closed_form_logits_tasks<ACT, false>(begin, end, g, in);
    }
  });
}

// x [..., O] -> contiguous [..., Op], zero beyond O.
at::Tensor pad_last(const at::Tensor& x, int64_t Op) {
  const int64_t O = x.size(-1);
  if (O == Op) return x.contiguous();
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = Op;
  at::Tensor out = at::zeros(sizes, x.options());
  out.narrow(-1, 0, O).copy_(x);
  return out;
}

// The launcher: validates, prepares the layouts, picks the kernel instance.
at::Tensor closed_form_logits_cpu(const at::Tensor& a, const at::Tensor& weight, const at::Tensor& z,
                                  const at::Tensor& scale, const at::Tensor& shift,
                                  const std::optional<at::Tensor>& residual_opt, int64_t act,
                                  const at::Tensor& tail, const at::Tensor& logits,
                                  const at::Tensor& filters, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation) {
  const bool res = residual_opt.has_value() && residual_opt->defined();
  CHECK_CPU(OP, a);
  // every other tensor on a's device, dtypes, act, ranks, conv settings and shapes: checked as the CUDA
  // binding checks them (csrc/closed_form_checks.h)
  const ConvGeometry s = check_closed_form(OP, a, weight, z, scale, shift, residual_opt, act, tail, logits, filters,
                                        stride, padding, dilation);

  Geometry g{};
  static_cast<ConvGeometry&>(g) = s;
  g.C = logits.size(1);
  g.J = filters.size(0);
  g.Hp = g.H + 2 * g.py;
  g.Wp = g.W + 2 * g.px;
  g.P = g.Ho * g.Wo;

  const at::Tensor filters_c = filters.contiguous();
  const int64_t* fp = filters_c.data_ptr<int64_t>();
  for (int64_t j = 0; j < g.J; ++j) {
    CHECK_ARG(OP, fp[j] >= 0 && fp[j] < g.K, "`filters[", j, "]` must be an input channel in [0, ",
              g.K, "), got ", fp[j], "; fix: pass channel indices of `a`");
  }

  at::Tensor out = at::empty({g.J, g.N, g.C}, a.options());
  if (out.numel() == 0) return out;

  g.Op = (g.O + VL - 1) / VL * VL;
  const at::Tensor a_c = a.contiguous();
  const at::Tensor wt = pad_last(weight.permute({1, 2, 3, 0}) * scale, g.Op);       // [K, kh, kw, Op]
  const at::Tensor zc = pad_last(z.permute({0, 2, 3, 1}), g.Op);                    // [N, Ho, Wo, Op]
  const at::Tensor rc = res ? pad_last(residual_opt->permute({0, 2, 3, 1}), g.Op) : at::Tensor();
  // [C, O, P] -> [P, C, Op] -> [P, C, Op/VL, VL] -> [Op/VL, P, C, VL]
  const at::Tensor tailB = pad_last(tail.reshape({g.C, g.O, g.P}).permute({2, 0, 1}), g.Op)
                               .view({g.P, g.C, g.Op / VL, VL})
                               .permute({2, 0, 1, 3})
                               .contiguous();
  const at::Tensor scale_c = pad_last(scale, g.Op), shift_c = pad_last(shift, g.Op);
  const at::Tensor logits_c = logits.contiguous();
  Inputs in{};
  in.a = a_c.data_ptr<float>();
  in.wt = wt.data_ptr<float>();
  in.zc = zc.data_ptr<float>();
  in.rc = res ? rc.data_ptr<float>() : nullptr;
  in.scale = scale_c.data_ptr<float>();
  in.shift = shift_c.data_ptr<float>();
  in.tailB = tailB.data_ptr<float>();
  in.logits = logits_c.data_ptr<float>();
  in.filters = fp;
  in.out = out.data_ptr<float>();
  switch (act) {
    case 0: launch_act<0>(res, g, in); break;
    case 1: launch_act<1>(res, g, in); break;
    default: launch_act<2>(res, g, in); break;
  }
  return out;
}

#undef OP

}  // namespace
}  // namespace carfast

TORCH_LIBRARY_IMPL(carfast, CPU, m) {
  m.impl("closed_form_logits", &carfast::closed_form_logits_cpu);
}

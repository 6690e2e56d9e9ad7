// CUDA kernels of carfast::closed_form_score and carfast::closed_form_logits (schemas: csrc/ops.cpp;
// contracts and plain-PyTorch references: carfast/ops/closed_form_score.py, closed_form_logits.py).
//
// For filter j (k = filters[j]) and image n, with M = O * Ho * Wo elements m = (o, y, x):
//   d[m]          = E(z[n] - delta)[m] - E(z[n])[m],   delta = U_k(a[n, k]),  E as in common.cuh
//   logits'[j, n] = logits[n] + sum_m d[m] * tail[:, m]
// closed_form_score reduces each logits'[j, n] where it is computed (top-1 against labels[n],
// cross-entropy in float64) to per-(filter, label class) counts and loss sums: the [J, N, classes]
// logits never reach global memory. closed_form_logits is the same kernel writing logits' out.
//
// Kernel 1, one block of 256 threads per (tile of TN images, filter j), j fastest so the blocks in
// flight share their images' z in L2:
//   0. the filter's weight slice [O, kh*kw] goes to shared memory (when it fits);
//   1. free zeros: a warp per image tests its channel a[n, k]; the images with a nonzero pixel are
//      listed in order (the others give exactly logits[n]: no work, step 3);
//   2. the listed images go by groups of NB = 4: their channels are staged in shared memory (when
//      they fit), then each thread walks m = tid, tid + 256, ... and, for the NB images at once,
//      computes delta at m (a direct convolution, the weight tap loaded once for NB pixels), the
//      epilogue difference d, and the tail contraction acc[b][c] += d[b] * tail[c, m] for a block
//      of CB classes in registers (each tail value loaded once for NB images; a warp whose d are all
//      zero skips the tail). acc is then summed over the block in a fixed order (warp butterflies,
//      then the 8 warps in order) into sums [NB, classes] in shared memory. With more than 16
//      classes the walk is repeated per block of 16 classes (recomputing d, which keeps d out of
//      memory; the tail contraction dominates there anyway). Each image's row logits[n] + sums is
//      then scored by a warp (common.cuh, warp_score_row) or, for closed_form_logits, written out;
//   3. the images with an all-zero channel are scored (or copied) from logits[n] exactly;
//   4. per class, the tile's correct counts and loss sums over its images in order go to a scratch
//      [J, tiles, classes].
// Kernel 2 sums the scratch over the tiles in order into counts [J, C] and loss_sums [J, C].
// Every sum has a fixed order, so results repeat bit for bit from run to run (on one device: the
// tile size TN follows the number of multiprocessors).
#include "common.cuh"
#include "kernels.h"

namespace carfast {
namespace cuda {
namespace {

constexpr int kNB = 4;            // images per group
constexpr int kMaxCB = 16;        // classes per register block
constexpr int kMaxTileImages = 32;

// Where each region of the dynamic shared memory starts (bytes), and the scratch pointers.
struct Layout {
  int tile_images;
  int64_t tiles;
  bool score;
  bool a_in_shared, w_in_shared;
  size_t off_loss, off_sums, off_red, off_w, off_a, off_lab, off_list, off_flag, off_corr;
  double* part_loss;  // [J, tiles, C]
  int* part_count;    // [J, tiles, C]
};

size_t align16(size_t v) { return (v + 15) / 16 * 16; }

size_t weight_bytes(const ClosedFormArgs& x) { return align16(sizeof(float) * x.g.O * x.g.kh * x.g.kw); }
size_t channel_bytes(const ClosedFormArgs& x) { return align16(sizeof(float) * kNB * x.g.H * x.g.W); }

// The shared memory regions in order, the weight slice and the channels last (present or not).
Layout make_layout(const ClosedFormArgs& x, bool score, int tile_images, bool a_in_shared, bool w_in_shared) {
  Layout L{};
  L.tile_images = tile_images;
  L.tiles = (x.g.N + tile_images - 1) / tile_images;
  L.score = score;
  L.a_in_shared = a_in_shared;
  L.w_in_shared = w_in_shared;
  size_t off = 0;
  L.off_loss = off;  off = align16(off + sizeof(double) * kMaxTileImages);
  L.off_sums = off;  off = align16(off + sizeof(float) * kNB * x.C);
  L.off_red = off;   off = align16(off + sizeof(float) * kWarps * kNB * kMaxCB);
  L.off_lab = off;   off = align16(off + sizeof(int) * kMaxTileImages);
  L.off_list = off;  off = align16(off + sizeof(int) * (kMaxTileImages + 1));
  L.off_flag = off;  off = align16(off + sizeof(int) * kMaxTileImages);
  L.off_corr = off;  off = align16(off + kMaxTileImages);
  L.off_w = off;     off += w_in_shared ? weight_bytes(x) : 0;
  L.off_a = off;
  return L;
}

size_t layout_bytes(const ClosedFormArgs& x, const Layout& L) {
  return L.off_a + (L.a_in_shared ? channel_bytes(x) : 0);
}

template <int CB>
__global__ void __launch_bounds__(kThreads) closed_form_tiles_kernel(const ClosedFormArgs x, const Layout L) {
  extern __shared__ float4 smem4[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(smem4);
  double* loss_s = reinterpret_cast<double*>(smem + L.off_loss);  // [TN] loss of each image of the tile
  float* sums_s = reinterpret_cast<float*>(smem + L.off_sums);    // [NB, C] tail sums of a group
  float* red_s = reinterpret_cast<float*>(smem + L.off_red);      // [warps, NB * CB]
  int* lab_s = reinterpret_cast<int*>(smem + L.off_lab);          // [TN] labels
  int* list_s = reinterpret_cast<int*>(smem + L.off_list);        // [TN] hit images, then the others; [TN]: count
  int* flag_s = reinterpret_cast<int*>(smem + L.off_flag);        // [TN] channel has a nonzero pixel
  bool* corr_s = reinterpret_cast<bool*>(smem + L.off_corr);      // [TN] top-1 == label

  const ConvGeometry& g = x.g;
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const int64_t j = blockIdx.x % x.J, tile = blockIdx.x / x.J;
  const int64_t k = x.filters[j];
  const int64_t N = g.N, C = x.C, HW = g.H * g.W;
  // sizes within one image fit in int (the binding checks O * Ho * Wo and H * W < 2^31)
  const int H = static_cast<int>(g.H), W = static_cast<int>(g.W), Wo = static_cast<int>(g.Wo);
  const int npos = static_cast<int>(g.Ho * g.Wo), M = static_cast<int>(g.O * g.Ho * g.Wo);
  const int kh = static_cast<int>(g.kh), kw = static_cast<int>(g.kw), taps = kh * kw;
  const int sy = static_cast<int>(g.sy), sx = static_cast<int>(g.sx), py = static_cast<int>(g.py);
  const int px = static_cast<int>(g.px), dy = static_cast<int>(g.dy), dx = static_cast<int>(g.dx);
  const int64_t n0 = tile * L.tile_images;
  const int tn = static_cast<int>(min64(L.tile_images, N - n0));

  // 0. weight slice [O, taps] and labels
  const float* wk = x.weight + k * g.O * taps;
  if (L.w_in_shared) {
    float* w_s = reinterpret_cast<float*>(smem + L.off_w);
    for (int64_t e = tid; e < g.O * taps; e += kThreads) w_s[e] = wk[e];
    wk = w_s;
  }
  if (L.score && tid < tn) lab_s[tid] = static_cast<int>(x.labels[n0 + tid]);

  // 1. free zeros: which images' channel has a nonzero pixel (NaN counts as nonzero)
  for (int i = warp; i < tn; i += kWarps) {
    const float* ch = x.a + ((n0 + i) * g.K + k) * HW;
    bool nz = false;
    for (int64_t e = lane; e < HW; e += kWarp) nz |= ch[e] != 0.0f;
    nz = __any_sync(kFullMask, nz);
    if (lane == 0) flag_s[i] = nz;
  }
  __syncthreads();
  if (warp == 0) {
    const bool in = lane < tn;
    const bool hit = in && flag_s[lane] != 0;
    const unsigned hits = __ballot_sync(kFullMask, hit), misses = __ballot_sync(kFullMask, in && !hit);
    const unsigned below = (1u << lane) - 1u;
    const int nhit = __popc(hits);
    if (hit) list_s[__popc(hits & below)] = lane;
    if (in && !hit) list_s[nhit + __popc(misses & below)] = lane;
    if (lane == 0) list_s[kMaxTileImages] = nhit;
  }
  __syncthreads();
  const int nhit = list_s[kMaxTileImages];

  // one image's row: scored, or written out (closed_form_logits); by the whole warp
  auto finish_row = [&](int i, const float* sums) {
    const int64_t n = n0 + i;
    const float* lg = x.logits + n * C;
    auto logit = [&](int c) { return sums == nullptr ? lg[c] : __fadd_rn(lg[c], sums[c]); };
    if (L.score) {
      const RowScore r = warp_score_row(logit, static_cast<int>(C), lab_s[i]);
      if (lane == 0) {
        loss_s[i] = r.loss;
        corr_s[i] = r.correct;
        x.correct[j * N + n] = r.correct;
      }
    } else {
      float* out = x.out_logits + (j * N + n) * C;
      for (int c = lane; c < C; c += kWarp) out[c] = logit(c);
    }
  };

  // 2. groups of NB images whose channel is not all zero
  for (int g0 = 0; g0 < nhit; g0 += kNB) {
    const int gn = static_cast<int>(min64(kNB, nhit - g0));
    const float* ab[kNB];
    const float* zb[kNB];
    const float* rb[kNB];
#pragma unroll
    for (int b = 0; b < kNB; ++b) {  // past gn: the last image again, its d forced to 0 below
      const int64_t n = n0 + list_s[g0 + min(b, gn - 1)];
      ab[b] = x.a + (n * g.K + k) * HW;
      zb[b] = x.z + n * M;
      rb[b] = x.residual == nullptr ? nullptr : x.residual + n * M;
    }
    if (L.a_in_shared) {
      float* a_s = reinterpret_cast<float*>(smem + L.off_a);
      for (int64_t e = tid; e < gn * HW; e += kThreads) {
        a_s[e] = x.a[((n0 + list_s[g0 + e / HW]) * g.K + k) * HW + e % HW];
      }
#pragma unroll
      for (int b = 0; b < kNB; ++b) ab[b] = a_s + min(b, gn - 1) * HW;
    }
    __syncthreads();

    for (int64_t cb0 = 0; cb0 < C; cb0 += CB) {
      float acc[kNB][CB];
#pragma unroll
      for (int b = 0; b < kNB; ++b)
#pragma unroll
        for (int c = 0; c < CB; ++c) acc[b][c] = 0.0f;

      for (int base = 0; base < M; base += kThreads) {
        const int m = base + tid;
        const bool valid = m < M;
        float d[kNB];
#pragma unroll
        for (int b = 0; b < kNB; ++b) d[b] = 0.0f;
        if (valid) {
          const int o = m / npos, pos = m - o * npos;
          const int oy = pos / Wo, ox = pos - oy * Wo;
          float delta[kNB];
#pragma unroll
          for (int b = 0; b < kNB; ++b) delta[b] = 0.0f;
          const float* wrow = wk + o * taps;
          for (int ky = 0; ky < kh; ++ky) {
            const int iy = oy * sy - py + ky * dy;
            if (iy < 0 || iy >= H) continue;
            for (int kx = 0; kx < kw; ++kx) {
              const int ix = ox * sx - px + kx * dx;
              if (ix < 0 || ix >= W) continue;
              const float wv = wrow[ky * kw + kx];
              const int off = iy * W + ix;
#pragma unroll
              for (int b = 0; b < kNB; ++b) delta[b] = fmaf(wv, ab[b][off], delta[b]);
            }
          }
          const float sc = x.scale[o], sh = x.shift[o];
#pragma unroll
          for (int b = 0; b < kNB; ++b) {
            if (b < gn) {
              const float zv = zb[b][m];
              const float rv = rb[b] == nullptr ? 0.0f : rb[b][m];
              d[b] = __fsub_rn(epilogue(__fsub_rn(zv, delta[b]), sc, sh, rv, x.act), epilogue(zv, sc, sh, rv, x.act));
            }
          }
        }
        bool nz = false;
#pragma unroll
        for (int b = 0; b < kNB; ++b) nz |= d[b] != 0.0f;
        if (__any_sync(kFullMask, nz)) {  // warp-uniform: all lanes run the same number of iterations
#pragma unroll
          for (int c = 0; c < CB; ++c) {
            const float tv = valid && cb0 + c < C ? x.tail[(cb0 + c) * M + m] : 0.0f;  // (cb0 + c) * M in int64
#pragma unroll
            for (int b = 0; b < kNB; ++b) acc[b][c] = fmaf(d[b], tv, acc[b][c]);
          }
        }
      }

      // fixed-order block sum of acc into sums_s[b, cb0 + c]
#pragma unroll
      for (int b = 0; b < kNB; ++b)
#pragma unroll
        for (int c = 0; c < CB; ++c) {
          const float v = warp_sum(acc[b][c]);
          if (lane == 0) red_s[warp * kNB * CB + b * CB + c] = v;
        }
      __syncthreads();
      if (tid < kNB * CB) {
        const int b = tid / CB, c = tid % CB;
        if (b < gn && cb0 + c < C) {
          float s = 0.0f;
          for (int w = 0; w < kWarps; ++w) s += red_s[w * kNB * CB + tid];
          sums_s[b * C + cb0 + c] = s;
        }
      }
      __syncthreads();
    }

    if (warp < gn) finish_row(list_s[g0 + warp], sums_s + warp * C);
    __syncthreads();  // before the next group overwrites a_s and sums_s
  }

  // 3. all-zero channels: exactly the intact logits
  for (int t = nhit + warp; t < tn; t += kWarps) finish_row(list_s[t], nullptr);
  if (!L.score) return;
  __syncthreads();

  // 4. the tile's per-class partials, images in order
  for (int64_t c = tid; c < C; c += kThreads) {
    int count = 0;
    double loss = 0.0;
    for (int i = 0; i < tn; ++i) {
      if (lab_s[i] == c) {
        count += corr_s[i] ? 1 : 0;
        loss += loss_s[i];
      }
    }
    const int64_t at = (j * L.tiles + tile) * C + c;
    L.part_count[at] = count;
    L.part_loss[at] = loss;
  }
}

// counts[j, c] and loss_sums[j, c]: the partials of filter j summed over the tiles in order.
__global__ void __launch_bounds__(kThreads) closed_form_finish_kernel(const ClosedFormArgs x, const Layout L) {
  const int64_t at = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (at >= x.J * x.C) return;
  const int64_t j = at / x.C, c = at % x.C;
  int64_t count = 0;
  double loss = 0.0;
  for (int64_t t = 0; t < L.tiles; ++t) {
    count += L.part_count[(j * L.tiles + t) * x.C + c];
    loss += L.part_loss[(j * L.tiles + t) * x.C + c];
  }
  x.counts[at] = count;
  x.loss_sums[at] = loss;
}

template <int CB>
cudaError_t launch_tiles(const ClosedFormArgs& x, const Layout& L, size_t smem, cudaStream_t stream) {
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(closed_form_tiles_kernel<CB>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const unsigned grid = static_cast<unsigned>(L.tiles * x.J);
  closed_form_tiles_kernel<CB><<<grid, kThreads, smem, stream>>>(x, L);
  return cudaGetLastError();
}

// Images per block: the largest of 32, 16, 8, 4 that still gives 4 blocks per multiprocessor.
int pick_tile_images(const ClosedFormArgs& x, int sm_count) {
  int tn = kMaxTileImages;
  while (tn > kNB && x.J * ((x.g.N + tn - 1) / tn) < 4 * static_cast<int64_t>(sm_count)) tn /= 2;
  return tn;
}

}  // namespace

ClosedFormPlan closed_form_plan(const ClosedFormArgs& args, bool score, int sm_count, size_t max_shared) {
  // the weight slice first (read for every element), then the channels, each where it still fits
  const int tn = pick_tile_images(args, sm_count);
  const size_t base = layout_bytes(args, make_layout(args, score, tn, false, false));
  const bool w_in_shared = base + weight_bytes(args) <= max_shared;
  const size_t with_w = base + (w_in_shared ? weight_bytes(args) : 0);
  const bool a_in_shared = with_w + channel_bytes(args) <= max_shared;
  const Layout L = make_layout(args, score, tn, a_in_shared, w_in_shared);
  ClosedFormPlan plan{};
  plan.score = score;
  plan.tile_images = L.tile_images;
  plan.tiles = L.tiles;
  plan.a_in_shared = L.a_in_shared;
  plan.w_in_shared = L.w_in_shared;
  plan.shared_bytes = layout_bytes(args, L);
  plan.workspace_bytes = score ? (sizeof(double) + sizeof(int)) * static_cast<size_t>(args.J * L.tiles * args.C) : 0;
  return plan;
}

cudaError_t launch_closed_form(const ClosedFormArgs& args, const ClosedFormPlan& plan, void* workspace,
                               cudaStream_t stream) {
  const bool score = plan.score;
  Layout L = make_layout(args, score, plan.tile_images, plan.a_in_shared, plan.w_in_shared);
  L.part_loss = static_cast<double*>(workspace);
  L.part_count = reinterpret_cast<int*>(L.part_loss + args.J * L.tiles * args.C);
  const size_t smem = layout_bytes(args, L);
  if (args.J > 0 && L.tiles > 0 && args.C > 0) {
    cudaError_t err;
    if (args.C <= 4) {
      err = launch_tiles<4>(args, L, smem, stream);
    } else if (args.C <= 8) {
      err = launch_tiles<8>(args, L, smem, stream);
    } else if (args.C <= 12) {
      err = launch_tiles<12>(args, L, smem, stream);
    } else {
      err = launch_tiles<kMaxCB>(args, L, smem, stream);
    }
    if (err != cudaSuccess) return err;
  }
  if (score && args.J * args.C > 0) {
    const unsigned grid = static_cast<unsigned>((args.J * args.C + kThreads - 1) / kThreads);
    closed_form_finish_kernel<<<grid, kThreads, 0, stream>>>(args, L);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace carfast

// The emulation runtime's switch points (how they run: runtime.h): __syncthreads, and the warp
// collectives __shfl_xor_sync, __any_sync and __ballot_sync with true 32-lane semantics.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "runtime.h"

namespace carfast_emu {
namespace detail {

namespace {

void make_runnable(Thread& t) {
  Device& d = dev();
  t.wait = Wait::kRunnable;
  d.cursor = std::min(d.cursor, t.rank);
}

}  // namespace

void release_barrier() {
  Device& d = dev();
  for (Thread& t : d.threads) {
    if (t.wait == Wait::kBarrier) make_runnable(t);
  }
  d.at_barrier = 0;
}

void sync_threads(const char* file, int line) {
  Device& d = dev();
  if (!d.in_kernel) {
    std::fprintf(stderr, "carfast cuda emu: __syncthreads outside a kernel (%s)\n", where(file, line).c_str());
    std::abort();
  }
  if (d.at_barrier == 0) {
    d.barrier_file = file;
    d.barrier_line = line;
  } else if (line != d.barrier_line || (file != d.barrier_file && std::strcmp(file, d.barrier_file) != 0)) {
    fail(cudaErrorLaunchFailure, block_name() + ": threads wait at different __syncthreads (" +
                                     where(d.barrier_file, d.barrier_line) + " and " + where(file, line) + ")");
  }
  d.current->wait = Wait::kBarrier;
  if (++d.at_barrier == d.live) release_barrier();
  park();
}

uint64_t warp_collective(WarpOp op, unsigned mask, int arg, uint64_t value, const char* file, int line) {
  Device& d = dev();
  Thread& t = *d.current;
  const int tid = static_cast<int>(&t - d.threads.data());
  const int w = tid / kWarpSize;
  Warp& wp = d.warps[w];
  if (mask != 0xffffffffu || wp.lanes != kWarpSize) {
    fail(cudaErrorLaunchFailure, block_name() + ": warp collective at " + where(file, line) +
                                     " with a mask other than all 32 lanes of a full warp (not emulated)");
  }
  if (wp.live != kWarpSize) {
    fail(cudaErrorLaunchFailure, block_name() + ": warp collective at " + where(file, line) + " in warp " +
                                     std::to_string(w) + ", some of whose lanes have exited");
  }
  if (wp.arrived > 0) {
    const Thread* other = nullptr;
    for (int l = 0; l < kWarpSize && other == nullptr; ++l) {
      const Thread& o = d.threads[w * kWarpSize + l];
      if (o.wait == Wait::kWarp) other = &o;
    }
    if (other->op != op) {
      fail(cudaErrorLaunchFailure, block_name() + ": lanes of warp " + std::to_string(w) +
                                       " call different warp collectives (" + where(other->file, other->line) +
                                       " and " + where(file, line) + ")");
    }
  }
  t.op = op;
  t.mask = mask;
  t.arg = arg;
  t.value = value;
  t.file = file;
  t.line = line;
  t.wait = Wait::kWarp;
  if (++wp.arrived == kWarpSize) {  // the last lane: every lane's result, from the values all brought
    Thread* lanes = &d.threads[w * kWarpSize];
    uint64_t any = 0, ballot = 0;
    for (int l = 0; l < kWarpSize; ++l) {
      any |= lanes[l].value != 0;
      ballot |= uint64_t{lanes[l].value != 0} << l;
    }
    for (int l = 0; l < kWarpSize; ++l) {
      Thread& x = lanes[l];
      if (op == WarpOp::kShflXor) {
        const int src = l ^ x.arg;
        x.result = src >= 0 && src < kWarpSize ? lanes[src].value : x.value;
      } else {
        x.result = op == WarpOp::kAny ? any : ballot;
      }
      x.wait = Wait::kRunnable;
    }
    wp.arrived = 0;
    d.cursor = std::min(d.cursor, wp.min_rank);
  }
  park();
  return t.result;
}

}  // namespace detail
}  // namespace carfast_emu

// The emulation runtime's scheduler (how it runs: runtime.h): a block's threads as fibers (makecontext,
// _setjmp / _longjmp), the order they run in, a block run to its end, to a fault or to a deadlock, and
// the faults reported from inside a kernel.
#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>

#include "runtime.h"

namespace carfast_emu {
namespace detail {

std::string where(const char* file, int line) {
  std::string f = file ? file : "?";
  const size_t slash = f.rfind('/');
  return (slash == std::string::npos ? f : f.substr(slash + 1)) + ":" + std::to_string(line);
}

std::string block_name() {
  return "block (" + std::to_string(g_block_idx.x) + ", " + std::to_string(g_block_idx.y) + ", " +
         std::to_string(g_block_idx.z) + ")";
}

// The first execution error of the current API call wins; the others would only follow from it.
void record(cudaError_t err, const std::string& msg) {
  Device& d = dev();
  if (d.exec_error == cudaSuccess) {
    d.exec_error = err;
    d.message = msg;
  }
}

// Back to the scheduler; returns when the scheduler resumes this thread.
void park() {
  Device& d = dev();
  Fiber* f = d.current_fiber;
  if (_setjmp(f->resume) == 0) _longjmp(d.scheduler, 1);
}

// An error inside a kernel: the block stops here (the GPU aborts the kernel), and so does the launch.
[[noreturn]] void fail(cudaError_t err, const std::string& msg) {
  record(err, msg);
  dev().abort_block = true;
  park();
  std::abort();  // never resumed
}

namespace {

void fiber_main();

void start_fiber(Fiber& f) {
  if (f.stack == nullptr) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
      std::fprintf(stderr, "carfast cuda emu: cannot map a fiber stack\n");
      std::abort();
    }
    mprotect(m, page, PROT_NONE);  // a stack overflow faults instead of corrupting the next stack
    f.stack = static_cast<unsigned char*>(m);
  }
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  getcontext(&f.start);
  f.start.uc_stack.ss_sp = f.stack + page;
  f.start.uc_stack.ss_size = kStackBytes;
  f.start.uc_link = nullptr;
  makecontext(&f.start, fiber_main, 0);
  f.started = true;
}

void resume(Thread& t, int tid) {
  Device& d = dev();
  d.current = &t;
  d.current_fiber = &d.fibers[tid];
  g_thread_idx = t.idx;
  Fiber& f = *d.current_fiber;
  if (_setjmp(d.scheduler) == 0) {
    if (!f.started) {
      start_fiber(f);
      setcontext(&f.start);
    }
    _longjmp(f.resume, 1);
  }
}

void thread_exit() {
  Device& d = dev();
  Thread& t = *d.current;
  const int tid = static_cast<int>(&t - d.threads.data());
  Warp& w = d.warps[tid / kWarpSize];
  t.wait = Wait::kExited;
  --d.live;
  --w.live;
  if (w.arrived > 0) {
    fail(cudaErrorLaunchFailure, block_name() + ": thread " + std::to_string(tid) +
                                     " exited while the other lanes of its warp wait in a warp collective");
  }
  if (d.at_barrier > 0 && d.at_barrier == d.live) release_barrier();
}

// Every fiber runs this loop: the kernel body for its thread, then park until the next block.
void fiber_main() {
  for (;;) {
    Device& d = dev();
    d.body(d.ctx);
    thread_exit();
    park();
  }
}

std::string describe_waits() {
  Device& d = dev();
  std::string s;
  if (d.at_barrier > 0) {
    s += std::to_string(d.at_barrier) + " thread(s) wait at __syncthreads (" + where(d.barrier_file, d.barrier_line) +
         ")";
  }
  for (size_t w = 0; w < d.warps.size(); ++w) {
    const Warp& wp = d.warps[w];
    if (wp.arrived == 0) continue;
    const Thread* lane0 = nullptr;
    for (int l = 0; l < wp.lanes; ++l) {
      const Thread& t = d.threads[w * kWarpSize + l];
      if (t.wait == Wait::kWarp) {
        lane0 = &t;
        break;
      }
    }
    s += (s.empty() ? "" : "; ") + std::string("warp ") + std::to_string(w) + " has " + std::to_string(wp.arrived) +
         " of " + std::to_string(wp.lanes) + " lanes in a warp collective (" + where(lane0->file, lane0->line) + ")";
  }
  return s;
}

}  // namespace

// Runs the current block to its end (or to an error).
void run_block() {
  Device& d = dev();
  const int n = d.nthreads;
  for (int tid = 0; tid < n; ++tid) {
    Thread& t = d.threads[tid];
    t.idx.x = tid % g_block_dim.x;
    t.idx.y = tid / g_block_dim.x % g_block_dim.y;
    t.idx.z = tid / (g_block_dim.x * g_block_dim.y);
    t.wait = Wait::kRunnable;
  }
  for (size_t w = 0; w < d.warps.size(); ++w) {
    Warp& wp = d.warps[w];
    wp.lanes = std::min(kWarpSize, n - static_cast<int>(w) * kWarpSize);
    wp.live = wp.lanes;
    wp.arrived = 0;
  }
  d.live = n;
  d.at_barrier = 0;
  d.cursor = 0;
  d.abort_block = false;
  for (;;) {
    while (d.cursor < n && d.threads[d.order_tids[d.cursor]].wait != Wait::kRunnable) ++d.cursor;
    if (d.cursor == n) {
      if (d.live > 0) {
        record(cudaErrorLaunchFailure, block_name() + ": deadlock, no thread can go on: " + describe_waits());
        d.abort_block = true;
      }
      break;
    }
    const int tid = d.order_tids[d.cursor];
    resume(d.threads[tid], tid);
    if (d.abort_block) break;
  }
  if (d.abort_block) {
    for (Fiber& f : d.fibers) f.started = false;  // their stacks hold abandoned kernels: start afresh
  }
}

void set_order(int nthreads, uint64_t launch_index) {
  Device& d = dev();
  d.order_tids.resize(nthreads);
  std::iota(d.order_tids.begin(), d.order_tids.end(), 0);
  if (d.order == Order::kReverse) {
    std::reverse(d.order_tids.begin(), d.order_tids.end());
  } else if (d.order == Order::kShuffled) {
    std::mt19937_64 rng(d.seed * 1000003u + launch_index);
    std::shuffle(d.order_tids.begin(), d.order_tids.end(), rng);
  }
  d.threads.assign(nthreads, Thread{});
  d.warps.assign((nthreads + kWarpSize - 1) / kWarpSize, Warp{});
  for (int r = 0; r < nthreads; ++r) d.threads[d.order_tids[r]].rank = r;
  for (size_t w = 0; w < d.warps.size(); ++w) {
    int m = nthreads;
    for (int l = 0; l < kWarpSize && static_cast<int>(w) * kWarpSize + l < nthreads; ++l) {
      m = std::min(m, d.threads[w * kWarpSize + l].rank);
    }
    d.warps[w].min_rank = m;
  }
}

void check_aligned(const void* p, size_t alignment, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % alignment != 0) {
    record(cudaErrorMisalignedAddress, block_name() + ", thread " + std::to_string(g_thread_idx.x) + ": " + what +
                                           " at a misaligned address");
  }
}

void unsupported(const char* what, const char* file, int line) {
  fail(cudaErrorLaunchFailure, std::string("not emulated: ") + what + " at " + where(file, line));
}

}  // namespace detail
}  // namespace carfast_emu

// The runtime of the CPU emulation of carfast's CUDA kernels (cuda_emu.h; overview in csrc/cuda/README.md).
//
// A launch is checked as the driver checks it (block and grid sizes, dynamic shared memory against the
// 48 KiB default or the kernel's cudaFuncSetAttribute opt-in); a bad one sets the error cudaGetLastError
// returns and runs nothing. Then the blocks run one after another on the calling OS thread.
//
// A block's threads are fibers (one stack each, started with makecontext, switched with _setjmp /
// _longjmp, which unlike swapcontext make no system call). A thread runs until it reaches a switch
// point: __syncthreads, a warp collective (__shfl_xor_sync, __any_sync, __ballot_sync) or its end. The
// scheduler always resumes the runnable thread that comes first in the schedule's order: forward
// (thread 0 first), reverse (the last thread first) or a seeded shuffle. So under "forward" warp 0 runs
// ahead to the next barrier before warp 1 starts, and under "reverse" the last warp does: with a barrier
// missing, a thread then reads shared memory that a later-scheduled thread has not written yet (poison,
// see below), or overwrites what a later-scheduled thread has still to read. A kernel free of races gives
// bit-identical results under every order; the tests compare them.
//
// A barrier releases when every thread of the block that has not exited waits at it (as the hardware
// counts); threads waiting at different __syncthreads call sites are an error. A warp collective
// completes when all 32 lanes of the warp have called the same collective; then every lane's result is
// computed at once from the values all lanes brought (true 32-lane semantics), and the lanes go on.
// A block in which no thread can go on (a barrier some lanes never reach while their warp waits in a
// collective, ...) is reported as a deadlock.
//
// Memory: the dynamic shared memory is filled with a poison byte (0xff by default: float and double
// NaN, integer -1) before every block, so a read before the write shows; the bytes after the launch's
// size are a red zone checked after the block (a write past the size is an error, as on the GPU).
#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#include "cuda_emu.h"
#include "emu_control.h"

namespace carfast_emu {
namespace detail {

uint3 g_thread_idx, g_block_idx;
dim3 g_block_dim, g_grid_dim;
unsigned char* g_dynamic_shared = nullptr;

namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxBlockThreads = 1024;
constexpr size_t kDefaultShared = 48 * 1024;  // dynamic shared memory without the opt-in attribute
constexpr size_t kMaxOptin = 232448;          // sharedMemPerBlockOptin of an H100 / H200: 227 KiB
constexpr size_t kRedZone = 16 * 1024;
constexpr size_t kStackBytes = 256 * 1024;  // per fiber, mapped lazily; a guard page below it

struct Fiber {
  unsigned char* stack = nullptr;  // mapping of kStackBytes + one guard page
  ucontext_t start;
  jmp_buf resume;
  bool started = false;  // its loop is running (parked between threads, or inside a kernel)
};

enum class Wait : uint8_t { kRunnable, kBarrier, kWarp, kExited };

struct Thread {
  uint3 idx;
  int rank;  // position in the schedule's order
  Wait wait;
  WarpOp op;  // the collective it waits in, and what it brought
  unsigned mask;
  int arg;
  uint64_t value, result;
  const char* file;
  int line;
};

struct Warp {
  int lanes, live, arrived, min_rank;
};

// One emulated device; its state is process-wide (the API serialises calls with g_mutex).
struct Device {
  // settings
  Order order = Order::kForward;
  uint64_t seed = 0;
  unsigned char poison = 0xff;
  size_t shared_optin = kMaxOptin;
  // the launch in flight
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  std::deque<Fiber> fibers;  // fiber i always runs thread i of the block (a deque: they never move)
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  std::vector<int> order_tids;  // thread ids by rank
  int nthreads = 0, cursor = 0, live = 0, at_barrier = 0;
  const char* barrier_file = nullptr;
  int barrier_line = 0;
  Thread* current = nullptr;
  Fiber* current_fiber = nullptr;
  jmp_buf scheduler;
  bool in_kernel = false, abort_block = false;
  // errors: the launch error (cudaGetLastError) and the first execution error with its message
  cudaError_t last_error = cudaSuccess, exec_error = cudaSuccess;
  std::string message;
  std::unordered_map<const void*, int> max_dynamic_shared;  // cudaFuncSetAttribute
  std::vector<LaunchRecord> launches;
  unsigned char* shared = nullptr;  // shared_optin + kRedZone bytes
  size_t shared_capacity = 0;
};

Device& dev() {
  static Device d;
  return d;
}

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

void make_runnable(Thread& t) {
  Device& d = dev();
  t.wait = Wait::kRunnable;
  d.cursor = std::min(d.cursor, t.rank);
}

void release_barrier() {
  Device& d = dev();
  for (Thread& t : d.threads) {
    if (t.wait == Wait::kBarrier) make_runnable(t);
  }
  d.at_barrier = 0;
}

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

cudaError_t check_config(const void* kernel, const LaunchConfig& c, std::string* why) {
  Device& d = dev();
  const uint64_t threads = uint64_t{c.block.x} * c.block.y * c.block.z;
  if (threads == 0 || threads > kMaxBlockThreads || c.block.x > 1024 || c.block.y > 1024 || c.block.z > 64) {
    *why = "block (" + std::to_string(c.block.x) + ", " + std::to_string(c.block.y) + ", " +
           std::to_string(c.block.z) + ") is not a valid block (1 to 1024 threads)";
    return cudaErrorInvalidConfiguration;
  }
  if (c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0 || c.grid.x > 0x7fffffffu || c.grid.y > 65535 ||
      c.grid.z > 65535) {
    *why = "grid (" + std::to_string(c.grid.x) + ", " + std::to_string(c.grid.y) + ", " + std::to_string(c.grid.z) +
           ") is not a valid grid";
    return cudaErrorInvalidConfiguration;
  }
  const auto it = d.max_dynamic_shared.find(kernel);
  const size_t limit = it == d.max_dynamic_shared.end() ? kDefaultShared : static_cast<size_t>(it->second);
  if (c.shared_bytes > limit) {
    *why = std::to_string(c.shared_bytes) + " bytes of dynamic shared memory, over the kernel's limit of " +
           std::to_string(limit) + (it == d.max_dynamic_shared.end() ? " (no cudaFuncSetAttribute opt-in)" : "");
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

std::mutex g_mutex;

}  // namespace

void check_aligned(const void* p, size_t alignment, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % alignment != 0) {
    record(cudaErrorMisalignedAddress, block_name() + ", thread " + std::to_string(g_thread_idx.x) + ": " + what +
                                           " at a misaligned address");
  }
}

void unsupported(const char* what, const char* file, int line) {
  fail(cudaErrorLaunchFailure, std::string("not emulated: ") + what + " at " + where(file, line));
}

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  Device& d = dev();
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > d.shared_optin) {
    return d.last_error = cudaErrorInvalidValue;
  }
  d.max_dynamic_shared[kernel] = value;
  return cudaSuccess;
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

void launch(const void* kernel, const LaunchConfig& cfg, void (*body)(void*), void* ctx) {
  Device& d = dev();
  if (d.in_kernel) unsupported("a launch from device code", cfg.file, cfg.line);
  LaunchRecord rec{};
  rec.kernel = cfg.kernel;
  rec.file = cfg.file;
  rec.line = cfg.line;
  rec.grid[0] = cfg.grid.x;
  rec.grid[1] = cfg.grid.y;
  rec.grid[2] = cfg.grid.z;
  rec.block[0] = cfg.block.x;
  rec.block[1] = cfg.block.y;
  rec.block[2] = cfg.block.z;
  rec.shared_bytes = static_cast<int64_t>(cfg.shared_bytes);
  std::string why;
  const cudaError_t err = check_config(kernel, cfg, &why);
  rec.error = err;
  d.launches.push_back(rec);
  if (err != cudaSuccess) {
    d.last_error = err;
    if (d.message.empty()) d.message = "launch of " + std::string(cfg.kernel) + " at " + where(cfg.file, cfg.line) +
                                       " rejected: " + why;
    return;
  }
  if (d.exec_error != cudaSuccess) return;  // after a fault the GPU runs no further kernels

  const int nthreads = static_cast<int>(cfg.block.x * cfg.block.y * cfg.block.z);
  if (static_cast<int>(d.fibers.size()) < nthreads) d.fibers.resize(nthreads);
  set_order(nthreads, d.launches.size());
  d.nthreads = nthreads;
  d.body = body;
  d.ctx = ctx;
  g_block_dim = cfg.block;
  g_grid_dim = cfg.grid;
  if (d.shared == nullptr) {
    d.shared_capacity = kMaxOptin + kRedZone;
    d.shared = static_cast<unsigned char*>(std::aligned_alloc(128, d.shared_capacity));
  }
  g_dynamic_shared = d.shared;
  const size_t used = cfg.shared_bytes, red = std::min(kRedZone, d.shared_capacity - used);

  // block order: forward, reverse, or shuffled, as the threads
  const uint64_t nblocks = uint64_t{cfg.grid.x} * cfg.grid.y * cfg.grid.z;
  std::vector<uint64_t> blocks;
  if (d.order == Order::kShuffled) {
    blocks.resize(nblocks);
    std::iota(blocks.begin(), blocks.end(), uint64_t{0});
    std::mt19937_64 rng(d.seed * 7919u + d.launches.size());
    std::shuffle(blocks.begin(), blocks.end(), rng);
  }
  d.in_kernel = true;
  for (uint64_t i = 0; i < nblocks && d.exec_error == cudaSuccess; ++i) {
    const uint64_t b = d.order == Order::kShuffled ? blocks[i] : d.order == Order::kReverse ? nblocks - 1 - i : i;
    g_block_idx.x = static_cast<unsigned>(b % cfg.grid.x);
    g_block_idx.y = static_cast<unsigned>(b / cfg.grid.x % cfg.grid.y);
    g_block_idx.z = static_cast<unsigned>(b / (uint64_t{cfg.grid.x} * cfg.grid.y));
    std::memset(d.shared, d.poison, used + red);
    run_block();
    for (size_t k = used; k < used + red; ++k) {
      if (d.shared[k] != d.poison) {
        record(cudaErrorIllegalAddress, block_name() + " of " + cfg.kernel + " wrote shared memory at byte " +
                                            std::to_string(k) + ", past the " + std::to_string(used) +
                                            " bytes the launch gave it");
        break;
      }
    }
  }
  d.in_kernel = false;
  if (d.exec_error != cudaSuccess && d.message.find(cfg.kernel) == std::string::npos) {
    d.message = std::string(cfg.kernel) + " (launched at " + where(cfg.file, cfg.line) + "): " + d.message;
  }
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Control (emu_control.h)

std::unique_lock<std::mutex> lock_device() { return std::unique_lock<std::mutex>(detail::g_mutex); }

void configure(Order order, uint64_t seed, unsigned char poison, size_t shared_optin) {
  detail::Device& d = detail::dev();
  d.order = order;
  d.seed = seed;
  d.poison = poison;
  d.shared_optin = std::min(shared_optin, detail::kMaxOptin);
}

size_t shared_optin() { return detail::dev().shared_optin; }

void begin_call() {
  detail::Device& d = detail::dev();
  d.last_error = cudaSuccess;
  d.exec_error = cudaSuccess;
  d.message.clear();
  d.launches.clear();
  // no shared memory opt-ins carried over from earlier calls (as in a fresh process): a launcher that
  // skips cudaFuncSetAttribute on some path fails on that path, not only on a process's first call
  d.max_dynamic_shared.clear();
}

cudaError_t end_call(cudaError_t launcher_result) {
  detail::Device& d = detail::dev();
  if (d.exec_error != cudaSuccess) return d.exec_error;
  return launcher_result;
}

const std::string& message() { return detail::dev().message; }
void set_message(const std::string& msg) { detail::dev().message = msg; }
const std::vector<LaunchRecord>& launches() { return detail::dev().launches; }

}  // namespace carfast_emu

cudaError_t cudaGetLastError() {
  carfast_emu::detail::Device& d = carfast_emu::detail::dev();
  // synchronous emulation: a kernel's fault is known by the time its launcher asks (CUDA_LAUNCH_BLOCKING)
  const cudaError_t err = d.last_error != cudaSuccess ? d.last_error : d.exec_error;
  d.last_error = cudaSuccess;
  return err;
}

cudaError_t cudaPeekAtLastError() {
  carfast_emu::detail::Device& d = carfast_emu::detail::dev();
  return d.last_error != cudaSuccess ? d.last_error : d.exec_error;
}

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorMisalignedAddress: return "misaligned address";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

// The runtime of the CPU emulation of carfast's CUDA kernels (cuda_emu.h; overview in csrc/cuda/README.md):
// the emulated device's state and what the runtime's units share. Internal to the runtime, whose units are
//   launch.cpp     the launch (checked as the driver checks it, then the blocks one after another), the
//                  host API the launchers call (cudaFuncSetAttribute, cudaGetLastError) and emu_control.h;
//   scheduler.cpp  a block's threads as fibers, the scheduler that runs them, the faults they report;
//   sync.cpp       the switch points: __syncthreads and the warp collectives.
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
#pragma once

#include <setjmp.h>
#include <ucontext.h>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <string>
#include <unordered_map>
#include <vector>

#include "cuda_emu.h"
#include "emu_control.h"

namespace carfast_emu {
namespace detail {

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

// One emulated device; its state is process-wide (the API serialises calls with g_mutex, launch.cpp).
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

// The device (launch.cpp).
Device& dev();

// Messages (scheduler.cpp): "file.cu:line" (the file's base name), "block (x, y, z)" of the running block.
std::string where(const char* file, int line);
std::string block_name();

// Errors inside a kernel (scheduler.cpp). record: the first execution error of the current API call
// wins (the others would only follow from it); fail: record, and the block stops here (never returns).
void record(cudaError_t err, const std::string& msg);
[[noreturn]] void fail(cudaError_t err, const std::string& msg);

// The running thread back to the scheduler; returns when the scheduler resumes it (scheduler.cpp).
void park();

// The block's threads: set_order prepares a launch of nthreads per block in the schedule's order;
// run_block runs the current block to its end or to an error (scheduler.cpp).
void set_order(int nthreads, uint64_t launch_index);
void run_block();

// Makes every thread waiting at the barrier runnable (sync.cpp).
void release_barrier();

}  // namespace detail
}  // namespace carfast_emu

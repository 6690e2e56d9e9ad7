// The emulation runtime's launch (how it runs: runtime.h): the emulated device, a launch checked as the
// driver checks it and then run block after block (each by the scheduler, scheduler.cpp), the host API
// the launchers call (cudaFuncSetAttribute, cudaGetLastError) and the control of emu_control.h.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "runtime.h"

namespace carfast_emu {
namespace detail {

uint3 g_thread_idx, g_block_idx;
dim3 g_block_dim, g_grid_dim;
unsigned char* g_dynamic_shared = nullptr;

Device& dev() {
  static Device d;
  return d;
}

namespace {

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

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  Device& d = dev();
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > d.shared_optin) {
    return d.last_error = cudaErrorInvalidValue;
  }
  d.max_dynamic_shared[kernel] = value;
  return cudaSuccess;
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

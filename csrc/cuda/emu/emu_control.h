// Host-side control of the CPU emulation (launch.cpp), for the C API (api.cpp, selftest.cu): the
// schedule, the emulated device's shared memory limit, and what the last call launched and why it failed.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_emu.h"

namespace carfast_emu {

// The order in which a block's threads (and a grid's blocks) run: see runtime.h.
enum class Order : int { kForward = 0, kReverse = 1, kShuffled = 2 };

struct LaunchRecord {
  const char* kernel;  // as written at the launch, e.g. "score_reduce_kernel<T>"
  const char* file;
  int line;
  unsigned grid[3], block[3];
  int64_t shared_bytes;
  int error;  // cudaError_t of the configuration check
};

// One call at a time per process: hold this while configuring, launching and reading the results.
std::unique_lock<std::mutex> lock_device();
// shared_optin: the device's sharedMemPerBlockOptin (at most an H100's 232448 bytes).
void configure(Order order, uint64_t seed, unsigned char poison, size_t shared_optin);
size_t shared_optin();
// Around each API call: begin_call clears the errors, the launch log and the kernels' shared memory
// opt-ins; end_call gives the call's result, an execution error (a fault inside a kernel) taking
// precedence over what the launcher returned.
void begin_call();
cudaError_t end_call(cudaError_t launcher_result);
const std::string& message();
void set_message(const std::string& msg);  // for a failure the API itself finds (nothing launched)
const std::vector<LaunchRecord>& launches();

}  // namespace carfast_emu

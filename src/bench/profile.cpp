// libtorch's Kineto profiler around a stretch of our own code, for `bench --profile`: the
// events come back to Rust as text lines, which it aggregates (src/bench/profile.rs).
//
// Each line: kind, thread, start ns, end ns, correlation id, name, tab-separated. Kinds: 'o' a
// CPU-side operator, 'r' a CUDA runtime or driver call (a kernel launch), 'k' something that
// ran on the device (kernel, copy, fill); other events are left out. A device event and the
// runtime call that launched it share a correlation id.

#include <torch/csrc/autograd/profiler_kineto.h>

#include <kineto/ActivityType.h>

#include <set>
#include <sstream>
#include <string>

#include "../model/ffi.h"

namespace prof = torch::autograd::profiler;
namespace impl = torch::profiler::impl;

namespace {

char kind_of(const prof::KinetoEvent& e) {
  using libkineto::ActivityType;
  switch (static_cast<ActivityType>(e.activityType())) {
    case ActivityType::CPU_OP:
      return 'o';
    case ActivityType::CUDA_RUNTIME:
    case ActivityType::CUDA_DRIVER:
      return 'r';
    case ActivityType::CONCURRENT_KERNEL:
    case ActivityType::GPU_MEMCPY:
    case ActivityType::GPU_MEMSET:
      return 'k';
    default:
      return 0;
  }
}

// Kernel names are C++ signatures: no tabs or newlines may reach the line format.
std::string one_field(std::string s) {
  for (char& c : s) {
    if (c == '\t' || c == '\n' || c == '\r') c = ' ';
  }
  return s;
}

}  // namespace

extern "C" {

// Starts the profiler on the calling thread (and the autograd threads it hands work to): CPU
// operators, and with `cuda` non-zero the CUDA runtime calls and device activity.
char* mp_profile_start(int cuda) {
  try {
    const impl::ProfilerConfig config(impl::ProfilerState::KINETO);
    std::set<impl::ActivityType> activities{impl::ActivityType::CPU};
    if (cuda != 0) activities.insert(impl::ActivityType::CUDA);
    prof::prepareProfiler(config, activities);
    prof::enableProfiler(config, activities);
    return nullptr;
  } catch (const std::exception& e) {
    return mp_error_copy(e.what());
  }
}

// Stops the profiler; writes Chrome's trace format to `trace_path` when it is not null and the
// event lines to *events (free with mp_free_error).
char* mp_profile_stop(const char* trace_path, char** events) {
  try {
    auto result = prof::disableProfiler();
    if (trace_path != nullptr) result->save(trace_path);
    std::ostringstream lines;
    for (const auto& e : result->events()) {
      const char kind = kind_of(e);
      if (kind == 0) continue;
      lines << kind << '\t' << e.startThreadId() << '\t' << e.startNs() << '\t' << e.endNs()
            << '\t' << e.correlationId() << '\t' << one_field(e.name()) << '\n';
    }
    *events = mp_error_copy(lines.str().c_str());
    return nullptr;
  } catch (const std::exception& e) {
    return mp_error_copy(e.what());
  }
}
}

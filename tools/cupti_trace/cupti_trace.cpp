// A kernel timeline without Nsight Systems: a CUPTI injection library that the CUDA driver loads at cuInit
// when CUDA_INJECTION64_PATH names it. Every kernel the process runs (each node of a replayed CUDA graph
// included) becomes one CSV line in $PEARL_CUPTI_TRACE (default ./cupti_trace.csv):
//
//   start_ns,end_ns,graph_id,graph_node_id,stream_id,grid_x,grid_y,grid_z,block_x,name
//
// graph_id and graph_node_id are 0 for kernels launched outside a graph. The name is the demangled full
// signature (template and argument lists included; the analysis shortens it). Build: tools/cupti_trace/build.sh.
#include <cupti.h>
#include <cxxabi.h>

#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>

namespace {

// CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL delivers the kernel record of the library's own version. Every
// version from CUpti_ActivityKernel5 on keeps start, end, streamId, grid, block, name, graphNodeId and
// graphId at the same offsets, so the header's newest struct reads a newer library's records correctly.
#if CUPTI_API_VERSION >= 130000
using KernelRecord = CUpti_ActivityKernel10;
#else
using KernelRecord = CUpti_ActivityKernel9;
#endif

constexpr size_t kBufferBytes = 8u << 20;
constexpr size_t kBufferAlignment = 8;

struct TraceState {
  std::mutex mutex;
  FILE* file = nullptr;
  std::string path;
  std::unordered_map<std::string, std::string> demangled;  // mangled name -> demangled, one lookup per kernel
  uint64_t kernels_written = 0;
  uint64_t incomplete_skipped = 0;
  uint64_t dropped = 0;
};

TraceState& state() {
  static TraceState* instance = new TraceState();  // never destroyed: the atexit handler still uses it
  return *instance;
}

void warn_on_error(CUptiResult result, const char* call) {
  if (result == CUPTI_SUCCESS) return;
  const char* message = nullptr;
  cuptiGetResultString(result, &message);
  std::fprintf(stderr, "cupti_trace: %s failed: %s\n", call, message != nullptr ? message : "unknown error");
}

const std::string& demangled_name(TraceState& trace, const char* mangled) {
  const std::string key = mangled != nullptr ? mangled : "";
  const auto found = trace.demangled.find(key);
  if (found != trace.demangled.end()) return found->second;
  int status = 0;
  char* readable = abi::__cxa_demangle(key.c_str(), nullptr, nullptr, &status);
  // extern "C" kernels are not mangled: their name is already readable.
  std::string name = status == 0 && readable != nullptr ? readable : key;
  std::free(readable);
  return trace.demangled.emplace(key, std::move(name)).first->second;
}

void write_csv_quoted(FILE* file, const std::string& text) {
  std::fputc('"', file);
  for (const char c : text) {
    if (c == '"') std::fputc('"', file);
    std::fputc(c, file);
  }
  std::fputc('"', file);
}

void write_kernel(TraceState& trace, const KernelRecord& kernel) {
  // A forced flush at exit may hand over records whose timestamps were never filled in.
  if (kernel.start == 0 || kernel.end < kernel.start) {
    ++trace.incomplete_skipped;
    return;
  }
  std::fprintf(trace.file, "%" PRIu64 ",%" PRIu64 ",%" PRIu32 ",%" PRIu64 ",%" PRIu32 ",%d,%d,%d,%d,", kernel.start,
               kernel.end, kernel.graphId, kernel.graphNodeId, kernel.streamId, kernel.gridX, kernel.gridY,
               kernel.gridZ, kernel.blockX);
  write_csv_quoted(trace.file, demangled_name(trace, kernel.name));
  std::fputc('\n', trace.file);
  ++trace.kernels_written;
}

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(kBufferAlignment, kBufferBytes));
  *size = *buffer != nullptr ? kBufferBytes : 0;
  *max_records = 0;  // as many as fit
  if (*buffer == nullptr) std::fprintf(stderr, "cupti_trace: no memory for an activity buffer, records are lost\n");
}

void CUPTIAPI buffer_completed(CUcontext context, uint32_t stream_id, uint8_t* buffer, size_t /*size*/,
                               size_t valid_size) {
  TraceState& trace = state();
  {
    std::lock_guard<std::mutex> lock(trace.mutex);
    if (buffer != nullptr && trace.file != nullptr) {
      CUpti_Activity* record = nullptr;
      for (;;) {
        const CUptiResult next = cuptiActivityGetNextRecord(buffer, valid_size, &record);
        if (next == CUPTI_ERROR_MAX_LIMIT_REACHED) break;
        if (next != CUPTI_SUCCESS) {
          warn_on_error(next, "cuptiActivityGetNextRecord");
          break;
        }
        if (record->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) {
          write_kernel(trace, *reinterpret_cast<const KernelRecord*>(record));
        }
      }
    }
    size_t dropped = 0;
    warn_on_error(cuptiActivityGetNumDroppedRecords(context, stream_id, &dropped), "cuptiActivityGetNumDroppedRecords");
    if (dropped > 0) {
      trace.dropped += dropped;
      std::fprintf(stderr, "cupti_trace: warning: CUPTI dropped %zu activity records (stream %" PRIu32 ")\n", dropped,
                   stream_id);
    }
  }
  std::free(buffer);
}

void flush_at_exit() {
  warn_on_error(cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED), "cuptiActivityFlushAll");
  TraceState& trace = state();
  std::lock_guard<std::mutex> lock(trace.mutex);
  if (trace.file == nullptr) return;
  const bool write_failed = std::ferror(trace.file) != 0;
  const bool close_failed = std::fclose(trace.file) != 0;
  trace.file = nullptr;
  if (write_failed || close_failed) {
    std::fprintf(stderr, "cupti_trace: error: writing %s failed\n", trace.path.c_str());
    return;
  }
  std::fprintf(stderr, "cupti_trace: %" PRIu64 " kernels written to %s", trace.kernels_written, trace.path.c_str());
  if (trace.incomplete_skipped > 0) {
    std::fprintf(stderr, " (%" PRIu64 " records without timestamps skipped)", trace.incomplete_skipped);
  }
  if (trace.dropped > 0) std::fprintf(stderr, "; warning: %" PRIu64 " records dropped", trace.dropped);
  std::fputc('\n', stderr);
}

// Returns whether tracing is on. Called once: the driver calls InitializeInjection once per process.
bool start_tracing() {
  TraceState& trace = state();
  const char* path = std::getenv("PEARL_CUPTI_TRACE");
  trace.path = path != nullptr && path[0] != '\0' ? path : "cupti_trace.csv";
  trace.file = std::fopen(trace.path.c_str(), "w");
  if (trace.file == nullptr) {
    std::perror(("cupti_trace: cannot open " + trace.path + " (PEARL_CUPTI_TRACE)").c_str());
    return false;
  }
  std::fputs("start_ns,end_ns,graph_id,graph_node_id,stream_id,grid_x,grid_y,grid_z,block_x,name\n", trace.file);
  const CUptiResult registered = cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed);
  warn_on_error(registered, "cuptiActivityRegisterCallbacks");
  // CONCURRENT_KERNEL, not KERNEL: KERNEL serializes kernels, which would change the timeline it records.
  const CUptiResult enabled =
      registered == CUPTI_SUCCESS ? cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) : registered;
  if (registered == CUPTI_SUCCESS) warn_on_error(enabled, "cuptiActivityEnable(CONCURRENT_KERNEL)");
  if (enabled != CUPTI_SUCCESS || std::atexit(flush_at_exit) != 0) {
    std::fprintf(stderr, "cupti_trace: tracing is off\n");
    std::fclose(trace.file);
    trace.file = nullptr;
    return false;
  }
  return true;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) int InitializeInjection(void) {
  static std::once_flag once;
  static bool tracing = false;
  std::call_once(once, [] { tracing = start_tracing(); });
  return tracing ? 1 : 0;
}

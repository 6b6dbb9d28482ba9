// ExecuTorch's process-wide thread pool (the one XNNPACK's delegate, the optimized kernels and our
// edgesparse:: ops share), declared here because the executorch wheel ships its
// libexecutorch_threadpool.so but not extension/threadpool/threadpool.h. Only the members we call
// are declared; their mangled names match the library's exports (checked with
// `nm -DC libexecutorch_threadpool.so`), so this header stays valid as long as those do.
#ifndef EDGESPARSE_ET_THREADPOOL_H
#define EDGESPARSE_ET_THREADPOOL_H

#include <cstddef>
#include <cstdint>

#include <executorch/runtime/core/function_ref.h>

namespace executorch::extension::threadpool {

class ThreadPool final {
 public:
  ThreadPool() = delete;  // only ever reached through get_threadpool()

  // Threads in the pool (the calling thread counts as one of them).
  size_t get_thread_count() const;

  // Replace the pool by one of `num_threads` threads; false when it cannot. "unsafe": no other
  // thread may be running work on the pool at the time (here: before the first execute).
  bool _unsafe_reset_threadpool(uint32_t num_threads);

  // fn(i) for i in [0, range) on the pool's threads (the caller's included), blocking; items are
  // handed out in contiguous runs per thread and idle threads steal what is left of the others'.
  // Calls are serialized, and must not be nested inside another run().
  void run(executorch::runtime::FunctionRef<void(size_t)> fn, size_t range);
};

// The process's pool, created on first use (one thread per core); null when it cannot be created.
ThreadPool* get_threadpool();

}  // namespace executorch::extension::threadpool

#endif  // EDGESPARSE_ET_THREADPOOL_H

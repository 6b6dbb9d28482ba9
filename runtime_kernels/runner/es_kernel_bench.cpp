// edgesparse_kernel_bench: our sparse kernels against dense XNNPACK on a device, in one process.
// Each argument is a one-layer .pte (our edgesparse:: op, or the same layer lowered dense to
// XNNPACK); all are loaded first, then timed in interleaved rounds (A, B, C, A, B, C, ...) so every
// variant sees the same machine state. Prints one JSON line: the thread count of ExecuTorch's
// thread pool (what XNNPACK and our ops ran with) and, per file, the median of each round.
//
//   edgesparse_kernel_bench [--rounds R] [--runs N] [--warmup W] a.pte b.pte ...
//
// Exit code 2 on any error, with the reason in the JSON's "error" field.
#include <executorch/extension/data_loader/file_data_loader.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/core/hierarchical_allocator.h>
#include <executorch/runtime/core/memory_allocator.h>
#include <executorch/runtime/executor/memory_manager.h>
#include <executorch/runtime/executor/method.h>
#include <executorch/runtime/executor/program.h>
#include <executorch/runtime/platform/runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "../include/edgesparse/et_threadpool.h"  // the wheel ships the pool, not its header

using executorch::extension::FileDataLoader;
using namespace executorch::runtime;

namespace {

int fail(const std::string& what) {
  std::printf("{\"error\": \"%s\"}\n", what.c_str());
  return 2;
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// One loaded program with its memory and inputs (float inputs only: one-layer benches).
struct Loaded {
  std::optional<FileDataLoader> loader;
  std::optional<Program> program;
  std::vector<std::unique_ptr<uint8_t[]>> buffers;
  std::vector<Span<uint8_t>> spans;
  std::unique_ptr<HierarchicalAllocator> planned;
  std::vector<uint8_t> pool;
  std::unique_ptr<MemoryAllocator> allocator;
  std::unique_ptr<MemoryManager> memory;
  std::optional<Method> method;
  std::vector<std::vector<float>> data;
  std::vector<executorch::extension::TensorPtr> inputs;

  std::string load(const char* path) {
    auto l = FileDataLoader::from(path);
    if (!l.ok()) return std::string("cannot open ") + path;
    loader.emplace(std::move(l.get()));
    auto p = Program::load(&*loader);
    if (!p.ok()) return std::string("not a valid ExecuTorch program: ") + path;
    program.emplace(std::move(p.get()));
    auto meta = program->method_meta("forward");
    if (!meta.ok()) return std::string("no forward method: ") + path;
    for (size_t i = 0; i < meta->num_memory_planned_buffers(); ++i) {
      const size_t size = meta->memory_planned_buffer_size(i).get();
      buffers.emplace_back(new uint8_t[size]);
      spans.emplace_back(buffers.back().get(), size);
    }
    planned = std::make_unique<HierarchicalAllocator>(Span<Span<uint8_t>>(spans.data(), spans.size()));
    pool.resize(32 << 20);
    allocator = std::make_unique<MemoryAllocator>(pool.size(), pool.data());
    memory = std::make_unique<MemoryManager>(allocator.get(), planned.get());
    auto m = program->load_method("forward", memory.get());
    if (!m.ok()) return std::string("load_method failed (missing operator or backend?): ") + path;
    method.emplace(std::move(m.get()));
    data.resize(meta->num_inputs());
    for (size_t i = 0; i < meta->num_inputs(); ++i) {
      auto info = meta->input_tensor_meta(i);
      if (!info.ok() || info->scalar_type() != executorch::aten::ScalarType::Float)
        return std::string("only float inputs are supported: ") + path;
      std::vector<executorch::aten::SizesType> sizes(info->sizes().begin(), info->sizes().end());
      size_t count = 1;
      for (auto s : sizes) count *= static_cast<size_t>(s);
      data[i].resize(count);
      for (size_t k = 0; k < count; ++k) data[i][k] = static_cast<float>((k * 7919) % 101) / 101.0f - 0.5f;
      inputs.push_back(executorch::extension::make_tensor_ptr(sizes, data[i].data()));
    }
    return "";
  }

  bool run() {
    // planned memory may overlap the inputs: set them before every execute
    for (size_t i = 0; i < inputs.size(); ++i)
      if (method->set_input(EValue(*inputs[i]), i) != Error::Ok) return false;
    return method->execute() == Error::Ok;
  }
};

}  // namespace

int main(int argc, char** argv) {
  int rounds = 3, runs = 30, warmup = 3;
  std::vector<const char*> files;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--rounds") && i + 1 < argc) rounds = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--runs") && i + 1 < argc) runs = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--warmup") && i + 1 < argc) warmup = std::atoi(argv[++i]);
    else if (argv[i][0] == '-') return fail(std::string("unknown option ") + argv[i]);
    else files.push_back(argv[i]);
  }
  if (files.empty() || rounds < 1 || runs < 1) return fail("usage: edgesparse_kernel_bench [--rounds R] [--runs N] [--warmup W] a.pte ...");
  runtime_init();
  std::vector<std::unique_ptr<Loaded>> models;
  for (const char* f : files) {
    models.push_back(std::make_unique<Loaded>());
    const std::string error = models.back()->load(f);
    if (!error.empty()) return fail(error);
    if (!models.back()->run()) return fail(std::string("execute failed: ") + f);
  }
  std::vector<std::vector<double>> medians(models.size());
  std::vector<double> times(runs);
  for (int r = 0; r < rounds; ++r) {
    for (size_t m = 0; m < models.size(); ++m) {
      for (int w = 0; w < warmup; ++w) models[m]->run();
      for (int k = 0; k < runs; ++k) {
        const auto t0 = std::chrono::steady_clock::now();
        if (!models[m]->run()) return fail(std::string("execute failed: ") + files[m]);
        times[k] = ms_since(t0);
      }
      std::nth_element(times.begin(), times.begin() + runs / 2, times.end());
      medians[m].push_back(times[runs / 2]);
    }
  }
  auto* pool = executorch::extension::threadpool::get_threadpool();
  const unsigned threads = pool ? static_cast<unsigned>(pool->get_thread_count() & 0xffffffffu) : 1;
  std::printf("{\"runtime\": \"executorch-cpp\", \"threads\": %u, \"rounds\": %d, \"runs\": %d, \"medians_ms\": [", threads,
              rounds, runs);
  for (size_t m = 0; m < medians.size(); ++m) {
    std::printf("%s[", m ? ", " : "");
    for (size_t r = 0; r < medians[m].size(); ++r) std::printf("%s%.6f", r ? ", " : "", medians[m][r]);
    std::printf("]");
  }
  std::printf("]}\n");
  return 0;
}

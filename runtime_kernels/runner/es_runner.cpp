// edgesparse_runner: run a .pte with ExecuTorch's C++ runtime (no Python, no libtorch) and print
// one JSON line: load time, first run, per-run times, peak RSS (VmHWM). The edgesparse:: kernels
// are linked in, so sparse exports run as they would on a device.
//
//   edgesparse_runner model.pte [--runs N] [--warmup W] [--min-seconds S] [--threads T] [--input x.f32] [--output y.f32]
//
// --threads: the size of ExecuTorch's thread pool, which XNNPACK and our ops share (default: the
// pool's own, one thread per core). The JSON's "threads" is the pool's size as read back after
// setting it, and "thread_cpu_ms" the CPU time each of the process's threads spent during the timed
// runs (most first), so a caller can see how many of them did the work.
// Timed runs continue until there are at least N of them and S seconds have passed.
// --input: raw little-endian float32 for input 0 (else every float input is filled with a fixed
// pattern, every int64 input, such as an LM's token id and cache position, with zeros); --output: write output 0 as raw float32. Exit code 2 on any error, with the reason
// in the JSON's "error" field.
#include <executorch/extension/data_loader/file_data_loader.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/core/hierarchical_allocator.h>
#include <executorch/runtime/core/memory_allocator.h>
#include <executorch/runtime/executor/memory_manager.h>
#include <executorch/runtime/executor/method.h>
#include <executorch/runtime/executor/program.h>
#include <executorch/runtime/platform/runtime.h>

#include <dirent.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <memory>
#include <string>
#include <vector>

#include "../include/edgesparse/et_threadpool.h"  // relative: the Android app compiles this file too

using executorch::extension::FileDataLoader;
using namespace executorch::runtime;

namespace {

int fail(const std::string& what) {
  std::printf("{\"error\": \"%s\"}\n", what.c_str());
  return 2;
}

double peak_rss_mb() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::atof(line.c_str() + 6) / 1024.0;
  return -1.0;
}

// CPU time of every thread of this process so far, in ms, by thread id: /proc/self/task/*/schedstat
// (ns on the CPU), else utime + stime from .../stat (clock ticks).
std::map<std::string, double> thread_cpu_ms() {
  std::map<std::string, double> times;
  DIR* tasks = opendir("/proc/self/task");
  if (!tasks) return times;
  const double tick_ms = 1e3 / static_cast<double>(sysconf(_SC_CLK_TCK));
  while (dirent* entry = readdir(tasks)) {
    if (entry->d_name[0] == '.') continue;
    const std::string dir = std::string("/proc/self/task/") + entry->d_name;
    std::ifstream schedstat(dir + "/schedstat");
    double ns = 0;
    if (schedstat >> ns) {
      times[entry->d_name] = ns / 1e6;
      continue;
    }
    std::ifstream stat(dir + "/stat");
    std::string line;
    if (!std::getline(stat, line) || line.rfind(')') == std::string::npos) continue;
    // fields after "pid (comm)": state is field 3, utime 14, stime 15
    std::vector<std::string> fields;
    std::string field;
    for (std::istringstream rest(line.substr(line.rfind(')') + 2)); rest >> field;) fields.push_back(field);
    if (fields.size() > 12) times[entry->d_name] = (std::atof(fields[11].c_str()) + std::atof(fields[12].c_str())) * tick_ms;
  }
  closedir(tasks);
  return times;
}

// Each thread's CPU time since `before` (a thread_cpu_ms() snapshot), most first.
std::vector<double> cpu_ms_since(const std::map<std::string, double>& before) {
  std::vector<double> spent;
  for (const auto& [tid, ms] : thread_cpu_ms()) {
    const auto then = before.find(tid);
    spent.push_back(ms - (then == before.end() ? 0.0 : then->second));
  }
  std::sort(spent.rbegin(), spent.rend());
  return spent;
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2)
    return fail("usage: edgesparse_runner model.pte [--runs N] [--warmup W] [--min-seconds S] [--threads T] [--input F] [--output F]");
  int runs = 100, warmup = 10, threads = 0;  // 0: the pool's default size
  double min_seconds = 0.0;
  const char* input_path = nullptr;
  const char* output_path = nullptr;
  for (int i = 2; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--runs")) runs = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--warmup")) warmup = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--min-seconds")) min_seconds = std::atof(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--threads")) {
      threads = std::atoi(argv[i + 1]);
      if (threads < 1) return fail("--threads must be a whole number >= 1");
    }
    else if (!std::strcmp(argv[i], "--input")) input_path = argv[i + 1];
    else if (!std::strcmp(argv[i], "--output")) output_path = argv[i + 1];
    else return fail(std::string("unknown option ") + argv[i]);
  }
  if (argc % 2) return fail(std::string("option ") + argv[argc - 1] + " needs a value");
  runtime_init();
  // Before the program loads: XNNPACK's delegate takes the pool's pthreadpool when it is initialized.
  auto* pool = executorch::extension::threadpool::get_threadpool();
  if (!pool) return fail("ExecuTorch's thread pool could not be created");
  if (threads > 0 && (!pool->_unsafe_reset_threadpool(static_cast<uint32_t>(threads)) ||
                      pool->get_thread_count() != static_cast<size_t>(threads)))
    return fail("cannot set ExecuTorch's thread pool to " + std::to_string(threads) + " threads (it has " +
                std::to_string(pool->get_thread_count()) + ")");
  const auto t_load = std::chrono::steady_clock::now();
  auto loader = FileDataLoader::from(argv[1]);
  if (!loader.ok()) return fail("cannot open the .pte file");
  auto program = Program::load(&loader.get());
  if (!program.ok()) return fail("not a valid ExecuTorch program");
  auto meta = program->method_meta("forward");
  if (!meta.ok()) return fail("the program has no forward method");
  std::vector<std::unique_ptr<uint8_t[]>> planned_buffers;
  std::vector<Span<uint8_t>> planned_spans;
  for (size_t i = 0; i < meta->num_memory_planned_buffers(); ++i) {
    const size_t size = meta->memory_planned_buffer_size(i).get();
    planned_buffers.emplace_back(new uint8_t[size]);
    planned_spans.emplace_back(planned_buffers.back().get(), size);
  }
  HierarchicalAllocator planned({planned_spans.data(), planned_spans.size()});
  std::vector<uint8_t> method_pool(32 << 20);
  MemoryAllocator method_allocator(method_pool.size(), method_pool.data());
  MemoryManager memory(&method_allocator, &planned);
  auto method = program->load_method("forward", &memory);
  if (!method.ok()) return fail("load_method failed (missing operator or backend?)");
  const double load_ms = ms_since(t_load);

  std::vector<std::vector<float>> data(meta->num_inputs());
  std::vector<std::vector<int64_t>> ids(meta->num_inputs());
  std::vector<executorch::extension::TensorPtr> inputs;
  for (size_t i = 0; i < meta->num_inputs(); ++i) {
    auto info = meta->input_tensor_meta(i);
    if (!info.ok()) return fail("cannot read the input's metadata");
    std::vector<executorch::aten::SizesType> sizes(info->sizes().begin(), info->sizes().end());
    size_t count = 1;
    for (auto s : sizes) count *= static_cast<size_t>(s);
    if (info->scalar_type() == executorch::aten::ScalarType::Long) {  // token ids, cache positions: 0
      ids[i].assign(count, 0);
      inputs.push_back(executorch::extension::make_tensor_ptr(sizes, ids[i].data(), executorch::aten::ScalarType::Long));
      continue;
    }
    if (info->scalar_type() != executorch::aten::ScalarType::Float) return fail("only float and int64 inputs are supported");
    data[i].resize(count);
    for (size_t k = 0; k < count; ++k) data[i][k] = static_cast<float>((k * 7919) % 101) / 101.0f - 0.5f;
    if (i == 0 && input_path) {
      std::ifstream in(input_path, std::ios::binary);
      in.read(reinterpret_cast<char*>(data[i].data()), static_cast<std::streamsize>(count * sizeof(float)));
      if (in.gcount() != static_cast<std::streamsize>(count * sizeof(float))) return fail("--input holds too few floats for input 0");
    }
    inputs.push_back(executorch::extension::make_tensor_ptr(sizes, data[i].data()));
  }
  auto run_once = [&]() -> bool {
    // planned memory may overlap the inputs: set them before every execute
    for (size_t i = 0; i < inputs.size(); ++i)
      if (method->set_input(EValue(*inputs[i]), i) != Error::Ok) return false;
    return method->execute() == Error::Ok;
  };
  auto t0 = std::chrono::steady_clock::now();
  if (!run_once()) return fail("execute failed");
  const double first_ms = ms_since(t0);
  for (int r = 0; r < warmup; ++r) run_once();
  std::vector<double> times;
  times.reserve(runs > 0 ? runs : 0);
  const auto cpu_before = thread_cpu_ms();
  const auto started = std::chrono::steady_clock::now();
  while (static_cast<int>(times.size()) < runs || ms_since(started) < min_seconds * 1e3) {
    t0 = std::chrono::steady_clock::now();
    if (!run_once()) return fail("execute failed");
    times.push_back(ms_since(t0));
  }
  const std::vector<double> cpu = cpu_ms_since(cpu_before);
  auto out = method->get_output(0).toTensor();
  if (output_path) {
    std::ofstream f(output_path, std::ios::binary);
    f.write(reinterpret_cast<const char*>(out.const_data_ptr<float>()), static_cast<std::streamsize>(out.nbytes()));
  }
  std::printf("{\"runtime\": \"executorch-cpp\", \"threads\": %zu, \"thread_cpu_ms\": [", pool->get_thread_count());
  for (size_t t = 0; t < cpu.size(); ++t) std::printf("%s%.3f", t ? ", " : "", cpu[t]);
  std::printf("], \"load_ms\": %.6f, \"first_run_ms\": %.6f, \"peak_rss_mb\": %.3f, \"times_ms\": [", load_ms,
              first_ms, peak_rss_mb());
  for (size_t r = 0; r < times.size(); ++r) std::printf("%s%.6f", r ? ", " : "", times[r]);
  std::printf("]}\n");
  return 0;
}

// The runner's own source, compiled with its main() renamed, so the app runs exactly the code the
// tests run; its stdout (the JSON line) goes to a file for the duration of the call.
#include "bench_api.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <mutex>
#include <string>
#include <vector>

#define main edgesparse_runner_main
#include "es_runner.cpp"  // runtime_kernels/runner/ is on the include path
#undef main

extern "C" int edgesparse_bench_run(int argc, const char* const* argv, const char* json_path) {
  static std::mutex stdout_lock;
  std::lock_guard<std::mutex> hold(stdout_lock);
  const int file = open(json_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (file < 0) return -1;
  std::fflush(stdout);
  const int saved = dup(STDOUT_FILENO);
  dup2(file, STDOUT_FILENO);
  close(file);
  std::vector<std::string> args{"edgesparse_runner"};
  args.insert(args.end(), argv, argv + argc);
  std::vector<char*> raw;
  for (auto& arg : args) raw.push_back(arg.data());
  raw.push_back(nullptr);
  const int rc = edgesparse_runner_main(static_cast<int>(args.size()), raw.data());
  std::fflush(stdout);
  if (saved >= 0) {
    dup2(saved, STDOUT_FILENO);
    close(saved);
  } else {
    close(STDOUT_FILENO);  // there was no stdout before the call
  }
  return rc;
}

// edgesparse_bench_run: the C++ .pte runner (runtime_kernels/runner/es_runner.cpp) as a library
// call, for apps that cannot exec a program (the Android app's JNI layer).
#ifndef EDGESPARSE_BENCH_API_H
#define EDGESPARSE_BENCH_API_H

#ifdef __cplusplus
extern "C" {
#endif

// Runs the runner with `argc` arguments (`argv[0]` is the .pte path, then the runner's options:
// --runs N --warmup W --min-seconds S --threads T --input F --output F) and writes its one JSON line to
// `json_path`. Returns the runner's exit code (0, or 2 with {"error": ...} in the file), or -1
// when `json_path` cannot be written. Calls are serialized: the runner prints to stdout.
int edgesparse_bench_run(int argc, const char* const* argv, const char* json_path);

#ifdef __cplusplus
}
#endif

#endif

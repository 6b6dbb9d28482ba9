package org.edgesparse.bench

/** The C++ .pte runner (runtime_kernels/runner/es_runner.cpp, with our sparse kernels) in this process. */
object NativeBench {
    init {
        System.loadLibrary("edgesparse_jni")
    }

    /** Runs the runner with [args] (the .pte path first, then --runs N --warmup W --min-seconds S);
     *  its one JSON line goes to [jsonPath]. Returns its exit code: 0, 2 (the JSON holds "error"),
     *  or -1 when [jsonPath] cannot be written. */
    @JvmStatic
    external fun run(args: Array<String>, jsonPath: String): Int
}

// JNI for NativeBench.run: Java strings in, edgesparse_bench_run (apps/android/native/bench_api.h)
// called, its exit code out. Nothing else lives here.
#include <jni.h>

#include <string>
#include <vector>

#include "bench_api.h"

namespace {

std::string utf8(JNIEnv* env, jstring text) {
  const char* chars = env->GetStringUTFChars(text, nullptr);
  std::string copy(chars);
  env->ReleaseStringUTFChars(text, chars);
  return copy;
}

}  // namespace

extern "C" JNIEXPORT jint JNICALL Java_org_edgesparse_bench_NativeBench_run(JNIEnv* env, jclass, jobjectArray args,
                                                                              jstring json_path) {
  std::vector<std::string> strings;
  for (jsize i = 0; i < env->GetArrayLength(args); ++i) {
    auto arg = static_cast<jstring>(env->GetObjectArrayElement(args, i));
    strings.push_back(utf8(env, arg));
    env->DeleteLocalRef(arg);
  }
  std::vector<const char*> argv;
  for (const auto& arg : strings) argv.push_back(arg.c_str());
  return edgesparse_bench_run(static_cast<int>(argv.size()), argv.data(), utf8(env, json_path).c_str());
}

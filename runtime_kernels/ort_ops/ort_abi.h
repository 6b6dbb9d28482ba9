// The few parts of ONNX Runtime's C ABI that the edgesparse op library uses, written from the
// public onnxruntime_c_api.h: the pip wheel ships no headers. The ABI is versioned and
// append-only, so these offsets hold for every runtime that serves GetApi(16).
//
// OrtApi is a table of function pointers; we reach the entries we need by their slot index
// (0-based position in `struct OrtApi`). Anything not listed here is deliberately unused.
#ifndef EDGESPARSE_ORT_ABI_H
#define EDGESPARSE_ORT_ABI_H

#include <stddef.h>
#include <stdint.h>

extern "C" {

struct OrtApi;
struct OrtStatus;
struct OrtValue;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtCustomOpDomain;
struct OrtSessionOptions;
struct OrtTensorTypeAndShapeInfo;

enum ONNXTensorElementDataType { ORT_FLOAT = 1, ORT_UINT8 = 2, ORT_INT32 = 6, ORT_INT64 = 7 };
enum OrtErrorCode { ORT_OK = 0, ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 };
enum OrtCustomOpInputOutputCharacteristic { ORT_REQUIRED = 0, ORT_OPTIONAL = 1 };
enum OrtMemType { OrtMemTypeDefault = 0 };

struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)(void);
};

// struct OrtCustomOp up to the fields of API 16. ORT reads the variadic fields only for VARIADIC
// inputs/outputs (we have none) and uses the V2 entry points, which can return an error status,
// when version >= 16 and they are set; nothing past KernelComputeV2 is read before version 17.
struct OrtCustomOp {
  uint32_t version;
  void* (*CreateKernel)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info);
  const char* (*GetName)(const OrtCustomOp* op);
  const char* (*GetExecutionProviderType)(const OrtCustomOp* op);  // NULL: CPU
  ONNXTensorElementDataType (*GetInputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetInputTypeCount)(const OrtCustomOp* op);
  ONNXTensorElementDataType (*GetOutputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetOutputTypeCount)(const OrtCustomOp* op);
  void (*KernelCompute)(void* kernel, OrtKernelContext* context);
  void (*KernelDestroy)(void* kernel);
  OrtCustomOpInputOutputCharacteristic (*GetInputCharacteristic)(const OrtCustomOp* op, size_t index);
  OrtCustomOpInputOutputCharacteristic (*GetOutputCharacteristic)(const OrtCustomOp* op, size_t index);
  OrtMemType (*GetInputMemoryType)(const OrtCustomOp* op, size_t index);
  int (*GetVariadicInputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicInputHomogeneity)(const OrtCustomOp* op);
  int (*GetVariadicOutputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicOutputHomogeneity)(const OrtCustomOp* op);
  OrtStatus* (*CreateKernelV2)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info, void** kernel);
  OrtStatus* (*KernelComputeV2)(void* kernel, OrtKernelContext* context);
};

}  // extern "C"

namespace ort_abi {

constexpr uint32_t kApiVersion = 16;          // ORT >= 1.16
constexpr uint32_t kParallelApiVersion = 17;  // ORT >= 1.17 adds KernelContext_ParallelFor

// Slot indices in struct OrtApi (checked against the static_asserts in ORT's onnxruntime_c_api.cc,
// e.g. ReleaseCustomOpDomain == 101).
enum Slot : size_t {
  CreateStatus = 0,
  CreateCustomOpDomain = 26,
  CustomOpDomain_Add = 27,
  AddCustomOpDomain = 28,
  GetTensorMutableData = 51,
  GetTensorElementType = 60,
  GetDimensionsCount = 61,
  GetDimensions = 62,
  GetTensorTypeAndShape = 65,
  KernelInfoGetAttribute_float = 85,
  KernelInfoGetAttribute_int64 = 86,
  KernelContext_GetInputCount = 88,
  KernelContext_GetInput = 90,
  KernelContext_GetOutput = 91,
  ReleaseStatus = 93,
  ReleaseTensorTypeAndShapeInfo = 99,
  ReleaseCustomOpDomain = 101,
  KernelContext_ParallelFor = 274,  // API 17
};

// The signatures of those slots.
using CreateStatusFn = OrtStatus* (*)(OrtErrorCode code, const char* msg);
using CreateCustomOpDomainFn = OrtStatus* (*)(const char* domain, OrtCustomOpDomain** out);
using CustomOpDomain_AddFn = OrtStatus* (*)(OrtCustomOpDomain* domain, const OrtCustomOp* op);
using AddCustomOpDomainFn = OrtStatus* (*)(OrtSessionOptions* options, OrtCustomOpDomain* domain);
using GetTensorMutableDataFn = OrtStatus* (*)(OrtValue* value, void** out);
using GetTensorElementTypeFn = OrtStatus* (*)(const OrtTensorTypeAndShapeInfo* info, ONNXTensorElementDataType* out);
using GetDimensionsCountFn = OrtStatus* (*)(const OrtTensorTypeAndShapeInfo* info, size_t* out);
using GetDimensionsFn = OrtStatus* (*)(const OrtTensorTypeAndShapeInfo* info, int64_t* dims, size_t count);
using GetTensorTypeAndShapeFn = OrtStatus* (*)(const OrtValue* value, OrtTensorTypeAndShapeInfo** out);
using KernelInfoGetAttribute_floatFn = OrtStatus* (*)(const OrtKernelInfo* info, const char* name, float* out);
using KernelInfoGetAttribute_int64Fn = OrtStatus* (*)(const OrtKernelInfo* info, const char* name, int64_t* out);
using KernelContext_GetInputCountFn = OrtStatus* (*)(const OrtKernelContext* context, size_t* out);
using KernelContext_GetInputFn = OrtStatus* (*)(const OrtKernelContext* context, size_t index, const OrtValue** out);
using KernelContext_GetOutputFn = OrtStatus* (*)(OrtKernelContext* context, size_t index, const int64_t* dims,
                                                 size_t count, OrtValue** out);
using ReleaseStatusFn = void (*)(OrtStatus* status);
using ReleaseTensorTypeAndShapeInfoFn = void (*)(OrtTensorTypeAndShapeInfo* info);
using ReleaseCustomOpDomainFn = void (*)(OrtCustomOpDomain* domain);
// fn(usr_data, i) for i in [0, total) on the session's intra-op threads; num_batch 0: ORT decides
using KernelContext_ParallelForFn = OrtStatus* (*)(const OrtKernelContext* context, void (*fn)(void*, size_t),
                                                   size_t total, size_t num_batch, void* usr_data);

// api.call<Fn>(Slot, args...): the function in that slot, called with its declared signature.
struct Api {
  const OrtApi* table;
  template <typename Fn, typename... Args>
  auto call(Slot slot, Args... args) const {
    return reinterpret_cast<Fn const*>(table)[slot](args...);
  }
};

}  // namespace ort_abi

#endif

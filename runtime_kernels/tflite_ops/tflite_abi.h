// The few parts of TFLite's kernel C ABI that the edgesparse custom-op library uses, written from
// the facts in LiteRT's tflite/core/c/common.h (the ai-edge-litert wheel ships no headers).
// Those structs are "semi-ABI stable": fields are only ever appended, never reordered, so a
// prefix that stops at the last field we touch is valid for every runtime that has them.
// The one struct whose full size matters is TfLiteRegistration: the resolver copies it whole,
// so it is declared here with every field of the current layout (V4: up to inplace_operator).
#ifndef EDGESPARSE_TFLITE_ABI_H
#define EDGESPARSE_TFLITE_ABI_H

#include <stddef.h>
#include <stdint.h>

extern "C" {

typedef enum { kTfLiteOk = 0, kTfLiteError = 1 } TfLiteStatus;

// TfLiteType: the same numbers as the flatbuffer schema's TensorType
typedef enum { kTfLiteFloat32 = 1, kTfLiteInt32 = 2, kTfLiteUInt8 = 3 } TfLiteType;

typedef enum { kTfLiteMmapRo = 1 } TfLiteAllocationType;  // constant (model-owned) tensor data

enum { kTfLiteOptionalTensor = -1 };

// Dims and index lists. The runtime frees the arrays it is handed (ResizeTensor) with free(),
// and allocates its own with malloc(), so ours come from malloc too.
typedef struct TfLiteIntArray {
  int size;
  int data[];
} TfLiteIntArray;

typedef struct TfLiteQuantizationParams {
  float scale;
  int32_t zero_point;
} TfLiteQuantizationParams;

// The whole struct, not a prefix: context->tensors is an array of them, so its size is ABI (the
// same holds for every kernel compiled against TFLite's own header). 112 bytes on LP64.
typedef struct TfLiteTensor {
  int type;    // TfLiteType
  void* data;  // TfLitePtrUnion: a union of pointers
  TfLiteIntArray* dims;
  TfLiteQuantizationParams params;
  int allocation_type;  // TfLiteAllocationType
  size_t bytes;
  const void* allocation;
  const char* name;
  void* delegate;  // struct TfLiteDelegate*
  int buffer_handle;
  bool data_is_stale;
  bool is_variable;
  struct {
    int type;  // TfLiteQuantizationType
    void* params;
  } quantization;
  void* sparsity;  // TfLiteSparsity*
  const TfLiteIntArray* dims_signature;
} TfLiteTensor;
#if defined(__LP64__)
static_assert(sizeof(TfLiteTensor) == 112, "TfLiteTensor must match TFLite's layout");
#endif

typedef struct TfLiteNode {
  TfLiteIntArray* inputs;
  TfLiteIntArray* outputs;
  TfLiteIntArray* intermediates;
  TfLiteIntArray* temporaries;
  void* user_data;  // what our init returned
  void* builtin_data;
  const void* custom_initial_data;  // the op's custom options
  int custom_initial_data_size;
} TfLiteNode;

struct TfLiteContext;
struct TfLiteRegistration;

// Prefix up to recommended_num_threads.
typedef struct TfLiteContext {
  size_t tensors_size;
  TfLiteStatus (*GetExecutionPlan)(struct TfLiteContext* context, TfLiteIntArray** plan);
  TfLiteTensor* tensors;  // indexed by node->inputs / node->outputs entries
  void* impl_;
  TfLiteStatus (*ResizeTensor)(struct TfLiteContext* context, TfLiteTensor* tensor, TfLiteIntArray* new_size);  // takes new_size
  void (*ReportError)(struct TfLiteContext* context, const char* format, ...);
  TfLiteStatus (*AddTensors)(struct TfLiteContext* context, int count, int* first_new_index);
  TfLiteStatus (*GetNodeAndRegistration)(struct TfLiteContext* context, int node_index, TfLiteNode** node,
                                         struct TfLiteRegistration** registration);
  void* ReplaceNodeSubsetsWithDelegateKernels;  // takes a TfLiteRegistration by value: never called here
  int recommended_num_threads;
} TfLiteContext;

typedef struct TfLiteRegistration {
  void* (*init)(TfLiteContext* context, const char* buffer, size_t length);  // custom ops: buffer = custom options
  void (*free)(TfLiteContext* context, void* buffer);
  TfLiteStatus (*prepare)(TfLiteContext* context, TfLiteNode* node);
  TfLiteStatus (*invoke)(TfLiteContext* context, TfLiteNode* node);
  const char* (*profiling_string)(const TfLiteContext* context, const TfLiteNode* node);
  int32_t builtin_code;     // set by the resolver (BuiltinOperator_CUSTOM = 32)
  const char* custom_name;  // set by the resolver
  int version;              // set by the resolver
  void* registration_external;  // TfLiteOperator*: NULL for a plain C registration
  void* async_kernel;           // NULL: no asynchronous execution
  uint64_t inplace_operator;    // 0: kTfLiteInplaceOpNone
} TfLiteRegistration;

}  // extern "C"

// tflite::MutableOpResolver (C++), what custom-op registerers receive, is opaque to us: the only
// thing done with it is calling its non-virtual member
//   void tflite::MutableOpResolver::AddCustom(const char* name, const TfLiteRegistration*, int version)
// whose Itanium-ABI symbol is below. As a member function it takes `this` as its first argument.
#define EDGESPARSE_TFLITE_ADD_CUSTOM_SYMBOL "_ZN6tflite17MutableOpResolver9AddCustomEPKcPK18TfLiteRegistrationi"
typedef void (*EdgesparseAddCustomFn)(void* resolver, const char* name, const TfLiteRegistration* registration,
                                      int version);

#endif

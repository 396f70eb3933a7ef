// gpupool's allocation functions for PyTorch, raising PyTorch's out-of-memory error.
//
// PyTorch's pluggable allocator passes the allocation function's NULL on as a tensor with a
// NULL data pointer (see gpupool/torch.py). These wrappers call gpupool_alloc / gpupool_free
// and, when gpupool_alloc returns NULL for a non-zero size, throw what PyTorch's own caching
// allocator throws: c10::OutOfMemoryError (torch.OutOfMemoryError in Python) when gpupool says
// out of memory, c10::Error (RuntimeError) for any other failure, with gpupool's message. The
// exception starts here, in C++, after gpupool_alloc has returned: it never crosses Rust.
//
// gpupool/torch.py compiles this file against the installed torch's headers and libc10 and
// binds the gpupool functions with gpupool_torch_shim_bind (their addresses in the gpupool
// library that the package loaded), so the shim and the package share one gpupool.
#include <c10/util/Exception.h>

#include <cstddef>
#include <sys/types.h>

namespace {

using AllocFunction = void* (*)(ssize_t, int, void*);
using FreeFunction = void (*)(void*, ssize_t, int, void*);
using LastErrorFunction = const char* (*)();
using LastErrorCodeFunction = int (*)();

// GPUPOOL_ERR_OUT_OF_MEMORY in gpupool.h.
constexpr int kOutOfMemory = -8;

AllocFunction gpupool_alloc_function = nullptr;
FreeFunction gpupool_free_function = nullptr;
LastErrorFunction gpupool_last_error_function = nullptr;
LastErrorCodeFunction gpupool_last_error_code_function = nullptr;

} // namespace

extern "C" void gpupool_torch_shim_bind(
    void* alloc, void* free, void* last_error, void* last_error_code) {
  gpupool_alloc_function = reinterpret_cast<AllocFunction>(alloc);
  gpupool_free_function = reinterpret_cast<FreeFunction>(free);
  gpupool_last_error_function = reinterpret_cast<LastErrorFunction>(last_error);
  gpupool_last_error_code_function =
      reinterpret_cast<LastErrorCodeFunction>(last_error_code);
}

extern "C" void* gpupool_torch_alloc(ssize_t size, int device, void* stream) {
  void* pointer = gpupool_alloc_function(size, device, stream);
  if (pointer == nullptr && size > 0) {
    const char* message = gpupool_last_error_function();
    const char* text = message != nullptr ? message : "gpupool_alloc returned NULL";
    TORCH_CHECK_WITH(
        OutOfMemoryError,
        gpupool_last_error_code_function() != kOutOfMemory,
        "CUDA out of memory (gpupool): ",
        text);
    TORCH_CHECK(false, "gpupool could not allocate ", size, " bytes on device ", device, ": ", text);
  }
  return pointer;
}

extern "C" void gpupool_torch_free(void* pointer, ssize_t size, int device, void* stream) {
  gpupool_free_function(pointer, size, device, stream);
}

// Issue 11: what each CUDA virtual-memory call costs on this device, to decide whether moving
// physical pages (unmap here, map there, keeping the physical handle) is cheap enough to do at
// the peak. Driver API only; build: nvcc -O2 -o vmm_costs vmm_costs.cpp -lcuda
// Prints one line per measurement: call, page MiB, microseconds per call. Arguments: handle
// sizes in MiB (default: 2 20).
#include <cuda.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(call)                                                              \
  do {                                                                           \
    CUresult r_ = (call);                                                        \
    if (r_ != CUDA_SUCCESS) {                                                    \
      const char* s_ = nullptr;                                                  \
      cuGetErrorString(r_, &s_);                                                 \
      std::fprintf(stderr, "%s:%d %s -> %s\n", __FILE__, __LINE__, #call, s_);   \
      std::exit(1);                                                              \
    }                                                                            \
  } while (0)

using Clock = std::chrono::steady_clock;
static double us_since(Clock::time_point t, size_t n) {
  return std::chrono::duration<double, std::micro>(Clock::now() - t).count() / double(n);
}

int main(int argc, char** argv) {
  CHECK(cuInit(0));
  CUdevice dev;
  CHECK(cuDeviceGet(&dev, 0));
  CUcontext ctx;
  CHECK(cuDevicePrimaryCtxRetain(&ctx, dev));
  CHECK(cuCtxSetCurrent(ctx));
  char name[256];
  cuDeviceGetName(name, sizeof name, dev);
  CUmemAllocationProp prop = {};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = 0;
  size_t gran = 0;
  CHECK(cuMemGetAllocationGranularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM));
  std::printf("device %s granularity %zu\n", name, gran);
  CUmemAccessDesc access = {};
  access.location = prop.location;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  std::vector<size_t> sizes_mib;
  for (int i = 1; i < argc; i++) sizes_mib.push_back(std::strtoull(argv[i], nullptr, 10));
  if (sizes_mib.empty()) sizes_mib = {2, 20};
  for (size_t page_mib : sizes_mib) {
    size_t page = page_mib << 20;
    size_t n = std::max<size_t>(4, (1024ull << 20) / page);  // 1 GiB worth, at least 4 handles
    CUdeviceptr a = 0, b = 0;
    CHECK(cuMemAddressReserve(&a, n * page, gran, 0, 0));
    CHECK(cuMemAddressReserve(&b, n * page, gran, 0, 0));
    std::vector<CUmemGenericAllocationHandle> h(n);
    auto t = Clock::now();
    for (size_t i = 0; i < n; i++) CHECK(cuMemCreate(&h[i], page, &prop, 0));
    std::printf("cuMemCreate %zu MiB %.1f us\n", page_mib, us_since(t, n));
    t = Clock::now();
    for (size_t i = 0; i < n; i++) CHECK(cuMemMap(a + i * page, page, 0, h[i], 0));
    std::printf("cuMemMap %zu MiB %.1f us\n", page_mib, us_since(t, n));
    t = Clock::now();
    for (size_t i = 0; i < n; i++) CHECK(cuMemSetAccess(a + i * page, page, &access, 1));
    std::printf("cuMemSetAccess(one page) %zu MiB %.1f us\n", page_mib, us_since(t, n));
    t = Clock::now();
    for (size_t i = 0; i < n; i++) CHECK(cuMemUnmap(a + i * page, page));
    std::printf("cuMemUnmap(one page) %zu MiB %.1f us\n", page_mib, us_since(t, n));
    // Map again, then set access on the whole range in one call and unmap it in one call.
    for (size_t i = 0; i < n; i++) CHECK(cuMemMap(a + i * page, page, 0, h[i], 0));
    t = Clock::now();
    CUresult whole = cuMemSetAccess(a, n * page, &access, 1);
    std::printf("cuMemSetAccess(whole range of %zu mappings) %zu MiB %.1f us/page (result %d)\n", n,
                page_mib, us_since(t, n), int(whole));
    t = Clock::now();
    CUresult unmap_whole = cuMemUnmap(a, n * page);
    std::printf("cuMemUnmap(whole range of %zu mappings) %zu MiB %.1f us/page (result %d)\n", n,
                page_mib, us_since(t, n), int(unmap_whole));
    if (unmap_whole != CUDA_SUCCESS)
      for (size_t i = 0; i < n; i++) CHECK(cuMemUnmap(a + i * page, page));
    // Moving retained handles: map at a, then for each page unmap at a and map + access at b.
    for (size_t i = 0; i < n; i++) CHECK(cuMemMap(a + i * page, page, 0, h[i], 0));
    CHECK(cuMemSetAccess(a, n * page, &access, 1));
    CHECK(cuCtxSynchronize());
    t = Clock::now();
    for (size_t i = 0; i < n; i++) {
      CHECK(cuMemUnmap(a + i * page, page));
      CHECK(cuMemMap(b + i * page, page, 0, h[i], 0));
      CHECK(cuMemSetAccess(b + i * page, page, &access, 1));
    }
    std::printf("move (unmap + map + access, handle kept) %zu MiB %.1f us\n", page_mib, us_since(t, n));
    // The same with a kernel-free stream in use: a memset queued before each move.
    CUstream s;
    CHECK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    t = Clock::now();
    for (size_t i = 0; i < n; i++) {
      CHECK(cuMemsetD8Async(b + i * page, 1, page, s));
      CHECK(cuStreamSynchronize(s));
      CHECK(cuMemUnmap(b + i * page, page));
      CHECK(cuMemMap(a + i * page, page, 0, h[i], 0));
      CHECK(cuMemSetAccess(a + i * page, page, &access, 1));
    }
    std::printf("move after a memset %zu MiB %.1f us\n", page_mib, us_since(t, n));
    t = Clock::now();
    for (size_t i = 0; i < n; i++) CHECK(cuMemUnmap(a + i * page, page));
    double unmap_us = us_since(t, n);
    t = Clock::now();
    for (size_t i = 0; i < n; i++) CHECK(cuMemRelease(h[i]));
    std::printf("cuMemUnmap(after use) %zu MiB %.1f us; cuMemRelease %.1f us\n", page_mib, unmap_us,
                us_since(t, n));
    // cuMemAlloc / cuMemFree of the same size, for comparison.
    std::vector<CUdeviceptr> p(n);
    t = Clock::now();
    for (size_t i = 0; i < n; i++) CHECK(cuMemAlloc(&p[i], page));
    double alloc_us = us_since(t, n);
    t = Clock::now();
    for (size_t i = 0; i < n; i++) CHECK(cuMemFree(p[i]));
    std::printf("cuMemAlloc %zu MiB %.1f us; cuMemFree %.1f us\n", page_mib, alloc_us, us_since(t, n));
    CHECK(cuStreamDestroy(s));
    CHECK(cuMemAddressFree(a, n * page));
    CHECK(cuMemAddressFree(b, n * page));
  }
  return 0;
}

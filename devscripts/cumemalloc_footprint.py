#!/usr/bin/env python3
"""What cuMemAlloc really takes from the device per allocation, by size: the drop of the
driver's free-memory reading over 400 allocations of each size (run on a GPU machine; needs
only libcuda). Session 18 on the H200: sizes of 256 KiB to 1 MiB and 20 MiB cost exactly their
bytes; 1.5 and 3 MiB cost 1.33x (rounded to 2 MiB); 4 KiB and smaller share one 2 MiB chunk."""
import ctypes, sys
cu = ctypes.CDLL("libcuda.so.1")
def ck(r, what):
    if r != 0: sys.exit(f"{what} failed: {r}")
ck(cu.cuInit(0), "cuInit")
dev = ctypes.c_int(); ck(cu.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
ctx = ctypes.c_void_p(); ck(cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "retain"); ck(cu.cuCtxSetCurrent(ctx), "setcurrent")
def free_bytes():
    f = ctypes.c_size_t(); t = ctypes.c_size_t(); ck(cu.cuMemGetInfo_v2(ctypes.byref(f), ctypes.byref(t)), "info"); return f.value
N = 400
for size in [512, 4096, 65536, 262144, 524288, 1 << 20, 1536 << 10, 3 << 20, 20 << 20]:
    before = free_bytes(); ptrs = []
    for _ in range(N):
        p = ctypes.c_uint64(); ck(cu.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(size)), "alloc"); ptrs.append(p)
    used = before - free_bytes()
    for p in ptrs: ck(cu.cuMemFree_v2(p), "free")
    print(f"cuMemAlloc {size:>9} B x {N}: device free memory fell {used:>12} B, {used / N / size:7.3f}x the bytes asked")

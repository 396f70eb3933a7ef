// replay_peers: replays one gpupool allocation trace through one peer allocator on a CUDA GPU
// and prints one JSON line with the time per operation and the peak memory.
//
//   replay_peers ALLOCATOR TRACE [--runs R] [--parse-only]
//
// ALLOCATOR:
//   pytorch    c10::cuda::CUDACachingAllocator (raw_alloc_with_stream / raw_delete), the
//              allocator behind every PyTorch tensor. Its settings come from the environment
//              (PYTORCH_CUDA_ALLOC_CONF, or PYTORCH_ALLOC_CONF), read when the allocator's
//              configuration is first used: run it with
//              PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True for expandable segments. The
//              program reads the setting back (AcceleratorAllocatorConfig) and checks after
//              each run, from the allocator's snapshot, that expandable segments really exist
//              (SegmentInfo::is_expandable), and fails when they were asked for but none was
//              made (or made though not asked for).
//   cuda-pool  the CUDA stream-ordered allocator: a pool made by cudaMemPoolCreate on device 0
//              with release threshold UINT64_MAX (it keeps everything it reserved),
//              cudaMallocFromPoolAsync / cudaFreeAsync.
//
// TRACE: gpupool's trace format, CSV with an optional `op,id,size,stream` header, plain or gzip
// (recognised by its magic bytes; inflated through `gzip -dc`, so no zlib is needed):
//   a,ID,SIZE,STREAM   allocate buffer ID of SIZE bytes on STREAM (0 = default stream)
//   f,ID,SIZE,STREAM   free it (SIZE must be the size it was allocated with)
// The whole trace is parsed and checked before anything is replayed, as gpupool's own
// `replay` does: bad op, bad number, wrong field count, zero-byte allocation, an id allocated
// while live, a free of an unknown id or with another size are each an error naming the line.
// Ids become dense slots so the timed loop indexes a vector. Each distinct stream value gets a
// stream created with cudaStreamNonBlocking; 0 stays the legacy default stream.
//
// Timing: CPU wall time (steady_clock) of the replay loop only (the allocation and free
// calls over the parsed trace), divided by the number of operations. The replay runs R times
// (default 5), each from a fresh state: PyTorch's cache is emptied (emptyCache) and its peak
// statistics reset between runs; the CUDA pool is destroyed and created anew. The device is
// synchronised between runs. Nothing is warmed up beforehand: like gpupool's replay, each run
// starts from an empty pool, so the times include the cudaMalloc / pool growth misses. The
// median run is reported, with every run beside it.
//
// Memory: peak reserved bytes (PyTorch: getDeviceStats(0).reserved_bytes[aggregate].peak;
// CUDA pool: cudaMemPoolAttrReservedMemHigh), the highest over the runs, divided by the peak
// of requested live bytes computed from the trace.
//
// Exit status: 0 on success; 1 on a replay failure (out of memory, CUDA error); 2 on a usage
// or trace error. Errors go to stderr, one line, prefixed "replay_peers: ".

#include <c10/core/AllocatorConfig.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

namespace {

[[noreturn]] void die(int code, const std::string& message) {
    std::fprintf(stderr, "replay_peers: %s\n", message.c_str());
    std::exit(code);
}

void cuda_check(cudaError_t err, const char* what) {
    if (err != cudaSuccess) {
        die(1, std::string(what) + " failed: " + cudaGetErrorName(err) + " (" +
                   cudaGetErrorString(err) + ")");
    }
}

// ---------------------------------------------------------------------------------------------
// The trace

struct Event {
    bool alloc;        // true: allocate, false: free
    uint32_t slot;     // dense buffer slot
    uint32_t stream;   // index into Trace::streams
    uint64_t bytes;
};

struct Trace {
    std::vector<Event> events;
    std::vector<uint64_t> streams;   // stream values, in order of first appearance
    uint32_t slots = 0;
    uint64_t allocations = 0, frees = 0;
    uint64_t peak_live_bytes = 0;
    std::vector<uint32_t> live_at_end;        // slots never freed
    std::vector<uint32_t> live_at_end_stream; // their streams
};

bool parse_u64(const std::string& s, uint64_t* out) {
    if (s.empty() || s.size() > 20) return false;
    uint64_t v = 0;
    for (char c : s) {
        if (c < '0' || c > '9') return false;
        uint64_t d = static_cast<uint64_t>(c - '0');
        if (v > (std::numeric_limits<uint64_t>::max() - d) / 10) return false;
        v = v * 10 + d;
    }
    *out = v;
    return true;
}

FILE* open_trace(const std::string& path, bool* piped) {
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) die(2, "cannot open trace " + path + ": " + std::strerror(errno));
    unsigned char magic[2] = {0, 0};
    size_t n = std::fread(magic, 1, 2, f);
    std::fclose(f);
    if (n == 2 && magic[0] == 0x1f && magic[1] == 0x8b) {
        // Quote the path for the shell: single quotes, with ' written as '\''.
        std::string quoted = "'";
        for (char c : path) {
            if (c == '\'') quoted += "'\\''";
            else quoted += c;
        }
        quoted += "'";
        std::string cmd = "gzip -dc -- " + quoted;
        FILE* p = popen(cmd.c_str(), "r");
        if (!p) die(2, "cannot run gzip for " + path);
        *piped = true;
        return p;
    }
    *piped = false;
    f = std::fopen(path.c_str(), "rb");
    if (!f) die(2, "cannot open trace " + path);
    return f;
}

Trace parse_trace(const std::string& path) {
    bool piped = false;
    FILE* in = open_trace(path, &piped);
    struct Live {
        uint32_t slot;
        uint32_t stream;
        uint64_t bytes;
        uint64_t line;
    };
    std::unordered_map<uint64_t, Live> live;
    std::unordered_map<uint64_t, uint32_t> stream_index;
    std::vector<uint32_t> free_slots;
    Trace t;
    uint64_t live_bytes = 0;
    uint64_t line_no = 0;
    std::string line;
    std::vector<std::string> fields;
    char buf[4096];
    auto fail = [&](const std::string& msg) {
        if (piped) pclose(in); else std::fclose(in);
        die(2, path + ":" + std::to_string(line_no) + ": " + msg);
    };
    while (std::fgets(buf, sizeof buf, in)) {
        size_t len = std::strlen(buf);
        line.assign(buf, len);
        // A line longer than the buffer: refuse (no valid line comes near 4 KiB).
        if (len == sizeof buf - 1 && buf[len - 1] != '\n') {
            ++line_no;
            fail("line longer than 4 KiB");
        }
        ++line_no;
        while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) line.pop_back();
        if (line.empty()) continue;
        if (line_no == 1 && line.rfind("op,", 0) == 0) continue;  // header
        fields.clear();
        size_t start = 0;
        while (true) {
            size_t comma = line.find(',', start);
            fields.push_back(line.substr(start, comma == std::string::npos ? std::string::npos
                                                                            : comma - start));
            if (comma == std::string::npos) break;
            start = comma + 1;
        }
        if (fields.size() != 4) fail("expected 4 fields (op,id,size,stream), got " +
                                     std::to_string(fields.size()));
        bool is_alloc;
        if (fields[0] == "a") is_alloc = true;
        else if (fields[0] == "f") is_alloc = false;
        else fail("bad op \"" + fields[0].substr(0, 16) + "\": expected \"a\" or \"f\"");
        uint64_t id, bytes, stream;
        if (!parse_u64(fields[1], &id)) fail("bad id \"" + fields[1].substr(0, 24) + "\"");
        if (!parse_u64(fields[2], &bytes)) fail("bad size \"" + fields[2].substr(0, 24) + "\"");
        if (!parse_u64(fields[3], &stream))
            fail("bad stream \"" + fields[3].substr(0, 24) + "\"");
        auto si = stream_index.find(stream);
        uint32_t s;
        if (si == stream_index.end()) {
            s = static_cast<uint32_t>(t.streams.size());
            stream_index.emplace(stream, s);
            t.streams.push_back(stream);
        } else {
            s = si->second;
        }
        Event e;
        e.alloc = is_alloc;
        e.stream = s;
        e.bytes = bytes;
        if (is_alloc) {
            if (bytes == 0) fail("allocation of 0 bytes for id " + std::to_string(id));
            auto it = live.find(id);
            if (it != live.end())
                fail("id " + std::to_string(id) + " allocated again while live (allocated at line " +
                     std::to_string(it->second.line) + ")");
            uint32_t slot;
            if (!free_slots.empty()) {
                slot = free_slots.back();
                free_slots.pop_back();
            } else {
                slot = t.slots++;
            }
            live.emplace(id, Live{slot, s, bytes, line_no});
            e.slot = slot;
            t.allocations++;
            live_bytes += bytes;
            t.peak_live_bytes = std::max(t.peak_live_bytes, live_bytes);
        } else {
            auto it = live.find(id);
            if (it == live.end())
                fail("free of unknown id " + std::to_string(id) +
                     " (never allocated, or freed already)");
            if (it->second.bytes != bytes)
                fail("free of id " + std::to_string(id) + " with size " + std::to_string(bytes) +
                     ", but it was allocated with size " + std::to_string(it->second.bytes) +
                     " at line " + std::to_string(it->second.line));
            e.slot = it->second.slot;
            free_slots.push_back(it->second.slot);
            live.erase(it);
            t.frees++;
            live_bytes -= bytes;
        }
        t.events.push_back(e);
    }
    bool read_error = std::ferror(in) != 0;
    int status = piped ? pclose(in) : std::fclose(in);
    if (read_error) die(2, "error reading " + path);
    if (piped && status != 0) die(2, "gzip -dc failed on " + path + " (truncated or corrupt?)");
    if (t.events.empty()) die(2, path + ": no events");
    for (auto& kv : live) {
        t.live_at_end.push_back(kv.second.slot);
        t.live_at_end_stream.push_back(kv.second.stream);
    }
    return t;
}

// ---------------------------------------------------------------------------------------------
// The peers. Each has begin_run (fresh state), alloc/free (the timed calls), end_run (frees
// what the trace left live, synchronises, returns the run's peak reserved bytes).

struct ReplayFailure {
    size_t event;
    std::string message;
};

struct PyTorchPeer {
    bool expandable_config = false;
    size_t expandable_segments_seen = 0;

    PyTorchPeer() {
        int count = 0;
        cuda_check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
        if (count < 1) die(1, "no CUDA device");
        cuda_check(cudaSetDevice(0), "cudaSetDevice(0)");
        namespace A = c10::cuda::CUDACachingAllocator;
        if (A::get() == nullptr) die(1, "c10 CUDA caching allocator is not registered");
        A::init(count);
        // Read back what the allocator will use (it parses PYTORCH_CUDA_ALLOC_CONF /
        // PYTORCH_ALLOC_CONF on first use of its configuration).
        expandable_config =
            c10::CachingAllocator::AcceleratorAllocatorConfig::use_expandable_segments();
    }
    std::string name() const {
        return expandable_config ? "pytorch-expandable" : "pytorch";
    }
    void begin_run() {
        namespace A = c10::cuda::CUDACachingAllocator;
        cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
        A::emptyCache();
        A::resetPeakStats(0);
        A::resetAccumulatedStats(0);
    }
    inline void* alloc(uint64_t bytes, cudaStream_t stream) {
        return c10::cuda::CUDACachingAllocator::raw_alloc_with_stream(bytes, stream);
    }
    inline void free(void* p, cudaStream_t) { c10::cuda::CUDACachingAllocator::raw_delete(p); }
    uint64_t end_run() {
        namespace A = c10::cuda::CUDACachingAllocator;
        cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
        auto stats = A::getDeviceStats(0);
        // Segments are still mapped here (emptyCache below releases them): count the
        // expandable ones in the allocator's own snapshot.
        size_t seen = 0;
        for (const auto& segment : A::snapshot().segments)
            if (segment.is_expandable) ++seen;
        expandable_segments_seen = std::max(expandable_segments_seen, seen);
        A::emptyCache();
        return static_cast<uint64_t>(stats.reserved_bytes[0].peak);
    }
};

struct CudaPoolPeer {
    cudaMemPool_t pool = nullptr;

    CudaPoolPeer() {
        int count = 0;
        cuda_check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
        if (count < 1) die(1, "no CUDA device");
        cuda_check(cudaSetDevice(0), "cudaSetDevice(0)");
        int supported = 0;
        cuda_check(cudaDeviceGetAttribute(&supported, cudaDevAttrMemoryPoolsSupported, 0),
                   "cudaDeviceGetAttribute(MemoryPoolsSupported)");
        if (!supported) die(1, "device 0 does not support memory pools");
    }
    std::string name() const { return "cuda-pool"; }
    void begin_run() {
        cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
        if (pool) {
            cuda_check(cudaMemPoolDestroy(pool), "cudaMemPoolDestroy");
            pool = nullptr;
        }
        cudaMemPoolProps props;
        std::memset(&props, 0, sizeof props);
        props.allocType = cudaMemAllocationTypePinned;
        props.handleTypes = cudaMemHandleTypeNone;
        props.location.type = cudaMemLocationTypeDevice;
        props.location.id = 0;
        cuda_check(cudaMemPoolCreate(&pool, &props), "cudaMemPoolCreate");
        uint64_t threshold = std::numeric_limits<uint64_t>::max();
        cuda_check(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold),
                   "cudaMemPoolSetAttribute(ReleaseThreshold)");
        uint64_t zero = 0;
        cuda_check(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReservedMemHigh, &zero),
                   "cudaMemPoolSetAttribute(ReservedMemHigh)");
    }
    inline void* alloc(uint64_t bytes, cudaStream_t stream) {
        void* p = nullptr;
        cudaError_t err = cudaMallocFromPoolAsync(&p, bytes, pool, stream);
        if (err != cudaSuccess) {
            (void)cudaGetLastError();
            last_error = err;
            return nullptr;
        }
        return p;
    }
    inline void free(void* p, cudaStream_t stream) {
        cudaError_t err = cudaFreeAsync(p, stream);
        if (err != cudaSuccess && last_error == cudaSuccess) last_error = err;
    }
    uint64_t end_run() {
        cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
        if (last_error != cudaSuccess)
            die(1, std::string("cudaFreeAsync failed during the replay: ") +
                       cudaGetErrorName(last_error));
        uint64_t high = 0;
        cuda_check(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReservedMemHigh, &high),
                   "cudaMemPoolGetAttribute(ReservedMemHigh)");
        cuda_check(cudaMemPoolTrimTo(pool, 0), "cudaMemPoolTrimTo");
        return high;
    }
    ~CudaPoolPeer() {
        if (pool) {
            cudaDeviceSynchronize();
            cudaMemPoolDestroy(pool);
        }
    }
    cudaError_t last_error = cudaSuccess;
};

struct RunResult {
    double ns_per_op;
    uint64_t peak_reserved;
};

// One timed run. Throws ReplayFailure on an allocation that fails.
template <class Peer>
RunResult run_once(Peer& peer, const Trace& t, const std::vector<cudaStream_t>& streams,
                   std::vector<void*>& ptrs) {
    peer.begin_run();
    const Event* ev = t.events.data();
    const size_t n = t.events.size();
    void** slots = ptrs.data();
    const cudaStream_t* st = streams.data();
    size_t i = 0;
    std::string error;
    auto t0 = std::chrono::steady_clock::now();
    try {
        for (; i < n; ++i) {
            const Event& e = ev[i];
            if (e.alloc) {
                void* p = peer.alloc(e.bytes, st[e.stream]);
                if (__builtin_expect(p == nullptr, 0)) break;
                slots[e.slot] = p;
            } else {
                peer.free(slots[e.slot], st[e.stream]);
            }
        }
    } catch (const c10::Error& err) {
        error = err.what_without_backtrace();
    } catch (const std::exception& err) {
        error = err.what();
    }
    auto t1 = std::chrono::steady_clock::now();
    if (i < n) {
        if (error.empty()) error = "allocation returned null";
        const Event& e = ev[i];
        throw ReplayFailure{i, "event " + std::to_string(i + 1) + " (" +
                                   (e.alloc ? "allocate " : "free ") +
                                   std::to_string(e.bytes) + " bytes) failed: " + error};
    }
    for (size_t k = 0; k < t.live_at_end.size(); ++k)
        peer.free(slots[t.live_at_end[k]], st[t.live_at_end_stream[k]]);
    uint64_t peak = peer.end_run();
    double ns = std::chrono::duration<double, std::nano>(t1 - t0).count();
    return RunResult{ns / static_cast<double>(n), peak};
}

std::string json_escape(const std::string& s) {
    std::string out;
    for (char c : s) {
        if (c == '"' || c == '\\') { out += '\\'; out += c; }
        else if (static_cast<unsigned char>(c) < 0x20) {
            char b[8];
            std::snprintf(b, sizeof b, "\\u%04x", c);
            out += b;
        } else out += c;
    }
    return out;
}

std::string basename_no_ext(const std::string& path) {
    size_t slash = path.find_last_of('/');
    std::string b = slash == std::string::npos ? path : path.substr(slash + 1);
    for (const char* ext : {".csv.gz", ".gz", ".csv"}) {
        size_t el = std::strlen(ext);
        if (b.size() > el && b.compare(b.size() - el, el, ext) == 0) {
            b.resize(b.size() - el);
            break;
        }
    }
    return b;
}

template <class Peer>
std::string replay(Peer& peer, const Trace& t, const std::string& trace_path, int runs) {
    std::vector<cudaStream_t> streams;
    for (uint64_t v : t.streams) {
        if (v == 0) {
            streams.push_back(nullptr);  // the legacy default stream
        } else {
            cudaStream_t s = nullptr;
            cuda_check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
            streams.push_back(s);
        }
    }
    std::vector<void*> ptrs(t.slots, nullptr);
    std::vector<RunResult> results;
    for (int r = 0; r < runs; ++r) {
        try {
            results.push_back(run_once(peer, t, streams, ptrs));
        } catch (const ReplayFailure& f) {
            die(1, peer.name() + " on " + trace_path + ": " + f.message);
        }
    }
    std::vector<double> sorted;
    for (auto& r : results) sorted.push_back(r.ns_per_op);
    std::sort(sorted.begin(), sorted.end());
    double median = sorted.size() % 2 ? sorted[sorted.size() / 2]
                                      : 0.5 * (sorted[sorted.size() / 2 - 1] +
                                               sorted[sorted.size() / 2]);
    uint64_t peak = 0;
    for (auto& r : results) peak = std::max(peak, r.peak_reserved);

    cudaDeviceProp prop;
    std::string device = "unknown";
    if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) device = prop.name;

    std::string out = "{\"allocator\":\"" + json_escape(peer.name()) + "\"";
    out += ",\"trace\":\"" + json_escape(basename_no_ext(trace_path)) + "\"";
    out += ",\"ops\":" + std::to_string(t.events.size());
    char b[64];
    std::snprintf(b, sizeof b, "%.1f", median);
    out += ",\"ns_per_op_median\":" + std::string(b);
    out += ",\"ns_per_op_runs\":[";
    for (size_t k = 0; k < results.size(); ++k) {
        std::snprintf(b, sizeof b, "%s%.1f", k ? "," : "", results[k].ns_per_op);
        out += b;
    }
    out += "]";
    out += ",\"peak_reserved_bytes\":" + std::to_string(peak);
    out += ",\"peak_live_bytes\":" + std::to_string(t.peak_live_bytes);
    std::snprintf(b, sizeof b, "%.4f",
                  t.peak_live_bytes ? double(peak) / double(t.peak_live_bytes) : 0.0);
    out += ",\"ratio\":" + std::string(b);
    out += ",\"peak_reserved_bytes_runs\":[";
    for (size_t k = 0; k < results.size(); ++k)
        out += (k ? "," : "") + std::to_string(results[k].peak_reserved);
    out += "]";
    out += ",\"allocations\":" + std::to_string(t.allocations);
    out += ",\"frees\":" + std::to_string(t.frees);
    out += ",\"streams\":" + std::to_string(t.streams.size());
    out += ",\"runs\":" + std::to_string(runs);
    out += ",\"device\":\"" + json_escape(device) + "\"";
    if constexpr (std::is_same<Peer, PyTorchPeer>::value) {
        const char* conf = std::getenv("PYTORCH_CUDA_ALLOC_CONF");
        if (!conf) conf = std::getenv("PYTORCH_ALLOC_CONF");
        out += ",\"alloc_conf\":\"" + json_escape(conf ? conf : "") + "\"";
        out += ",\"expandable_segments_seen\":" + std::to_string(peer.expandable_segments_seen);
    }
    out += "}";
    for (cudaStream_t s : streams)
        if (s) cudaStreamDestroy(s);
    return out;
}

void usage() {
    std::fprintf(stderr,
                 "usage: replay_peers (pytorch|cuda-pool) TRACE [--runs R] [--parse-only]\n"
                 "  pytorch reads PYTORCH_CUDA_ALLOC_CONF (e.g. expandable_segments:True)\n");
    std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 3) usage();
    std::string which = argv[1];
    std::string path = argv[2];
    int runs = 5;
    bool parse_only = false;
    for (int i = 3; i < argc; ++i) {
        std::string a = argv[i];
        if (a == "--runs" && i + 1 < argc) {
            uint64_t r;
            if (!parse_u64(argv[++i], &r) || r < 1 || r > 1000) die(2, "bad --runs value");
            runs = static_cast<int>(r);
        } else if (a == "--parse-only") {
            parse_only = true;
        } else {
            usage();
        }
    }
    if (which != "pytorch" && which != "cuda-pool")
        die(2, "unknown allocator \"" + which + "\": expected pytorch or cuda-pool");
    Trace t = parse_trace(path);
    if (parse_only) {
        std::printf("{\"trace\":\"%s\",\"ops\":%zu,\"allocations\":%" PRIu64
                    ",\"frees\":%" PRIu64 ",\"slots\":%u,\"streams\":%zu,"
                    "\"peak_live_bytes\":%" PRIu64 "}\n",
                    json_escape(basename_no_ext(path)).c_str(), t.events.size(), t.allocations,
                    t.frees, t.slots, t.streams.size(), t.peak_live_bytes);
        return 0;
    }
    try {
        if (which == "pytorch") {
            PyTorchPeer peer;
            const char* conf = std::getenv("PYTORCH_CUDA_ALLOC_CONF");
            if (!conf) conf = std::getenv("PYTORCH_ALLOC_CONF");
            bool asked = conf && std::strstr(conf, "expandable_segments:True");
            if (asked && !peer.expandable_config)
                die(1, "PYTORCH_CUDA_ALLOC_CONF asks for expandable segments but the allocator "
                       "configuration reads them as off");
            std::string line = replay(peer, t, path, runs);
            if (asked && peer.expandable_segments_seen == 0)
                die(1, "expandable segments were asked for but the allocator made none");
            if (!asked && peer.expandable_segments_seen != 0)
                die(1, "the allocator made expandable segments though none were asked for");
            std::printf("%s\n", line.c_str());
        } else {
            CudaPoolPeer peer;
            std::string line = replay(peer, t, path, runs);
            std::printf("%s\n", line.c_str());
        }
        std::fflush(stdout);
        return 0;
    } catch (const c10::Error& err) {
        die(1, std::string("c10 error: ") + err.what_without_backtrace());
    } catch (const std::exception& err) {
        die(1, std::string("error: ") + err.what());
    }
}

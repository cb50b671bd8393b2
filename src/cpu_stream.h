// Private to the CPU sources: streaming (non-temporal) stores for outputs larger than the
// last-level cache, shared by the op families' elementwise passes.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__)
#include <emmintrin.h>
#endif
#include <sys/mman.h>
#include <unistd.h>

namespace normkit::cpu {

// Non-temporal ("streaming") stores write an output straight to memory instead of first reading
// each line into cache (write-allocate), a third less traffic for y = f(x), a quarter for
// dx = f(dy, x). Worth it only when the op's data is larger than the share of the last-level cache
// it can count on, so that the output would be evicted before anyone reads it. SSE2 16-byte
// stores exist in every x86-64 clone; the write-combining buffers merge them into whole lines.
#if defined(__x86_64__)
template <class T>
constexpr bool kCanStream = std::is_same_v<T, float> || std::is_same_v<T, double>;
#else
template <class T>
constexpr bool kCanStream = false;
#endif

// Streaming stores write whole 64-byte cache lines only: callers store ordinarily up to the first
// address that is a multiple of kStreamAlign, stream whole vectors (one or two lines each) from
// there, and store the tail ordinarily. A line written partly by streaming stores (from a
// misaligned start, or where a row ends mid-line next to another row's ordinarily stored head)
// costs a partial write-combining flush: batch norm on (64,256,14,14) ran 4.8 ms against 1.0 (all
// streamed, NORMKIT_STREAM_MIN_BYTES=8388608). And _mm_stream_si128 faults on an address that is
// not a multiple of 16. (A pointer not even aligned to its item size never reaches the alignment:
// everything is then stored ordinarily.)
constexpr uintptr_t kStreamAlign = 64;

template <class T, class V>
inline __attribute__((always_inline)) void stream_store(T* dst, const V& value) {
#if defined(__x86_64__)
  for (size_t j = 0; j < sizeof value / 16; ++j) {
    __m128i part;
    std::memcpy(&part, reinterpret_cast<const char*>(&value) + 16 * j, 16);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst) + j, part);
  }
#else
  std::memcpy(dst, &value, sizeof value);
#endif
}

inline void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();  // streaming stores are weakly ordered: publish them before the threads join
#endif
}

// The last-level cache of the CPU this process runs on. Linux's sysfs first: in a virtual machine,
// sysconf can report the host's whole L3 (384 MiB here) rather than the slice this CPU shares.
inline int64_t last_level_cache_bytes() {
  if (std::FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
    long kib = 0;
    const bool ok = std::fscanf(f, "%ldK", &kib) == 1 && kib > 0;
    std::fclose(f);
    if (ok) return int64_t(kib) << 10;
  }
  const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
  return l3 > 0 ? int64_t(l3) : int64_t(32) << 20;
}

// Whether an op moving `bytes` should stream its output: more than a quarter of the last-level
// cache, or than NORMKIT_STREAM_MIN_BYTES if set (read once; for tuning, and for tests of the
// streaming path). Not the whole cache: it is shared with every other core of the chip, and in a
// virtual machine with other guests' cores too, which neither sysfs nor cpuid counts (a 2-core
// guest on a 105 MiB Sapphire Rapids L3 reports the whole L3 as shared by its 2 cores). glibc's
// memcpy likewise streams copies far below the cache's size (there, glibc 2.36: copies over
// 41 MiB). On that guest instance norm on (32,64,56,56) float32 (x + y = 51 MB) ran 2.8-3.2 ms
// without streaming and 1.6-2.2 ms with it, forward and backward 7.0-7.9 against 4.4-5.9 ms
// (benchmarks/bench_instancenorm.py, the two alternating in separate processes).
//
// And only into an output whose first page is already mapped in (`out`; null: false). A fresh
// mapping (glibc serves every allocation over 32 MiB, and smaller ones after a trim, with new
// pages) is zero-filled by the kernel at each page's first touch, which leaves its lines in cache;
// a streaming store must then evict the line before writing around the cache. Instance norm's
// channels-last forward on (2,32,48,64,64), whose 50 MB output is always fresh, ran 15-20 ms
// streamed against 11-13 ms with plain stores (alternating processes; under a heavier load of the
// host later, both ran 19-24 ms); into reused memory streaming won (group norm's elementwise
// backward on the same shape, 5.1 against 6.6 ms).
// NORMKIT_STREAM_MIN_BYTES skips that check too, so that the tests' small outputs take the path.
inline bool should_stream(int64_t bytes, const void* out) {
  static const char* env = std::getenv("NORMKIT_STREAM_MIN_BYTES");
  static const bool forced = env && *env;
  static const int64_t threshold =
      forced ? int64_t(std::strtoll(env, nullptr, 10)) : last_level_cache_bytes() / 4;
  if (bytes <= threshold || out == nullptr) return false;
  if (forced) return true;
  static const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  unsigned char mapped = 0;
  void* first = reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(out) & ~(page - 1));
  return mincore(first, page, &mapped) == 0 && (mapped & 1);
}

}  // namespace normkit::cpu

// Work split for kernels that sum per-worker partial results (weight gradients): the partial buffers belong to
// contiguous slots of the work, not to thread ids.
//
// A buffer per at::get_thread_num() is only safe when the threads running a parallel_for are the ones
// at::get_num_threads() counts. That fails when the extension is built against another OpenMP runtime than torch's
// (clang links libomp while torch runs libgomp: torch.set_num_threads changes only libgomp, so libomp may start more
// threads than there are buffers), and with other ATen parallel backends, which may hand one thread several ranges.
// Slots are runtime-independent: slot s owns buffer s, whichever thread runs it. With torch's OpenMP backend the
// slots are exactly the ranges at::parallel_for(0, n) would give each thread, so the sums keep their order.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace ops_dscn {

// Number of partial buffers for n work items: one per thread that can get work, at least one.
inline int64_t parallel_slots_for(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
}

// Calls body(slot, begin, end) for `slots` contiguous ranges of [0, n) (ceil(n / slots) items each; empty ranges are
// skipped), in parallel. A slot's range and buffer are used by one call only.
template <typename Body>
void parallel_over_slots(int64_t n, int64_t slots, const Body& body) {
  if (n <= 0) return;
  const int64_t chunk = (n + slots - 1) / slots;
  at::parallel_for(0, slots, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t begin = s * chunk, end = std::min(n, begin + chunk);
      if (begin < end) body(s, begin, end);
    }
  });
}

}  // namespace ops_dscn

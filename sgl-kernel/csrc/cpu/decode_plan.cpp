#include "decode_plan.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>

namespace sgl_kernel {
namespace {

// How many parts each request's own positions are split into, so that short batches still give
// every thread work; parts are at least kMinPart positions (below that, merging costs more).
int64_t num_parts(int64_t tasks, int64_t max_len) {
  constexpr int64_t kMinPart = 64;
  const int64_t want = (4 * at::get_num_threads() + tasks - 1) / tasks;
  return std::max<int64_t>(1, std::min(want, (max_len + kMinPart - 1) / kMinPart));
}

// Chunks a shared prefix of `len` positions is cut into: enough chunk tasks for every thread
// (4 each, over all groups and kv heads), none shorter than kMinChunk positions, none longer
// than kMaxChunk (its packed K and V must stay in L2 while every row reads them).
int64_t num_chunks(int64_t len, int64_t tasks) {
  constexpr int64_t kMinChunk = 64, kMaxChunk = 512;
  const int64_t want = (4 * at::get_num_threads() + tasks - 1) / tasks;
  const int64_t most = (len + kMinChunk - 1) / kMinChunk;
  return std::max((len + kMaxChunk - 1) / kMaxChunk, std::min(want, most));
}

// Checks the groups, then lists each group's members (in batch order) and where each request's
// own positions start.
void group_members(DecodePlan& plan, const int64_t* lens, int64_t B, const int64_t* group_of,
                   const int64_t* prefix, int64_t G) {
  plan.start.assign(B, 0);
  plan.member_start.assign(G + 1, 0);
  for (int64_t b = 0; group_of != nullptr && b < B; ++b) {
    const int64_t g = group_of[b];
    TORCH_CHECK(g >= -1 && g < G, "group_of[", b, "] is ", g, "; groups are -1 (none) or 0..",
                G - 1);
    if (g < 0) continue;
    TORCH_CHECK(prefix[g] >= 0 && prefix[g] < lens[b], "group ", g, "'s prefix of ", prefix[g],
                " tokens is not shorter than request ", b, "'s ", lens[b], " tokens");
    plan.start[b] = prefix[g];
    ++plan.member_start[g + 1];
  }
  for (int64_t g = 0; g < G; ++g) plan.member_start[g + 1] += plan.member_start[g];
  plan.members.resize(plan.member_start[G]);
  std::vector<int64_t> fill(plan.member_start.begin(), plan.member_start.end() - 1);
  for (int64_t b = 0; group_of != nullptr && b < B; ++b) {
    if (group_of[b] >= 0) plan.members[fill[group_of[b]]++] = b;
  }
}

// The chunk tasks of every group, heaviest first (so that the threads end together); returns
// how many chunks each group's prefix has.
std::vector<int64_t> cut_chunks(DecodePlan& plan, const int64_t* prefix, int64_t G, int64_t Hkv,
                                int group) {
  std::vector<int64_t> chunks(G, 0);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t n = plan.member_start[g + 1] - plan.member_start[g];
    if (n == 0 || prefix[g] == 0) continue;
    const int64_t c = chunks[g] = num_chunks(prefix[g], G * Hkv);
    plan.most_rows = std::max(plan.most_rows, n * group);
    for (int64_t h = 0; h < Hkv; ++h) {
      for (int64_t i = 0; i < c; ++i) {  // balanced: never empty, as c <= prefix[g]
        const int64_t lo = prefix[g] * i / c, hi = prefix[g] * (i + 1) / c;
        plan.chunks.push_back({g, h, lo, hi, i});
        plan.longest_chunk = std::max(plan.longest_chunk, hi - lo);
      }
    }
  }
  auto work = [&](const DecodePlan::Chunk& c) {  // rows x keys
    return (plan.member_start[c.group + 1] - plan.member_start[c.group]) * (c.hi - c.lo);
  };
  std::stable_sort(plan.chunks.begin(), plan.chunks.end(),
                   [&](const auto& a, const auto& b) { return work(a) > work(b); });
  return chunks;
}

}  // namespace

DecodePlan plan_decode(const int64_t* lens, int64_t B, int64_t Hkv, int group,
                       const int64_t* group_of, const int64_t* prefix, int64_t G) {
  DecodePlan plan;
  plan.heads = Hkv * group;
  group_members(plan, lens, B, group_of, prefix, G);
  int64_t max_own = 0;
  for (int64_t b = 0; b < B; ++b) max_own = std::max(max_own, lens[b] - plan.start[b]);
  plan.parts = num_parts(B * Hkv, max_own);
  const std::vector<int64_t> chunks = cut_chunks(plan, prefix, G, Hkv, group);
  plan.pieces.resize(B);
  plan.first.resize(B);
  int64_t next = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t g = group_of != nullptr ? group_of[b] : -1;
    plan.pieces[b] = (g >= 0 ? chunks[g] : 0) + plan.parts;
    plan.first[b] = next;
    next += plan.heads * plan.pieces[b];
  }
  return plan;
}

}  // namespace sgl_kernel

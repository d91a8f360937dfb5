// The work plan of one decode step, plain or cascade: its tasks and where each leaves its
// partial results. attention.cpp runs the tasks and merges the results.
#pragma once

#include <cstdint>
#include <vector>

namespace sgl_kernel {

// How one decode step is cut into tasks. Request b's context is its group's shared prefix
// [0, P) (empty for plain decode and for requests outside any group), then its own positions:
//
//   | chunk 0 | chunk 1 | ... | part 0 | part 1 | ... |
//   0                        P                        len_b
//
// A chunk task covers one chunk and one kv head for every member of the group at once; a part
// task one part and one kv head of one request. Each piece leaves one partial record
// (m, l, acc[Dv]) per query head, all merged by log-sum-exp:
//
//   record(b, head, piece) = first[b] + head * pieces[b] + piece,   chunks first, then parts
struct DecodePlan {
  struct Chunk {
    int64_t group, h, lo, hi, piece;
  };
  int64_t heads = 0;                  // query heads per request
  int64_t parts = 1;                  // own parts per request
  std::vector<int64_t> start;         // [B] first own position: the group's prefix, or 0
  std::vector<int64_t> pieces;        // [B] records per (request, head): chunks, then parts
  std::vector<int64_t> first;         // [B] record of (b, head 0, piece 0)
  std::vector<int64_t> members;       // requests by group, in batch order
  std::vector<int64_t> member_start;  // [G + 1] the group's range in `members`
  std::vector<Chunk> chunks;          // the chunk tasks, most work (rows x keys) first
  int64_t longest_chunk = 0;
  int64_t most_rows = 0;              // members x GQA heads of the largest group

  int64_t record(int64_t b, int64_t head, int64_t piece) const {
    return first[b] + head * pieces[b] + piece;
  }
  int64_t records() const { return first.empty() ? 0 : record(first.size() - 1, heads, 0); }
};

// The plan for B requests of lengths `lens` over Hkv kv heads of `group` query heads each.
// Cascade: group_of[b] in [-1, G) and prefix[g] = P_g (checked: P_g < lens[b] of each member);
// plain decode passes group_of = nullptr and G = 0.
DecodePlan plan_decode(const int64_t* lens, int64_t B, int64_t Hkv, int group,
                       const int64_t* group_of, const int64_t* prefix, int64_t G);

}  // namespace sgl_kernel

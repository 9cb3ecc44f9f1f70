#include <algorithm>

#include "ops.h"

namespace pearl::ops {

namespace {

// Every output element is computed exactly as dot() computes it (16 lanes, lane k summing the
// products with i % 16 == k in increasing i, then dot()'s pairwise tree, then the tail in order). So a
// result depends neither on which rows and columns share a tile nor on the instruction set of the
// clone that runs: lanes only see IEEE multiplies and adds, and the build forbids fusing them (no FMA).
constexpr int kLanes = 16;
using Lanes = float __attribute__((vector_size(kLanes * sizeof(float))));
// The same vector read from any float address.
using UnalignedLanes = float __attribute__((vector_size(kLanes * sizeof(float)), aligned(alignof(float)), may_alias));

// A tile is kTileRows rows of x against kTileColumns rows of W: each W vector loaded feeds kTileRows
// accumulators, so a step of several rows reads the weights once instead of once per row. 4 x 4
// accumulators plus the loaded vectors fit in the 32 AVX-512 registers.
constexpr int kTileRows = 4;
constexpr int kTileColumns = 4;
constexpr int kTileOutputs = kTileRows * kTileColumns;
static_assert(kTileOutputs == kLanes, "the tile's reduction packs one result per lane");

// Weights stream from L3 or memory once per step, and a tile's four short row streams are too brief for
// the hardware prefetcher: while the first row block of a tile runs, the tile this many ahead is
// requested. Without it a step spends as long waiting for weights as multiplying them.
constexpr int kPrefetchTiles = 2;

// Folds 16 accumulators through dot()'s tree together: lane t of `sums` is accumulator t reduced to one
// value. Each lane addition is one of dot()'s (a + b and b + a are the same float), but 8 + 4 + 2 + 1
// vector additions replace 16 separate horizontal reductions.
[[gnu::always_inline]] inline void reduce_tile(const Lanes (&acc)[kTileOutputs], Lanes& sums) {
  Lanes halves[8];
  for (int p = 0; p < 8; ++p) {
    const Lanes& a = acc[2 * p];
    const Lanes& b = acc[2 * p + 1];
    halves[p] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  Lanes quarters[4];
  for (int p = 0; p < 4; ++p) {
    const Lanes& a = halves[2 * p];
    const Lanes& b = halves[2 * p + 1];
    quarters[p] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
                  __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  }
  Lanes pairs[2];
  for (int p = 0; p < 2; ++p) {
    const Lanes& a = quarters[2 * p];
    const Lanes& b = quarters[2 * p + 1];
    pairs[p] = __builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
               __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  }
  sums = __builtin_shufflevector(pairs[0], pairs[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(pairs[0], pairs[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

struct Operands {
  const float* x;
  int in;
  const float* weight;
  const float* bias;
  int out;
  float* y;
};

// Rows [row, row + Rows) against columns [column, column + Columns). Full tiles and remainders are all
// instances of this template, so every output element goes through the same arithmetic; a remainder
// tile merely leaves some accumulators (and their lanes of the reduction) unused. `prefetch`, when not
// null, is a tile of W to request from memory on the way.
template <int Rows, int Columns>
[[gnu::always_inline]] inline void tile(const Operands& op, int row, int column, const float* prefetch) {
  const float* x_rows[Rows];
  const float* w_rows[Columns];
  for (int r = 0; r < Rows; ++r) x_rows[r] = op.x + static_cast<int64_t>(row + r) * op.in;
  for (int c = 0; c < Columns; ++c) w_rows[c] = op.weight + static_cast<int64_t>(column + c) * op.in;

  Lanes acc[kTileOutputs] = {};
  int i = 0;
  for (; i + kLanes <= op.in; i += kLanes) {
    Lanes w[Columns];
    for (int c = 0; c < Columns; ++c) w[c] = *reinterpret_cast<const UnalignedLanes*>(w_rows[c] + i);
    if (prefetch != nullptr) {
      for (int c = 0; c < Columns; ++c) __builtin_prefetch(prefetch + static_cast<int64_t>(c) * op.in + i);
    }
    for (int r = 0; r < Rows; ++r) {
      const Lanes x_lanes = *reinterpret_cast<const UnalignedLanes*>(x_rows[r] + i);
      for (int c = 0; c < Columns; ++c) acc[r * kTileColumns + c] += x_lanes * w[c];
    }
  }
  Lanes sums;
  reduce_tile(acc, sums);

  for (int r = 0; r < Rows; ++r) {
    float* y_row = op.y + static_cast<int64_t>(row + r) * op.out + column;
    for (int c = 0; c < Columns; ++c) {
      float sum = sums[r * kTileColumns + c];
      for (int t = i; t < op.in; ++t) sum += x_rows[r][t] * w_rows[c][t];
      y_row[c] = op.bias != nullptr ? sum + op.bias[column + c] : sum;
    }
  }
}

// Every row against columns [column, column + Columns): the weight tile stays in L1 while the row
// blocks pass over it.
template <int Columns>
[[gnu::always_inline]] inline void column_tile(const Operands& op, int rows, int column) {
  const int ahead = column + kPrefetchTiles * kTileColumns;
  const float* prefetch = ahead + Columns <= op.out ? op.weight + static_cast<int64_t>(ahead) * op.in : nullptr;
  int row = 0;
  for (; row + kTileRows <= rows; row += kTileRows) {
    tile<kTileRows, Columns>(op, row, column, prefetch);
    prefetch = nullptr;
  }
  switch (rows - row) {
    case 3: tile<3, Columns>(op, row, column, prefetch); break;
    case 2: tile<2, Columns>(op, row, column, prefetch); break;
    case 1: tile<1, Columns>(op, row, column, prefetch); break;
    default: break;
  }
}

// Columns [first, last) for every row. On x86-64 Linux this is compiled once per instruction set and
// the loader picks the widest the CPU has (the build itself targets baseline x86-64); all clones give
// the same bits.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void matmul_columns(const Operands& op, int rows, int first, int last) {
  int column = first;
  for (; column + kTileColumns <= last; column += kTileColumns) column_tile<kTileColumns>(op, rows, column);
  switch (last - column) {
    case 3: column_tile<3>(op, rows, column); break;
    case 2: column_tile<2>(op, rows, column); break;
    case 1: column_tile<1>(op, rows, column); break;
    default: break;
  }
}

}  // namespace

void matmul(const float* x, int rows, int in, const float* weight, const float* bias, int out, float* y,
            ThreadPool& pool) {
  const Operands op{x, in, weight, bias, out, y};
  // Threads take contiguous runs of column tiles (never part of a reduction), each worth enough
  // multiply-adds to pay for waking a thread.
  const int64_t num_tiles = (out + kTileColumns - 1) / kTileColumns;
  const int64_t macs_per_tile = static_cast<int64_t>(rows) * in * kTileColumns;
  const int64_t min_tiles_per_thread = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, macs_per_tile));
  pool.parallel_for(num_tiles, min_tiles_per_thread, [&](int64_t first_tile, int64_t last_tile) {
    matmul_columns(op, rows, static_cast<int>(first_tile * kTileColumns),
                   static_cast<int>(std::min<int64_t>(out, last_tile * kTileColumns)));
  });
}

}  // namespace pearl::ops

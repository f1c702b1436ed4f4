// Host emulation of csrc/attention/device_utils.cuh, for testing the real kernel
// templates without a GPU (see emulator.cpp).
//
// It replaces the device header of the same name when the kernels are compiled by
// the host compiler: CUDA keywords become plain C++, each CUDA thread is a fiber
// (fibers.h), and the warp-wide instructions (ldmatrix, mma.sync, shuffles) are
// collectives in which every lane posts its operands and waits for the whole warp;
// the last to arrive computes every lane's result from the PTX ISA's fragment
// layouts, and each lane takes its own. The definitions here
// are written from the PTX specification independently of the kernels, so a lane
// address or fragment index that the kernels get wrong gives wrong numbers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "fibers.h"

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__

using std::max;
using std::min;

// The built-in variables: per fiber for the thread and block index, per launch for the sizes.
#define threadIdx (pk::emulation::current.thread_index)
#define blockIdx (pk::emulation::current.block_index)
inline dim3 gridDim;
inline dim3 blockDim;

namespace pk::emulation {

// What one warp's lanes share: a barrier, one slot of operands and one of results per lane.
struct Warp {
  Barrier arrive{32};
  alignas(16) unsigned char slots[32][64];
  alignas(16) unsigned char results[32][64];
};

inline Barrier* block_barrier = nullptr;  // of the block being run

// Every lane posts `mine` (all of its operands); the last lane to arrive runs
// compute(operand, result) once for the warp, where operand(l) is lane l's posted
// value and result(l, value) sets lane l's result; then each lane returns its own.
// Operands are consumed before any lane is released, and a lane's result is read
// before it can arrive at the next collective, so one rendezvous a collective suffices.
template <typename Out, typename In, typename Compute>
Out warp_collective(const In& mine, Compute compute) {
  static_assert(sizeof(In) <= 64 && sizeof(Out) <= 64, "operands and results must fit a slot");
  Warp& warp = *current.warp;
  const int lane = current.lane;
  std::memcpy(warp.slots[lane], &mine, sizeof(In));
  warp.arrive.arrive_and_wait([&] {
    auto operand = [&](int source) {
      In value;
      std::memcpy(&value, warp.slots[source], sizeof(In));
      return value;
    };
    auto result = [&](int target, const Out& value) { std::memcpy(warp.results[target], &value, sizeof(Out)); };
    compute(operand, result);
  });
  Out out;
  std::memcpy(&out, warp.results[lane], sizeof(Out));
  return out;
}

inline uint16_t bits(const void* row, int column) {
  uint16_t value;
  std::memcpy(&value, static_cast<const unsigned char*>(row) + 2 * column, 2);
  return value;
}

inline uint32_t pair_bits(uint16_t low, uint16_t high) { return low | (static_cast<uint32_t>(high) << 16); }

template <typename T>
float b16_to_float(uint16_t x) {
  T value;
  std::memcpy(static_cast<void*>(&value), &x, 2);
  return static_cast<float>(value);
}

}  // namespace pk::emulation

inline void __syncthreads() { pk::emulation::block_barrier->arrive_and_wait(); }

struct ShuffleOperand {
  float x;
  int lane;  // source lane (__shfl_sync) or lane mask (__shfl_xor_sync)
};

inline float __shfl_sync(unsigned, float x, int source) {
  return pk::emulation::warp_collective<float>(ShuffleOperand{x, source}, [](auto operand, auto result) {
    for (int l = 0; l < 32; ++l) result(l, operand(operand(l).lane & 31).x);
  });
}

inline float __shfl_xor_sync(unsigned, float x, int lane_mask) {
  return pk::emulation::warp_collective<float>(ShuffleOperand{x, lane_mask}, [](auto operand, auto result) {
    for (int l = 0; l < 32; ++l) result(l, operand((l ^ operand(l).lane) & 31).x);
  });
}

namespace pk {

struct FourRegisters {
  uint32_t r[4];
};

// ldmatrix .x4: lane i addresses row i % 8 of matrix i / 8; lane l receives, in
// register j, elements (row l / 4, columns 2 (l % 4) and +1) of matrix j.
inline void ldmatrix_x4(uint32_t (&regs)[4], const void* smem_row) {
  const auto out = emulation::warp_collective<FourRegisters>(smem_row, [](auto operand, auto result) {
    for (int lane = 0; lane < 32; ++lane) {
      FourRegisters o;
      for (int j = 0; j < 4; ++j) {
        const void* row = operand(8 * j + lane / 4);
        o.r[j] = emulation::pair_bits(emulation::bits(row, 2 * (lane % 4)), emulation::bits(row, 2 * (lane % 4) + 1));
      }
      result(lane, o);
    }
  });
  for (int j = 0; j < 4; ++j) regs[j] = out.r[j];
}

// ldmatrix .x4 .trans: lane l receives elements (rows 2 (l % 4) and +1, column l / 4)
// of matrix j.
inline void ldmatrix_x4_trans(uint32_t (&regs)[4], const void* smem_row) {
  const auto out = emulation::warp_collective<FourRegisters>(smem_row, [](auto operand, auto result) {
    for (int lane = 0; lane < 32; ++lane) {
      FourRegisters o;
      for (int j = 0; j < 4; ++j) {
        const void* first = operand(8 * j + 2 * (lane % 4));
        const void* second = operand(8 * j + 2 * (lane % 4) + 1);
        o.r[j] = emulation::pair_bits(emulation::bits(first, lane / 4), emulation::bits(second, lane / 4));
      }
      result(lane, o);
    }
  });
  for (int j = 0; j < 4; ++j) regs[j] = out.r[j];
}

// mma.sync.m16n8k16.row.col with fp32 accumulation. With g = lane / 4, t = lane % 4:
// A regs hold (g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..); B regs hold
// (k = 2t..2t+1, n = g) and (k = 2t+8..2t+9, n = g); C/D hold (g, 2t..2t+1) and
// (g+8, 2t..2t+1). The low half of a register is the lower column (row for B).
template <typename T>
inline void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  struct In { uint32_t a[4]; uint32_t b[2]; float c[4]; };
  struct Out { float d[4]; };
  In mine{{a[0], a[1], a[2], a[3]}, {b0, b1}, {d[0], d[1], d[2], d[3]}};
  const Out out = emulation::warp_collective<Out>(mine, [](auto operand, auto result) {
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
      const In in = operand(l);
      const int g = l / 4, t = l % 4;
      auto low = [](uint32_t r) { return emulation::b16_to_float<T>(static_cast<uint16_t>(r & 0xffff)); };
      auto high = [](uint32_t r) { return emulation::b16_to_float<T>(static_cast<uint16_t>(r >> 16)); };
      const int a_rows[4] = {g, g + 8, g, g + 8};
      const int a_cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
      for (int r = 0; r < 4; ++r) {
        A[a_rows[r]][a_cols[r]] = low(in.a[r]);
        A[a_rows[r]][a_cols[r] + 1] = high(in.a[r]);
      }
      B[2 * t][g] = low(in.b[0]);
      B[2 * t + 1][g] = high(in.b[0]);
      B[2 * t + 8][g] = low(in.b[1]);
      B[2 * t + 9][g] = high(in.b[1]);
      C[g][2 * t] = in.c[0];
      C[g][2 * t + 1] = in.c[1];
      C[g + 8][2 * t] = in.c[2];
      C[g + 8][2 * t + 1] = in.c[3];
    }
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane / 4, t = lane % 4;
      const int rows[4] = {g, g, g + 8, g + 8};
      const int cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
      Out o;
      for (int e = 0; e < 4; ++e) {
        float sum = C[rows[e]][cols[e]];
        for (int k = 0; k < 16; ++k) sum += A[rows[e]][k] * B[k][cols[e]];
        o.d[e] = sum;
      }
      result(lane, o);
    }
  });
  for (int e = 0; e < 4; ++e) d[e] = out.d[e];
}

template <typename T>
inline uint32_t pack_pair(float first, float second) {
  const T low = static_cast<T>(first);
  const T high = static_cast<T>(second);
  uint16_t low_bits, high_bits;
  std::memcpy(&low_bits, &low, 2);
  std::memcpy(&high_bits, &high, 2);
  return emulation::pair_bits(low_bits, high_bits);
}

template <typename T>
inline float to_float(T x) {
  return static_cast<float>(x);
}

template <typename T>
inline T from_float(float x) {
  return static_cast<T>(x);
}

// cp.async completes at once here; commit and wait have nothing left to do.
inline void cp_async_16(void* smem, const void* global) { std::memcpy(smem, global, 16); }
inline void cp_async_commit() {}
inline void cp_async_wait_all() {}

}  // namespace pk

#include "warp_reductions.cuh"

// Cooperative threads for the host emulation: every CUDA thread of a block is a fiber
// (ucontext) on one OS thread, and a barrier is where a fiber yields until all the
// fibers it waits for have arrived. Switching fibers costs far less than switching OS
// threads, which matters when every shuffle and MMA is a warp-wide rendezvous.
#pragma once

#include <ucontext.h>
#include <vector_types.h>

#include <functional>
#include <memory>
#include <vector>

namespace pk::emulation {

struct Warp;

// The per-thread state a kernel sees (threadIdx, the warp, the lane); the scheduler
// swaps it in and out with the fiber.
struct ThreadState {
  uint3 thread_index{};
  uint3 block_index{};
  Warp* warp = nullptr;
  int lane = 0;
};

struct Fiber {
  ucontext_t context{};
  std::unique_ptr<char[]> stack;
  ThreadState state;
  bool done = false;
};

inline ucontext_t scheduler_context;
inline Fiber* current_fiber = nullptr;
inline ThreadState current;  // the running fiber's state

inline void yield() {
  Fiber* me = current_fiber;
  me->state = current;
  swapcontext(&me->context, &scheduler_context);
  current = me->state;
}

class Barrier {
 public:
  explicit Barrier(int expected) : expected_(expected) {}

  void arrive_and_wait() {
    const unsigned generation = generation_;
    if (++arrived_ == expected_) {
      arrived_ = 0;
      ++generation_;
      return;
    }
    while (generation_ == generation) yield();
  }

 private:
  int expected_;
  int arrived_ = 0;
  unsigned generation_ = 0;
};

inline std::function<void()>* fiber_body = nullptr;

inline void fiber_entry() {
  (*fiber_body)();
  current_fiber->done = true;
}

// Runs `body` as `count` fibers (state i starts as initial[i]) until all have returned.
inline void run_fibers(const std::vector<ThreadState>& initial, std::function<void()> body) {
  constexpr size_t kStackBytes = 256 * 1024;
  std::vector<Fiber> fibers(initial.size());
  fiber_body = &body;
  for (size_t i = 0; i < fibers.size(); ++i) {
    Fiber& fiber = fibers[i];
    fiber.stack.reset(new char[kStackBytes]);
    fiber.state = initial[i];
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = fiber.stack.get();
    fiber.context.uc_stack.ss_size = kStackBytes;
    fiber.context.uc_link = &scheduler_context;
    makecontext(&fiber.context, fiber_entry, 0);
  }
  for (bool running = true; running;) {
    running = false;
    for (Fiber& fiber : fibers) {
      if (fiber.done) continue;
      running = true;
      current_fiber = &fiber;
      current = fiber.state;
      swapcontext(&scheduler_context, &fiber.context);
      if (!fiber.done) fiber.state = current;
    }
  }
}

}  // namespace pk::emulation

// Cooperative threads for the host emulation: every CUDA thread of a block is a fiber
// on one OS thread, and a barrier is where a fiber yields until all the fibers it waits
// for have arrived. Switching fibers costs far less than switching OS threads, which
// matters when every shuffle and MMA is a warp-wide rendezvous. On x86-64 a switch is a
// few instructions (below); elsewhere it is ucontext's swapcontext, which also saves the
// signal mask with a system call each time (it took half of the emulation's time).
#pragma once

#include <ucontext.h>
#include <vector_types.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

namespace pk::emulation {

#if defined(__x86_64__)
// A suspended context is its stack pointer: the switch pushes the callee-saved registers
// and the SSE and x87 control words (callee-saved in the System V ABI), stores the stack
// pointer, loads the other context's and pops its registers. fibers.h is compiled into
// one translation unit (emulator.cpp), so the symbol is defined once.
extern "C" void pk_emulation_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl pk_emulation_switch
  .type pk_emulation_switch, @function
pk_emulation_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size pk_emulation_switch, .-pk_emulation_switch
)");

struct Context {
  void* sp = nullptr;
};

inline void switch_context(Context& from, Context& to) { pk_emulation_switch(&from.sp, to.sp); }

// Prepares `context` to start `entry` (which must never return) on `stack`: the frame
// the switch pops, whose return address is `entry`, entered with the stack aligned as
// after a call.
inline void make_context(Context& context, char* stack, size_t bytes, void (*entry)()) {
  auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t{15});
  uint64_t* sp = top - 9;
  uint32_t control[2];
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(control[0]), "=m"(control[1]));
  sp[0] = control[0] | (static_cast<uint64_t>(control[1]) << 32);
  for (int r = 1; r <= 6; ++r) sp[r] = 0;  // r15, r14, r13, r12, rbx, rbp
  sp[7] = reinterpret_cast<uint64_t>(entry);
  sp[8] = 0;  // entry's return address: it never returns
  context.sp = sp;
}
#else
struct Context {
  ucontext_t context{};
};

inline void switch_context(Context& from, Context& to) { swapcontext(&from.context, &to.context); }

inline void make_context(Context& context, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&context.context);
  context.context.uc_stack.ss_sp = stack;
  context.context.uc_stack.ss_size = bytes;
  context.context.uc_link = nullptr;
  makecontext(&context.context, entry, 0);
}
#endif

}  // namespace pk::emulation

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
  Context context;
  std::unique_ptr<char[]> stack;
  ThreadState state;
  bool done = false;
};

inline Context scheduler_context;
inline Fiber* current_fiber = nullptr;
inline ThreadState current;  // the running fiber's state

inline void yield() {
  Fiber* me = current_fiber;
  me->state = current;
  switch_context(me->context, scheduler_context);
  current = me->state;
}

class Barrier {
 public:
  explicit Barrier(int expected) : expected_(expected) {}

  void arrive_and_wait() {
    arrive_and_wait([] {});
  }

  // The last fiber to arrive runs `completion` before any waiting fiber is released.
  template <typename Completion>
  void arrive_and_wait(Completion completion) {
    const unsigned generation = generation_;
    if (++arrived_ == expected_) {
      completion();
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

// A fiber's first frame: runs the body, then hands control back for good.
inline void fiber_entry() {
  (*fiber_body)();
  current_fiber->done = true;
  switch_context(current_fiber->context, scheduler_context);
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
    make_context(fiber.context, fiber.stack.get(), kStackBytes, fiber_entry);
  }
  for (bool running = true; running;) {
    running = false;
    for (Fiber& fiber : fibers) {
      if (fiber.done) continue;
      running = true;
      current_fiber = &fiber;
      current = fiber.state;
      switch_context(scheduler_context, fiber.context);
      if (!fiber.done) fiber.state = current;
    }
  }
}

}  // namespace pk::emulation

// llmc CPU kernels: the thread pool that llmc_sgemm.cc and llmc_attention.cc share.
//
// One pool per process (per forked child), used by one caller at a time (`run_in_turn` runs a
// concurrent caller's work alone, on its own thread). Internal to the library: nothing here is
// exported (-fvisibility=hidden).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include <sched.h>
#include <unistd.h>

namespace llmc {

// A pool of worker threads that run part t of a job each; the caller runs part 0.
//
// Waking a blocked worker took 30-50 us on the 2-core VM (as long as a cache-resident GEMV),
// and after an idle spell milliseconds (the hypervisor halts an idle vCPU): GPT-2's one-token
// forward took 36 ms after 0.2 s idle against 23 ms back to back. So a worker waits for the
// next job spinning for kSpin, yielding the processor between checks: a TVM kernel's thread
// between two GEMMs gets the core at once (a worker that spins without yielding slowed them,
// runtime/threads.py), and the forward keeps both vCPUs awake. Measured: 25 ms after idle, 20
// back to back; GPT-2 1 x 128 unchanged or faster.
class Pool {
 public:
  void run(int parts, const std::function<void(int)>& part) {
    ensure(parts - 1);
    pending_.store(parts - 1, std::memory_order_relaxed);
    {
      // the job and its generation change together: a worker reads all three under this lock,
      // so it never runs one job's part with another's (a worker left out of a job, id >= parts,
      // could otherwise see the next job's parts_ and then run it twice)
      std::lock_guard<std::mutex> g(mu_);
      job_ = &part;
      parts_ = parts;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    part(0);
    if (!spin_until([&] { return pending_.load(std::memory_order_acquire) == 0; })) {
      std::unique_lock<std::mutex> g(mu_);
      done_.wait(g, [&] { return pending_.load(std::memory_order_acquire) == 0; });
    }
  }

 private:
  static constexpr auto kSpin = std::chrono::microseconds(2000);  // then block on the condition variable

  template <typename F>
  static bool spin_until(F ready) {
    const auto until = std::chrono::steady_clock::now() + kSpin;
    do {
      for (int i = 0; i < 64; ++i) {
        if (ready()) return true;
        _mm_pause();
      }
      sched_yield();
    } while (std::chrono::steady_clock::now() < until);
    return ready();
  }

  void ensure(int workers) {
    while (static_cast<int>(workers_.size()) < workers) {
      const int id = static_cast<int>(workers_.size()) + 1;
      // read before run() publishes the next job, which the new worker must then see
      const uint64_t now = generation_.load(std::memory_order_acquire);
      workers_.emplace_back([this, id, now] { loop(id, now); });
    }
  }

  void loop(int id, uint64_t seen) {
    for (;;) {
      auto fresh = [&] { return generation_.load(std::memory_order_acquire) != seen; };
      if (!spin_until(fresh)) {
        std::unique_lock<std::mutex> g(mu_);
        cv_.wait(g, fresh);
      }
      const std::function<void(int)>* job;
      int parts;
      {
        std::lock_guard<std::mutex> g(mu_);
        seen = generation_.load(std::memory_order_relaxed);
        job = job_;
        parts = parts_;
      }
      if (id >= parts) continue;  // not needed this time
      (*job)(id);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> g(mu_);  // the caller, between its check and its wait, sees this
        done_.notify_one();
      }
    }
  }

  std::mutex mu_;
  std::condition_variable cv_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* job_ = nullptr;  // job_, parts_, generation_: written under mu_
  int parts_ = 0;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
};

Pool& pool();

// Runs work(c) for every c in [0, chunks) on up to `parts` threads (the caller's one of them),
// each thread taking the next chunk as it gets to it: a worker woken late (after an idle spell
// its wake-up took milliseconds on the VM, measured) then costs its share of the chunks, not a
// doubled run time. Each chunk runs on one thread, so its results do not depend on `parts`.
void run_in_turn(int parts, int64_t chunks, const std::function<void(int64_t)>& work);

}  // namespace llmc

// What the shipped CUDA kernels (csrc/cuda/*.cu) need, beyond HIP-CPU itself, to run on the CPU: the
// SIMT emulator glue of the test-only build in tests/ops/emulator (never part of the shipped extension).
//
// HIP-CPU (github.com/ROCm/HIP-CPU, header-only, checked out outside the repository: $HIP_CPU_ROOT) runs
// a kernel's blocks as tasks of the C++17 parallel algorithms (TBB threads) and the threads of a block as
// fibers on one OS thread that switch at every __syncthreads (a round robin through the block). What this
// header adds, and why:
//   - Launches run synchronously through HIP-CPU's tile/fiber machinery (hip::detail::Tiled_domain) on
//     the calling thread and TBB's, without HIP-CPU's runtime thread (it busy-polls its streams for as
//     long as the process lives). CUDA's launch limits are checked first (cudaErrorInvalidConfiguration).
//   - Warp shuffles of width 32 (__shfl_xor_sync) with a barrier of the 32 lanes only. HIP-CPU's own
//     shuffles synchronise the whole block (and assume 64-lane warps): a warp-uniform but not
//     block-uniform loop of shuffles, as in the statistics' reduction (a warp per expert), would
//     desynchronise its round robin.
//   - __syncthreads_or and __ldcg, which HIP-CPU lacks.
//   - Execution orders for a racecheck-like pass: blockIdx and threadIdx are remapped through a
//     permutation (identity, reversed or a seeded one), and with `sequential` the blocks run one after
//     the other on one thread in the order of that permutation (parallel otherwise: TBB, several OS
//     threads, so the cross-block ticket is taken concurrently). Reductions in a fixed order must give
//     bit-identical results under every order; a missing barrier or an order-dependent sum would not.
//   - Every block's threads run as fibers (HIP-CPU runs a block without barriers as a loop on one
//     fiber, which a warp-level barrier of a later warp cannot join).
//   - Barrier divergence is reported, not silently mis-scheduled: a thread that reaches more barriers
//     than its block's others would be resumed after its kernel ended (HIP-CPU then restarts it), and a
//     block whose first thread ends before the others would end early; both are counted as faults.
// The kernels see __CUDA_ARCH__ (so gate_row.h takes the device branches: expf, not the host polynomial)
// and run as plain scalar code: HIP-CPU's `simd` attributes on __device__ / __global__ are dropped.
#pragma once

#include <hip/hip_runtime.h>
#include <tbb/global_control.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <numeric>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#undef __device__
#define __device__
#undef __global__
#define __global__
// inline as under nvcc (HIP-CPU leaves it empty without NDEBUG): csrc's row headers define functions
// that several translation units of the test extension include.
#undef __forceinline__
#define __forceinline__ inline __attribute__((always_inline))
// csrc's headers take their nvcc branches (GATE_HD, ORTHO_HD) and device branches (gate_exp: expf).
#define __CUDACC__ 1
#define __CUDA_ARCH__ 800

namespace tdmpc2_moe_emu {

constexpr unsigned kWarp = 32;
// CUDA's launch limits without opt-in: threads per block and dynamic shared memory per block.
constexpr unsigned kMaxThreads = 1024;
constexpr size_t kMaxDynamicShared = 48 * 1024;

enum class Order : int { kIdentity = 0, kReversed = 1, kSeeded = 2 };

// The execution order of every launch (set by the test harness between launches).
struct Schedule {
	Order blocks = Order::kIdentity;
	Order threads = Order::kIdentity;  // within a block: warps permuted, and lanes within each warp
	uint64_t seed = 0;
	bool sequential = false;  // blocks one after the other, in the order of the permutation
};

inline Schedule& schedule() {
	static Schedule s;
	return s;
}

// Per launch: the logical block of each block as it started (filled when sequential), the number of
// threads that finished, and the first fault seen.
struct LaunchRecord {
	std::mutex mutex;
	std::vector<uint32_t> block_starts;
	std::atomic<uint64_t> threads_finished{0};
	std::string fault;
	hipError_t launch_error = hipSuccess;
};

inline LaunchRecord& record() {
	static LaunchRecord r;
	return r;
}

inline void report_fault(const std::string& what) {
	std::lock_guard<std::mutex> lock(record().mutex);
	if (record().fault.empty()) record().fault = what;
}

// A bijection of [0, n): identity, reversed, or x -> (a x + c) mod n with a coprime to n, from the seed.
inline uint32_t permute(uint32_t x, uint32_t n, Order order, uint64_t seed) {
	if (n <= 1 || order == Order::kIdentity) return x;
	if (order == Order::kReversed) return n - 1 - x;
	uint64_t a = 1 + 2 * ((seed >> 8) % n);
	while (std::gcd(a, static_cast<uint64_t>(n)) != 1) ++a;
	const uint64_t c = (seed * 0x9E3779B97F4A7C15ull >> 17) % n;
	return static_cast<uint32_t>((a * x + c) % n);
}

inline uint32_t physical_thread() {
	return id(hip::detail::Fiber::this_fiber());
}

inline uint32_t block_threads() {
	return count(hip::detail::Tile::this_tile().dimensions());  // Dim3's hidden friend
}

// threadIdx.x as the kernel sees it: warps permuted among themselves and lanes within each warp, so a
// warp's lanes stay one warp (blocks of a whole number of warps; others keep the identity).
inline uint32_t logical_thread() {
	const uint32_t t = physical_thread(), n = block_threads();
	const Schedule& s = schedule();
	if (s.threads == Order::kIdentity || n % kWarp != 0) return t;
	return permute(t / kWarp, n / kWarp, s.threads, s.seed + 1) * kWarp + permute(t % kWarp, kWarp, s.threads, s.seed + 2);
}

inline uint32_t logical_block() {
	const uint32_t b = hip::detail::Tile::this_tile().index().x;
	return permute(b, hip::detail::Tile::this_tile().domain().tile_count().x, schedule().blocks, schedule().seed);
}

struct LogicalThreadIdx {
	struct X {
		operator uint32_t() const { return logical_thread(); }
	};
	static constexpr X x{};
	static constexpr uint32_t y = 0, z = 0;
};
struct LogicalBlockIdx {
	struct X {
		operator uint32_t() const { return logical_block(); }
	};
	static constexpr X x{};
	static constexpr uint32_t y = 0, z = 0;
};
inline constexpr LogicalThreadIdx logical_thread_idx{};
inline constexpr LogicalBlockIdx logical_block_idx{};

// A barrier of the 32 lanes of the calling thread's warp: a round robin through the warp's fibers
// (HIP-CPU's __syncthreads is the same round robin through the whole block, so the two compose: a
// block barrier enters each warp at its first lane, and a warp barrier leaves the warp where it began).
inline void warp_barrier() {
	const uint32_t t = physical_thread(), n = block_threads();
	const uint32_t base = t / kWarp * kWarp, width = n - base < kWarp ? n - base : kWarp;
	if (width == 1) return;
	hip::detail::this_tile::has_barrier = true;  // the block's other threads now run as fibers
	hip::detail::Fiber::yield(hip::detail::Tile::fibers()[base + (t - base + 1) % width]);
}

// Each lane's value by (physical warp, logical lane), for the exchange of a shuffle.
inline uint64_t (&shuffle_slots())[kMaxThreads / kWarp][kWarp] {
	thread_local uint64_t slots[kMaxThreads / kWarp][kWarp];
	return slots;
}

template <typename T>
T shfl_xor(T v, int lane_mask, int width) {
	static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "a register-sized value");
	const uint32_t warp = physical_thread() / kWarp, lane = logical_thread() % kWarp;
	if (width != static_cast<int>(kWarp)) report_fault("__shfl_xor_sync with a width other than 32");
	std::memcpy(&shuffle_slots()[warp][lane], &v, sizeof(T));
	warp_barrier();
	T r;
	std::memcpy(&r, &shuffle_slots()[warp][(lane ^ static_cast<uint32_t>(lane_mask)) % kWarp], sizeof(T));
	warp_barrier();  // before a later shuffle overwrites the slots
	return r;
}

// Kernel entry and exit of every thread: counts the threads that finished and catches a thread that
// starts twice in one block (it was resumed after its end: more barriers on some threads than others).
struct ThreadEpoch {
	uint64_t block = 0;  // blocks begun on this OS thread
	std::vector<uint64_t> started;  // per physical thread: the block it last started in
};

inline ThreadEpoch& epoch() {
	thread_local ThreadEpoch e;
	return e;
}

inline void thread_begins() {
	ThreadEpoch& e = epoch();
	const uint32_t t = physical_thread();
	if (t == 0) {
		++e.block;
		// Every thread of the block as a fiber, from the start. HIP-CPU runs a block whose first thread
		// met no barrier by calling the kernel for each further thread on that same fiber, which breaks
		// when a later thread does meet one: a warp's shuffles (warp-uniform work, as in the routed
		// experts' row kernels, where the warp of physical thread 0 may have no row under a permuted
		// thread order) would round-robin into fibers that never ran.
		if (block_threads() > 1) hip::detail::this_tile::has_barrier = true;
		if (schedule().sequential) {
			std::lock_guard<std::mutex> lock(record().mutex);
			record().block_starts.push_back(logical_block());
		}
	}
	if (e.started.size() <= t) e.started.resize(kMaxThreads, 0);
	if (e.started[t] == e.block)
		report_fault("barrier divergence: thread " + std::to_string(logical_thread()) + " of block " +
				std::to_string(logical_block()) + " was resumed after its kernel returned");
	e.started[t] = e.block;
}

inline void thread_ends() {
	record().threads_finished.fetch_add(1, std::memory_order_relaxed);
}

inline hipError_t take_launch_error() {
	return std::exchange(record().launch_error, hipSuccess);
}

// Runs kernel(args...) on grid x block threads now and returns when every block is done.
template <typename... Params, typename... Args>
void launch(uint32_t grid, uint32_t block, size_t shared_bytes, void (*kernel)(Params...), Args&&... args) {
	if (grid == 0 || grid > 0x7fffffffu || block == 0 || block > kMaxThreads || shared_bytes > kMaxDynamicShared) {
		record().launch_error = hipErrorInvalidConfiguration;
		return;
	}
	const std::tuple<std::decay_t<Params>...> params(static_cast<Params>(std::forward<Args>(args))...);
	const auto body = [kernel](const std::decay_t<Params>&... xs) {
		thread_begins();
		kernel(xs...);
		thread_ends();
	};
	struct {
		const decltype(body)* fn;
		const decltype(params)* args;
		void operator()() const { std::apply(*fn, *args); }
	} per_thread{&body, &params};
	const hip::detail::Tiled_domain domain{hip::detail::Dim3{block, 1, 1}, hip::detail::Dim3{grid, 1, 1},
			static_cast<uint32_t>(shared_bytes), per_thread};
	record().threads_finished = 0;
	{
		std::lock_guard<std::mutex> lock(record().mutex);
		record().block_starts.clear();
	}
	if (schedule().sequential) {
		// One TBB thread: the blocks run in index order, i.e. as logical blocks in the permutation's order.
		const tbb::global_control one(tbb::global_control::max_allowed_parallelism, 1);
		for_each_tile(domain, body, params);
	} else {
		for_each_tile(domain, body, params);
	}
	const uint64_t want = static_cast<uint64_t>(grid) * block, got = record().threads_finished.load();
	if (got != want)
		report_fault("barrier divergence: " + std::to_string(got) + " of " + std::to_string(want) +
				" threads returned from the kernel");
}

// The launch expression of TDMPC2_LAUNCH(grid, block, shared, stream, kernel)(args...).
template <typename... Params>
struct Launch {
	uint32_t grid, block;
	size_t shared_bytes;
	void (*kernel)(Params...);
	template <typename... Args>
	void operator()(Args&&... args) const {
		launch(grid, block, shared_bytes, kernel, std::forward<Args>(args)...);
	}
};

template <typename G, typename B, typename Stream, typename... Params>
Launch<Params...> launch_config(G grid, B block, size_t shared_bytes, Stream, void (*kernel)(Params...)) {
	return {static_cast<uint32_t>(grid), static_cast<uint32_t>(block), shared_bytes, kernel};
}

}  // namespace tdmpc2_moe_emu

// CUDA's names for what the kernels use, on the emulator.
#define TDMPC2_LAUNCH(grid, block, shared_bytes, stream, ...) \
	::tdmpc2_moe_emu::launch_config(grid, block, shared_bytes, stream, __VA_ARGS__)
#define TDMPC2_DYNAMIC_SHARED(type, name) HIP_DYNAMIC_SHARED(type, name)
#define threadIdx ::tdmpc2_moe_emu::logical_thread_idx
#define blockIdx ::tdmpc2_moe_emu::logical_block_idx

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
	if (mask != 0xffffffffu) ::tdmpc2_moe_emu::report_fault("__shfl_xor_sync with a partial mask");
	return ::tdmpc2_moe_emu::shfl_xor(v, lane_mask, width);
}

// Whether any thread of the block passed a nonzero predicate; every thread gets the answer.
inline int __syncthreads_or(int predicate) {
	thread_local int any;  // per OS thread, i.e. per running block, as shared memory
	__syncthreads();  // the previous call's readers are done
	if (::tdmpc2_moe_emu::physical_thread() == 0) any = 0;
	__syncthreads();
	if (predicate) any = 1;
	__syncthreads();
	return any;
}

// A load that bypasses L1 on the GPU (the other blocks' partials): an atomic load here, so that the
// cross-block hand-over is well-defined between OS threads too (ordered by the kernels' __threadfence).
template <typename T>
inline T __ldcg(const T* p) {
	T r;
	__atomic_load(p, &r, __ATOMIC_RELAXED);
	return r;
}

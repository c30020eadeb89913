// CPU kernels of the orthonormalisation and their registration: the per-row code of ortho_row.h run by
// a one-member team, over blocks of rows in parallel with at::parallel_for. float64 features are
// computed in float64, every other dtype in float32 (converted once, up front, and back at the end).
// Built twice, for AVX2 + FMA and for the baseline x86-64 (chosen at run time, as lanes.cpp does).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../ortho_checks.h"
#include "../ortho_row.h"

namespace tdmpc2_moe {
namespace {

// One thread owns the whole row; kLanes independent partial sums per dot product let the compiler
// vectorise it without reassociating floating-point additions.
template <typename T>
struct CpuTeam {
	static constexpr int kLanes = 128 / sizeof(T);
	int rank() const { return 0; }
	int size() const { return 1; }
	T sum(T partial) const { return partial; }
	bool leader() const { return true; }
	void sync() const {}
};

// Rows per parallel chunk: at least this many elements, so that waking threads costs less than the work.
constexpr int64_t kGrainElements = 32768;

template <typename T>
struct Rows {
	const T* x;  // [E, N, D] contiguous
	const T* g;  // [E, N, D] contiguous (backward only)
	T* out;  // q (forward) or grad_x (backward), [E, N, D]
	int64_t n;
	int e, d;
	T eps2;
};

template <typename T>
inline __attribute__((always_inline)) void forward_rows(const Rows<T>& a, int64_t begin, int64_t end) {
	const int64_t stride = a.n * a.d;
	for (int64_t r = begin; r < end; ++r)
		ortho_forward_row(CpuTeam<T>(), a.x + r * a.d, a.out + r * a.d, stride, a.e, a.d, a.eps2, (T*)nullptr);
}

template <typename T>
inline __attribute__((always_inline)) void backward_rows(const Rows<T>& a, int64_t begin, int64_t end) {
	const int64_t stride = a.n * a.d;
	// The gradients of the q_j (one row, [E, D]) and the row's coefficients, reused row after row.
	std::vector<T> gq(static_cast<size_t>(a.e) * a.d), coef(ortho_coef_size(a.e));
	for (int64_t r = begin; r < end; ++r)
		ortho_backward_row(CpuTeam<T>(), a.g + r * a.d, a.x + r * a.d, a.out + r * a.d, gq.data(), stride, a.d, a.e,
				a.d, a.eps2, coef.data());
}

#if defined(__x86_64__) && defined(__GNUC__)
#define ORTHO_AVX2 __attribute__((target("avx2,fma")))
template <typename T>
ORTHO_AVX2 void forward_rows_avx2(const Rows<T>& a, int64_t begin, int64_t end) {
	forward_rows(a, begin, end);
}
template <typename T>
ORTHO_AVX2 void backward_rows_avx2(const Rows<T>& a, int64_t begin, int64_t end) {
	backward_rows(a, begin, end);
}

bool use_avx2() {
	static const bool yes = [] {
		// TDMPC2_MOE_CPU_ISA=generic forces the baseline build (to test or time it on an AVX2 machine).
		const char* cap = getenv("TDMPC2_MOE_CPU_ISA");
		__builtin_cpu_init();
		return !(cap && strcmp(cap, "generic") == 0) && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
	}();
	return yes;
}
#endif

template <typename T>
void run_rows(const Rows<T>& a, bool backward) {
	const auto block = [&](int64_t begin, int64_t end) {
#if defined(__x86_64__) && defined(__GNUC__)
		if (use_avx2()) {
			backward ? backward_rows_avx2(a, begin, end) : forward_rows_avx2(a, begin, end);
			return;
		}
#endif
		backward ? backward_rows(a, begin, end) : forward_rows(a, begin, end);
	};
	const int64_t grain = std::max<int64_t>(1, kGrainElements / (static_cast<int64_t>(a.e) * a.d));
	if (a.n <= grain)
		block(0, a.n);
	else
		at::parallel_for(0, a.n, grain, block);
}

template <typename T>
Rows<T> rows_of(const at::Tensor& x, const at::Tensor* g, at::Tensor& out, double eps) {
	return {x.const_data_ptr<T>(), g ? g->const_data_ptr<T>() : nullptr, out.data_ptr<T>(), x.size(1),
			static_cast<int>(x.size(0)), static_cast<int>(x.size(2)), static_cast<T>(eps * eps)};
}

at::Tensor run(const at::Tensor& features, const at::Tensor* grad, double eps) {
	const at::ScalarType compute = ortho_compute_dtype(features);
	const at::Tensor x = features.to(compute).contiguous();
	const at::Tensor g = grad ? grad->to(compute).contiguous() : at::Tensor();
	at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
	if (x.numel() > 0) {
		if (compute == at::kDouble)
			run_rows(rows_of<double>(x, grad ? &g : nullptr, out, eps), grad != nullptr);
		else
			run_rows(rows_of<float>(x, grad ? &g : nullptr, out, eps), grad != nullptr);
	}
	return out.to(features.scalar_type());
}

}  // namespace

at::Tensor orthonormalize_cpu(const at::Tensor& features, double eps) {
	check_ortho_args(features, eps);
	return run(features, nullptr, eps);
}

at::Tensor orthonormalize_backward_cpu(const at::Tensor& grad, const at::Tensor& features, double eps) {
	check_ortho_backward_args(grad, features, eps);
	return run(features, &grad, eps);
}

}  // namespace tdmpc2_moe

TORCH_LIBRARY_IMPL(tdmpc2_moe, CPU, m) {
	m.impl("orthonormalize", &tdmpc2_moe::orthonormalize_cpu);
	m.impl("orthonormalize_backward", &tdmpc2_moe::orthonormalize_backward_cpu);
}

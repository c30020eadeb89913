// CPU kernels of the routed experts (routed_experts.h, docs/design.md 22) and their registration.
// One pass per call instead of the sparse path's fifty tensor ops: the slots are grouped per expert by a
// counting sort, then expert after expert its rows go through all its layers while they are in cache
// (rows gathered once, one GEMM per layer through the BLAS that ATen's mm calls, then one loop over the rows that adds the
// bias and applies LayerNorm and the activation in place), and the weighted combination is gathered back
// per row. The backward runs the same way in reverse, expert after expert, from what the training forward
// kept. Row loops are plain C++ that the compiler vectorises, built for AVX2 + FMA and for the baseline
// (chosen at run time, as lanes.cpp does). Sums over rows (bias and LayerNorm gradients, the combination)
// run in a fixed order: results do not depend on the number of threads.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <tuple>
#include <vector>

#include "../expert_act.h"
#include "../routed_experts.h"

namespace tdmpc2_moe {
namespace {

// Rows of an expert per parallel chunk of the row loops: at least this many elements per chunk.
constexpr int64_t kGrainElements = 16384;

template <typename T>
struct LayerPtrs {
	const T* bias;  // [out] of the expert at hand
	const T* gamma;  // LayerNorm weight [out] (null without norm)
	const T* beta;
	ExpertAct act;
	int64_t out;
	int64_t group;  // SimNorm group width
};

// --- per row: forward -------------------------------------------------------------------------------

// z (the Linear's output without bias, [out]) becomes the layer's output h in place; with norm, writes
// xhat [out] and returns rstd when `xhat` is not null (the training forward).
template <typename T>
inline __attribute__((always_inline)) T forward_row(const LayerPtrs<T>& p, T* __restrict z, T* __restrict xhat) {
	const int64_t d = p.out;
	if (p.act == ExpertAct::kNone) {
		for (int64_t c = 0; c < d; ++c) z[c] += p.bias[c];
		return T(0);
	}
	T sum = 0;
	for (int64_t c = 0; c < d; ++c) {
		z[c] += p.bias[c];
		sum += z[c];
	}
	const T mean = sum / T(d);
	T sq = 0;
	for (int64_t c = 0; c < d; ++c) sq += (z[c] - mean) * (z[c] - mean);
	const T rstd = T(1) / std::sqrt(sq / T(d) + T(kExpertNormEps));
	if (xhat)
		for (int64_t c = 0; c < d; ++c) xhat[c] = (z[c] - mean) * rstd;
	if (p.act == ExpertAct::kMish) {
		for (int64_t c = 0; c < d; ++c) z[c] = expert_mish((z[c] - mean) * rstd * p.gamma[c] + p.beta[c]);
		return rstd;
	}
	for (int64_t c = 0; c < d; ++c) z[c] = (z[c] - mean) * rstd * p.gamma[c] + p.beta[c];
	for (int64_t g0 = 0; g0 < d; g0 += p.group) {
		T m = z[g0];
		for (int64_t c = g0 + 1; c < g0 + p.group; ++c) m = z[c] > m ? z[c] : m;
		T s = 0;
		for (int64_t c = g0; c < g0 + p.group; ++c) {
			z[c] = expert_exp(z[c] - m);
			s += z[c];
		}
		const T inv = T(1) / s;
		for (int64_t c = g0; c < g0 + p.group; ++c) z[c] *= inv;
	}
	return rstd;
}

// --- per row: backward ------------------------------------------------------------------------------

// g (the gradient of the layer's output h, [out]) becomes the gradient of its pre-bias z in place; adds
// the gradient of the LayerNorm's affine output to `ga` (the caller sums them into gamma's and beta's
// gradients). h is the layer's output (SimNorm's backward reads it).
template <typename T>
inline __attribute__((always_inline)) void backward_row(const LayerPtrs<T>& p, T* __restrict g, const T* __restrict h,
		const T* __restrict xhat, T rstd, T* __restrict ga) {
	const int64_t d = p.out;
	if (p.act == ExpertAct::kNone) return;
	if (p.act == ExpertAct::kMish) {
		for (int64_t c = 0; c < d; ++c) ga[c] = g[c] * expert_mish_grad(xhat[c] * p.gamma[c] + p.beta[c]);
	} else {
		for (int64_t g0 = 0; g0 < d; g0 += p.group) {
			T dot = 0;
			for (int64_t c = g0; c < g0 + p.group; ++c) dot += g[c] * h[c];
			for (int64_t c = g0; c < g0 + p.group; ++c) ga[c] = h[c] * (g[c] - dot);
		}
	}
	T mean_g = 0, mean_gx = 0;
	for (int64_t c = 0; c < d; ++c) {
		const T gx = ga[c] * p.gamma[c];
		mean_g += gx;
		mean_gx += gx * xhat[c];
	}
	mean_g /= T(d);
	mean_gx /= T(d);
	for (int64_t c = 0; c < d; ++c) g[c] = rstd * (ga[c] * p.gamma[c] - mean_g - xhat[c] * mean_gx);
}

// --- the row loops, per instruction set ---------------------------------------------------------------

template <typename T>
struct RowLoops {
	// Rows [begin, end) of an expert's block `z` [rows, out] through forward_row (xhat, rstd: null in inference).
	static void forward(const LayerPtrs<T>& p, T* z, T* xhat, T* rstd, int64_t begin, int64_t end) {
		for (int64_t r = begin; r < end; ++r) {
			const T s = forward_row(p, z + r * p.out, xhat ? xhat + r * p.out : nullptr);
			if (rstd) rstd[r] = s;
		}
	}

	// Rows [begin, end) through backward_row; `ga` [rows, out] receives the affine output's gradients.
	static void backward(const LayerPtrs<T>& p, T* g, const T* h, const T* xhat, const T* rstd, T* ga, int64_t begin,
			int64_t end) {
		for (int64_t r = begin; r < end; ++r)
			backward_row(p, g + r * p.out, h + r * p.out, xhat + r * p.out, rstd[r], ga + r * p.out);
	}

	// Adds the column sums of `a` [rows, width] (and of a * b when b is given) to sum_a (sum_ab), rows in order.
	static void column_sums(const T* a, const T* b, int64_t rows, int64_t width, T* sum_a, T* sum_ab) {
		for (int64_t r = 0; r < rows; ++r) {
			const T* ar = a + r * width;
			for (int64_t c = 0; c < width; ++c) sum_a[c] += ar[c];
			if (b) {
				const T* br = b + r * width;
				for (int64_t c = 0; c < width; ++c) sum_ab[c] += ar[c] * br[c];
			}
		}
	}

	// out[r] = sum_j scale[r, j] * y[pos[r k + j]] for rows [begin, end) (scale null: 1), j in order.
	static void combine(const T* y, const int64_t* pos, const T* scale, int64_t k, int64_t width, T* out,
			int64_t begin, int64_t end) {
		for (int64_t r = begin; r < end; ++r) {
			T* o = out + r * width;
			for (int64_t j = 0; j < k; ++j) {
				const T* yr = y + pos[r * k + j] * width;
				const T w = scale ? scale[r * k + j] : T(1);
				if (j == 0)
					for (int64_t c = 0; c < width; ++c) o[c] = w * yr[c];
				else
					for (int64_t c = 0; c < width; ++c) o[c] += w * yr[c];
			}
		}
	}
};

#if defined(__x86_64__) && defined(__GNUC__)
#define EXPERTS_AVX2 __attribute__((target("avx2,fma")))
template <typename T>
struct RowLoopsAvx2 {
	EXPERTS_AVX2 static void forward(const LayerPtrs<T>& p, T* z, T* xhat, T* rstd, int64_t begin, int64_t end) {
		for (int64_t r = begin; r < end; ++r) {
			const T s = forward_row(p, z + r * p.out, xhat ? xhat + r * p.out : nullptr);
			if (rstd) rstd[r] = s;
		}
	}
	EXPERTS_AVX2 static void backward(const LayerPtrs<T>& p, T* g, const T* h, const T* xhat, const T* rstd, T* ga,
			int64_t begin, int64_t end) {
		for (int64_t r = begin; r < end; ++r)
			backward_row(p, g + r * p.out, h + r * p.out, xhat + r * p.out, rstd[r], ga + r * p.out);
	}
};

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

// The per-row forward / backward over an expert's `rows`, split among threads (rows are independent).
template <typename T>
void forward_rows(const LayerPtrs<T>& p, T* z, T* xhat, T* rstd, int64_t rows) {
	const int64_t grain = std::max<int64_t>(1, kGrainElements / p.out);
	at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
#if defined(__x86_64__) && defined(__GNUC__)
		if (use_avx2()) return RowLoopsAvx2<T>::forward(p, z, xhat, rstd, begin, end);
#endif
		RowLoops<T>::forward(p, z, xhat, rstd, begin, end);
	});
}

template <typename T>
void backward_rows(const LayerPtrs<T>& p, T* g, const T* h, const T* xhat, const T* rstd, T* ga, int64_t rows) {
	const int64_t grain = std::max<int64_t>(1, kGrainElements / p.out);
	at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
#if defined(__x86_64__) && defined(__GNUC__)
		if (use_avx2()) return RowLoopsAvx2<T>::backward(p, g, h, xhat, rstd, ga, begin, end);
#endif
		RowLoops<T>::backward(p, g, h, xhat, rstd, ga, begin, end);
	});
}

// --- grouping -----------------------------------------------------------------------------------------

// The slots grouped per expert (routed_experts.h, saved[0]): a stable counting sort of the indices.
struct Grouping {
	at::Tensor table;  // int64 [2 S + E + 1]: perm, pos, offsets
	const int64_t* perm;
	const int64_t* pos;
	const int64_t* offsets;
};

Grouping group_slots(const at::Tensor& indices_in, int64_t n_experts) {
	const at::Tensor indices = indices_in.contiguous();
	const int64_t s = indices.numel();
	at::Tensor table = at::empty({2 * s + n_experts + 1}, indices.options());
	int64_t* perm = table.data_ptr<int64_t>();
	int64_t* pos = perm + s;
	int64_t* offsets = pos + s;
	const int64_t* idx = indices.const_data_ptr<int64_t>();
	std::fill(offsets, offsets + n_experts + 1, 0);
	for (int64_t i = 0; i < s; ++i) {
		// Checked before anything is written where an index points.
		TORCH_CHECK_VALUE(idx[i] >= 0 && idx[i] < n_experts, "indices must lie in [0, E=", n_experts, "), got ", idx[i],
				" at slot ", i);
		++offsets[idx[i] + 1];
	}
	for (int64_t e = 0; e < n_experts; ++e) offsets[e + 1] += offsets[e];
	std::vector<int64_t> next(offsets, offsets + n_experts);
	for (int64_t i = 0; i < s; ++i) {
		const int64_t p = next[idx[i]]++;
		perm[p] = i;
		pos[i] = p;
	}
	return {table, perm, pos, offsets};
}

Grouping grouping_of(const at::Tensor& table, int64_t s, int64_t n_experts) {
	const int64_t* perm = table.const_data_ptr<int64_t>();
	return {table, perm, perm + s, perm + 2 * s};
}

template <typename T>
LayerPtrs<T> layer_ptrs(const ExpertLayer& layer, int64_t e, int64_t group) {
	const auto of = [&](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<T>() + e * layer.out : nullptr; };
	return {of(layer.bias), of(layer.ln_weight), of(layer.ln_bias), layer.act, layer.out, group};
}

// --- GEMMs -------------------------------------------------------------------------------------------
// The experts' GEMMs are small (a batch of 64 routes some 16 rows to an expert) and many (one per expert
// and layer, three per layer in the backward): through at::mm each paid for its views, the dispatcher and
// the shape checks, a tenth of a planning step. So they call the Fortran BLAS that ATen's mm itself ends
// in for float32/float64 (MKL in the x86 wheels; the same routine, so the same bits), by pointer. The
// symbols are weak: a torch built without a BLAS still loads this extension and takes at::mm instead,
// as do sizes past BLAS's 32-bit integers.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
		const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c, const int* ldc)
		__attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
		const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
		const int* ldc) __attribute__((weak));
}

// TDMPC2_MOE_CPU_GEMM=aten takes at::mm for every GEMM (the path of a torch without BLAS, to test it).
bool blas_enabled() {
	static const bool yes = [] {
		const char* choice = getenv("TDMPC2_MOE_CPU_GEMM");
		return !(choice && strcmp(choice, "aten") == 0);
	}();
	return yes;
}

inline bool fits_int(int64_t v) {
	return v >= 0 && v <= std::numeric_limits<int>::max();
}

// Row-major C [m, n] = op(A) [m, k] @ op(B) [k, n] (op: 'N' as stored, 'T' transposed; lda, ldb, ldc the
// row strides as stored). Returns false, having done nothing, where no BLAS routine takes it.
template <typename T>
bool blas_gemm(char trans_a, char trans_b, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
		int64_t ldb, T* c, int64_t ldc) {
	if (!blas_enabled() || !fits_int(m) || !fits_int(n) || !fits_int(k) || !fits_int(lda) || !fits_int(ldb) ||
			!fits_int(ldc))
		return false;
	// Column-major BLAS sees every row-major matrix transposed: C^T = op(B)^T op(A)^T, the same flags.
	const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
	const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
	const T one = 1, zero = 0;
	if constexpr (std::is_same_v<T, float>) {
		if (sgemm_ == nullptr) return false;
		sgemm_(&trans_b, &trans_a, &M, &N, &K, &one, b, &LDA, a, &LDB, &zero, c, &LDC);
	} else {
		if (dgemm_ == nullptr) return false;
		dgemm_(&trans_b, &trans_a, &M, &N, &K, &one, b, &LDA, a, &LDB, &zero, c, &LDC);
	}
	return true;
}

// Row-major C [m, n] = op(A) @ op(B) of contiguous blocks (lda, ldb, ldc their row strides): through
// BLAS, else through at::mm_out on views of the same memory.
template <typename T>
void gemm(char trans_a, char trans_b, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
		int64_t ldb, T* c, int64_t ldc) {
	if (m == 0 || n == 0) return;
	if (k > 0 && blas_gemm<T>(trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc)) return;
	const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
	const auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, char trans) {
		at::Tensor t = at::from_blob(const_cast<T*>(p), trans == 'N' ? at::IntArrayRef{rows, cols} : at::IntArrayRef{cols, rows},
				{ld, 1}, opts);
		return trans == 'N' ? t : t.t();
	};
	at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, opts);
	at::mm_out(out, view(a, m, k, lda, trans_a), view(b, k, n, ldb, trans_b));
}

// Contiguous parameters: the row loops read bias and LayerNorm rows by pointer.
std::vector<ExpertLayer> contiguous_layers(std::vector<ExpertLayer> layers) {
	for (ExpertLayer& layer : layers) {
		layer.weight = layer.weight.contiguous();  // the GEMMs read W_e by pointer
		layer.bias = layer.bias.contiguous();
		if (layer.normed()) {
			layer.ln_weight = layer.ln_weight.contiguous();
			layer.ln_bias = layer.ln_bias.contiguous();
		}
	}
	return layers;
}

// --- forward ------------------------------------------------------------------------------------------

template <typename T>
void gather_rows(const at::Tensor& x, const Grouping& g, int64_t k, int64_t begin, int64_t end, T* dst) {
	const int64_t in = x.size(1), rs = x.stride(0), cs = x.stride(1);
	const T* src = x.const_data_ptr<T>();
	for (int64_t p = begin; p < end; ++p) {
		const T* row = src + (g.perm[p] / k) * rs;
		T* out = dst + (p - begin) * in;
		if (cs == 1)
			std::memcpy(out, row, sizeof(T) * in);
		else
			for (int64_t c = 0; c < in; ++c) out[c] = row[c * cs];
	}
}

// The forward. With `saved` (training), fills it (routed_experts.h) and runs every layer into it; without,
// runs each expert through two scratch blocks and keeps only the experts' outputs.
template <typename T>
at::Tensor forward(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& weights,
		const std::vector<ExpertLayer>& layers, int64_t group, std::vector<at::Tensor>* saved) {
	const int64_t n = x.size(0), k = indices.size(1), s = n * k, n_experts = layers[0].weight.size(0);
	const int64_t n_layers = static_cast<int64_t>(layers.size()), width = layers.back().out;
	const auto opts = x.options();
	const Grouping g = group_slots(indices, n_experts);
	at::Tensor y;  // [S, width]: the experts' outputs in sorted order
	std::vector<at::Tensor> hs, xhats, rstds;
	if (saved) {
		hs.push_back(at::empty({s, layers[0].in}, opts));
		for (const ExpertLayer& layer : layers) hs.push_back(at::empty({s, layer.out}, opts));
		for (const ExpertLayer& layer : layers)
			if (layer.normed()) {
				xhats.push_back(at::empty({s, layer.out}, opts));
				rstds.push_back(at::empty({s}, opts));
			}
		y = hs.back();
	} else {
		y = at::empty({s, width}, opts);
	}
	int64_t max_rows = 0, max_width = layers[0].in;
	for (int64_t e = 0; e < n_experts; ++e) max_rows = std::max(max_rows, g.offsets[e + 1] - g.offsets[e]);
	for (const ExpertLayer& layer : layers) max_width = std::max(max_width, layer.out);
	// Inference: each expert's layers alternate between two scratch blocks, the last layer writes y.
	const int64_t block = max_rows * max_width;
	at::Tensor scratch = saved ? at::Tensor() : at::empty({2 * block}, opts);
	for (int64_t e = 0; e < n_experts; ++e) {
		const int64_t begin = g.offsets[e], rows = g.offsets[e + 1] - begin;
		if (rows == 0) continue;
		T* h = saved ? hs[0].data_ptr<T>() + begin * layers[0].in : scratch.data_ptr<T>();
		gather_rows<T>(x, g, k, begin, begin + rows, h);
		int64_t normed = 0;
		for (int64_t l = 0; l < n_layers; ++l) {
			const ExpertLayer& layer = layers[l];
			T* z = saved ? hs[l + 1].data_ptr<T>() + begin * layer.out
					: l == n_layers - 1 ? y.data_ptr<T>() + begin * layer.out
					: scratch.data_ptr<T>() + ((l + 1) % 2) * block;
			// z [rows, out] = h [rows, in] @ W_e^T
			gemm<T>('N', 'T', rows, layer.out, layer.in, h, layer.in, layer.weight.const_data_ptr<T>() + e * layer.out * layer.in,
					layer.in, z, layer.out);
			T* xhat = saved && layer.normed() ? xhats[normed].data_ptr<T>() + begin * layer.out : nullptr;
			T* rstd = saved && layer.normed() ? rstds[normed].data_ptr<T>() + begin : nullptr;
			forward_rows(layer_ptrs<T>(layer, e, group), z, xhat, rstd, rows);
			normed += layer.normed();
			h = z;
		}
	}
	at::Tensor out = at::empty({n, width}, opts);
	const at::Tensor scale = weights.to(x.scalar_type()).contiguous();
	at::parallel_for(0, n, std::max<int64_t>(1, kGrainElements / (width * k)), [&](int64_t begin, int64_t end) {
		RowLoops<T>::combine(y.const_data_ptr<T>(), g.pos, scale.const_data_ptr<T>(), k, width, out.data_ptr<T>(), begin,
				end);
	});
	if (saved) {
		saved->push_back(g.table);
		for (at::Tensor& h : hs) saved->push_back(h);
		for (size_t i = 0; i < xhats.size(); ++i) {
			saved->push_back(xhats[i]);
			saved->push_back(rstds[i]);
		}
	}
	return out;
}

// --- backward -----------------------------------------------------------------------------------------

template <typename T>
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> backward(const at::Tensor& grad_out_in,
		const at::Tensor& x, const at::Tensor& indices, const at::Tensor& weights, const std::vector<ExpertLayer>& layers,
		at::TensorList saved, int64_t group, bool input_grad) {
	const int64_t n = x.size(0), k = indices.size(1), s = n * k, n_experts = layers[0].weight.size(0);
	const int64_t n_layers = static_cast<int64_t>(layers.size()), width = layers.back().out;
	const auto opts = x.options();
	const at::Tensor grad_out = grad_out_in.to(x.scalar_type()).contiguous();
	const at::Tensor scale = weights.to(x.scalar_type()).contiguous();
	const Grouping g = grouping_of(saved[0], s, n_experts);
	const T* go = grad_out.const_data_ptr<T>();
	const T* w = scale.const_data_ptr<T>();
	const T* y = saved[1 + n_layers].const_data_ptr<T>();
	// The routing weights' gradient: <grad_out[r], y[pos[r k + j]]>.
	at::Tensor grad_weights = at::empty({n, k}, opts);
	T* gw = grad_weights.data_ptr<T>();
	for (int64_t i = 0; i < s; ++i) {
		const T* a = go + (i / k) * width;
		const T* b = y + g.pos[i] * width;
		T dot = 0;
		for (int64_t c = 0; c < width; ++c) dot += a[c] * b[c];
		gw[i] = dot;
	}
	std::vector<at::Tensor> grad_params;
	for (const ExpertLayer& layer : layers) {
		// Every routed expert's slice is written whole by its GEMM; only idle experts' are zeroed (below).
		grad_params.push_back(at::empty(layer.weight.sizes(), opts));
		grad_params.push_back(at::zeros(layer.bias.sizes(), opts));
		if (layer.normed()) {
			grad_params.push_back(at::zeros(layer.ln_weight.sizes(), opts));
			grad_params.push_back(at::zeros(layer.ln_bias.sizes(), opts));
		}
	}
	std::vector<int64_t> first_param(n_layers), first_normed(n_layers);
	for (int64_t l = 0, p = 0, q = 0; l < n_layers; ++l) {
		first_param[l] = p;
		first_normed[l] = q;
		p += expert_params_of(layers[l].act);
		q += layers[l].normed();
	}
	const int64_t saved_norms = 2 + n_layers;
	int64_t max_rows = 0, max_width = layers[0].in;
	for (int64_t e = 0; e < n_experts; ++e) max_rows = std::max(max_rows, g.offsets[e + 1] - g.offsets[e]);
	for (const ExpertLayer& layer : layers) max_width = std::max(max_width, layer.out);
	// Three scratch blocks: the gradient flowing down alternates between the first two, the third takes
	// the affine output's gradient of a normed layer.
	const int64_t block = max_rows * max_width;
	at::Tensor scratch = at::empty({3 * block}, opts);
	T* const blocks[3] = {scratch.data_ptr<T>(), scratch.data_ptr<T>() + block, scratch.data_ptr<T>() + 2 * block};
	// The gradient of every slot's gathered input (h_0), in sorted order, when x needs one.
	at::Tensor grad_h0 = input_grad ? at::empty({s, layers[0].in}, opts) : at::Tensor();
	for (int64_t e = 0; e < n_experts; ++e) {
		const int64_t begin = g.offsets[e], rows = g.offsets[e + 1] - begin;
		if (rows == 0) {
			for (int64_t l = 0; l < n_layers; ++l) {
				T* gw = grad_params[first_param[l]].data_ptr<T>() + e * layers[l].out * layers[l].in;
				std::fill(gw, gw + layers[l].out * layers[l].in, T(0));
			}
			continue;
		}
		// The gradient of the experts' outputs: weight * grad_out of the slot's row.
		T* grad = blocks[0];
		for (int64_t p = 0; p < rows; ++p) {
			const int64_t slot = g.perm[begin + p];
			const T ws = w[slot];
			const T* src = go + (slot / k) * width;
			for (int64_t c = 0; c < width; ++c) grad[p * width + c] = ws * src[c];
		}
		int64_t buffer = 0;
		for (int64_t l = n_layers - 1; l >= 0; --l) {
			const ExpertLayer& layer = layers[l];
			const LayerPtrs<T> ptrs = layer_ptrs<T>(layer, e, group);
			const T* h_in = saved[1 + l].const_data_ptr<T>() + begin * layer.in;
			const T* weight_e = layer.weight.const_data_ptr<T>() + e * layer.out * layer.in;
			at::Tensor* gparams = &grad_params[first_param[l]];
			if (layer.normed()) {
				const int64_t q = first_normed[l];
				const T* xhat = saved[saved_norms + 2 * q].const_data_ptr<T>() + begin * layer.out;
				const T* rstd = saved[saved_norms + 2 * q + 1].const_data_ptr<T>() + begin;
				const T* h_out = saved[2 + l].const_data_ptr<T>() + begin * layer.out;
				T* ga = blocks[2];
				backward_rows(ptrs, grad, h_out, xhat, rstd, ga, rows);
				RowLoops<T>::column_sums(ga, xhat, rows, layer.out, gparams[3].data_ptr<T>() + e * layer.out,
						gparams[2].data_ptr<T>() + e * layer.out);
			}
			T* gb = gparams[1].data_ptr<T>() + e * layer.out;
			RowLoops<T>::column_sums(grad, nullptr, rows, layer.out, gb, nullptr);
			// grad_w [out, in] = grad [rows, out]^T @ h_in [rows, in]
			gemm<T>('T', 'N', layer.out, layer.in, rows, grad, layer.out, h_in, layer.in,
					gparams[0].data_ptr<T>() + e * layer.out * layer.in, layer.in);
			if (l == 0 && !input_grad) break;
			buffer = 1 - buffer;
			T* grad_in = l == 0 ? grad_h0.data_ptr<T>() + begin * layer.in : blocks[buffer];
			// grad_in [rows, in] = grad [rows, out] @ W_e
			gemm<T>('N', 'N', rows, layer.in, layer.out, grad, layer.out, weight_e, layer.in, grad_in, layer.in);
			grad = grad_in;
		}
	}
	at::Tensor grad_x = at::empty({0}, opts);
	if (input_grad) {
		grad_x = at::empty({n, layers[0].in}, opts);
		const int64_t in = layers[0].in;
		at::parallel_for(0, n, std::max<int64_t>(1, kGrainElements / (in * k)), [&](int64_t begin, int64_t end) {
			RowLoops<T>::combine(grad_h0.const_data_ptr<T>(), g.pos, nullptr, k, in, grad_x.data_ptr<T>(), begin, end);
		});
	}
	return {grad_x, grad_weights.to(weights.scalar_type()), grad_params};
}

}  // namespace

at::Tensor routed_experts_cpu(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& weights,
		at::TensorList params, at::IntArrayRef activations, int64_t simnorm_dim) {
	const auto layers = contiguous_layers(check_routed_experts_args(x, indices, weights, params, activations, simnorm_dim));
	if (x.scalar_type() == at::kDouble) return forward<double>(x, indices, weights, layers, simnorm_dim, nullptr);
	return forward<float>(x, indices, weights, layers, simnorm_dim, nullptr);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> routed_experts_train_cpu(const at::Tensor& x, const at::Tensor& indices,
		const at::Tensor& weights, at::TensorList params, at::IntArrayRef activations, int64_t simnorm_dim) {
	const auto layers = contiguous_layers(check_routed_experts_args(x, indices, weights, params, activations, simnorm_dim));
	std::vector<at::Tensor> saved;
	at::Tensor out = x.scalar_type() == at::kDouble ? forward<double>(x, indices, weights, layers, simnorm_dim, &saved)
			: forward<float>(x, indices, weights, layers, simnorm_dim, &saved);
	return {out, saved};
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> routed_experts_backward_cpu(const at::Tensor& grad_out,
		const at::Tensor& x, const at::Tensor& indices, const at::Tensor& weights, at::TensorList params,
		at::TensorList saved, at::IntArrayRef activations, int64_t simnorm_dim, bool input_grad) {
	const auto layers = contiguous_layers(
			check_routed_experts_backward_args(grad_out, x, indices, weights, params, saved, activations, simnorm_dim));
	if (x.scalar_type() == at::kDouble)
		return backward<double>(grad_out, x, indices, weights, layers, saved, simnorm_dim, input_grad);
	return backward<float>(grad_out, x, indices, weights, layers, saved, simnorm_dim, input_grad);
}

}  // namespace tdmpc2_moe

TORCH_LIBRARY_IMPL(tdmpc2_moe, CPU, m) {
	m.impl("routed_experts", &tdmpc2_moe::routed_experts_cpu);
	m.impl("routed_experts_train", &tdmpc2_moe::routed_experts_train_cpu);
	m.impl("routed_experts_backward", &tdmpc2_moe::routed_experts_backward_cpu);
}

// Test-only operators, built by tests/ops/test_gpu_row_path.py (torch.utils.cpp_extension.load with csrc/ on
// the include path) and never part of the shipped extension: the CUDA kernels' per-row path (gate_row.h's gate_forward_row /
// gate_row_backward for E <= 32, gate_team_forward_row / gate_team_backward_row with a one-thread team
// for E > 32, chosen by the same gate_with_bucket as the CUDA launcher) compiled for and run on the
// host, row by row. They let CPU tests check the GPU's row logic against the reference on a machine
// without a GPU.
//   tdmpc2_moe_test::gpu_rows_forward  (schema of topk_gate_record; statistics summed in row order)
//   tdmpc2_moe_test::gpu_rows_backward (schema of topk_gate_backward)
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "gate_row.h"
#include "topk_gate.h"

namespace tdmpc2_moe {
namespace {

template <typename T>
struct HostCvt {
	static T from_float(float v) { return static_cast<T>(v); }
};

// A team of one host thread: owns every entry; reductions are the value itself.
struct HostTeam {
	int rank() const { return 0; }
	int size() const { return 1; }
	float sum(float v) const { return v; }
	float max(float v) const { return v; }
	bool any(bool v) const { return v; }
	void sync() const {}
};

constexpr int kMaxE = 1024;

template <typename TRing>
GateOutputs forward_rows(const at::Tensor& logits_in, int64_t k64, double temperature, bool renormalize,
		at::Tensor& ring, at::Tensor& cursor) {
	check_gate_args(logits_in, k64, temperature);
	check_ring_args(logits_in, ring, cursor);
	const at::Tensor logits = logits_in.to(at::kFloat).contiguous();
	const float t = check_temperature(temperature);
	const int64_t n = logits.size(0), capacity = ring.size(0);
	const int e = static_cast<int>(logits.size(1)), k = static_cast<int>(k64);
	const auto f32 = logits.options();
	at::Tensor weights = at::empty({n, k}, f32), indices = at::empty({n, k}, f32.dtype(at::kLong));
	at::Tensor prob_mean = at::empty({e}, f32), frac = at::empty({e}, f32), lse = at::empty({n}, f32);
	const float* src = logits.const_data_ptr<float>();
	float* w = weights.data_ptr<float>();
	int64_t* idx = indices.data_ptr<int64_t>();
	TRing* ring_data = ring.data_ptr<TRing>();
	int64_t* cur = cursor.data_ptr<int64_t>();
	std::vector<double> prob_sum(e, 0.0), counts(e, 0.0);
	gate_with_bucket(e, [&](auto bucket) {
		constexpr int EB = decltype(bucket)::value;
		for (int64_t r = 0; r < n; ++r) {
			const float* row = src + r * e;
			float* wr = w + r * k;
			int64_t* ir = idx + r * k;
			int64_t pos = 0;
			const bool record = gate_ring_slot(*cur, r, n, capacity, &pos);
			if constexpr (EB > 0) {
				float x[EB], count[EB];
				for (int j = 0; j < EB; ++j) {
					x[j] = j < e ? row[j] / t : -INFINITY;
					count[j] = 0.f;
				}
				lse.data_ptr<float>()[r] = gate_forward_row<EB>(x, e, k, renormalize, wr, ir, count);
				if (record) gate_ring_write<HostCvt<TRing>>(ring_data + pos * e, e, wr, ir, k);
				for (int j = 0; j < e; ++j) {
					prob_sum[j] += x[j];
					counts[j] += count[j];
				}
			} else {
				float prob[kMaxE], key[kMaxE], acc[kMaxE];
				unsigned count[kMaxE];
				for (int j = 0; j < e; ++j) {
					prob[j] = row[j] / t;
					acc[j] = 0.f;
					count[j] = 0u;
				}
				HostTeam team;
				lse.data_ptr<float>()[r] = gate_team_forward_row<kMaxE, HostCvt<TRing>>(team, prob, key, e, k,
						renormalize, wr, ir, acc, count, record ? ring_data + pos * e : nullptr);
				for (int j = 0; j < e; ++j) {
					prob_sum[j] += acc[j];
					counts[j] += count[j];
				}
			}
		}
	});
	const double rows = static_cast<double>(std::max<int64_t>(n, 1));
	for (int j = 0; j < e; ++j) {
		prob_mean.data_ptr<float>()[j] = static_cast<float>(prob_sum[j] / rows);
		frac.data_ptr<float>()[j] = static_cast<float>(counts[j] / (rows * k));
	}
	*cur += n;
	return {weights, indices, prob_mean, frac, lse};
}

GateOutputs gpu_rows_forward(const at::Tensor& logits, int64_t k, double temperature, bool renormalize,
		at::Tensor& ring, at::Tensor& cursor) {
	const auto dt = ring.scalar_type();
	if (dt == at::kBFloat16) return forward_rows<at::BFloat16>(logits, k, temperature, renormalize, ring, cursor);
	if (dt == at::kHalf) return forward_rows<at::Half>(logits, k, temperature, renormalize, ring, cursor);
	return forward_rows<float>(logits, k, temperature, renormalize, ring, cursor);
}

at::Tensor gpu_rows_backward(const std::optional<at::Tensor>& grad_weights, const std::optional<at::Tensor>& grad_prob_mean,
		const std::optional<at::Tensor>& grad_lse, const at::Tensor& logits_in, const at::Tensor& indices_in,
		double temperature, bool renormalize) {
	const auto [gw_t, gpm_t, glse_t] =
			check_backward_args(grad_weights, grad_prob_mean, grad_lse, logits_in, indices_in, temperature);
	const at::Tensor logits = logits_in.to(at::kFloat).contiguous();
	const at::Tensor indices = indices_in.contiguous();
	const float t = check_temperature(temperature), inv_t = 1.f / t;
	const int64_t n = logits.size(0);
	const int e = static_cast<int>(logits.size(1)), k = static_cast<int>(indices.size(1));
	at::Tensor grad = at::empty({n, e}, logits.options());
	// Absent gradients read as zeros, as the CUDA kernels' kZeros.
	const std::vector<float> zeros(kMaxE, 0.f);
	const float* gpm = gpm_t.defined() ? gpm_t.const_data_ptr<float>() : zeros.data();
	const float inv_rows = 1.f / static_cast<float>(std::max<int64_t>(n, 1));
	gate_with_bucket(e, [&](auto bucket) {
		constexpr int EB = decltype(bucket)::value;
		for (int64_t r = 0; r < n; ++r) {
			const float* row = logits.const_data_ptr<float>() + r * e;
			const float* gw = gw_t.defined() ? gw_t.const_data_ptr<float>() + r * k : zeros.data();
			const int64_t* idx = indices.const_data_ptr<int64_t>() + r * k;
			const float glse = glse_t.defined() ? glse_t.const_data_ptr<float>()[r] : 0.f;
			float* dst = grad.data_ptr<float>() + r * e;
			if constexpr (EB > 0) {
				float x[EB], out[EB];
				for (int j = 0; j < EB; ++j) x[j] = j < e ? row[j] / t : -INFINITY;
				gate_row_backward<EB>(x, out, e, k, gw, idx, gpm, inv_rows, glse, renormalize, inv_t);
				std::copy(out, out + e, dst);
			} else {
				float prob[kMaxE];
				for (int j = 0; j < e; ++j) prob[j] = row[j] * inv_t;
				HostTeam team;
				gate_team_backward_row(team, prob, dst, e, k, gw, idx, gpm, inv_rows, glse, renormalize, inv_t);
			}
		}
	});
	return logits_in.scalar_type() == at::kFloat ? grad : grad.to(logits_in.scalar_type());
}

}  // namespace
}  // namespace tdmpc2_moe

TORCH_LIBRARY(tdmpc2_moe_test, m) {
	m.def("gpu_rows_forward(Tensor logits, int k, float temperature, bool renormalize, Tensor(a!) ring, "
		  "Tensor(b!) cursor) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
	m.def("gpu_rows_backward(Tensor? grad_weights, Tensor? grad_prob_mean, Tensor? grad_lse, Tensor logits, "
		  "Tensor indices, float temperature, bool renormalize) -> Tensor");
}

TORCH_LIBRARY_IMPL(tdmpc2_moe_test, CPU, m) {
	m.impl("gpu_rows_forward", &tdmpc2_moe::gpu_rows_forward);
	m.impl("gpu_rows_backward", &tdmpc2_moe::gpu_rows_backward);
}

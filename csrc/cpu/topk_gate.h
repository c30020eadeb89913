// CPU kernels of the tdmpc2_moe operators (registered in cpu/topk_gate.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "../topk_gate.h"

namespace tdmpc2_moe {

// Returns (weights [N,k] f32, indices [N,k] i64, expert_prob_mean [E] f32, expert_frac [E] f32, lse [N] f32).
GateOutputs topk_gate_cpu(const at::Tensor& logits, int64_t k, double temperature, bool renormalize);

// As topk_gate_cpu, and writes each row's dense routing vector into `ring` at `cursor`, then advances it.
GateOutputs topk_gate_record_cpu(const at::Tensor& logits, int64_t k, double temperature, bool renormalize,
		at::Tensor& ring, at::Tensor& cursor);

// Returns d(loss)/d(logits) from the gradients of weights, expert_prob_mean and lse (absent ones count as zero).
at::Tensor topk_gate_backward_cpu(const std::optional<at::Tensor>& grad_weights,
		const std::optional<at::Tensor>& grad_prob_mean, const std::optional<at::Tensor>& grad_lse,
		const at::Tensor& logits, const at::Tensor& indices, double temperature, bool renormalize);

}  // namespace tdmpc2_moe

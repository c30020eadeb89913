// Host entry points of the routed experts' CUDA kernels (cuda/routed_experts_kernels.cu, docs/design.md 22):
// raw pointers and a stream only, so the .cu needs no ATen/c10 header and compiles with plain nvcc.
// cuda/routed_experts_binding_impl.h fills these structs from tensors and calls the launchers.
//
// Every buffer is contiguous and every size comes from N, k, E and the layer widths, never from the
// per-expert counts (those exist only on the device): the launches are the same for every routing, take
// no host synchronisation and can be captured in a CUDA graph. `table` is saved[0] of routed_experts.h
// (perm [S], pos [S], offsets [E + 1]; S = N k). An index outside [0, E) is not checked (that would need
// the host to read it): its slot joins no expert (it is sorted after offsets[E]) and its row's output,
// routing-weight gradient and input gradient come out NaN, with nothing written out of bounds.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace tdmpc2_moe {

// One layer of the experts. Forward: weight [E, out, in], bias [E, out], gamma / beta (LayerNorm weight
// and bias, [E, out], null for a plain layer); h_in [S, in] and h_out [S, out] in sorted order; xhat
// [S, out] and rstd [S] are written when not null (training, normed layers). Backward: the same inputs
// (h_out, xhat, rstd as the training forward saved them) and the gradients grad_weight, grad_bias,
// grad_gamma, grad_beta of the parameters' shapes.
struct ExpertLayerArgs {
	const void* weight;
	const void* bias;
	const void* gamma;
	const void* beta;
	int act;  // ExpertAct: 0 none, 1 LayerNorm + Mish, 2 LayerNorm + SimNorm
	int64_t in, out;
	const void* h_in;
	void* h_out;
	void* xhat;
	void* rstd;
	void* grad_weight;
	void* grad_bias;
	void* grad_gamma;
	void* grad_beta;
};

struct ExpertsForwardParams {
	bool f64;  // every floating-point buffer is float64 (else float32)
	const void* x;  // [n, in] with strides x_row, x_col (elements)
	int64_t x_row, x_col;
	const int64_t* indices;  // [n, k]
	const void* weights;  // [n, k], the dtype of x
	int64_t n;
	int k, e;
	int group;  // SimNorm's group width
	const ExpertLayerArgs* layers;  // [n_layers], host memory; layers[0].h_in is the gathered rows
	int n_layers;
	int64_t* table;  // perm, pos, offsets: [2 S + E + 1]
	void* out;  // [n, out of the last layer]
	int64_t* work;  // routed_experts_sort_work(n k, e) int64 of scratch
};

struct ExpertsBackwardParams {
	bool f64;
	const void* grad_out;  // [n, out of the last layer], the dtype of x
	const int64_t* indices;  // [n, k]
	const void* weights;  // [n, k], the dtype of x
	int64_t n;
	int k, e;
	int group;
	const ExpertLayerArgs* layers;  // h_in of layer l is saved[1 + l], h_out saved[2 + l]
	int n_layers;
	const int64_t* table;  // saved[0]
	void* grad_x;  // [n, in] or null (x needs no gradient)
	void* grad_weights;  // [n, k], the dtype of x
	// Scratch of the dtype of x: two gradient buffers and the LayerNorm affine output's gradient, each
	// [S, the widest layer]; grad_h0 [S, in] (when grad_x is set).
	void* grad_a;
	void* grad_b;
	void* grad_affine;
	void* grad_h0;
	int64_t* work;  // routed_experts_sort_work(n k, e) int64 of scratch
};

// int64 scratch the launchers need for S slots and e experts (the sort's per-block counts, the experts'
// totals and the GEMMs' tile offsets).
int64_t routed_experts_sort_work(int64_t s, int e);

// Enqueue the forward / backward on `stream`. Return the launch error, cudaSuccess if none.
cudaError_t launch_routed_experts_forward(const ExpertsForwardParams& p, cudaStream_t stream);
cudaError_t launch_routed_experts_backward(const ExpertsBackwardParams& p, cudaStream_t stream);

}  // namespace tdmpc2_moe

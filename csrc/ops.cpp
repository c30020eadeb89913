// Operator schemas of tdmpc2_moe (TORCH_LIBRARY). Importing tdmpc2_moe._C runs the static registrations
// of this file and of the kernels' files (cpu/, cuda/, autograd.cpp); the module itself only carries
// WITH_CUDA (whether CUDA kernels were built).
#include <Python.h>
#include <torch/library.h>

#ifndef TDMPC2_MOE_WITH_CUDA
#define TDMPC2_MOE_WITH_CUDA 0
#endif

extern "C" {
PyObject* PyInit__C(void) {
	static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
	PyObject* module = PyModule_Create(&module_def);
	if (module && PyModule_AddObjectRef(module, "WITH_CUDA", TDMPC2_MOE_WITH_CUDA ? Py_True : Py_False) < 0) {
		Py_DECREF(module);
		return nullptr;
	}
	return module;
}
}

TORCH_LIBRARY(tdmpc2_moe, m) {
	m.def("topk_gate(Tensor logits, int k, float temperature, bool renormalize) -> "
		  "(Tensor weights, Tensor indices, Tensor expert_prob_mean, Tensor expert_frac, Tensor lse)");
	// ring and cursor are mutated in place: the schema says so, so torch.compile keeps the write.
	m.def("topk_gate_record(Tensor logits, int k, float temperature, bool renormalize, Tensor(a!) ring, "
		  "Tensor(b!) cursor) -> "
		  "(Tensor weights, Tensor indices, Tensor expert_prob_mean, Tensor expert_frac, Tensor lse)");
	// Gradients of outputs the loss does not use may be None (no zero tensors are made for them).
	m.def("topk_gate_backward(Tensor? grad_weights, Tensor? grad_prob_mean, Tensor? grad_lse, Tensor logits, "
		  "Tensor indices, float temperature, bool renormalize) -> Tensor");
	// Orthonormalisation of expert features [E, N, D] per row (ortho_row.h); the backward recomputes the
	// forward from the features rather than keeping intermediates.
	m.def("orthonormalize(Tensor features, float eps) -> Tensor");
	m.def("orthonormalize_backward(Tensor grad, Tensor features, float eps) -> Tensor");
	// A block's routed experts on their rows and the weighted combination (routed_experts.h). The public op
	// is the inference forward; its autograd kernel runs routed_experts_train instead, which also returns
	// what routed_experts_backward reads (`saved`), so that nothing is recomputed. The backward returns
	// grad_x as [0] when input_grad is false (x needs no gradient: its GEMM is skipped).
	m.def("routed_experts(Tensor x, Tensor indices, Tensor weights, Tensor[] params, int[] activations, "
		  "int simnorm_dim) -> Tensor");
	m.def("routed_experts_train(Tensor x, Tensor indices, Tensor weights, Tensor[] params, int[] activations, "
		  "int simnorm_dim) -> (Tensor out, Tensor[] saved)");
	m.def("routed_experts_backward(Tensor grad_out, Tensor x, Tensor indices, Tensor weights, Tensor[] params, "
		  "Tensor[] saved, int[] activations, int simnorm_dim, bool input_grad) -> "
		  "(Tensor grad_x, Tensor grad_weights, Tensor[] grad_params)");
}

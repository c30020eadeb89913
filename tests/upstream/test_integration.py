"""
Patched upstream TD-MPC2 on the CPU: updates through its Buffer, planning, memory, checkpoints,
expert init, and a real `tdmpc2-moe train` run through its trainer. Needs $TDMPC2_ROOT.
"""
import csv
import gc
import os
import subprocess
import sys

import psutil
import pytest
import torch

from tdmpc2_moe.upstream import heads, patching
import tdmpc2_moe

MOE_METRICS = ("moe_aux_loss", "moe_entropy", "moe_max_load")
_TORCH_COMPILE = torch.compile


def _agent(cfg, seed=0):
	from tdmpc2 import TDMPC2
	torch.manual_seed(seed)
	return TDMPC2(cfg)


@pytest.mark.slow
def test_updates_and_planning_on_walker_shaped_data(walker_cfg, make_buffer):
	cfg = walker_cfg("use_moe=true")
	agent = _agent(cfg)
	assert agent.device == torch.device("cpu") and agent.scale.value.device == torch.device("cpu")
	buffer = make_buffer(cfg)
	for _ in range(200):
		info = agent.update(buffer)
	for key in ("total_loss", "consistency_loss", "reward_loss", "value_loss", "pi_loss", *MOE_METRICS):
		assert isinstance(info[key], torch.Tensor) and torch.isfinite(info[key]), key
	assert 0 < info["moe_aux_loss"] and 0 < info["moe_max_load"] <= 1
	assert 0 <= info["moe_entropy"] <= torch.log(torch.tensor(2.0)) + 1e-6  # top-2 routing
	stats = agent.gate_stats()
	assert set(stats) == {"dynamics", "reward", "pi"} and int(stats["pi"]["rows"]) > 0
	obs = torch.randn(24)
	for t in range(3):
		action = agent.act(obs, t0=t == 0)
		assert action.shape == (6,) and torch.isfinite(action).all() and action.abs().max() <= 1
	agent.clear_gate_history()
	assert all(int(s["rows"]) == 0 for s in agent.gate_stats().values())


def test_plain_agent_info_has_no_moe_metrics(walker_cfg, make_buffer):
	cfg = walker_cfg()
	agent = _agent(cfg)
	info = agent.update(make_buffer(cfg))
	assert not set(MOE_METRICS) & set(info) and torch.isfinite(info["total_loss"])
	assert agent.gate_stats() == {}



def test_update_raises_when_upstream_skips_the_metrics_hook(walker_cfg, make_buffer):
	# The metrics ride on soft_update_target_Q; an upstream _update that stops calling it must not
	# silently drop them.
	cfg = walker_cfg("use_moe=true")
	agent = _agent(cfg)
	agent.model.soft_update_target_Q = lambda: None
	with pytest.raises(RuntimeError, match="soft_update_target_Q"):
		agent.update(make_buffer(cfg, episodes=1))

def _compiled_update(walker_cfg, make_buffer, monkeypatch, *overrides):
	"""
	Returns (info, ExplainOutput) of one update of a `compile=true` agent, with upstream's
	torch.compile running dynamo with the eager backend (no inductor: seconds, not minutes) and
	recording every graph it compiled and every graph break, with user stacks.
	"""
	from torch._dynamo.backends.debugging import ExplainWithBackend
	explain = ExplainWithBackend("eager")
	# Upstream asks for mode="reduce-overhead", which cannot be combined with a backend.
	monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: _TORCH_COMPILE(fn, backend=explain))
	torch._dynamo.reset()
	# num_q=2 and batch_size=8 only shorten tracing; the graph structure is model_size=1's.
	cfg = walker_cfg("compile=true", "batch_size=8", "num_q=2", *overrides)
	agent = _agent(cfg)
	try:
		info = agent.update(make_buffer(cfg, episodes=1))
	finally:
		torch._dynamo.reset()
	return info, explain.output()


@pytest.mark.slow
def test_compiled_update_runs_the_plugin_without_adding_graphs(walker_cfg, make_buffer, monkeypatch):
	moe_info, moe = _compiled_update(walker_cfg, make_buffer, monkeypatch, "use_moe=true")
	plain_info, plain = _compiled_update(walker_cfg, make_buffer, monkeypatch)
	# The compiled function is the patched _update: its info carries the MoE metrics.
	assert all(torch.isfinite(moe_info[key]) for key in MOE_METRICS)
	assert not set(MOE_METRICS) & set(plain_info)
	package = os.path.dirname(tdmpc2_moe.__file__)
	for reason in moe.break_reasons:
		frames = [f"{frame.filename}:{frame.lineno}" for frame in reason.user_stack]
		assert not any(f.startswith(package) for f in frames), f"graph break in the plugin: {reason.reason}\n{frames}"
	# Upstream's own breaks (Q ensemble, backward, optimizer) stay; the plugin adds no graph or recompile.
	assert moe.graph_count == plain.graph_count and moe.graph_break_count == plain.graph_break_count, \
		f"{moe.graph_count} graphs with MoE, {plain.graph_count} without; MoE graphs start at {_graph_starts(moe)}"


def _graph_starts(explain):
	"""Returns the innermost user frame ("file:line in function") of each graph's first traced op."""
	starts = []
	for gm in explain.graphs:
		traces = [n.meta["stack_trace"] for n in gm.graph.nodes if n.meta.get("stack_trace")]
		frames = [line.strip() for line in traces[0].splitlines() if line.strip().startswith("File")] if traces else []
		starts.append(frames[-1] if frames else "?")
	return starts


@pytest.mark.slow
def test_resident_memory_flat_over_2000_updates(walker_cfg, make_buffer):
	# A narrow model (widths 64/32 instead of model_size=1's 384/128) and batch_size=16 keep 2,200 CPU
	# updates within the test budget. Leaks scale with forwards, not widths: the fork's gate list
	# alone would keep every forward's [rows, 4] gate tensor, several MB over these updates.
	cfg = walker_cfg("use_moe=true", "batch_size=16", "monitor_mem_interval=500", "model_size=null",
					 "mlp_dim=64", "latent_dim=32", "enc_dim=64", "num_q=2")
	agent = _agent(cfg)
	buffer = make_buffer(cfg)
	process = psutil.Process()
	for _ in range(200):
		agent.update(buffer)
	gc.collect()
	before = process.memory_info().rss
	for _ in range(2000):
		agent.update(buffer)
	gc.collect()
	growth_mb = (process.memory_info().rss - before) / 2 ** 20
	assert growth_mb < 5, f"resident memory grew {growth_mb:.1f} MB over 2,000 updates"
	assert agent.memory_monitor.steps == 2200


def test_checkpoint_round_trip_gives_the_same_actions(walker_cfg, make_buffer, tmp_path):
	cfg = walker_cfg("use_moe=true", "moe_experts=2")
	agent = _agent(cfg)
	buffer = make_buffer(cfg)
	for _ in range(5):
		agent.update(buffer)
	path = tmp_path / "moe.pt"
	agent.save(path)
	saved = torch.load(path, weights_only=True)
	assert saved["moe"]["use_moe"] is True and saved["moe"]["moe_experts"] == 2
	restored = _agent(walker_cfg("use_moe=true", "moe_experts=2"), seed=1)
	restored.load(path)
	obs = torch.randn(24)
	actions = []
	for a in (agent, restored):
		torch.manual_seed(3)
		actions.append(a.act(obs, t0=True, eval_mode=True))
	torch.testing.assert_close(actions[0], actions[1], rtol=0, atol=0)


def test_checkpoint_written_before_the_router_experts_split_loads(walker_cfg, make_buffer, tmp_path):
	# Before MoEBlock had a router and experts of its own, a head's gate was `<head>.gate.*`, its
	# temperature `<head>.adaptive_temperature.*` and its experts `<head>.layers.*`.
	cfg = walker_cfg("use_moe=true", "moe_experts=2", "moe_target_entropy=0.5")
	agent = _agent(cfg)
	buffer = make_buffer(cfg)
	for _ in range(3):
		agent.update(buffer)
	path = tmp_path / "old.pt"
	agent.save(path)
	saved = torch.load(path, weights_only=True)
	old_names = {".router.gate.": ".gate.", ".router.adaptive_temperature.": ".adaptive_temperature.",
				 ".experts.layers.": ".layers."}
	renamed = {}
	for key, value in saved["model"].items():
		for new, old in old_names.items():
			key = key.replace(new, old)
		renamed[key] = value
	assert "_dynamics.gate.weight" in renamed and "_dynamics.adaptive_temperature.tau" in renamed
	torch.save(dict(saved, model=renamed), path)
	restored = _agent(cfg, seed=1)
	restored.load(path)
	for (name, p), q in zip(agent.model.state_dict().items(), restored.model.state_dict().values()):
		assert torch.equal(p, q) if torch.is_tensor(p) else p == q, name


def test_checkpoint_mismatch_names_both_settings(walker_cfg, tmp_path):
	moe, plain = tmp_path / "moe.pt", tmp_path / "plain.pt"
	_agent(walker_cfg("use_moe=true", "moe_experts=2")).save(moe)
	_agent(walker_cfg()).save(plain)
	with pytest.raises(ValueError, match=r"moe_experts=2.*moe_experts=3"):
		_agent(walker_cfg("use_moe=true", "moe_experts=3")).load(moe)
	with pytest.raises(ValueError, match=r"moe_experts=2.*plain TD-MPC2"):
		_agent(walker_cfg()).load(moe)
	with pytest.raises(ValueError, match=r"plain TD-MPC2.*moe_experts=2"):
		_agent(walker_cfg("use_moe=true", "moe_experts=2")).load(plain)


def _expert_params(block, i):
	return [p[i].clone() for layer in block.layers for p in layer.parameters()]


def test_moe_init_experts_copies_plain_heads_and_freeze_trains_gates_only(walker_cfg, make_buffer, tmp_path):
	paths = [tmp_path / f"plain{i}.pt" for i in range(2)]
	for i, path in enumerate(paths):
		_agent(walker_cfg(), seed=10 + i).save(path)
	plain = [torch.load(p, weights_only=True)["model"] for p in paths]
	cfg = walker_cfg("use_moe=true", "moe_experts=2", "moe_heads=[encoder,dynamics,pi]",
					 f"moe_init_experts=[{paths[0]},{paths[1]}]", "moe_freeze_experts=true")
	agent = _agent(cfg)
	blocks = heads.moe_blocks(agent.model)
	for name, prefix in (("encoder", "_encoder.state"), ("dynamics", "_dynamics"), ("pi", "_pi")):
		for i in range(2):
			for j, layer in enumerate(blocks[name].layers):
				torch.testing.assert_close(layer.weight[i], plain[i][f"{prefix}.{j}.weight"], rtol=0, atol=0)
				torch.testing.assert_close(layer.bias[i], plain[i][f"{prefix}.{j}.bias"], rtol=0, atol=0)
				if layer.norm:
					torch.testing.assert_close(layer.ln_weight[i], plain[i][f"{prefix}.{j}.ln.weight"], rtol=0, atol=0)
	assert not torch.equal(blocks["dynamics"].layers[0].weight[0], blocks["dynamics"].layers[0].weight[1])
	experts = {n: _expert_params(b, 0) + _expert_params(b, 1) for n, b in blocks.items()}
	gates = {n: b.gate.weight.detach().clone() for n, b in blocks.items()}
	assert all(not p.requires_grad for b in blocks.values() for p in b.layers.parameters())
	buffer = make_buffer(cfg)
	for _ in range(3):
		agent.update(buffer)
	for name, block in blocks.items():
		assert all(torch.equal(a, b) for a, b in zip(experts[name], _expert_params(block, 0) + _expert_params(block, 1)))
		assert not torch.equal(gates[name], block.gate.weight), f"{name} gate did not train"


def test_moe_init_experts_rejects_a_moe_checkpoint(walker_cfg, tmp_path):
	path = tmp_path / "moe.pt"
	_agent(walker_cfg("use_moe=true", "moe_experts=2")).save(path)
	with pytest.raises(ValueError, match="moe_init_experts"):
		_agent(walker_cfg("use_moe=true", "moe_experts=2", f"moe_init_experts=[{path},{path}]"))


@pytest.mark.slow
def test_train_command_runs_upstream_trainer_on_cpu(tdmpc2_root, tmp_path):
	# seed_steps=500 is one walker episode (the buffer needs one before the first update); mpc=false
	# keeps the evaluation episode cheap. The pretraining phase runs 500 MoE updates.
	args = ["--tdmpc2", str(tdmpc2_root), "task=walker-walk", "steps=510", "seed_steps=500", "eval_freq=100000",
			"eval_episodes=1", "enable_wandb=false", "compile=false", "save_video=false", "device=cpu",
			"model_size=1", "batch_size=16", "mpc=false", "use_moe=true", "moe_experts=2",
			"monitor_mem_interval=250"]
	env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
	out = subprocess.run([sys.executable, "-m", "tdmpc2_moe", "train", *args], cwd=tmp_path,
						 capture_output=True, text=True, env=env, timeout=420)
	assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
	assert "Training completed successfully" in out.stdout
	assert "Dynamics: MoEBlock" in out.stdout and "Memory Usage:" in out.stdout
	with open(tmp_path / "logs" / "walker-walk" / "1" / "default" / "eval.csv") as f:
		rows = list(csv.DictReader(f))
	assert rows and float(rows[0]["step"]) == 0


def test_train_command_rejects_bad_settings(tdmpc2_root, capsys):
	from tdmpc2_moe.cli import train as train_command
	assert train_command.main(["--tdmpc2", str(tdmpc2_root), "use_moe=true", "moe_heads=[Qs]"]) == 2
	assert "moe_heads" in capsys.readouterr().err
	assert train_command.main(["--tdmpc2", str(tdmpc2_root), "no_such_key=1"]) == 2
	assert not patching.is_patched()

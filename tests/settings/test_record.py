"""The settings record (MoESettings): the documented defaults, cfg keys against keywords, errors that name the key."""
import pytest
import torch

from tdmpc2_moe.settings import MoESettings


def test_defaults_are_the_documented_ones():
	s = MoESettings.resolve()
	assert (s.use_moe, s.moe_experts, s.moe_top_k, s.moe_heads) == (False, 4, 2, ("dynamics", "reward", "pi"))
	assert (s.moe_temperature, s.moe_aux_coef, s.moe_zloss_coef) == (1.0, 0.01, 0.0)
	assert (s.gate_history_rows, s.monitor_mem_interval, s.device) == (65536, 1000, None)
	assert (s.moe_init_experts, s.moe_freeze_experts) == ((), False)


def test_cfg_wins_over_keywords_and_none_in_cfg_does_not():
	cfg = {"use_moe": True, "moe_experts": 8, "device": None}
	s = MoESettings.resolve(cfg, moe_experts=2, device="cpu", moe_top_k=1)
	assert (s.use_moe, s.moe_experts, s.moe_top_k) == (True, 8, 1)
	assert s.device == torch.device("cpu")


@pytest.mark.parametrize("key, value", [
	("use_moe", "yes"), ("moe_experts", 0), ("moe_experts", 2.0), ("moe_experts", 2000), ("moe_top_k", 5),
	("moe_heads", ["dynamics", "Qs"]), ("moe_heads", [1]), ("moe_temperature", 0.0),
	("moe_temperature", float("nan")), ("moe_aux_coef", -1.0), ("moe_zloss_coef", float("inf")),
	("gate_history_rows", -1), ("monitor_mem_interval", True), ("device", "gpu0"),
	("moe_init_experts", ["a.pt"]), ("moe_freeze_experts", 1),
])
def test_bad_values_raise_naming_the_key(key, value):
	with pytest.raises(ValueError, match=key):
		MoESettings.resolve(**{key: value})
	with pytest.raises(ValueError, match=key):
		MoESettings.resolve({key: value})


def test_heads_accept_a_comma_separated_string():
	assert MoESettings.resolve(moe_heads="encoder, termination").moe_heads == ("encoder", "termination")

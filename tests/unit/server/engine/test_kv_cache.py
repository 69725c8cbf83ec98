"""The KV cache: slot sizing from a memory budget, tensor shapes, slot allocation and usage."""

import pytest
import torch

from server.engine.kv_cache import DEFAULT_CPU_BUDGET_GB, KVCache, KVCacheSpec, slots_for_budget

SPEC = KVCacheSpec(layers=2, kv_heads=2, head_dim=16, max_model_len=64, dtype=torch.float32)


def test_bytes_per_slot_is_k_and_v_for_every_layer_and_position():
    assert SPEC.bytes_per_slot == 2 * 2 * 2 * 64 * 16 * 4
    half = KVCacheSpec(2, 2, 16, 64, torch.bfloat16)
    assert half.bytes_per_slot == SPEC.bytes_per_slot // 2


def test_slots_for_budget_caps_at_what_fits_and_keeps_one():
    per_slot_gb = SPEC.bytes_per_slot / 2**30
    assert slots_for_budget(SPEC, 16, 3.5 * per_slot_gb, "cpu") == 3
    assert slots_for_budget(SPEC, 2, 100 * per_slot_gb, "cpu") == 2
    assert slots_for_budget(SPEC, 16, 0.1 * per_slot_gb, "cpu") == 1


def test_cpu_default_budget():
    big = KVCacheSpec(layers=32, kv_heads=8, head_dim=128, max_model_len=4096, dtype=torch.float32)
    assert big.bytes_per_slot == 2**30
    expected = int(DEFAULT_CPU_BUDGET_GB)
    assert slots_for_budget(big, 1000, None, "cpu") == expected


def test_tensors_have_one_slot_per_request():
    cache = KVCache(SPEC, slots=3, device="cpu")
    assert len(cache.k) == len(cache.v) == SPEC.layers
    for tensor in (*cache.k, *cache.v):
        assert tensor.shape == (3, SPEC.kv_heads, SPEC.max_model_len, SPEC.head_dim)
        assert tensor.dtype == SPEC.dtype


def test_allocate_release_and_usage():
    cache = KVCache(SPEC, slots=2, device="cpu")
    first, second = cache.allocate(), cache.allocate()
    assert {first, second} == {0, 1}
    assert cache.free_slots == 0
    with pytest.raises(IndexError):
        cache.allocate()
    cache.lengths[first] = 32
    cache.lengths[second] = 16
    assert cache.usage() == pytest.approx(48 / (2 * 64))
    cache.release(first)
    assert cache.free_slots == 1
    assert cache.usage() == pytest.approx(16 / (2 * 64))
    assert cache.allocate() == first  # a released slot is reused, its length reset
    assert cache.lengths[first] == 0

"""The native kernels' Python boundary: every argument the C++ side would trust is checked first. Each case below
used to reach the kernel (an out-of-bounds write or read, or garbage) and is now a ValueError naming the problem."""

import pytest
import torch

from nexusquant_vllm import codec, native

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels not built")

FMT = codec.get_format("e8-k3v2", 64)
NUM_BLOCKS, HK, PAGE, N = 4, 2, 16, 5


def store_args(**change):
    args = dict(key=torch.randn(N, HK, 64), value=torch.randn(N, HK, 64),
                kv_cache=torch.zeros(NUM_BLOCKS, HK, PAGE, FMT.slot_bytes, dtype=torch.uint8),
                slot_mapping=torch.tensor([0, 17, -1, 40, 63]), fmt=FMT)
    return {**args, **change}


def decode_args(**change):
    args = dict(query=torch.randn(2, 6, 64), key=torch.randn(2, HK, 64), value=torch.randn(2, HK, 64),
                kv_cache=torch.zeros(NUM_BLOCKS, HK, PAGE, FMT.slot_bytes, dtype=torch.uint8),
                block_table=torch.tensor([[1, 2], [3, 0]]), cached_len=torch.tensor([20, 9]), scale=0.125, fmt=FMT)
    return {**args, **change}


def test_valid_arguments_pass():
    native.store_kv(**store_args())
    assert native.decode_attention(**decode_args()).shape == (2, 6, 64)


@pytest.mark.parametrize("change,message", [
    ({"slot_mapping": torch.tensor([0, 17, -1, 40, 64])}, r"slot_mapping .* must lie in \[-1, 64\)"),
    ({"slot_mapping": torch.tensor([0, 17, -2, 40, 63])}, r"slot_mapping .* must lie in \[-1, 64\)"),
    ({"slot_mapping": torch.tensor([0, 1, 2])}, "slot_mapping must be 5 integer slots"),
    ({"value": torch.randn(N, HK, 32)}, "key and value must both be"),
    ({"key": torch.randn(N, 3, 64), "value": torch.randn(N, 3, 64)}, "holds 2 KV heads, the K/V 3"),
    ({"key": torch.randn(N, HK, 128), "value": torch.randn(N, HK, 128)}, "does not match the format's 64"),
    ({"kv_cache": torch.zeros(NUM_BLOCKS, HK, PAGE, 40, dtype=torch.uint8)}, "slots are 40 wide, the format needs 44"),
    ({"kv_cache": torch.zeros(NUM_BLOCKS, HK, PAGE, FMT.slot_bytes)}, "dtype must be one of"),
    ({"kv_cache": torch.zeros(NUM_BLOCKS, HK, PAGE, 2 * FMT.slot_bytes, dtype=torch.uint8)[..., ::2]},
     "slot must be contiguous"),
    ({"kv_cache": torch.zeros(NUM_BLOCKS * HK * PAGE, FMT.slot_bytes, dtype=torch.uint8)}, "kv_cache must be"),
])
def test_store_refuses(change, message):
    with pytest.raises(ValueError, match=message):
        native.store_kv(**store_args(**change))


@pytest.mark.parametrize("change,message", [
    ({"block_table": torch.tensor([[1, 4], [3, 0]])}, r"block ids must lie in \[0, 4\)"),
    ({"block_table": torch.tensor([[1, -1], [3, 0]])}, r"block ids must lie in \[0, 4\)"),
    ({"cached_len": torch.tensor([33, 9])}, r"cached_len must lie in \[0, 33\)"),
    ({"cached_len": torch.tensor([20])}, "cached_len \\[2\\]"),
    ({"query": torch.randn(2, 5, 64)}, "5 query heads over 2 KV heads"),
    ({"query": torch.randn(2, 34, 64)}, "at most 16 per KV head"),
    ({"value": torch.randn(2, HK, 32)}, "query must be"),
    ({"query": torch.randn(2, 6, 128), "key": torch.randn(2, HK, 128), "value": torch.randn(2, HK, 128)},
     "does not match the format's 64"),
    ({"fmt": None}, "kv_cache dtype must be one of"),  # E8 pages read as dense rows
    ({"kv_cache": torch.zeros(NUM_BLOCKS, 3, PAGE, FMT.slot_bytes, dtype=torch.uint8)}, "holds 3 KV heads"),
])
def test_decode_refuses(change, message):
    with pytest.raises(ValueError, match=message):
        native.decode_attention(**decode_args(**change))

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from benchmarks import common
from benchmarks.corpus import load_corpus_text


@pytest.fixture(scope="module")
def tokenizer(smollm2_path: str) -> PreTrainedTokenizerBase:
    """One instance for the module, so the tokenized corpus is computed once."""
    return AutoTokenizer.from_pretrained(smollm2_path)


def test_corpus_is_the_deduplicated_bbc_articles() -> None:
    text = load_corpus_text()
    assert text.startswith("Ad sales boost Time Warner profit\n\n")
    assert 4_500_000 < len(text) < 5_000_000
    assert "�" not in text  # the one Latin-1 file decoded, not replaced


def test_corpus_chunks_are_deterministic_and_disjoint(tokenizer: PreTrainedTokenizerBase) -> None:
    chunks = common.corpus_token_chunks(tokenizer, n_chunks=64, chunk_len=512, seed=7)
    assert chunks == common.corpus_token_chunks(tokenizer, n_chunks=64, chunk_len=512, seed=7)
    assert chunks != common.corpus_token_chunks(tokenizer, n_chunks=64, chunk_len=512, seed=8)
    stream = common.tokenized_corpus(tokenizer)
    assert len(stream) > 1_000_000
    windows = stream[: len(stream) // 512 * 512].view(-1, 512)
    positions = {(windows == torch.tensor(chunk)).all(dim=1).nonzero().item() for chunk in chunks}
    assert len(positions) == len(chunks)


def test_too_many_chunks_is_an_error(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError, match="windows"):
        common.corpus_token_chunks(tokenizer, n_chunks=1_000, chunk_len=4096, seed=0)


def test_captured_qkv_shapes_and_layer_choice(smollm2_path: str) -> None:
    token_ids = list(range(100, 120))
    full = common.capture_qkv(smollm2_path, token_ids)
    assert full.queries.shape == (30, 9, 20, 64)
    assert full.keys.shape == full.values.shape == (30, 3, 20, 64)
    picked = common.capture_qkv(smollm2_path, token_ids, layers=[7, 2])
    assert torch.equal(picked.queries, full.queries[[7, 2]])
    assert torch.equal(picked.values, full.values[[7, 2]])


def test_captured_qkv_is_what_attention_used(smollm2_path: str) -> None:
    """Causal attention over the captured Q, K, V gives the very tensor the layer fed to o_proj (so Q is post-RoPE)."""
    layer = 11
    attention = common.float32_model(smollm2_path).model.layers[layer].self_attn
    fed_to_o_proj = []
    hook = attention.o_proj.register_forward_pre_hook(lambda module, args: fed_to_o_proj.append(args[0]))
    try:
        queries, keys, values = (part[layer] for part in common.capture_qkv(smollm2_path, list(range(200, 240))))
    finally:
        hook.remove()
    groups = queries.shape[0] // keys.shape[0]
    out = F.scaled_dot_product_attention(
        queries, keys.repeat_interleave(groups, 0), values.repeat_interleave(groups, 0), is_causal=True
    )
    torch.testing.assert_close(out.transpose(0, 1).reshape(40, -1), fed_to_o_proj[0][0])


def test_write_results_writes_json_and_markdown(tmp_path: Path) -> None:
    json_path, markdown_path = common.write_results("demo", {"mse": 0.5}, "| a |\n|---|\n| 1 |", tmp_path)
    assert json.loads(json_path.read_text()) == {"mse": 0.5}
    assert markdown_path.read_text() == "| a |\n|---|\n| 1 |\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["demo.json", "demo.md"]

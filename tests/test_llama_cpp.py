"""GGUF in llama.cpp: greedy tokens of the exported INT4 sub-network equal hf-elastic's; LoNAS per-layer widths as
llama.cpp's `deci`; and `push` of every export format with the card that runs it."""

from __future__ import annotations

import copy
import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import ARCHS, byte_level_bpe, make_config, pruned, qa_config, random_llama, train_steps
from huggingface_hub import ModelCard
from peft import get_peft_model
from test_export import FakeHub, fake_hub  # noqa: F401 (the fixture)

from hf_elastic import QuantLinear, export_subnetwork, get_supernet, push_to_hub, quantize
from hf_elastic.export import CardInfo, build_model_card, write_gguf

requires_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs hf-elastic[gguf]")
requires_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="needs hf-elastic[llama-cpp] (compiles llama.cpp)"
)
ARCH = ARCHS["llama"]
WORDS = ["good food", "bad taste", "great tea", "not very good", "it was bad"]
PROMPTS = ["good food and great tea", "it was bad, not very", "bad taste. great", "not very good food"]
NEW_TOKENS = 8
TOKEN = "hf_" + "x" * 34


def tokenizer():
    return byte_level_bpe(WORDS * 10, 300, ["</s>"], eos_token="</s>", pad_token="</s>", bos_token="</s>")


def tiny_llama(vocab: int, train_steps: int = 0):
    """A tiny Llama (hidden 128, so INT4 groups of 128 fit), trained for `train_steps` to continue a fixed cycle of
    the phrases, so that its greedy choices are clear: the smallest top-2 logit margin of the prompts below is
    0.06-2 after pruning and INT4 (logits of about 10), where a random model's goes down to 1e-3 and any kernel's
    rounding flips it. llama.cpp's int8 activations move these logits by up to 0.14."""
    model = random_llama(vocab, hidden_size=128, intermediate_size=256)
    if train_steps:
        stream = tokenizer().encode(", ".join(WORDS * 12))
        data = torch.tensor([stream[i : i + 24] for i in range(len(stream) - 24)])
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for step in range(train_steps):
            batch = data[torch.randint(0, len(data), (16,), generator=torch.Generator().manual_seed(step))]
            opt.zero_grad()
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    return tiny_llama(len(tokenizer()), train_steps=150)


def qa_int4_supernet(base, group_size: int, symmetric: bool, sparse: bool):
    """A QA-SparsePEFT super-network (two training steps) on a copy of `base`, quantized with RTN INT4."""
    base = pruned(base) if sparse else copy.deepcopy(base)
    quantize(base, bits=4, group_size=group_size, symmetric=symmetric, keep_residual=True, show_progress=False)
    model = get_peft_model(base, qa_config(ARCH, grouped=False))
    train_steps(model, ARCH, steps=2)
    return get_supernet(model)


def lonas_widths_model(base):
    """A LoNAS sub-network of a copy of `base` with per-layer widths: layer 0 keeps 192 of 256 feed-forward units,
    layer 1 two of four heads (one of two key/value heads)."""
    peft_config = make_config("elastic", ARCH, init_lora_weights=False)
    sn = get_supernet(get_peft_model(copy.deepcopy(base), peft_config))
    config = sn.space.max_config() | {"0.ffn": 192, "1.heads": sn.space["1.heads"].choices[-1]}
    return sn, config


def torch_greedy(model, ids: list[int]) -> tuple[list[int], np.ndarray]:
    """PyTorch's greedy tokens after `ids`, and the logits each was chosen from."""
    tokens, rows = list(ids), []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            rows.append(model(input_ids=torch.tensor([tokens])).logits[0, -1].numpy())
            tokens.append(int(rows[-1].argmax()))
    return tokens[len(ids) :], np.stack(rows)


def llama_cpp_greedy(path, ids: list[int]) -> tuple[list[int], np.ndarray]:
    """llama.cpp's greedy tokens after `ids` (f32 KV cache, one thread), and the logits each was chosen from."""
    from llama_cpp import Llama, llama_get_logits_ith

    llm = Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=1, type_k=0, type_v=0, verbose=False)
    llm.eval(ids)
    tokens, rows = [], []
    for _ in range(NEW_TOKENS):
        rows.append(np.ctypeslib.as_array(llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy())
        tokens.append(int(rows[-1].argmax()))
        llm.eval([tokens[-1]])
    llm.close()
    return tokens, np.stack(rows)


def assert_llama_cpp_matches(path, model, tok, atol: float) -> None:
    """llama.cpp's greedy tokens equal PyTorch's on every prompt, and its logits are within `atol` (its CPU kernels
    multiply INT4 blocks by int8-quantized activations, hence the looser bound for INT4)."""
    from llama_cpp import Llama

    vocab_only = Llama(model_path=str(path), vocab_only=True, verbose=False)
    assert [vocab_only.tokenize(p.encode(), add_bos=False) for p in PROMPTS] == [tok.encode(p) for p in PROMPTS]
    vocab_only.close()
    worst, seen = 0.0, set()
    for prompt in PROMPTS:
        expected, expected_logits = torch_greedy(model, tok.encode(prompt))
        got, logits = llama_cpp_greedy(path, tok.encode(prompt))
        assert got == expected, prompt
        worst, seen = max(worst, float(np.abs(logits - expected_logits).max())), seen | set(got)
    print(f"{path.parent.name}: greedy tokens equal on {len(PROMPTS)} prompts; max |logit diff| = {worst:.2e}")
    assert worst <= atol
    assert len(seen) > 2  # not one repeated token


# (group size, symmetric, 50 %-sparse base)
INT4_SCHEMES = [(32, False, False), (32, True, True), (64, False, True), (128, True, False)]


@requires_llama_cpp
@pytest.mark.parametrize(("group_size", "symmetric", "sparse"), INT4_SCHEMES)
def test_llama_cpp_greedy_tokens_equal_hf_elastic_int4(tmp_path, trained, group_size, symmetric, sparse):
    tok = tokenizer()
    sn = qa_int4_supernet(trained, group_size, symmetric, sparse)
    merged = sn.extract_model("min")  # hf-elastic's INT4 forward: QuantLinear layers
    assert isinstance(merged.model.layers[0].mlp.down_proj, QuantLinear)
    out = export_subnetwork(sn, "min", tmp_path / f"g{group_size}", tokenizer=tok, format="gguf")
    assert_llama_cpp_matches(out / "model.gguf", merged, tok, atol=0.25)


@requires_llama_cpp
def test_llama_cpp_runs_per_layer_widths(tmp_path, trained):
    tok = tokenizer()
    sn, config = lonas_widths_model(trained)
    out = export_subnetwork(sn, config, tmp_path / "lonas", tokenizer=tok, format="gguf")  # float: F32
    assert_llama_cpp_matches(out / "model.gguf", sn.extract_model(config), tok, atol=1e-4)
    int4 = sn.extract_model(config)
    quantize(int4, bits=4, group_size=64, show_progress=False)
    (tmp_path / "int4").mkdir()
    write_gguf(int4, tmp_path / "int4" / "model.gguf", tok)
    assert_llama_cpp_matches(tmp_path / "int4" / "model.gguf", int4, tok, atol=0.25)


@requires_gguf
def test_per_layer_widths_are_written_as_deci(tmp_path):
    from gguf import GGUFReader

    from hf_elastic.export.gguf_file import permute_rows

    tok = tokenizer()
    sn, config = lonas_widths_model(tiny_llama(len(tok)))
    model = sn.extract_model(config)
    quantize(model, bits=4, group_size=64, symmetric=True, show_progress=False)
    kinds = write_gguf(model, tmp_path / "model.gguf", tok)
    assert set(kinds.values()) == {"Q4_0", "F32"} and kinds["model.layers.1.self_attn.o_proj"] == "Q4_0"
    reader = GGUFReader(tmp_path / "model.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "deci"
    assert fields["deci.feed_forward_length"] == [192, 256]
    assert fields["deci.attention.head_count"] == [4, 2] and fields["deci.attention.head_count_kv"] == [2, 1]
    assert fields["deci.attention.key_length"] == 32 and fields["deci.rope.dimension_count"] == 32
    tensors = {t.name: t for t in reader.tensors}
    # ggml shapes are (in, out); a Q4_0 row of 128 weights is 4 blocks of 18 bytes (d, 16 bytes of nibbles)
    assert [int(x) for x in tensors["blk.0.ffn_down.weight"].shape] == [192, 128]
    assert [int(x) for x in tensors["blk.1.attn_q.weight"].shape] == [128, 64]
    assert [int(x) for x in tensors["blk.1.attn_k.weight"].shape] == [128, 32]
    assert [int(x) for x in tensors["blk.1.attn_output.weight"].shape] == [64, 128]
    q = model.model.layers[1].self_attn.q_proj
    raw = np.asarray(tensors["blk.1.attn_q.weight"].data).reshape(64, 4, 18)
    codes = np.concatenate([raw[..., 2:] & 15, raw[..., 2:] >> 4], axis=-1).reshape(64, 128)
    assert np.array_equal(codes, permute_rows(q.qweight, 2).numpy())  # permuted with this layer's two heads

    # uniform widths stay `llama`, which transformers' GGUF loader also reads
    uniform = tiny_llama(len(tok))
    write_gguf(uniform, tmp_path / "uniform.gguf", tok)
    arch = GGUFReader(tmp_path / "uniform.gguf").fields["general.architecture"].contents()
    assert arch == "llama"

    (tmp_path / "uniform.gguf").unlink()
    card = build_model_card(tmp_path, CardInfo(base_model="me/base", method="lonas"))
    assert "uses llama.cpp's `deci`\narchitecture" in card.text and "INT4, ggml Q4_0" in card.text


@requires_gguf
def test_gguf_refuses_an_attention_free_layer(tmp_path):
    model = tiny_llama(300)
    attn = model.model.layers[1].self_attn
    attn.k_proj = torch.nn.Linear(128, 0, bias=False)
    with pytest.raises(ValueError, match=r"cannot describe layer 1: .* have 128 and 0 rows, not whole heads of 32"):
        write_gguf(model, tmp_path / "a.gguf", tokenizer())
    model.model.layers[1].self_attn.k_proj = torch.nn.Linear(128, 32, bias=False)
    with pytest.raises(ValueError, match=r"layer 1: self_attn.v_proj is 64x128, where the .* make it 32x128"):
        write_gguf(model, tmp_path / "a.gguf", tokenizer())
    assert not (tmp_path / "a.gguf").exists()


# ---------------------------------------------------------------------------------------------------- push
FORMATS = {
    # format: (how-to-run lines the card must hold, lines it must not)
    "hf-elastic": (['load_exported(snapshot_download("me/tiny-hf-elastic"))'], ["vllm serve", "llama-cli"]),
    "compressed-tensors": (
        [
            "vllm serve me/tiny-compressed-tensors",
            'AutoModelForCausalLM.from_pretrained("me/tiny-compressed-tensors")',
        ],
        ["load_exported", "llama-cli"],
    ),
    "gguf": (
        [
            "llama-cli --hf-repo me/tiny-gguf --hf-file model.gguf",
            "llama-server --hf-repo me/tiny-gguf --hf-file model.gguf",
            "ollama run hf.co/me/tiny-gguf",
            'Llama.from_pretrained(repo_id="me/tiny-gguf", filename="model.gguf")',
            "4-bit integers in ggml `Q4_1` blocks of 32 weights",
            "zero weights read back as\nvalues of at most 0.8 % of a quantization step",
        ],
        ["vllm serve", "load_exported", 'from_pretrained("me/tiny-gguf")'],
    ),
    "openvino": (['OVModelForCausalLM.from_pretrained("me/tiny-openvino")'], ["vllm serve", "llama-cli"]),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """One sparse INT4 QA sub-network in every format: hf-elastic, compressed-tensors, GGUF and OpenVINO."""
    root, tok = tmp_path_factory.mktemp("formats"), tokenizer()
    sn = qa_int4_supernet(tiny_llama(len(tok)), 32, False, True)
    folders = {}
    for fmt in ("hf-elastic", "compressed-tensors", "gguf"):
        if fmt != "hf-elastic" and importlib.util.find_spec(fmt.replace("-", "_")) is None:
            continue
        folders[fmt] = export_subnetwork(sn, "min", root / fmt, tokenizer=tok, format=fmt)
    if importlib.util.find_spec("openvino") is not None:
        from hf_elastic.export import export_openvino

        folders["openvino"] = export_openvino(folders["hf-elastic"], root / "openvino")
    return folders


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_push_uploads_every_format_with_its_how_to_run(exported, fake_hub, tmp_path, fmt):  # noqa: F811
    if fmt not in exported:
        pytest.skip(f"the {fmt} export needs its extra")
    source, repo = exported[fmt], f"me/tiny-{fmt}"
    info = CardInfo(base_model="me/base", license="apache-2.0")
    url = push_to_hub(source, repo, card_info=info, token=TOKEN)
    assert url.startswith("https://huggingface.co/me/tiny/commit/")
    files = fake_hub.committed_files()
    artefact = {p.name for p in source.iterdir() if p.is_file()}
    assert set(files) == artefact | {"README.md"}
    assert all(files[name] == (source / name).read_bytes() for name in artefact)
    weights = {"hf-elastic": "model.safetensors", "compressed-tensors": "model.safetensors", "gguf": "model.gguf",
               "openvino": "openvino_model.bin"}  # fmt: skip
    assert len(files[weights[fmt]]) > 10_000
    if "sparsity_report.json" in artefact or fmt != "openvino":
        assert json.loads(files["sparsity_report.json"])["sparsity"] >= 0.5
    card = ModelCard(files["README.md"].decode())
    must, must_not = FORMATS[fmt]
    for text in must:
        assert text in card.text, text
    for text in must_not:
        assert text not in card.text, text
    assert card.data.base_model == "me/base" and card.data.base_model_relation == "quantized"
    assert {"sqft", "qa-sparsepeft"} <= set(card.data.tags)
    if fmt == "gguf":
        assert {"gguf", "llama.cpp", "int4", "sparse"} <= set(card.data.tags) and card.data.library_name is None
        assert "| Weights | INT4, ggml Q4_1 |" in card.text
    assert "| Weights | INT4, g" in card.text  # group size 32; GGUF: its ggml blocks of 32
    if fmt == "openvino":  # nothing in the IR folder records the bits: read from its u4 constants
        assert "4-bit integers (asymmetric) with one scale per group of 32 weights" in card.text
    else:
        assert "% of the weights in the linear layers are zero" in card.text

"""Hugging Face transformers models (``hf:DIR``): building from config.json +
model.safetensors, GPT-2's Conv1D as a Linear, conversion, save/load, the dense export as
a directory ``from_pretrained`` loads unchanged, and the trust rules (a directory never
makes transformers run code). Tiny random configs: fast."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli

import symconvert
from symconvert.errors import CheckpointError, SymconvertError, WeightsError
from symconvert.io.export import export
from symconvert.models.hf import is_hf

transformers = pytest.importorskip("transformers")

VOCAB = 64


def _configs() -> dict:
    return {
        "gpt2": transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2,
                                        n_head=4, bos_token_id=0, eos_token_id=0),
        "bert": transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=64,
                                        max_position_embeddings=32),
        "llama": transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=32),
    }


CLASSES = {"gpt2": "GPT2LMHeadModel", "bert": "BertModel", "llama": "LlamaForCausalLM"}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """save_pretrained directories of tiny random GPT-2, BERT and Llama (GQA) models."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    out = {}
    for name, config in _configs().items():
        model = getattr(transformers, CLASSES[name])(config)
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def _reference(path: Path, name: str, x: torch.Tensor) -> torch.Tensor:
    auto = transformers.AutoModel if name == "bert" else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(path).eval()
    with torch.no_grad():
        out = model(x)
    return out.last_hidden_state if name == "bert" else out.logits


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_convert_save_load_export_round_trip(hf_dirs, tmp_path, name):
    """hf:DIR equals transformers' own model; converted, saved, loaded and exported dense,
    the directory loads with from_pretrained and gives the symconvert model's outputs."""
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    model = symconvert.create_model(f"hf:{hf_dirs[name]}")
    assert is_hf(model)
    conv1d = transformers.pytorch_utils.Conv1D
    assert not any(isinstance(m, conv1d) for m in model.modules())  # GPT-2: Linear now
    with torch.no_grad():
        assert torch.allclose(model(x), _reference(hf_dirs[name], name, x), atol=1e-5)
    converted, plan = symconvert.convert(model, "block")
    names = [e.module for e in plan.converted]
    assert names and not any("lm_head" in n or "embed" in n or "wte" in n for n in names)
    symconvert.save(converted, tmp_path / "conv")
    loaded = symconvert.load(tmp_path / "conv")
    with torch.no_grad():
        y = converted(x)
        assert torch.equal(loaded(x), y)
        assert not torch.allclose(y, _reference(hf_dirs[name], name, x), atol=1e-3)
    export(loaded, "dense", tmp_path / "dense")
    assert (tmp_path / "dense" / "config.json").is_file()
    assert torch.allclose(_reference(tmp_path / "dense", name, x), y, atol=1e-5)


def test_gpt2_conv1d_is_an_equal_linear_and_tied_embeddings_count_once(hf_dirs):
    model = symconvert.create_model(f"hf:{hf_dirs['gpt2']}")
    ref = transformers.GPT2LMHeadModel.from_pretrained(hf_dirs["gpt2"])
    c_attn = model.model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, torch.nn.Linear)
    assert torch.equal(c_attn.weight, ref.transformer.h[0].attn.c_attn.weight.t())
    inner = model.model
    assert inner.lm_head.weight is inner.transformer.wte.weight
    own = sum(p.numel() for p in model.parameters())
    assert own == sum(p.numel() for p in ref.parameters())
    # the tied head is the classifier: left alone unless asked
    plan = symconvert.inspect(model, "block", include_head=True)
    assert "model.lm_head" in [e.module for e in plan.layers]


def test_llama_gqa_projections_are_rectangular(hf_dirs):
    """k/v of grouped-query attention are [16, 32]: block converts them, channel skips
    them with the reason."""
    model = symconvert.create_model(f"hf:{hf_dirs['llama']}")
    k = "model.model.layers.0.self_attn.k_proj"
    assert list(model.get_submodule(k).weight.shape) == [16, 32]
    assert k in [e.module for e in symconvert.inspect(model, "block").converted]
    channel = {e.module: e for e in symconvert.inspect(model, "channel").layers}
    assert not channel[k].converted and channel[k].reason
    assert channel["model.model.layers.0.self_attn.q_proj"].converted


def test_cli_convert_and_export(hf_dirs, tmp_path):
    result = run_cli("convert", f"hf:{hf_dirs['bert']}", "--scheme", "channel",
                     "--out", tmp_path / "c")
    assert result.code == 0, result
    result = run_cli("export", tmp_path / "c", "--format", "dense", "--out", tmp_path / "d")
    assert result.code == 0, result
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["config.json",
                                                                  "model.safetensors"]
    meta = json.loads((tmp_path / "c" / "symconvert.json").read_text())
    assert meta["source"]["library"] == "hf" and meta["source"]["config"]["model_type"] == "bert"


# ----------------------------------------------------------------------------- trust


def _copy(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(config_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_auto_map_is_refused_and_its_code_never_runs(hf_dirs, tmp_path):
    marker = tmp_path / "ran"
    d = _copy(hf_dirs["bert"], tmp_path / "remote", auto_map={"AutoModel": "evil.EvilModel"})
    (d / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    result = run_cli("inspect", f"hf:{d}", "--scheme", "block")
    assert result.code == 2, result
    assert "auto_map" in result.stderr and "trust_remote_code" in result.stderr
    assert "Traceback" not in result.stderr and not marker.exists()


def test_crafted_directory_recording_auto_map_is_refused(hf_dirs, tmp_path):
    model = symconvert.create_model(f"hf:{hf_dirs['bert']}")
    symconvert.save(model, tmp_path / "m")
    path = tmp_path / "m" / "symconvert.json"
    meta = json.loads(path.read_text())
    meta["source"]["config"]["auto_map"] = {"AutoModel": "evil.EvilModel"}
    path.write_text(json.dumps(meta))
    # the header copy inside model.safetensors is what load reads: drop it
    from safetensors.torch import load_file, save_file
    save_file(load_file(str(tmp_path / "m" / "model.safetensors")),
              str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="auto_map"):
        symconvert.load(tmp_path / "m", trust_code=True)  # never, even when trusting


def test_pickle_weights_and_unknown_architectures_are_refused(hf_dirs, tmp_path):
    d = _copy(hf_dirs["bert"], tmp_path / "bin")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="pytorch_model.bin"):
        symconvert.create_model(f"hf:{d}")
    d = _copy(hf_dirs["bert"], tmp_path / "arch", architectures=["BertForEvil"])
    with pytest.raises(SymconvertError, match="not supported"):
        symconvert.create_model(f"hf:{d}")
    d = _copy(hf_dirs["bert"], tmp_path / "type", model_type="evil")
    with pytest.raises(SymconvertError, match="not a transformers architecture"):
        symconvert.create_model(f"hf:{d}")
    d = _copy(hf_dirs["bert"], tmp_path / "kernel", attn_implementation="kernels-community/x")
    with pytest.raises(SymconvertError, match="fetched from the Hub"):
        symconvert.create_model(f"hf:{d}")
    result = run_cli("inspect", "hf:nobody-xyz/absent-model", "--scheme", "block")
    assert result.code == 2 and "local Hugging Face cache" in result.stderr, result


def test_hub_name_is_read_from_the_local_cache(hf_dirs, tmp_path, monkeypatch):
    """hf:ORG/NAME: the snapshot in the Hugging Face cache, offline."""
    snapshot = tmp_path / "hub" / "models--someorg--tiny-bert" / "snapshots" / ("a" * 40)
    shutil.copytree(hf_dirs["bert"], snapshot)
    refs = tmp_path / "hub" / "models--someorg--tiny-bert" / "refs"
    refs.mkdir()
    (refs / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    model = symconvert.create_model("hf:someorg/tiny-bert")
    assert model.symconvert_source["name"] == "someorg/tiny-bert"
    x = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert torch.allclose(model(x), _reference(hf_dirs["bert"], "bert", x), atol=1e-5)


def _wordpiece(text: list[str], path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tok.train_from_iterator(text, trainers.WordPieceTrainer(vocab_size=VOCAB,
                                                            special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(path))


def test_sequence_classifier_on_tsv(tmp_path):
    """A BertForSequenceClassification head: tsv:ROOT with its tokenizer, top-1 over every
    test line; image data and text: refuse it by name."""
    pytest.importorskip("tokenizers")
    from symconvert.train.evaluate import evaluate

    config = _configs()["bert"]
    config.num_labels = 3
    d = tmp_path / "cls"
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(d)
    lines = [f"the {w} cat sat on a mat number {i}" for i, w in
             enumerate(["red", "big", "old", "small"] * 6)]
    _wordpiece(lines, d / "tokenizer.json")
    data = tmp_path / "tsv"
    data.mkdir()
    rows = [f"{t}\t{i % 3}" for i, t in enumerate(lines)]
    (data / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[:16]) + "\n")
    (data / "test.tsv").write_text("\n".join(rows[16:]) + "\n")
    model = symconvert.create_model(f"hf:{d}")
    result = evaluate(model, f"tsv:{data}", device="cpu")
    assert result["n"] == 8 and 0.0 <= result["top1"] <= 1.0
    assert "model.classifier" not in [e.module for e in symconvert.inspect(model, "block").converted]
    result = run_cli("evaluate", f"hf:{d}", "--data", "digits")
    assert result.code == 2 and "sequence classifier" in result.stderr, result
    result = run_cli("evaluate", f"hf:{d}", "--data", f"text:{data}")
    assert result.code == 2 and "tsv:ROOT" in result.stderr, result
    (data / "test.tsv").write_text("b\t1\na\tnot-a-label\n")
    with pytest.raises(SymconvertError, match="not an integer"):
        evaluate(model, f"tsv:{data}", device="cpu")


def test_sharded_safetensors_are_read(hf_dirs, tmp_path):
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dirs["llama"])
    model.save_pretrained(tmp_path / "sharded", max_shard_size="30KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    x = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        ours = symconvert.create_model(f"hf:{tmp_path / 'sharded'}")(x)
    assert torch.allclose(ours, _reference(hf_dirs["llama"], "llama", x), atol=1e-5)


def test_load_needs_no_source_directory(hf_dirs, tmp_path):
    """The directory records the config: load rebuilds with the source directory gone."""
    src = shutil.copytree(hf_dirs["gpt2"], tmp_path / "src")
    model, _ = symconvert.convert(symconvert.create_model(f"hf:{src}"), "channel")
    symconvert.save(model, tmp_path / "conv")
    shutil.rmtree(src)
    x = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        assert torch.equal(symconvert.load(tmp_path / "conv")(x), model.eval()(x))


def test_finetune_defaults_are_the_models_task_on_text(hf_dirs, tmp_path, monkeypatch):
    """On text:, an hf: causal LM directory fine-tunes with its own task's defaults (AdamW,
    clip 1), not the LSTM language model's (SGD lr 20, which diverges a transformer); an
    LSTM LM directory keeps the paper's; what the caller sets wins; an unreadable
    directory gives the data's task (loading it then says what is wrong)."""
    import symconvert.cli.train as cli_train
    from symconvert.tasks import get_task
    from symconvert.train.config import data_task, finetune_config

    text = tmp_path / "text"
    text.mkdir()
    (text / "train.txt").write_text("a b c\n" * 20)
    (text / "test.txt").write_text("a b\n" * 5)
    data = f"text:{text}"
    gpt2, _ = symconvert.convert(symconvert.create_model(f"hf:{hf_dirs['gpt2']}"), "channel")
    symconvert.save(gpt2, tmp_path / "gpt2")
    lstm = symconvert.create_model("py:symconvert.models.lstm_lm:lstm_lm", pretrained=False,
                                   vocab_size=8, emb=8, hidden=8, layers=1, dropout=0.0)
    symconvert.convert(lstm, "channel", layers="rnn")
    symconvert.save(lstm, tmp_path / "lstm")
    assert data_task(data, tmp_path / "gpt2").name == "hf-causal-lm"
    assert data_task(data, tmp_path / "lstm").name == "language-model"
    assert data_task(data, tmp_path / "missing").name == "language-model"
    assert data_task(data).name == "language-model"

    seen = {}
    monkeypatch.setattr(cli_train, "finetune", lambda *a, **k: seen.setdefault("cfg", a[3]))
    monkeypatch.setattr(cli_train, "_print_finetuned", lambda *a: None)
    hf = get_task("hf-causal-lm").defaults
    assert run_cli("finetune", tmp_path / "gpt2", "--data", data).code == 0
    cfg = seen.pop("cfg")
    assert (cfg.opt, cfg.lr, cfg.clip_grad, cfg.batch_size, cfg.weight_decay) == \
        (hf["opt"], hf["lr"], hf["clip_grad"], hf["batch_size"], hf["weight_decay"]) == \
        ("adamw", 1e-4, 1.0, 16, 0.0)
    assert run_cli("finetune", tmp_path / "gpt2", "--data", data, "--lr", "5e-4").code == 0
    assert (seen["cfg"].lr, seen.pop("cfg").opt) == (5e-4, "adamw")
    assert run_cli("finetune", tmp_path / "lstm", "--data", data).code == 0
    cfg = seen.pop("cfg")
    assert (cfg.opt, cfg.lr, cfg.clip_grad, cfg.batch_size) == ("sgd", 20.0, 0.25, 20)
    lm = finetune_config(data_task(data, tmp_path / "lstm"))
    assert (lm.lr, lm.momentum) == (20.0, 0.0)

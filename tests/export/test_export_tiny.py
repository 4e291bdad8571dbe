"""`afinar export` end to end on a tiny trained run (conftest's `evaluated_run`): every format,
verified with real llama.cpp or plain transformers; atomic output; clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from afinar.errors import AfinarError
from afinar.export import export, exporter
from afinar.export.verify import VerificationFailed

pytestmark = pytest.mark.slow
AFINAR = str(Path(sys.executable).parent / "afinar")


@pytest.fixture(scope="module")
def run_dir(evaluated_run) -> Path:
    return evaluated_run[0].run_dir


def _no_leftovers(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_merged_loads_in_plain_transformers_and_answers_the_same(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from afinar import load

    result = export(str(run_dir), to="merged", output=str(tmp_path / "merged"), prompts=4)
    summary = result.verification.summary()
    assert summary["passed"] and summary["same_prompt_ids"] == 4
    assert summary["exact_first_tokens"] == 4 and summary["greedy_agreement"] == 1.0
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "verification.json"} <= set(result.files)

    model = AutoModelForCausalLM.from_pretrained(result.output).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.output)
    trained = load(str(run_dir))
    assert tokenizer.chat_template == trained.tokenizer.chat_template
    eos = model.generation_config.eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])
    ids = torch.tensor([trained.prompt_ids([{"role": "user", "content": "pedido 7 llegó roto"}])])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, trained.model(ids).logits, atol=1e-5)


def test_merged_f16_halves_the_weights(run_dir, tmp_path):
    f32 = export(str(run_dir), to="merged", output=str(tmp_path / "a"), verify=False)
    f16 = export(str(run_dir), to="merged", quant="f16", output=str(tmp_path / "b"), prompts=2)
    assert f16.verification.passed
    ratio = f16.files["model.safetensors"] / f32.files["model.safetensors"]
    assert 0.45 < ratio < 0.55
    assert json.loads((f16.output / "config.json").read_text())["dtype"] == "float16"


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0"])
def test_gguf_export_is_verified_by_llama_cpp(run_dir, tmp_path, kind):
    result = export(str(run_dir), to="gguf", quant=kind, output=str(tmp_path / "g"), prompts=4)
    summary = result.verification.summary()
    print(kind, summary)
    assert summary["passed"] and summary["engine"] == "llama.cpp"
    assert summary["same_prompt_ids"] == 4 and summary["tokenizer_probes_mismatched"] == 0
    if kind != "q8_0":
        assert summary["exact_first_tokens"] == 4
    assert set(result.files) == {f"{run_dir.name}-{kind}.gguf", "verification.json",
                                 "README.md", "afinar.json"}
    provenance = json.loads((result.output / "afinar.json").read_text())
    assert provenance["converted_by"].startswith("llama.cpp 0c1e57098 ")
    assert provenance["run"] == run_dir.name
    assert "Converted to GGUF by llama.cpp 0c1e57098" in (result.output / "README.md").read_text()
    assert result.command.startswith("llama-cli -m ")
    _no_leftovers(tmp_path)


def test_k_quant_goes_through_llama_cpps_quantiser(run_dir, tmp_path):
    import gguf

    result = export(str(run_dir), to="gguf", quant="q4_k_m", output=str(tmp_path / "q"),
                    prompts=2, min_agreement=0.0)
    assert not result.verification.exact_required
    assert 0.0 <= result.verification.agreement <= 1.0
    path = result.output / f"{run_dir.name}-q4_k_m.gguf"
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert not [p for p in result.output.iterdir() if p.name.startswith(".")]


def test_ollama_folder(run_dir, tmp_path):
    result = export(str(run_dir), to="ollama", quant="q8_0", output=str(tmp_path / "my model"),
                    prompts=2)
    assert result.verification.passed
    modelfile = (result.output / "Modelfile").read_text()
    assert f"FROM ./{run_dir.name}-q8_0.gguf" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'SYSTEM """You are a test model."""' in modelfile  # the template's default system
    assert "{{ .Content }}" in modelfile
    assert result.command == (f"cd '{result.output}' && ollama create afinar-{run_dir.name} "
                              "-f Modelfile")
    assert "ollama create" in (result.output / "README.txt").read_text()


def test_gguf_adapter_applied_by_llama_cpp_matches_the_run(run_dir, tmp_path):
    import gguf

    result = export(str(run_dir), to="gguf-adapter", output=str(tmp_path / "lora"), prompts=3)
    assert result.verification.passed and result.verification.summary()["exact_first_tokens"] == 3
    path = result.output / f"{run_dir.name}-lora-f32.gguf"
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.lora.alpha"].contents() > 0
    assert reader.fields["afinar.converted_by"].contents().startswith("llama.cpp ")
    names = [t.name for t in reader.tensors]
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.0.attn_q.weight.lora_b" in names
    assert "BASE.gguf --lora" in result.command


def _lose_control_tokens(path: Path) -> None:
    """Marks the chat markers as plain text in a real GGUF file, in place."""
    import gguf

    reader = gguf.GGUFReader(str(path), "r+")
    field = reader.fields["tokenizer.ggml.token_type"]
    for index in field.data:
        if field.parts[index][0] == gguf.TokenType.CONTROL:
            field.parts[index][0] = gguf.TokenType.NORMAL
    reader.data.flush()


def test_a_broken_conversion_fails_loudly_and_leaves_no_output(run_dir, tmp_path, monkeypatch):
    """A conversion that loses the special tokens (a classic cause of exports that ramble: the
    chat markers become plain text): the converter's real file is damaged that way on its way
    out, verification catches it, nothing that looks like an export is left, and the report
    says why."""
    real = exporter.convert_model

    def losing_control_tokens(*args, **kwargs):
        path = real(*args, **kwargs)
        _lose_control_tokens(path)
        return path

    monkeypatch.setattr(exporter, "convert_model", losing_control_tokens)
    out = tmp_path / "broken"
    with pytest.raises(VerificationFailed) as caught:
        export(str(run_dir), to="gguf", quant="f32", output=str(out), prompts=4)
    assert not out.exists()
    _no_leftovers(tmp_path)
    failed = json.loads((tmp_path / "broken.verify-failed.json").read_text())
    assert failed["passed"] is False and failed["problems"]
    assert failed["summary"]["same_prompt_ids"] == 0
    assert "prompt token ids differ" in str(caught.value)


def test_export_errors_are_clear(run_dir, tmp_path):
    with pytest.raises(AfinarError, match="not a type for --to merged"):
        export(str(run_dir), to="merged", quant="q8_0")
    with pytest.raises(AfinarError, match="unknown export format"):
        export(str(run_dir), to="zip")
    with pytest.raises(AfinarError, match="not a run directory"):
        export(str(tmp_path), to="gguf")


def test_cli_export_json_and_errors(run_dir, tmp_path):
    done = subprocess.run([AFINAR, "export", str(run_dir), "--to", "gguf", "--quant", "f16",
                           "--output", str(tmp_path / "cli"), "--prompts", "2", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(done.stdout[done.stdout.index("{"):])
    assert data["verification"]["passed"] and data["type"] == "f16"
    assert (tmp_path / "cli" / f"{run_dir.name}-f16.gguf").is_file()

    bad = subprocess.run([AFINAR, "export", str(run_dir), "--to", "merged", "--quant", "q4_k_m"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert "not a type for --to merged" in bad.stderr + bad.stdout
    assert "Traceback" not in bad.stderr + bad.stdout


def test_without_llama_cpp_the_error_says_how_to_install_it(monkeypatch):
    """llama-cpp-python is installed here; hiding it shows what a user without it is told."""
    from afinar.export.llama_runner import require_llama_cpp

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    with pytest.raises(AfinarError) as caught:
        require_llama_cpp()
    assert "llama-cpp-python" in str(caught.value) and "--no-verify" in caught.value.hint

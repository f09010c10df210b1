"""The CLI: help, version, arch list/show, and one-line errors with a non-zero exit."""

from __future__ import annotations

from click.testing import CliRunner
from tiny_models import tiny_model, tiny_tokenizer

from fastedit import __version__
from fastedit.cli import cli


def test_help_and_version():
    runner = CliRunner()
    assert "Usage" in runner.invoke(cli, ["--help"]).output
    assert __version__ in runner.invoke(cli, ["--version"]).output


def test_arch_list_names_the_families():
    result = CliRunner().invoke(cli, ["arch", "list"])
    assert result.exit_code == 0
    for family in (
        "gpt2",
        "gptj",
        "gpt_neox",
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "phi3",
        "gemma",
        "gemma2",
        "gemma3_text",
    ):
        assert f"\n{family}" in "\n" + result.output


def test_arch_show_local_folder(tmp_path):
    tiny_model("gemma2").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    result = CliRunner().invoke(cli, ["arch", "show", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "model.layers.{i}.mlp.down_proj" in result.output
    assert "d_k            40" in result.output
    assert "post_mlp_norm  yes" in result.output


def test_errors_are_one_line_without_traceback():
    result = CliRunner().invoke(cli, ["arch", "show", "no-such-alias"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: unknown model 'no-such-alias'")


def test_edit_with_an_unknown_hparams_variant_fails_in_one_line_before_the_model_loads(tmp_path, monkeypatch):
    import fastedit.models

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the hparams were checked")

    monkeypatch.setattr(fastedit.models, "load_model", no_load)
    requests = tmp_path / "r.json"
    requests.write_text('[{"prompt": "{} is located in", "subject": "Paris", "target_new": "Rome"}]')
    args = ["edit", str(requests), "--model", "smollm2-135m", "--hparams", "quick", "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    assert "variant 'quick'" in result.output and "thorough" in result.output
    assert not (tmp_path / "run").exists()

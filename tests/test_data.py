"""Data sets by name: `fastedit data list/add/fetch`, `dataset_path`, and names accepted where files are expected.

Every test writes its own small files (never real data) into a data directory under tmp_path.
"""

from __future__ import annotations

import io
import json

import pytest
from click.testing import CliRunner

from fastedit.cli import cli
from fastedit.data import KNOWN, DataError, add_dataset, dataset_path, fetch_dataset, list_datasets, resolve_data

FLAT = {
    "case_id": 0,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "subject": "Danielle Darrieux",
    "target_new": "English",
    "ground_truth": "French",
    "rephrase_prompt": "Danielle Darrieux, a native speaker of",
    "locality_prompt": "The mother tongue of Léon Blum is",
    "locality_ground_truth": "French",
}
ZSRE = {
    "subject": "Watts Humphrey",
    "src": "What university did Watts Humphrey attend?",
    "alt": "University of Michigan",
    "answers": ["Illinois Institute of Technology"],
    "rephrase": "What university did Watts Humphrey take part in?",
    "loc": "nq question: who played desmond doss father in hacksaw ridge",
    "loc_ans": "Hugo Weaving",
}


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    monkeypatch.setenv("FASTEDIT_DATA", str(folder))
    return folder


def _write(path, records):
    path.write_text(json.dumps(records))
    return path


def test_missing_data_set_is_a_one_line_error_naming_both_commands(data_dir):
    with pytest.raises(DataError) as err:
        dataset_path("counterfact")
    message = str(err.value)
    assert "\n" not in message and str(data_dir) in message
    assert "fastedit data fetch counterfact" in message and "fastedit data add counterfact FILE" in message
    with pytest.raises(DataError, match="unknown data set 'cf'; known: counterfact"):
        dataset_path("cf")


def test_add_copies_atomically_and_list_shows_size_and_sha256(data_dir, tmp_path):
    src = _write(tmp_path / "mine.json", [FLAT, {**FLAT, "case_id": 1}])
    status = add_dataset("counterfact", src)
    assert status.present and status.path == data_dir / "counterfact-edit.json"
    assert status.path.read_bytes() == src.read_bytes() and status.matches_published is False
    src.unlink()  # a copy, not a link: the registered set survives its source
    assert dataset_path("counterfact").is_file()
    assert [p.name for p in data_dir.iterdir()] == ["counterfact-edit.json"]  # no temp file left
    result = CliRunner().invoke(cli, ["data", "list"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()[1:]}
    assert set(lines) == set(KNOWN)
    assert status.sha256 in lines["counterfact"] and "MB" in lines["counterfact"]
    assert "missing" in lines["zsre"] and "fastedit data add zsre FILE" in lines["zsre"]


def test_add_refuses_a_file_of_another_layout_and_leaves_nothing(data_dir, tmp_path):
    zsre = _write(tmp_path / "z.json", [ZSRE])
    with pytest.raises(DataError, match="zsre-layout records; data set 'counterfact' is the flat layout"):
        add_dataset("counterfact", zsre)
    binary = tmp_path / "w.raw"
    binary.write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(DataError, match="binary file"):
        add_dataset("wikitext-2", binary)
    assert not data_dir.exists() or not any(data_dir.iterdir())
    assert add_dataset("zsre", zsre).present


def test_cli_add_errors_are_one_line(data_dir, tmp_path):
    result = CliRunner().invoke(cli, ["data", "add", "counterfact", str(tmp_path / "nope.json")])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "is not a file" in result.output


def test_fetch_offline_says_how_to_add_a_local_copy(data_dir, monkeypatch):
    import fastedit.data
    import fastedit.models

    monkeypatch.setattr(fastedit.models, "_hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(fastedit.data, "_host_reachable", lambda *a, **k: False)
    for name in KNOWN:
        with pytest.raises(DataError, match=rf"unreachable; .* run `fastedit data add {name} FILE`"):
            fetch_dataset(name)
    result = CliRunner().invoke(cli, ["data", "fetch", "wikitext-2"])
    assert result.exit_code == 1 and result.output.startswith("error: cannot fetch data set 'wikitext-2'")


def test_names_resolve_where_files_are_expected(data_dir, tmp_path):
    from fastedit.requests import load_requests
    from fastedit.sae.questions import read_counterfact

    add_dataset("counterfact", _write(tmp_path / "cf.json", [FLAT, {**FLAT, "case_id": 1}]))
    assert resolve_data("counterfact") == data_dir / "counterfact-edit.json"
    assert resolve_data(tmp_path / "cf.json") == tmp_path / "cf.json"  # an existing file wins over a name
    assert resolve_data("other.json").name == "other.json"  # neither: left for the caller's own error
    assert len(load_requests("counterfact").requests) == 2
    assert len(read_counterfact()) == 2  # the unlearning default is the data set too
    assert [s.present for s in list_datasets()] == [name == "counterfact" for name in KNOWN]


def test_cli_edit_with_a_missing_data_set_fails_before_loading_a_model(data_dir):
    result = CliRunner().invoke(cli, ["edit", "counterfact", "--n", "2", "--model", "no-such-model"])
    assert result.exit_code == 1
    assert "data set 'counterfact' is not in" in result.output and "fastedit data add counterfact" in result.output


def test_sae_train_and_unlearn_check_their_data_before_loading_a_model(data_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["sae", "train", "--model", "no-such-model", "--layer", "1", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "data set 'wikitext-2' is not in" in result.output
    result = runner.invoke(cli, ["unlearn", "--model", "no-such-model", "--sae", str(tmp_path), "--out", str(tmp_path)])
    assert result.exit_code == 1 and "data set 'counterfact' is not in" in result.output


def test_every_model_option_defaults_to_the_default_model():
    from fastedit.models import DEFAULT_MODEL

    def commands(group, prefix=()):
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):
                yield from commands(cmd, (*prefix, name))
            else:
                yield (*prefix, name), cmd

    checked = []
    for path, cmd in commands(cli):
        for param in cmd.params:
            if param.name == "model" and param.param_type_name == "option" and path != ("sae", "eval"):  # cfg.json
                assert param.default == DEFAULT_MODEL and not param.required, path
                checked.append(path)
    assert {("edit",), ("precompute",), ("sae", "train"), ("unlearn",)} <= set(checked)


def test_quiet_hides_every_progress_bar_and_verbose_does_not():
    from tqdm.auto import tqdm

    from fastedit import progress

    try:
        assert CliRunner().invoke(cli, ["-q", "data", "list"]).exit_code == 0
        assert not progress.enabled()
        assert tqdm(range(3)).disable and progress.bar(total=3).disable  # also bars built by other code
        assert CliRunner().invoke(cli, ["-v", "data", "list"]).exit_code == 0
        assert progress.enabled() and not progress.bar(total=3, file=io.StringIO()).disable
    finally:
        progress.set_enabled(True)

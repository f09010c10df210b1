"""EasyEdit users: edit(prompts=..., locality_inputs=...), per-request locality dicts, hparams YAML."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

import fastedit
from fastedit.editing.easyedit import easyedit_records
from fastedit.editing.hparams import EditHparams, load_hparams
from fastedit.errors import ConfigError, RequestError
from fastedit.requests import parse_requests

# As in EasyEdit's README: one entry per request under each locality name.
EASY = {
    "prompts": ["The capital of Italy is", "Michael Jordan plays"],
    "target_new": ["Paris", "guitar"],
    "subject": ["Italy", "Michael Jordan"],
    "ground_truth": [["Rome", "Roma"], "basketball"],  # list-valued ground_truth: aliases, the first is scored
    "rephrase_prompts": ["Italy has the capital", "The sport Michael Jordan plays is"],
    "locality_inputs": {
        "neighborhood": {
            "prompt": ["The capital of Germany is", "Larry Bird plays"],
            "ground_truth": ["Berlin", "basketball"],
        },
        "distracting": {"prompt": [None, "Tokyo is a city in"], "ground_truth": [None, "Japan"]},
    },
}


def test_easyedit_keywords_become_requests_with_their_locality():
    requests = parse_requests(easyedit_records(**EASY)).requests
    italy, jordan = requests
    assert italy.prompt == "The capital of {} is" and italy.target_true == "Rome" and italy.target_new == "Paris"
    assert italy.paraphrases == ("Italy has the capital",)
    assert italy.neighborhood_prompts == ("The capital of Germany is",) and italy.neighborhood_answers == ("Berlin",)
    assert jordan.neighborhood_prompts == ("Larry Bird plays", "Tokyo is a city in")
    assert jordan.neighborhood_answers == ("basketball", "Japan")


def test_per_request_locality_dicts_are_read_not_dropped():
    record = {
        "prompt": "The mother tongue of Danielle Darrieux is",
        "subject": "Danielle Darrieux",
        "target_new": "English",
        "ground_truth": ["French"],
        "rephrase_prompt": "Danielle Darrieux spoke the language",
        "locality": {
            "neighborhood": {
                "prompt": ["Léon Blum speaks", "Montesquieu's mother tongue is"],
                "ground_truth": ["French", ["French", "français"]],
            }
        },
        "portability": {"one_hop": {"prompt": "x", "ground_truth": "y"}},
    }
    (request,) = parse_requests([record]).requests
    assert request.target_true == "French"
    assert request.neighborhood_prompts == ("Léon Blum speaks", "Montesquieu's mother tongue is")
    assert request.neighborhood_answers == ("French", "French")
    bad = {**record, "locality": {"neighborhood": {"prompt": ["a", "b"], "ground_truth": ["c"]}}}
    with pytest.raises(RequestError, match=r"record 0: .*2 prompt\(s\) but 1 ground_truth"):
        parse_requests([bad])


def test_edit_accepts_easyedit_keywords():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    hp = EditHparams(method="memit", layers=(0, 1), clamp_norm_factor=4.0, v_weight_decay=1e-3,
                     mom2_update_weight=1.0, v_num_grad_steps=4, context_seeds=("The",), context_length=3)  # fmt: skip
    d_k = model.config.intermediate_size
    stats = {0: torch.eye(d_k), 1: torch.eye(d_k)}
    outcome = fastedit.edit(model, tok, hparams=hp, stats=stats, evaluate=True, **EASY)
    assert outcome.patch.layers == [0, 1] and outcome.patch.metadata["case_ids"] == ["0", "1"]
    assert outcome.post.summary["n"] == 2
    with pytest.raises(ConfigError, match="unknown keyword"):
        fastedit.edit(model, tok, hparams=hp, stats=stats, prompt=["x"])
    with pytest.raises(RequestError, match="not both"):
        fastedit.edit(model, tok, [{"prompt": "{} is", "subject": "a", "target_new": "b"}], prompts=["x"])


MEMIT_YAML = """alg_name: "MEMIT"
model_name: "./hugging_cache/llama-7b"
stats_dir: "./data/stats"
device: 0
layers: [0, 1]
clamp_norm_factor: 0.75
layer_selection: "all"
fact_token: "subject_last"
v_num_grad_steps: 20
v_lr: 5e-1
v_loss_layer: 31
v_weight_decay: 0.5
kl_factor: 0.0625
mom2_adjustment: true
mom2_update_weight: 15000
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
"""


def test_easyedit_hparams_yaml_maps_keys_and_warns_about_the_rest(tmp_path, caplog):
    path = tmp_path / "llama-7b.yaml"
    path.write_text(MEMIT_YAML)
    with caplog.at_level(logging.WARNING, logger="fastedit"):
        hp = load_hparams("memit", "llama", path)
    assert hp.layers == (0, 1) and hp.clamp_norm_factor == 0.75 and hp.v_num_grad_steps == 20
    assert hp.v_lr == 0.5 and not hp.v_lr_relative and hp.v_weight_decay == 0.5 and hp.mom2_update_weight == 15000
    ignored = "device, fact_token, layer_selection, model_name, mom2_adjustment, mom2_dataset, mom2_dtype"
    assert ignored in caplog.text and "v_loss_layer" in caplog.text
    assert "clamp_norm_factor" not in caplog.text.split("ignored:")[1]
    base = load_hparams("memit", "llama")
    assert hp.context_seeds == base.context_seeds  # unmapped fields keep the model's own hparams
    with pytest.raises(ConfigError, match="alg_name 'MEMIT' is not the method 'rome'"):
        load_hparams("rome", "llama", path)
    (tmp_path / "bad.yaml").write_text("layers: [0\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_hparams("memit", "llama", tmp_path / "bad.yaml")


def test_precompute_reads_layers_from_an_easyedit_yaml(tmp_path):
    from fastedit.stats.layers import layers_from_hparams

    path = tmp_path / "h.yaml"
    path.write_text(MEMIT_YAML)
    assert layers_from_hparams(path) == [0, 1]

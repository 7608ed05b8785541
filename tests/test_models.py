"""The embedded model conversion and --model resolution.

    .venv/bin/python -m pytest tests/test_models.py
"""

import pytest

from collector.errors import ModelError
from collector.models import CHECK_QUESTION, greedy_answer, resolve_model


def test_converted_smollm2_answers_a_factual_question_greedily(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert "Paris" in greedy_answer(model, tok, CHECK_QUESTION)
    assert "Rome" in greedy_answer(model, tok, "What is the capital of Italy? Answer in one sentence.")
    assert tok.chat_template, "the chat template must survive the conversion"


def test_resolve_model_reuses_the_converted_folder(smollm2_dir):
    # resolve 'embedded' into the same models dir: no second conversion, same folder back.
    assert resolve_model("embedded", smollm2_dir.parent.parent) == str(smollm2_dir)


def test_a_folder_without_config_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path), tmp_path)


def test_a_hub_id_offline_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="pass a local folder") as e:
        resolve_model("no-such-org/no-such-model", tmp_path)
    assert "\n" not in str(e.value)

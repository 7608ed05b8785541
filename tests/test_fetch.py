"""Models from the Hub are fetched before anything serves them, and the card's memory is planned
from the model's own config.

The Hub cannot be reached from here: downloads go to ``tests/hubstub.py``, a local stand-in that
serves files the way the Hub's file API does (repo info, tree, HEAD metadata, byte ranges) and
answers as it does for gated and missing models.

    .venv/bin/python -m pytest tests/test_fetch.py
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from collector.errors import EngineError, ModelError
from collector.gpu import ModelShape, plan_for
from collector.models import fetch_model
from tests.conftest import ROOT
from tests.hubstub import HubStub


@pytest.fixture
def hub():
    stub = HubStub()
    yield stub
    stub.release.set()
    stub.close()


def test_a_gated_model_gets_one_line_with_the_licence_page_and_the_variable(hub, tmp_path):
    hub.add_model("mistralai/Mistral-7B-Instruct-v0.2", {"config.json": b"{}"})
    hub.gated.add("mistralai/Mistral-7B-Instruct-v0.2")
    with pytest.raises(ModelError) as e:
        fetch_model("mistralai/Mistral-7B-Instruct-v0.2", cache_dir=str(tmp_path), endpoint=hub.url)
    msg = str(e.value)
    assert "gated" in msg and f"{hub.url}/mistralai/Mistral-7B-Instruct-v0.2" in msg and "HF_TOKEN" in msg
    assert "\n" not in msg


def test_a_missing_model_gets_one_line(hub, tmp_path):
    with pytest.raises(ModelError, match="no such model on the Hub.*pass a local folder") as e:
        fetch_model("nobody/nothing", cache_dir=str(tmp_path), endpoint=hub.url)
    assert "\n" not in str(e.value)


def test_a_download_skips_duplicate_checkpoints_and_a_second_fetch_downloads_nothing(hub, tmp_path):
    hub.add_model("acme/small", {"config.json": b'{"hidden_size": 8}', "model.safetensors": os.urandom(4096),
                                 "consolidated.safetensors": os.urandom(4096), "pytorch_model.bin": b"old"})
    path = fetch_model("acme/small", cache_dir=str(tmp_path), endpoint=hub.url)
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    assert sorted(hub.downloads) == ["config.json", "model.safetensors"]
    assert fetch_model("acme/small", cache_dir=str(tmp_path), endpoint=hub.url) == path
    assert len(hub.downloads) == 2  # the second start downloads nothing


def test_a_connection_dropped_mid_file_resumes_where_it_stopped(hub, tmp_path):
    weights = os.urandom(24 * 2**20)  # huggingface_hub keeps what it wrote in 10 MiB chunks
    hub.add_model("acme/big", {"config.json": b"{}", "model.safetensors": weights})
    hub.cut_after = 15 * 2**20
    path = fetch_model("acme/big", cache_dir=str(tmp_path), endpoint=hub.url)
    assert open(os.path.join(path, "model.safetensors"), "rb").read() == weights
    assert hub.ranges == [f"bytes={10 * 2**20}-"]  # the rest, not the whole file again


def test_a_download_killed_mid_file_completes_at_the_next_start_without_leaving_the_partial_file(hub, tmp_path):
    weights = os.urandom(24 * 2**20)
    hub.add_model("acme/big", {"config.json": b"{}", "model.safetensors": weights})
    hub.stall_after = 15 * 2**20
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys; sys.path.insert(0, '.'); from collector.models import fetch_model; "
        f"fetch_model('acme/big', cache_dir={str(tmp_path)!r}, endpoint={hub.url!r})")], cwd=ROOT)
    assert hub.stalled.wait(120), "the download never started"
    child.kill()  # as a restart of the Space, or the OOM killer, would
    child.wait()
    hub.stall_after = None
    hub.release.set()
    partials = list(tmp_path.rglob("*.incomplete"))
    assert partials
    for p in partials:  # as if the kill was more than ten minutes ago
        os.utime(p, (0, 0))
    path = fetch_model("acme/big", cache_dir=str(tmp_path), endpoint=hub.url)
    assert open(os.path.join(path, "model.safetensors"), "rb").read() == weights
    assert not list(tmp_path.rglob("*.incomplete"))


# -- the memory plan, from the model's own config ----------------------------------------------

SMOLLM2_135M = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
                "max_position_embeddings": 8192}
MISTRAL_7B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False,
              "max_position_embeddings": 32768}
LLAMA_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False,
             "max_position_embeddings": 4096}


def test_the_shape_read_from_a_config_matches_the_published_sizes():
    assert ModelShape.from_config(SMOLLM2_135M).billions == pytest.approx(0.135, abs=0.002)
    mistral = ModelShape.from_config(MISTRAL_7B)
    assert mistral.billions == pytest.approx(7.24, abs=0.01)
    assert mistral.weights_gib(quantized=False) == pytest.approx(13.5, abs=0.1)
    assert mistral.kv_gib_min() == pytest.approx(4.0)  # 128 KiB a token, 16 sequences of 2,048
    assert ModelShape.from_config(LLAMA_70B).billions == pytest.approx(69.0, abs=0.5)


@pytest.mark.parametrize("card", [24.0, 48.0, 80.0])
@pytest.mark.parametrize("config", [SMOLLM2_135M, MISTRAL_7B], ids=["135m", "7b"])
def test_what_fits_is_planned_with_room_for_the_server_its_cache_and_the_trainer(card, config):
    shape = ModelShape.from_config(config)
    plan = plan_for(card, shape)
    quantized = plan.vllm_quantization == "bitsandbytes"
    vllm = plan.gpu_memory_utilization * card
    assert vllm - shape.weights_gib(quantized) - 1.5 >= shape.kv_gib_min()  # 8 pairs at the full context
    assert vllm + shape.trainer_gib(plan.trainer_quantize == "4bit") + 1.0 <= card + 1e-6


def test_the_plan_prefers_full_precision_where_it_fits():
    mistral = ModelShape.from_config(MISTRAL_7B)
    assert (plan_for(24, mistral).vllm_quantization, plan_for(24, mistral).trainer_quantize) == ("bitsandbytes", "4bit")
    assert (plan_for(80, mistral).vllm_quantization, plan_for(80, mistral).trainer_quantize) == (None, None)
    small = plan_for(24, ModelShape.from_config(SMOLLM2_135M))
    assert (small.vllm_quantization, small.trainer_quantize) == (None, None)  # a small model is never squeezed


@pytest.mark.parametrize("card", [24.0, 48.0, 80.0])
def test_a_70b_model_is_refused_with_what_would_fit(card):
    shape = ModelShape.from_config(LLAMA_70B)
    with pytest.raises(EngineError, match=r"cannot hold a 69\.\d B model") as e:
        plan_for(card, shape)
    msg = str(e.value)
    assert "GiB or more" in msg and "smaller --model" in msg
    if card == 80.0:  # its QLoRA trainer alone fits: serve elsewhere, train here
        assert "--vllm-url" in msg
        assert plan_for(card, shape, serve_here=False).trainer_quantize == "4bit"


def test_an_attached_server_leaves_the_whole_card_to_the_trainer():
    plan = plan_for(24, ModelShape.from_config(MISTRAL_7B), serve_here=False)
    assert plan.gpu_memory_utilization is None and plan.trainer_quantize is None  # bf16 LoRA fits alone


# -- deploying the Space ---------------------------------------------------------------------------


def test_one_command_creates_the_space_and_a_second_run_updates_it(hub):
    """Against the Hub stand-in (the real Hub cannot be reached from here)."""
    import importlib.util

    from huggingface_hub import HfApi

    spec = importlib.util.spec_from_file_location("deploy_space", ROOT / "scripts" / "deploy_space.py")
    deploy_space = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deploy_space)
    api = HfApi(endpoint=hub.url, token="hf_x")
    deploy_space.deploy("me/prefloop", api, hardware="l40sx1", variables={"PREFLOOP_ANNOTATORS": "org:team"})
    files = hub.spaces["me/prefloop"]
    assert hub.space_sdk["me/prefloop"] == "docker"
    assert {"Dockerfile", "app.py", "pyproject.toml", "README.md", "scripts/space-entrypoint.sh",
            "docs/annotate.png"} <= set(files)
    assert not [f for f in files if f.startswith((".venv/", "data/", ".git/")) or "__pycache__" in f]
    assert hub.space_variables["me/prefloop"] == {"PREFLOOP_ANNOTATORS": "org:team"}
    assert hub.space_hardware["me/prefloop"] == "l40sx1"
    deploy_space.deploy("me/prefloop", api)  # the Space exists: updated, not refused
    assert len([c for c in hub.commits if c["repo"] == "me/prefloop"]) == 2


def test_the_readmes_deploy_commands_exist_in_the_pinned_huggingface_hub():
    import re
    import shutil

    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"`(hf [^`]+)`", readme)
    assert commands, "the README gives its deploy steps as hf commands"
    assert "huggingface-cli" not in readme  # gone from huggingface_hub 1.0 on
    hf = shutil.which("hf", path=str(ROOT / ".venv" / "bin")) or shutil.which("hf")
    for command in commands:
        words = command.split()
        sub = [w for w in words[1:3] if not w.startswith("-") and "/" not in w and w != "."]
        out = subprocess.run([hf, *sub, "--help"], capture_output=True, text=True)
        assert out.returncode == 0, (command, out.stderr)
        for flag in (w.split("=")[0] for w in words if w.startswith("--")):
            assert flag in out.stdout, (command, flag)

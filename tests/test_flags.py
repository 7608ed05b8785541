"""Settings: one definition and one default per setting for the app, the trainer CLI and the
benches, and ``--config FILE.yaml`` for all of them (storage/flags.py)."""

import dataclasses

import pytest

from app import parse_args
from collector.annotate import AnnotateConfig
from collector.sampling import SamplingParams
from storage.flags import from_flags, parse
from trainer.__main__ import _config, parser
from trainer.ipo import TrainConfig
from trainer.rounds import RoundConfig
from trainer.schedule import ScheduleConfig


def _settings(cls) -> dict:
    return {f.name: f for f in dataclasses.fields(cls) if "help" in f.metadata}


def test_the_app_and_the_trainer_build_their_configs_with_the_dataclass_defaults(monkeypatch):
    monkeypatch.delenv("PREFLOOP_TRAINER_LAUNCHER", raising=False)
    app = parse_args([])
    cli = parse(parser(), ["round"])
    assert _config(cli) == RoundConfig()  # every field, nested TrainConfig included
    assert from_flags(TrainConfig, app) == TrainConfig()
    assert from_flags(RoundConfig, app, train=TrainConfig()) == RoundConfig()
    assert from_flags(ScheduleConfig, app) == ScheduleConfig()
    assert from_flags(AnnotateConfig, app, sampling=from_flags(SamplingParams, app)) == AnnotateConfig()
    # The flags the app shows are the dataclasses' own, with their help.
    shown = {a.dest: a for a in _app_parser()._actions}
    for cls in (TrainConfig, RoundConfig, ScheduleConfig, AnnotateConfig, SamplingParams):
        for name, f in _settings(cls).items():
            if name in shown:
                assert shown[name].help.startswith(f.metadata["help"]), name


def _app_parser():
    import argparse

    import app

    captured = {}
    real = argparse.ArgumentParser.parse_args

    def keep(self, *a, **kw):
        captured["parser"] = self
        return real(self, *a, **kw)

    argparse.ArgumentParser.parse_args = keep
    try:
        app.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = real
    return captured["parser"]


def test_a_config_file_sets_flags_by_name_and_the_command_line_wins(tmp_path):
    cfg = tmp_path / "prefloop.yaml"
    cfg.write_text("beta: 0.25\nround-every-votes: 32\nlearning_rate: 1e-4\nlauncher: [torchrun, --nproc-per-node, 2]\n"
                   "max_tokens: 128\nadmins: alice,bob\n")
    args = parse_args(["--config", str(cfg), "--beta", "0.75"])
    assert args.beta == 0.75  # the command line wins
    assert args.min_new_votes == 32 and args.learning_rate == 1e-4 and args.max_tokens == 128
    assert args.admins == "alice,bob"
    assert from_flags(RoundConfig, args, train=TrainConfig()).launcher == ["torchrun", "--nproc-per-node", "2"]
    cli = parse(parser(), ["round", "--config", str(tmp_path / "t.yaml")]) if (tmp_path / "t.yaml").write_text(
        "epochs: 3\ninit: fresh\nquantize: 4bit\n") else None
    config = _config(cli)
    assert config.init == "fresh" and config.train.epochs == 3.0 and config.train.quantize == "4bit"


@pytest.mark.parametrize("text, says", [
    ("betta: 0.3\n", "unknown setting 'betta'"),
    ("init: sideways\n", "'sideways' is not one of ['previous', 'fresh']"),
    ("beta: [1, 2\n", "not valid YAML"),
    ("epochs: many\n", "epochs: 'many' is not valid"),
    ("- beta\n", "expected a mapping"),
])
def test_a_bad_config_file_is_refused_in_one_line_that_names_the_setting(tmp_path, capsys, text, says):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(SystemExit) as e:
        parse(parser(), ["round", "--config", str(cfg)])
    assert e.value.code == 2
    assert says in capsys.readouterr().err


def test_an_environment_default_yields_to_the_file_and_the_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFLOOP_TRAINER_LAUNCHER", "accelerate launch --num_processes 4")
    assert _config(parse(parser(), ["round"])).launcher == ["accelerate", "launch", "--num_processes", "4"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("trainer-launcher: torchrun\n")
    assert _config(parse(parser(), ["round", "--config", str(cfg)])).launcher == ["torchrun"]
    assert _config(parse(parser(), ["round", "--config", str(cfg), "--launcher", ""])).launcher == []


@pytest.mark.parametrize("bench", ["iterative.py", "round.py"])
def test_the_benches_offer_the_same_training_settings(bench):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "bench" / bench), "--help"], cwd=root / "bench",
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for name in ("beta", "learning_rate"):
        f = _settings(TrainConfig)[name]
        assert f"--{name.replace('_', '-')}" in text and " ".join(f.metadata["help"].split()[:4]) in text
    assert "--config" in text

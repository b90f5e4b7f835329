"""Run configuration: --config TOML files on every command, the written config.toml, precedence."""
from __future__ import annotations

import tomllib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from netslim import cli
from netslim.config import dump_toml, read_config_file, resolve

from test_cli_train import MODEL, one_error_line, run_main, train_args


def test_resolve_later_layers_win_and_none_means_unset():
    assert resolve({"a": 1, "b": 2, "c": 3}, {"b": 20, "c": None}, None, {"c": 30, "a": None}) == \
        {"a": 1, "b": 20, "c": 30}
    assert resolve({"x": True}, {"x": False}) == {"x": False}  # False is a value, not "unset"


_scalars = (st.booleans() | st.integers(-2**63, 2**63 - 1)
            | st.floats(allow_nan=False) | st.text(max_size=20))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9_-]{0,12}", fullmatch=True),
                       _scalars | st.lists(_scalars, max_size=4), max_size=8))
def test_dump_toml_reads_back_with_tomllib(values):
    assert tomllib.loads(dump_toml(values, header="a comment\nover two lines")) == values


def test_a_run_repeated_from_its_written_config_gives_the_same_checkpoint(data_dir, tmp_path, capsys):
    first = tmp_path / "first"
    # no --seed: the drawn seed must be in the written config for the repeat to be identical
    argv = ["train", "--dataset", "fashion-mnist", "--data-dir", str(data_dir), *MODEL, "--train-subset", "128",
            "--batch-size", "64", "--epochs", "2", "-sr", "--s", "1e-3", "--device", "cpu", "--save", str(first)]
    assert cli.main(argv) == 0
    written = read_config_file(first / "config.toml")
    assert written["sr"] is True and written["epochs"] == 2 and isinstance(written["seed"], int)
    assert written["width"] == 0.125 and written["data_dir"] == str(data_dir.resolve())
    assert cli.main(["train", "--config", str(first / "config.toml"), "--save", str(tmp_path / "again")]) == 0
    for name in ("checkpoint.pt", "model_best.pt"):
        a = torch.load(first / name, weights_only=True)["state_dict"]
        b = torch.load(tmp_path / "again" / name, weights_only=True)["state_dict"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert read_config_file(tmp_path / "again" / "config.toml") == written


def test_flags_override_the_file_and_keys_take_dashes(data_dir, tmp_path):
    conf = tmp_path / "run.toml"
    conf.write_text(f'dataset = "fashion-mnist"\ndata-dir = "{data_dir}"\narch = "vgg"\ndepth = 11\n'
                    'width = 0.125\ntrain_subset = 128\nepochs = 3\nno_augment = true\nseed = 5\n')
    assert cli.main(["train", "--config", str(conf), "--epochs", "1", "--save", str(tmp_path / "r")]) == 0
    ts = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["train_state"]
    assert ts["epoch"] == 1 and ts["config"]["augment"] is False and ts["config"]["seed"] == 5


@pytest.mark.parametrize("text, says", [
    ("epohcs = 3\n", "unknown key 'epohcs' for netslim train: did you mean 'epochs'?"),
    ("batch-sise = 3\n", "did you mean 'batch_size'?"),
    ("sr = 1\n", "sr = 1 is not valid: use true or false"),
    ("lr = true\n", "lr = true is not valid: --lr takes a value"),
    ("epochs = 3\nepochs = 4\n", "is not valid TOML"),
    ("[recipe]\nepochs = 3\n", "[recipe] is a table"),
    ("epochs = 0\n", "bad.toml: epochs = 0: must be at least 1"),
    ('amp = "fp8"\n', "bad.toml: amp = 'fp8' is not valid: use one of auto, off, bf16, fp16"),
])
def test_bad_config_files_are_one_line_errors_and_write_nothing(data_dir, tmp_path, capsys, text, says):
    conf = tmp_path / "bad.toml"
    conf.write_text(text)
    assert run_main(train_args(data_dir, tmp_path / "r", "--config", str(conf))) == 2
    assert says in one_error_line(capsys)
    assert not (tmp_path / "r").exists()


def test_every_command_takes_a_config_file(tmp_path, capsys):
    parser = cli.build_parser()
    assert set(parser.commands) == {"train", "finetune", "eval", "prune", "profile", "export", "pipeline"}
    for name, sub in parser.commands.items():
        assert any("--config" in a.option_strings for a in sub._actions), name
    conf = tmp_path / "p.toml"
    conf.write_text('arch = "vgg"\ndepth = 11\ndataset = "fashion-mnist"\nno_latency = true\njson = true\n')
    assert cli.main(["profile", "--config", str(conf)]) == 0
    assert '"params"' in capsys.readouterr().out
    assert run_main(["profile", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "config file" in one_error_line(capsys)


def test_a_config_given_after_the_flags_still_loses_to_them(data_dir, tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text("log_every = 1\nseed = 7\n")  # train_args gives --seed 0
    assert cli.main(train_args(data_dir, tmp_path / "r", "--epochs", "1", "--config", str(conf))) == 0
    config = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["train_state"]["config"]
    assert (config["log_every"], config["seed"]) == (1, 0)

"""CLI surface: each command parses its options and makes exactly one library call."""

import sys
import types

import pytest
from typer.testing import CliRunner

from dspark_offline import cli
from dspark_offline.config import Params

runner = CliRunner()


@pytest.fixture
def capture(monkeypatch, tmp_path):
    """Replace a stage module by a fake whose run(params) records what it got."""
    monkeypatch.chdir(tmp_path)  # no params.yaml here: built-in defaults
    got = {}

    def install(module_name):
        fake = types.ModuleType(module_name)
        fake.run = lambda params: got.setdefault("params", params) and {}
        monkeypatch.setitem(sys.modules, module_name, fake)

    return install, got


@pytest.mark.parametrize(
    "argv, module, expected",
    [
        (
            ["prepare", "--num-samples", "12", "--source", "x.jsonl"],
            "dspark_offline.prepare",
            {"prepare": {"num_samples": 12, "source": "x.jsonl"}},
        ),
        (
            [
                "generate",
                "--max-new-tokens",
                "32",
                "--output",
                "g",
                "--temperature",
                "0.5",
                "--batch-size",
                "4",
                "-S",
                "generate.enabled=true",
            ],
            "dspark_offline.generate",
            {
                "generate": {
                    "max_new_tokens": 32,
                    "output": "g",
                    "temperature": 0.5,
                    "batch_size": 4,
                    "enabled": True,
                }
            },
        ),
        (
            ["dump", "--num-parts", "4", "--part-index", "3", "--overwrite"],
            "dspark_offline.dump",
            {"dump": {"num_parts": 4, "part_index": 3, "overwrite": True}},
        ),
        (
            ["train", "--store", "s.zarr", "--max-steps", "5", "--resume", "-S", "train.learning_rate=1e-3"],
            "dspark_offline.train.loop",
            {"dump": {"store": "s.zarr"}, "train": {"max_steps": 5, "resume": True, "learning_rate": 1e-3}},
        ),
        (["export", "--output", "out"], "dspark_offline.train.export", {"export": {"output": "out"}}),
        (
            ["evaluate", "--temperature", "0.7", "--num-prompts", "3"],
            "dspark_offline.evaluate",
            {"evaluate": {"temperature": 0.7, "num_prompts": 3}},
        ),
        (
            ["evaluate", "--compare", "runs/baseline/drafter", "--drafter", "d"],
            "dspark_offline.evaluate",
            {"evaluate": {"compare": "runs/baseline/drafter", "drafter": "d"}},
        ),
    ],
)
def test_command_passes_exact_params(capture, argv, module, expected):
    install, got = capture
    install(module)
    result = runner.invoke(cli.app, argv)
    assert result.exit_code == 0, result.output
    assert got["params"] == Params.model_validate(expected)


def test_params_file_then_set_then_option(capture, tmp_path):
    install, got = capture
    install("dspark_offline.train.loop")
    (tmp_path / "p.yaml").write_text("train:\n  max_steps: 7\n  learning_rate: 0.5\n")
    result = runner.invoke(cli.app, ["train", "-p", "p.yaml", "-S", "train.max_steps=9", "--max-steps", "11"])
    assert result.exit_code == 0, result.output
    assert got["params"].train.max_steps == 11 and got["params"].train.learning_rate == 0.5


def test_bad_override_is_a_clean_error(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["dspark-offline", "params", "-S", "train.nope=1"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    assert "train.nope" in capsys.readouterr().err


def test_params_files_layer_field_by_field(capture, tmp_path):
    install, got = capture
    install("dspark_offline.train.loop")
    (tmp_path / "a.yaml").write_text(
        "train:\n  max_steps: 7\n  learning_rate: 0.5\ndraft:\n  markov_rank: 8\n"
    )
    (tmp_path / "b.yaml").write_text("train:\n  learning_rate: 0.25\n")
    result = runner.invoke(cli.app, ["train", "-p", "a.yaml", "-p", "b.yaml"])
    assert result.exit_code == 0, result.output
    p = got["params"]
    assert (p.train.max_steps, p.train.learning_rate, p.draft.markov_rank) == (7, 0.25, 8)


def test_missing_optional_package_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    fake = types.ModuleType("dspark_offline.dump")

    def run(params):
        raise ImportError("dump.backend='vllm' needs vLLM: pip install 'dspark-offline[vllm]'")

    fake.run = run
    monkeypatch.setitem(sys.modules, "dspark_offline.dump", fake)
    monkeypatch.setattr(sys, "argv", ["dspark-offline", "dump", "-S", "dump.backend=vllm"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    assert "pip install 'dspark-offline[vllm]'" in capsys.readouterr().err


def test_vllm_target_without_vllm_names_the_extra(tmp_path):
    if __import__("importlib").util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    from dspark_offline.target.vllm_backend import VLLMTarget

    with pytest.raises(ImportError, match=r"dspark-offline\[vllm\]"):
        VLLMTarget(tmp_path, layer_ids=[0])

"""The method protocol end to end: a method written and registered here, at test time, with a setting of its own,
works through the command line, config files, the GUI's form, training, checkpoints and export, without any other
module knowing it. And no module outside opdiff names a method."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils import parametrize

import opdiff
from opdiff.methods.base import Method, register, unregister
from opdiff.settings import Setting

REPO = Path(__file__).resolve().parent.parent

# ---- the toy method: one file's worth of code -------------------------------------------------------------------

TOY_GAIN = Setting("toy_gain", float, 0.5, "How much the toy method scales B while training.", label="toy gain",
                   above=0)


class Gain(nn.Module):
    """Parametrization B = gain * B_raw (B_raw stays PEFT's trainable tensor)."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.gain = gain

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return self.gain * raw


class ToyMethod(Method):
    """LoRA whose B is `toy_gain` times a trained tensor; reports its B norm after every step."""

    events_title = "B norms"

    def attach(self, model, layers, config) -> None:
        for a in layers:
            parametrize.register_parametrization(a.lora_B, "weight", Gain(config.toy_gain))

    def after_step(self, model, step, optimizer, probe_loss) -> list[dict]:
        norm = sum(float(a.lora_B.weight.detach().norm()) for a in opdiff.adapted_layers(model))
        return [{"step": step, "b_norm": norm}]

    def report(self, model) -> dict:
        return {"gain": model.opdiff_config.toy_gain}


TOY = ToyMethod("toy-gain", "Toy: LoRA with a scaled B.", settings=(TOY_GAIN,))
# ---- the registry line ------------------------------------------------------------------------------------------


@pytest.fixture
def toy():
    register(TOY)
    yield TOY.name
    unregister(TOY.name)


def test_the_cli_lists_the_new_setting_and_a_config_file_sets_it(toy, tmp_path, capsys):
    from pipelines.cli import build_parser
    from pipelines.config import config_from_args

    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    train_help = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--toy-gain" in train_help and "scales B while training" in train_help and "[read by toy-gain]" in train_help
    assert toy in train_help  # among the method choices
    config = tmp_path / "toy.toml"
    config.write_text(f'method = "{toy}"\ntoy_gain = 0.25\nrank = 2\n')
    cfg = config_from_args(parser.parse_args(["train", "--config", str(config)]))
    assert (cfg.adapter.method, cfg.adapter.toy_gain, cfg.adapter.rank) == (toy, 0.25, 2)
    flagged = config_from_args(parser.parse_args(["train", "--config", str(config), "--toy-gain", "3"]))
    assert flagged.adapter.toy_gain == 3.0
    with pytest.raises(SystemExit):  # range-checked by its description: argparse names the flag
        parser.parse_args(["train", "--toy-gain", "0"])


def test_the_gui_form_shows_the_setting_only_for_its_method(toy):
    import app

    assert "toy_gain" in app.form_spec(toy)["method"]
    for other in opdiff.METHODS:
        if other != toy:
            assert "toy_gain" not in app.form_spec(other).get("method", [])
    assert "op_width" not in app.form_spec(toy).get("method", [])
    assert "op_width" in app.form_spec("op-lora")["method"]


def test_a_short_run_trains_checkpoints_and_exports(toy, tmp_path, bundled_model, demo_subset, single_thread,
                                                    shared_pipeline):
    from pipelines.config import TrainConfig, resume_config
    from pipelines.rundir import RunDir
    from pipelines.train import train

    cfg = TrainConfig.from_dict({"base": str(bundled_model), "data": demo_subset(2), "output_dir": tmp_path / "run",
                                 "method": toy, "toy_gain": 0.25, "max_steps": 2, "resolution": 32, "lr": 1e-2})
    run = RunDir(train(cfg))
    config = run.read_config()
    assert config["adapter"]["toy_gain"] == 0.25 and config["method_report"] == {"gain": 0.25}
    assert [e["step"] for e in run.read_events()] == [1, 2]
    exported = load_file(run.lora)
    trained = load_file(run.training_state)
    key = next(k for k in exported if k.endswith("lora_B.weight"))
    # unet.<module>.lora_B.weight in the export; <module>.lora_B.default.parametrizations.weight.original in training
    raw = trained[key.removeprefix("unet.").replace("lora_B.weight", "lora_B.default.parametrizations.weight.original")]
    assert raw.abs().sum() > 0, "B was not trained"
    assert torch.allclose(exported[key], 0.25 * raw)  # the export is the collapsed B = gain * B_raw
    resumed = RunDir(train(resume_config(run.path, max_steps=3)))  # the checkpoint code needs nothing of it
    assert [e["step"] for e in resumed.read_events()] == [1, 2, 3]


def _string_constants(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


@pytest.mark.parametrize("path", sorted((REPO / "pipelines").glob("*.py")) + [REPO / "app.py"],
                         ids=lambda p: p.name)
def test_no_method_is_named_outside_opdiff(path):
    """The loop, checkpoints, CLI and GUI read methods from the registry; none spells a method's name."""
    named = _string_constants(path) & set(opdiff.METHODS)
    if path.name == "kohya.py":
        named.discard("lora")  # LyCORIS's algorithm id in sd-scripts' ss_network_args, not an opdiff method
    assert not named, f"{path.name} names method(s) {sorted(named)}"

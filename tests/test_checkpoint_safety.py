"""Checkpoints are read without unpickling: a file that pickles objects is refused unless trusted.

A pickled object's class here records every unpickling, so a refusal is seen to run no code from the
file; lit_attrib's own checkpoints (a real ``CausalLMModule`` fit) load on the safe path.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import FACTS, TINY_CONFIGS, TOKENIZER
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from lit_attrib.callbacks import SketchedGradCallback
from lit_attrib.data import TextDataModule
from lit_attrib.data.algorithmic import AlgorithmicDataModule
from lit_attrib.errors import ArtifactError
from lit_attrib.io import load_checkpoint
from lit_attrib.modules import CausalLMModule, CurvatureEditModule, EvalModule
from lit_attrib.modules.looped import LoopedTransformerModule

CONFIG = TINY_CONFIGS["llama"]
UNPICKLED: list[str] = []  # every unpickling of a Payload adds its tag


@dataclasses.dataclass
class Payload:
    """An object torch's safe loader refuses; unpickling it records its tag (the code a file can run)."""

    tag: str = "payload"

    def __setstate__(self, state: dict) -> None:
        UNPICKLED.append(state["tag"])
        self.__dict__.update(state)


@pytest.fixture(autouse=True)
def _fresh_record():
    UNPICKLED.clear()


def _pickled(path: Path, state_dict: dict, **extra) -> str:
    torch.save({"state_dict": state_dict, "hyper_parameters": {"payload": Payload("from-file")}, **extra}, path)
    return str(path)


# ------------------------------------------------------------------------------------ load_checkpoint
def test_a_pickled_object_is_refused_with_the_opt_in_and_loads_when_trusted(tmp_path):
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    path = _pickled(tmp_path / "foreign.ckpt", weights)
    with pytest.raises(ArtifactError) as refused:
        load_checkpoint(path, opt_in="set Something's trust_it: true")
    message = str(refused.value)
    assert path in message and f"{__name__}.Payload" in message  # what torch refused: the global's name
    assert "runs code stored in the file" in message and "set Something's trust_it: true" in message
    assert UNPICKLED == []  # nothing of the file ran
    with pytest.raises(ArtifactError, match=r"pass trust_pickle=True"):  # the default opt-in names the argument
        load_checkpoint(path)
    with pytest.warns(UserWarning, match=r"foreign.ckpt' was unpickled"):
        checkpoint = load_checkpoint(path, trust_pickle=True)
    assert UNPICKLED == ["from-file"] and checkpoint["hyper_parameters"]["payload"] == Payload("from-file")
    torch.testing.assert_close(checkpoint["state_dict"]["w"], weights["w"])


def test_plain_files_load_without_a_warning_and_broken_ones_are_named(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(3)}, "hyper_parameters": {"lr": 0.1, "betas": (0.9, 0.99)}},
               tmp_path / "plain.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkpoint = load_checkpoint(tmp_path / "plain.ckpt", trust_pickle=True)  # trusted, but no unpickling needed
    assert checkpoint["hyper_parameters"] == {"lr": 0.1, "betas": (0.9, 0.99)}
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "plain.ckpt").read_bytes()[:200])
    with pytest.raises(ArtifactError, match=r"cut.ckpt' cannot be read \(corrupt"):
        load_checkpoint(tmp_path / "cut.ckpt")
    with pytest.raises(ArtifactError, match=r"does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_a_causal_lm_fit_checkpoint_loads_without_unpickling(tmp_path):
    """lit_attrib's own checkpoints (module and datamodule hyperparameters, optimizer, scheduler, loops,
    callback states) are tensors and plain containers only."""
    module = CausalLMModule(config=CONFIG, learning_rate=1e-3, scheduler="cosine", warmup_steps=1)
    data = TextDataModule(path=str(FACTS), tokenizer=str(TOKENIZER), num_samples=16, val_size=8, batch_size=8,
                          max_length=48)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, num_sanity_val_steps=0, max_steps=2, limit_val_batches=0,
                      callbacks=[ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)])
    trainer.fit(module, data)
    path = tmp_path / "ck" / "last.ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "unpickled" warning: the safe path took it
        checkpoint = load_checkpoint(path)
        torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2 and checkpoint["hyper_parameters"]["config"] == CONFIG
    assert checkpoint["hyper_parameters"]["tokenizer"] == str(TOKENIZER)  # recorded from the datamodule
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["initial_lr"] == 1e-3
    trained = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    assert checkpoint["state_dict"].keys() == trained.keys()
    for key, value in trained.items():
        torch.testing.assert_close(checkpoint["state_dict"][key], value, msg=key)
    # and an analysis module takes it by `checkpoint:` alone (the model named by its hyperparameters), untrusted
    evaluator = EvalModule(checkpoint=str(path), tokenizer=str(TOKENIZER))
    evaluator.configure_model()
    for key, value in trained.items():
        torch.testing.assert_close(evaluator.state_dict()[key], value, msg=key)
    assert UNPICKLED == []


# ------------------------------------------------------------------------ modules with `checkpoint:`
@pytest.mark.parametrize("cls", [EvalModule, CurvatureEditModule])
def test_modules_refuse_a_pickled_checkpoint_unless_trusted(tmp_path, cls):
    extra = {"factors": str(tmp_path / "factors"), "layers": {"0": {"up": 0.5}}} if cls is CurvatureEditModule else {}
    source = cls(config=CONFIG, tokenizer=str(TOKENIZER), init_seed=7, **extra)
    source.configure_model()
    path = _pickled(tmp_path / "model.ckpt", source.state_dict())
    refusing = cls(config=CONFIG, tokenizer=str(TOKENIZER), checkpoint=path, **extra)
    assert refusing.hparams.trust_checkpoint is False
    with pytest.raises(ArtifactError, match=rf"model.ckpt' is refused(.|\n)*{__name__}.Payload(.|\n)*runs code"
                                            rf"(.|\n)*set {cls.__name__}'s trust_checkpoint: true"):
        refusing.configure_model()
    assert refusing.model is None and UNPICKLED == []
    trusting = cls(config=CONFIG, tokenizer=str(TOKENIZER), checkpoint=path, trust_checkpoint=True, **extra)
    with pytest.warns(UserWarning, match="was unpickled"):
        trusting.configure_model()
    assert UNPICKLED == ["from-file"]
    for key, value in source.state_dict().items():  # the checkpoint's weights (init_seed 7), not a fresh init
        torch.testing.assert_close(trusting.state_dict()[key], value, msg=key)


# ------------------------------------------------------------------------------ SketchedGradCallback
def _looped() -> LoopedTransformerModule:
    return LoopedTransformerModule(vocab_size=14, d_model=8, n_heads=2, d_ff=12, n_loops=2, max_length=16,
                                   init_seed=0).double()


def _data() -> AlgorithmicDataModule:
    return AlgorithmicDataModule(task="addition", digits=1, num_train=6, num_val=2, seed=1, batch_size=3)


def _predict(tmp_path, callback) -> None:
    Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=tmp_path, callbacks=[callback]).predict(_looped(), datamodule=_data(),
                                                                     return_predictions=False)


def test_sketched_grad_refuses_a_pickled_checkpoint_before_any_work_unless_trusted(tmp_path):
    trained = _looped()
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    optimizer = {"optimizer_states": [{"param_groups": [{"lr": 0.5}]}], "global_step": 3}
    pickled = _pickled(tmp_path / "pickled.ckpt", trained.state_dict(), **optimizer)
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": trained.state_dict(), **optimizer}, plain)
    arguments = dict(exact=True, dtype="float64")

    refused = SketchedGradCallback(checkpoints=[pickled], output_dir=str(tmp_path / "refused"), **arguments)
    with pytest.raises(ArtifactError, match=r"pickled.ckpt' is refused(.|\n)*Payload(.|\n)*runs code"
                                            r"(.|\n)*set SketchedGradCallback's trust_checkpoints: true"):
        _predict(tmp_path, refused)
    assert UNPICKLED == [] and refused._used == [] and len(refused._tracin.rows()[0]) == 0
    folder = tmp_path / "refused"
    assert not folder.exists() or not any(folder.rglob("*.safetensors"))  # no sketches, no results
    assert "trust_checkpoints" not in refused.arguments()  # it does not change results

    with pytest.warns(UserWarning, match="pickled.ckpt' was unpickled"):
        _predict(tmp_path, SketchedGradCallback(checkpoints=[pickled], trust_checkpoints=True,
                                                output_dir=str(tmp_path / "trusted"), **arguments))
    assert UNPICKLED == ["from-file"]
    _predict(tmp_path, SketchedGradCallback(checkpoints=[str(plain)], output_dir=str(tmp_path / "plain"), **arguments))
    trusted, reference = load_file(str(tmp_path / "trusted" / "sdi.safetensors")), load_file(
        str(tmp_path / "plain" / "sdi.safetensors"))
    assert trusted["sdi"].abs().sum() > 0
    torch.testing.assert_close(trusted["sdi"], reference["sdi"])  # the checkpoint's weights and lr were used
    used = json.loads((tmp_path / "trusted" / "sdi.json").read_text())["checkpoints"][0]
    assert used["eta"] == 0.5 and used["global_step"] == 3

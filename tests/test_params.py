"""params.yaml: loaded into frozen dataclasses; a bad value is one error naming the key."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import ROOT

from headstart import params as P


def test_project_params_file_is_valid_and_frozen():
    params = P.load(ROOT / "params.yaml")
    assert params.base.image_size == "auto" and params.head.augment == "auto"
    assert params.finetune.enabled is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.base.seed = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"head": {"epochs": -1}}, "head.epochs must be > 0"),
        ({"head": {"epoch": 3}}, "unknown key 'head.epoch'"),
        ({"heads": {}}, "unknown section 'heads'"),
        ({"prepare": {"val_fraction": 0.5, "test_fraction": 0.5}}, "must be < 1"),
        ({"prepare": {"val_fraction": 1.2}}, "prepare.val_fraction must be between 0 and 1"),
        ({"base": {"image_size": 16}}, "base.image_size must be >= 32"),
        ({"base": {"image_size": "big"}}, "base.image_size must be a number of pixels or auto"),
        ({"head": {"augment": "mirror"}}, "head.augment must be auto or one of none, flip"),
        ({"finetune": {"enabled": "maybe"}}, "finetune.enabled must be true, false or auto"),
        ({"finetune": {"enabled": 1}}, "finetune.enabled must be true, false or auto"),
        ({"base": {"backbone": "resnet"}}, "base.backbone must be one of"),
        ({"baseline": {"epochs": "many"}}, "baseline.epochs must be an integer"),
        ({"baseline": {"arch": "resnet"}}, "baseline.arch must be one of pooled, seed"),
        ({"weights": {"url": "http://insecure/x"}}, "weights.url must be empty or an https:// URL"),
    ],
)
def test_bad_values_name_the_key(raw, message):
    with pytest.raises(P.ParamsError, match=message.replace("(", r"\(")):
        P.from_dict(raw)


def test_finetune_enabled_is_true_false_or_auto():
    for value, expected in ((True, True), ("false", False), ("auto", "auto")):
        assert P.from_dict({"finetune": {"enabled": value}}).finetune.enabled == expected


def test_overrides_are_written_with_comments_kept(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    P.write_overrides(path, ["head.dropout=0.3", "finetune.enabled=true"])
    params = P.load(path)
    assert params.head.dropout == 0.3 and params.finetune.enabled is True
    assert "# headstart parameters" in path.read_text()
    with pytest.raises(P.ParamsError, match="head.epochs must be > 0"):
        P.write_overrides(path, ["head.epochs=0"])
    assert P.load(path).head.epochs == params.head.epochs


def test_an_override_changes_its_own_line_only(tmp_path):
    """`headstart run -S evaluate.top_k=2` must not rewrite other lines (it turned every `""`
    into `''`, a change in git the user never made)."""
    path = tmp_path / "params.yaml"
    original = (ROOT / "params.yaml").read_text()
    assert '""' in original
    path.write_text(original)
    P.write_overrides(path, ["evaluate.top_k=2"])
    lines = path.read_text().splitlines()
    assert len(lines) == len(original.splitlines())
    changed = [b for a, b in zip(original.splitlines(), lines, strict=True) if a != b]
    assert [line.split("#")[0].strip() for line in changed] == ["top_k: 2"]


def test_the_projects_params_file_holds_the_schemas_defaults():
    """The dataclasses hold the defaults; params.yaml is the user's copy of them (a missing key's
    error line quotes the dataclass default, so the two must agree)."""
    assert P.to_dict(P.load(ROOT / "params.yaml")) == P.to_dict(P.Params())


def test_a_choice_outside_its_literal_names_the_choices():
    with pytest.raises(P.ParamsError, match=r"head.optimizer must be one of adam, sgd, rmsprop"):
        P.from_dict({"head": {"optimizer": "lbfgs"}})
    with pytest.raises(P.ParamsError, match=r"export.formats must list each of saved_model"):
        P.from_dict({"export": {"formats": ["onnx", "tflite"]}})

"""Every config combination composes and builds its objects' configs."""

from __future__ import annotations

import itertools

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from xdyna.models import ModelConfig
from xdyna.train import config_rules
from xdyna.train.cli import CONF_DIR

GROUPS = ("model", "data", "stage", "trainer", "logger")
# Groups whose options constrain one another (config rules tie the model's variants, the data's
# conditions and the stage's trainable set): every combination of them composes. The others
# (trainer, logger) touch nothing of theirs, so each of their options is composed once, beside
# the first option of every other group: a sum, not a product, of the independent groups.
COUPLED = ("model", "data", "stage")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), group


def combinations() -> list[tuple[str, ...]]:
    first = {g: options(g)[0] for g in GROUPS}
    combos = [tuple(dict(first, **dict(zip(COUPLED, coupled)))[g] for g in GROUPS)
              for coupled in itertools.product(*(options(g) for g in COUPLED))]
    combos += [tuple(option if g == group else first[g] for g in GROUPS)
               for group in GROUPS if group not in COUPLED for option in options(group)[1:]]
    return combos


def test_combinations_cover_every_option():
    for position, group in enumerate(GROUPS):
        assert {combo[position] for combo in combinations()} == set(options(group)), group


@pytest.mark.parametrize("combo", combinations(), ids="-".join)
def test_every_combination_composes(combo, monkeypatch):
    from datapipes.loader import ClipLoaderConfig

    monkeypatch.setenv("XDYNA_RUN_ID", "compose-test")
    overrides = [f"{g}={o}" for g, o in zip(GROUPS, combo)]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    # sd15 needs the user's SD1.5 folder: a config rule names it (a `???` in model/sd15.yaml cannot
    # replace the schema's null), and it is the only gap of the model.
    assert not OmegaConf.missing_keys(cfg.model)
    assert bool(config_rules.real_weights_given(cfg)) == (combo[0] == "sd15")
    ModelConfig.from_mapping(OmegaConf.to_container(cfg.model, resolve=True))
    ClipLoaderConfig(**OmegaConf.to_container(cfg.data, resolve=True))
    assert set(cfg.stage.trainable) and cfg.stage.optim.lr > 0
    assert cfg.run.dir.endswith("compose-test")


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


NESTED = [
    *(f"experiment={o}" for o in options("experiment")),
    *(f"trainer/strategy={o}" for o in options("trainer/strategy")),
    *(f"model/reference={r}" for r in options("model/reference")),
    *(f"model/face={f}" for f in options("model/face")),
]


@pytest.mark.parametrize("override", NESTED)
def test_every_nested_option_composes_into_a_valid_model_config(override, monkeypatch):
    monkeypatch.setenv("XDYNA_RUN_ID", "compose-test")
    cfg = compose_train([override])
    ModelConfig.from_mapping(OmegaConf.to_container(cfg.model, resolve=True))
    group, _, option = override.partition("=")
    if group == "model/reference":
        assert cfg.model.reference == option
    if group == "model/face":
        assert cfg.model.face == option

"""The data config's defaults live in one place, datapipes.loader.ClipLoaderConfig: a conf/data
file may differ from them only where it says so on purpose (listed here with the reason), and
every conf/data option composes into a config the loader takes."""
import dataclasses
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from datapipes.loader import ClipLoaderConfig, build_clip_loader, config_from_dict
from xdyna.train.cli import CONF_DIR

DATA_FILES = sorted((CONF_DIR / "data").glob("*.yaml"))
DEFAULTS = {f.name: getattr(ClipLoaderConfig(), f.name) for f in dataclasses.fields(ClipLoaderConfig)}
# (file, key): why that file's value is not the dataclass default.
INTENDED = {
    ("synthetic.yaml", "output_dtype"): "training ships uint8 and scales on the device; the library "
                                        "default stays the float32 batch contract",
    ("three_sources.yaml", "shards"): "sources replace the two-key form",
    ("three_sources.yaml", "scene_probability"): "sources replace the two-key form",
    ("three_sources.yaml", "sources"): "the example itself",
}


def _own_keys(path: Path) -> dict:
    values = yaml.safe_load(path.read_text())
    values.pop("defaults", None)
    return values


def _set_keys(path: Path) -> dict:
    """The keys a data file sets itself or through the data files its defaults list extends."""
    parents = [entry for entry in yaml.safe_load(path.read_text()).get("defaults", [])
               if isinstance(entry, str) and entry != "_self_" and not entry.startswith("/")]
    keys = {}
    for parent in parents:
        keys.update(_set_keys(path.parent / f"{parent}.yaml"))
    return {**keys, **_own_keys(path)}


@pytest.mark.parametrize("path", DATA_FILES, ids=lambda p: p.name)
def test_data_files_differ_from_the_dataclass_only_on_purpose(path):
    values = _own_keys(path)
    unknown = sorted(set(values) - set(DEFAULTS))
    assert not unknown, f"{path.name}: keys {unknown} are no ClipLoaderConfig field"
    silent = {key: (value, DEFAULTS[key]) for key, value in values.items()
              if value != DEFAULTS[key] and (path.name, key) not in INTENDED}
    assert not silent, f"{path.name} disagrees with ClipLoaderConfig's defaults (file, dataclass): {silent}"
    stale = [key for (name, key) in INTENDED if name == path.name and values.get(key, DEFAULTS[key]) == DEFAULTS[key]]
    assert not stale, f"{path.name}: {stale} listed as intended differences but equal to the defaults"


@pytest.mark.parametrize("path", DATA_FILES, ids=lambda p: p.name)
def test_every_field_composes_from_the_dataclass(path, monkeypatch):
    # The schema (xdyna/train/schema.py) gives the composed `data` every field, so `data.KEY=...`
    # works for keys no file names, and each value no file sets is the dataclass's.
    monkeypatch.setenv("XDYNA_RUN_ID", "defaults-test")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"data={path.stem}"])
    composed = OmegaConf.to_container(cfg.data)
    assert set(composed) == set(DEFAULTS)
    own = _set_keys(path)
    assert {key: value for key, value in composed.items() if key not in own} == \
        {key: value for key, value in DEFAULTS.items() if key not in own}


def test_three_sources_example_composes_into_a_working_loader(tmp_path, portrait_shards):
    from datapipes.synthetic import write_synthetic_shards

    write_synthetic_shards(str(tmp_path / "talk"), human=2, scene=0, frames=12, height=64, width=32, seed=7)
    write_synthetic_shards(str(tmp_path / "nature"), human=0, scene=2, frames=12, height=64, width=32, seed=8)
    overrides = ["data=three_sources", f"data.sources.dance.shards={portrait_shards}",
                 f"data.sources.talk.shards={tmp_path / 'talk'}", f"data.sources.nature.shards={tmp_path / 'nature'}",
                 "data.num_frames=2", "data.height=64", "data.width=32", "data.batches_per_epoch=2"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    loader = build_clip_loader(config_from_dict(OmegaConf.to_container(cfg.data, resolve=True)), 0, 1)
    assert loader.source_names == ["dance", "talk", "nature"]
    assert [s.conditions for s in loader.sources] == [("pose", "face"), ("pose",), ()]
    assert len(list(loader)) == 2

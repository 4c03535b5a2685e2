"""One schema: the config dataclasses hold every default (xdyna/train/schema.py registers them),
the conf/ files only what differs, typos are refused at compose time in one line, and the rules
across groups (xdyna/train/config_rules.py) name each violation. Composition only, no training."""

from __future__ import annotations

import shutil
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from xdyna.train import config_rules
from xdyna.train.cli import CONF_DIR
from xdyna.train.hydra_errors import describe_config_error
from xdyna.train.schema import SCHEMAS, TrainConfig, schema_node

YAML_FILES = sorted(CONF_DIR.rglob("*.yaml"))
# The composed config's defaults: the top level's and, under each group, its schema's.
DEFAULTS = {**OmegaConf.to_container(schema_node(TrainConfig)),
            **{group: OmegaConf.to_container(schema_node(schema)) for group, schema in SCHEMAS.items()}}
MISSING = "???"


@pytest.fixture(autouse=True)
def run_id(monkeypatch):
    monkeypatch.setenv("XDYNA_RUN_ID", "schema-test")


def compose_train(overrides: list[str], conf_dir: Path = CONF_DIR):
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def compose_error(overrides: list[str], conf_dir: Path = CONF_DIR) -> str:
    with pytest.raises(Exception) as raised:
        compose_train(overrides, conf_dir)
    line = describe_config_error(raised.value, overrides)
    assert line is not None and "\n" not in line, raised.value
    return line


def package_of(path: Path, root: Path) -> list[str]:
    """Where a file's keys land: its ``# @package`` line, else its group (the primary: the root)."""
    for line in path.read_text().splitlines():
        if line.startswith("# @package"):
            package = line.split()[-1]
            return [] if package == "_global_" else package.split(".")
    group = path.parent.relative_to(root)
    return [] if group == Path(".") else list(group.parts)


def defaults_equal_in(path: Path, root: Path = CONF_DIR) -> tuple[list[str], int]:
    """The keys of ``path`` whose value equals the schema's default, and how many keys had one."""
    values = yaml.safe_load(path.read_text()) or {}
    values.pop("defaults", None)
    equal, compared = [], 0

    def visit(node, default, where: list[str]) -> None:
        nonlocal compared
        if isinstance(node, dict) and isinstance(default, dict):
            for key, value in node.items():
                if key in default:
                    visit(value, default[key], [*where, key])
            return
        compared += 1
        # Type-strict: 0 is not false, 1 is not 1.0 written on purpose.
        same = node == default and type(node) is type(default) or (
            isinstance(node, float) and isinstance(default, float) and node == default)
        # A switch file (model/reference/kv_concat.yaml: reference: kv_concat) names its own option:
        # equal to the default for one of them, and still what that file is for.
        switch = where[-1] == path.parent.name and node == path.stem
        if same and not switch:
            equal.append(".".join(where))

    package = package_of(path, root)
    scoped = values
    for part in reversed(package):
        scoped = {part: scoped}
    visit(scoped, DEFAULTS, [])
    return equal, compared


def test_every_file_holds_only_what_differs_from_its_schema():
    compared = 0
    for path in YAML_FILES:
        equal, count = defaults_equal_in(path)
        assert not equal, f"{path.relative_to(CONF_DIR)} repeats the schema's default of {equal}: delete them"
        compared += count
    # Not vacuous: the model, data, stage and schedule files, presets and experiments name schema keys.
    assert compared >= 30


def test_the_check_finds_a_repeated_default(tmp_path):
    path = tmp_path / "stage" / "stage9.yaml"
    path.parent.mkdir()
    path.write_text("name: stage9\ntrainable: [motion_modules]\noptim:\n  lr: 1.0e-5\n  warmup_steps: 7\n")
    assert defaults_equal_in(path, tmp_path) == (["stage.optim.lr"], 4)


def test_the_top_level_is_typed_by_its_dataclass():
    cfg = compose_train([])
    assert OmegaConf.get_type(cfg) is TrainConfig
    assert set(cfg) == {f.name for f in fields(TrainConfig)}
    assert "run.idd=x: run has no key 'idd' (did you mean id?)" in compose_error(["run.idd=x"])


@pytest.mark.parametrize("group", SCHEMAS)
def test_every_option_of_a_schema_group_is_typed_by_its_dataclass(group):
    # A group outside train.yaml's defaults (the launcher: xdyna-launch adds it) is added with '+'.
    add = "+" if compose_train([]).get(group) is None else ""
    for option in sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")):
        cfg = compose_train([f"{add}{group}={option}"])
        assert OmegaConf.get_type(cfg[group]) is SCHEMAS[group], f"{group}/{option}.yaml does not name /schema/{group}"
        assert set(cfg[group]) == {f.name for f in fields(SCHEMAS[group])}


@pytest.mark.parametrize("override, line", [
    ("data.num_frame=4", "data.num_frame=4: data has no key 'num_frame' (did you mean num_frames?)"),
    ("stage.optim.lrr=1e-4", "stage.optim.lrr=1e-4: stage.optim has no key 'lrr' (did you mean lr?)"),
    ("model.pretrained.sd1=/w", "model.pretrained.sd1=/w: model.pretrained has no key 'sd1' (did you mean sd15?)"),
    ("schedule.prediction=v_prediction", "schedule.prediction=v_prediction: schedule has no key 'prediction'"),
])
def test_a_typo_in_an_override_is_one_line_naming_the_key(override, line):
    message = compose_error([override])
    assert message.startswith(line), message
    assert "the fields of " in message  # not Hydra's '+' advice: a schema node takes its fields only


@pytest.mark.parametrize("file, text, line", [
    ("data/synthetic.yaml", "num_frame: 4\n", "conf/data/synthetic.yaml: data has no key 'num_frame' (did you mean num_frames?)"),
    ("stage/stage1.yaml", "optim:\n  lrr: 1.0e-4\n", "conf/stage/stage1.yaml: stage.optim has no key 'lrr' (did you mean lr?)"),
    ("data/synthetic.yaml", "num_frames: many\n", "conf/data/synthetic.yaml: data.num_frames: Value 'many'"),
])
def test_a_typo_in_a_file_is_one_line_naming_the_file_and_key(tmp_path, file, text, line):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    with open(conf / file, "a") as handle:
        handle.write(text)
    message = compose_error([], conf)
    assert message.startswith(line), message


def test_a_key_added_with_plus_is_a_violation():
    # Hydra opens a typed node for '+key=...'; the rule keeps the dataclass's fields the only keys.
    (line,) = config_rules.keys_are_schema_fields(compose_train(["+data.num_frame=4"]))
    assert line.startswith("data.num_frame: no such key; data takes the fields of datapipes.loader_config.ClipLoaderConfig")
    assert config_rules.keys_are_schema_fields(compose_train([])) == []


def test_optimizer_defaults_come_from_the_schema():
    from xdyna.train.stage_config import OptimConfig

    stage = compose_train(["stage=stage2"]).stage
    assert OmegaConf.to_container(stage.optim) == OptimConfig().to_dict()
    assert "optim" not in (yaml.safe_load((CONF_DIR / "stage" / "stage2.yaml").read_text()))
    with pytest.raises(Exception, match=r"stage.optim: unknown key\(s\) \['lrr'\]"):
        OptimConfig.from_mapping({"lrr": 1})
    assert OptimConfig.from_mapping({"lr": 3e-4}).warmup_steps == OptimConfig().warmup_steps


@pytest.mark.parametrize("override, line", [
    ("stage.optim.lr=0", "stage.optim.lr=0.0: must be a number > 0"),  # typed float by the schema
    ("stage.optim.betas=[0.9]", "stage.optim.betas=[0.9]: must be two numbers in [0, 1)"),
    ("stage.optim.warmup_steps=-1", "stage.optim.warmup_steps=-1: must be an integer >= 0"),
])
def test_a_bad_optimizer_value_is_one_line_naming_the_key(override, line):
    assert config_rules.optim_is_valid(compose_train([override])) == [line]


# ----------------------------------------------------------------------------- rules across groups

RULE_CASES = [
    # (overrides, rule, the start of its one line)
    (["model/reference=reference_net"], "stage_trains_what_the_model_has",
     "stage.trainable has dynamics_adapter but model.reference=reference_net (ReferenceNet) has no dynamics_adapter"),
    (["model/reference=kv_concat"], "stage_trains_what_the_model_has",
     "stage.trainable has dynamics_adapter but model.reference=kv_concat"),
    (["stage.trainable=[dynamics_adapter,image_prompt]"], "stage_trains_what_the_model_has",
     "stage.trainable has image_prompt but model.image_prompt=false"),
    (["stage.trainable=[motion_modules,pose_net]"], "stage_trains_what_the_model_has",
     "stage.trainable: unknown component(s) ['pose_net']"),
    (["stage=stage2", "data.with_face=true", "model/face=none"], "stage_trains_what_the_model_has",
     "stage.trainable has face_controlnet but model.face=none has no S-Face ControlNet"),
    (["stage=stage2"], "stage_conditions_fit_the_data",
     "stage.conditions has face but data.with_face=false"),
    (["stage=stage2", "data.with_face=true", "model/face=landmarks_in_pose", "data.face_landmarks_in_pose=true",
      "stage.trainable=[motion_modules]"], "stage_conditions_fit_the_data",
     "stage.conditions has face but model.face=landmarks_in_pose has no S-Face ControlNet"),
    (["stage.conditions=[]"], "stage_conditions_fit_the_data",
     "stage.trainable has pose_controlnet but stage.conditions=[] has no pose"),
    (["stage=stage2", "data.with_face=true", "data=three_sources", "data.sources.dance.shards=/d",
      "data.sources.talk.shards=/t", "data.sources.nature.shards=/n", "+data.sources.dance.conditions=[pose]"],
     "stage_conditions_fit_the_data", "stage.conditions has face but no source of data.sources (dance, talk, nature)"),
    (["model/face=landmarks_in_pose"], "face_landmarks_switch_is_one",
     "model.face=landmarks_in_pose (w/lmk) needs data.face_landmarks_in_pose=true"),
    (["data.face_landmarks_in_pose=true"], "face_landmarks_switch_is_one",
     "data.face_landmarks_in_pose=true draws face landmarks into the pose"),
    (["model=sd15"], "real_weights_given", "required config value(s) not set: model.pretrained.sd15"),
    (["data=three_sources", "data.sources.dance.shards=/d", "data.sources.talk.shards=/t", "data.sources.nature.shards=/n",
      "+data.sources.talk.wieght=2"], "data_is_valid",
     "invalid data config: sources.talk: unknown keys ['wieght']; known: ['shards', 'weight', 'kind', 'conditions']"),
    (["data.crop=middle"], "data_is_valid", "invalid data config: crop must be one of"),
    (["model.reference=ip_adapter", "stage.trainable=[image_prompt]"], "model_is_valid",
     "model.reference=ip_adapter needs model.image_prompt=true"),
]


@pytest.mark.parametrize("overrides, rule, line", RULE_CASES, ids=[case[1] + ":" + " ".join(case[0]) for case in RULE_CASES])
def test_each_rule_names_its_violation_in_one_line(overrides, rule, line):
    found = getattr(config_rules, rule)(compose_train(overrides))
    assert any(found_line.startswith(line) for found_line in found), found
    assert all("\n" not in found_line for found_line in found)


def shipped_combinations():
    experiments = [None, *sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))]
    for experiment in experiments:
        for stage in ("stage1", "stage2"):
            for model in ("tiny", "sd15"):
                yield experiment, stage, model


def test_every_shipped_experiment_stage_and_model_passes_the_rules():
    # Stage 2 trains the S-Face ControlNet on face maps (docs/scale.md: stage=stage2 data.with_face=true);
    # the ablations without one (wo/face, w/lmk) are stage-1 runs, and their stage 2 is refused.
    no_sface = {"wo_face", "w_lmk"}
    checked = 0
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for experiment, stage, model in shipped_combinations():
            overrides = [f"stage={stage}", f"model={model}"]
            overrides += [f"experiment={experiment}"] if experiment else []
            overrides += ["data.with_face=true"] if stage == "stage2" else []
            overrides += ["model.pretrained.sd15=/weights/sd15"] if model == "sd15" else []
            found = config_rules.violations(compose(config_name="train", overrides=overrides), config_rules.CONFIG_RULES)
            if stage == "stage2" and experiment in no_sface:
                assert [line.split(" but ")[0] for line in found] == [
                    "stage.trainable has face_controlnet", "stage.conditions has face"], (overrides, found)
            else:
                assert found == [], (overrides, found)
            checked += 1
    assert checked == 2 * 2 * (1 + len(list((CONF_DIR / "experiment").glob("*.yaml"))))


# Two builds switch every component on in one and off in the other.
@pytest.mark.parametrize("reference, face, image_prompt", [("dynamics_adapter", "none", True), ("reference_net", "sface", False)])
def test_model_config_components_are_what_the_built_model_has(reference, face, image_prompt):
    # The rules ask ModelConfig.components() instead of building a model: it must agree with one.
    from xdyna.models import ModelConfig, build_model

    config = ModelConfig(reference=reference, face=face, image_prompt=image_prompt)
    built = {name for name, params in build_model(config).component_parameters().items() if params}
    assert set(config.components()) == built


def test_cfg_job_shows_the_composed_schema_defaults(capsys, monkeypatch):
    from xdyna.train import cli

    monkeypatch.setattr("sys.argv", ["xdyna-train"])
    cli.main(["--cfg", "job", "stage=stage2"])
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["stage"]["optim"] == {"lr": 1.0e-5, "betas": [0.9, 0.999], "weight_decay": 0.01, "eps": 1.0e-8,
                                       "warmup_steps": 500, "elastic_lr": "keep"}
    assert shown["stage"]["conditions"] == ["pose", "face"] and shown["data"]["num_frames"] == 8
    assert shown["schedule"]["beta_end"] == 0.012 and shown["model"]["vae_chunk_size"] == 16
    assert shown["checkpoint"] == {"every_n_steps": 50, "keep": 3, "export_at_end": True}

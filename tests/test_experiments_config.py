"""Every config in conf/ composes; bad values fail at start-up naming their key (before any load)."""

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from jaxtyping import install_import_hook
from omegaconf import OmegaConf

# the experiments' tensor signatures are checked at run time, like modlora's
with install_import_hook("experiments", "beartype.beartype"):
    from experiments import models
    from experiments.config import ConfigError, validate
    from experiments.paths import CONF_DIR
    from experiments.train import run

CONF = Path(CONF_DIR)
GROUPS = ["model", "adapter", "data", "objective", "train", "eval", "experiment"]


def _compose(overrides=(), name="train", hydra_cfg=False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides), return_hydra_config=hydra_cfg)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_has_options():
    # one folder per concept: the groups above and hydra/launcher; primary configs at the top
    assert sorted(p.name for p in CONF.iterdir() if p.is_dir()) == sorted([*GROUPS, "hydra"])
    assert sorted(p.name for p in CONF.glob("*.yaml")) == ["evaluate.yaml", "train.yaml"]
    for group in GROUPS:
        assert _options(group), f"conf/{group} is empty"
    assert _options("hydra/launcher") == ["local", "slurm"]


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(group):
    for option in _options(group):
        cfg = _compose([f"{group}={option}"])
        assert cfg.model.kind in ("encoder", "causal"), (group, option)
        assert "_target_" in cfg.model.loader


def test_default_config_is_valid_and_offline():
    cfg = _compose()
    assert cfg.model.name == "all-MiniLM-L6-v2" and cfg.objective.name == "encoder"
    data = validate(cfg)
    assert len(data.train) >= 200
    # held-out wording is disjoint from training wording
    train_words = {w for p in data.train for w in (p.chosen + " " + p.rejected).lower().split()}
    for p in data.heldout:
        novel = set(p.chosen.lower().split()) - train_words
        assert novel, f"held-out pair {p} uses only training words"


@pytest.mark.parametrize("option", _options("experiment"))
def test_experiment_files_start_with_package_and_command(option):
    lines = (CONF / "experiment" / f"{option}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"
    assert any("python -m experiments.train" in line for line in lines[1:3]), option


@pytest.mark.parametrize("option", _options("experiment"))
def test_every_experiment_validates(option, monkeypatch):
    cfg = _compose([f"experiment={option}"])
    if cfg.model.loader._target_.endswith("load_hub"):
        # the weights are not here; every other check (types, ranges, data files) still runs
        monkeypatch.setattr(models, "hub_model_available", lambda name, revision=None: True)
    validate(cfg)


@pytest.mark.parametrize("group", ["adapter", "objective"])
def test_every_adapter_and_objective_option_instantiates_its_typed_record(group):
    for option in _options(group):
        record = instantiate(_compose([f"{group}={option}"])[group], _convert_="all")
        assert dataclasses.is_dataclass(record) and callable(record.build), option
        assert (record.kind if group == "adapter" else record.name) == option


def test_every_knob_has_a_comment():
    for path in CONF.rglob("*.yaml"):
        for line in path.read_text().splitlines():
            stripped = line.split("#")[0].strip()
            if not stripped or stripped.startswith("- ") or stripped.startswith("_target_:"):
                continue
            if stripped.endswith(":"):  # a mapping header; its knobs carry the comments
                continue
            assert "#" in line, f"{path.relative_to(CONF)}: knob without a comment: {line!r}"


@pytest.mark.filterwarnings("error")  # no deprecation warning from a config named like a plugin's
@pytest.mark.parametrize("launcher", ["local", "slurm"])
def test_launchers_compose(launcher):
    cfg = _compose([f"hydra/launcher={launcher}"], hydra_cfg=True)
    target = cfg.hydra.launcher._target_
    assert target.endswith("JoblibLauncher" if launcher == "local" else "SlurmLauncher")
    if launcher == "local":
        assert cfg.hydra.launcher.n_jobs == 2
    if launcher == "slurm":
        for key in ("partition", "gpus_per_node", "timeout_min"):
            assert key in cfg.hydra.launcher


def test_evaluate_config_composes():
    cfg = _compose(["checkpoint=/some/adapter.safetensors"], name="evaluate")
    assert cfg.checkpoint == "/some/adapter.safetensors"
    assert cfg.eval is None and cfg.plot is True


# ---------------------------------------------------------------- bad values, named keys
BAD = [
    (["adapter.r=0"], "adapter.r"),
    (["adapter.r=-3"], "adapter.r"),
    (["adapter=pissa", "adapter.r=0"], "adapter.r"),
    (["model.kind=vision"], "model.kind"),
    (["model.loader._target_=experiments.models.no_such_model"], "model.loader._target_"),
    (["eval.c_grid=[-1,0.5,1]"], "eval.c_grid"),
    (["eval.c_grid=[]"], "eval.c_grid"),
    (["objective=bidirectional"], "objective.name"),
    (["train.lr=0"], "train.lr"),
    (["adapter.layer_range=[0.8,0.2]"], "adapter.layer_range"),
    (["data.n_train=5000"], "data.n_train"),
    (["device=nonsense"], "device"),
    (["experiment=tiny_gpt2_heal", "objective.aggregate=median"], "objective.aggregate"),
    (["experiment=tiny_gpt2_heal", "objective.anchor=other"], "objective.anchor"),
    (["adapter=pissa", "adapter.selection_score=random"], "adapter.selection_score"),
    (["adapter.lr=0"], "adapter.lr"),
    (["eval.frontier.cosine=[0.9,0.99]"], "eval.frontier.cosine"),
    (["eval.frontier.kl=[0.5,0.1]"], "eval.frontier.kl"),
    (["eval.frontier.cosine=[1.0]"], "eval.frontier.cosine"),
    (["eval.frontier.rel_tol=0"], "eval.frontier.rel_tol"),
    (["eval.baselines.methods=[vector_top]"], "eval.baselines.methods"),
    (["eval.baselines.methods=[vector_out,vector_out]"], "eval.baselines.methods"),
    (["eval.baselines.mid_block=2"], "eval.baselines.mid_block"),
    (["eval.calibration.max_c=0.5"], "eval.calibration.max_c"),
    (["eval.bootstrap.n=1"], "eval.bootstrap.n"),
    # types (structured configs), unknown keys, records that contradict their _target_
    (["adapter.r=abc"], "adapter.r"),
    (["train.lr='0.1'"], "train.lr"),  # a string the merge could convert: the run reads it raw
    (["eval.c_grid=[0,1,x]"], r"eval.c_grid\[2\]"),
    (["experiment=tiny_llama_persona", "objective.pcgrad=maybe"], "objective.pcgrad"),
    (["+adapter.foo=1"], "adapter.foo"),
    (["adapter.kind=pissa"], "adapter.kind"),
    (["adapter._target_=experiments.schema.RunSchema"], "adapter._target_"),
    (["adapter.init=other"], "adapter.init"),
    (["adapter.layer_range=[2,1]"], "adapter.layer_range"),
]


@pytest.mark.parametrize("overrides,key", BAD)
def test_bad_values_name_their_key(overrides, key):
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.")):
        validate(_compose(overrides))


def test_unknown_model_option_names_the_group():
    with pytest.raises(MissingConfigException, match="model"):
        _compose(["model=no_such_model"])


def test_hub_model_not_available_offline_names_model_name(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _compose(["experiment=causal_persona", "model.name=nobody/not-a-model-xyz"])
    with pytest.raises(ConfigError, match=r"model\.name='nobody/not-a-model-xyz'"):
        validate(cfg)


def _persona(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    return path


GOOD = json.dumps({"prompt": "Q: hi\nA:", "chosen": " glad", "rejected": " sad"})


@pytest.mark.parametrize(
    "lines,match",
    [
        ([], "holds no examples"),
        ([GOOD, "{not json"], "line 2: malformed JSON"),
        ([GOOD, json.dumps([1, 2])], "line 2: expected a JSON object"),
        (
            [GOOD, json.dumps({"prompt": "x", "chosen": "a"})],
            "line 2: 'rejected' must be a non-empty string",
        ),
        (
            [GOOD, json.dumps({"prompt": 3, "chosen": "a", "rejected": "b"})],
            "line 2: 'prompt' must be a string",
        ),
    ],
)
def test_bad_data_files_fail_at_startup(tmp_path, lines, match):
    path = _persona(tmp_path, lines)
    before = path.read_bytes()
    cfg = _compose(["experiment=tiny_llama_persona", f"data.path={path}"])
    run_dir = tmp_path / "run"
    start = time.time()
    with pytest.raises(ConfigError, match=r"data\.path=.*" + match.replace("(", r"\(")):
        run(cfg, run_dir)
    assert time.time() - start < 5, "validation must fail before anything heavy is loaded"
    assert not run_dir.exists(), "a failed start-up must not create the run folder"
    assert path.read_bytes() == before


def test_missing_data_file_names_the_key(tmp_path):
    cfg = _compose(["experiment=tiny_llama_persona", f"data.path={tmp_path / 'nope.jsonl'}"])
    with pytest.raises(ConfigError, match=r"data\.path=.*no such file"):
        validate(cfg)


def test_resume_and_fork_paths_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.resume_from"):
        validate(_compose([f"train.resume_from={tmp_path / 'missing'}"]))
    with pytest.raises(ConfigError, match="exclusive"):
        validate(_compose([f"train.resume_from={tmp_path}", f"train.init_from={tmp_path}"]))


def test_config_is_plain_yaml_round_trip():
    cfg = _compose()
    again = OmegaConf.create(OmegaConf.to_yaml(cfg, resolve=True))
    assert again.adapter.r == cfg.adapter.r


@pytest.mark.slow
def test_command_line_fails_at_startup_naming_the_key(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(CONF.parent)}
    cmd = [
        sys.executable,
        "-m",
        "experiments.train",
        "adapter.r=0",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "adapter.r must be >= 1, got 0" in done.stderr
    assert not (tmp_path / "run" / "adapter.safetensors").exists()
    assert not (tmp_path / "run" / "metrics.json").exists()

"""config.py: one typed source of truth; bad keys and types stop with a useful message."""
import os

import pytest

import config
from config import ConfigError, load_config

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config.yaml")


def test_config_yaml_equals_the_dataclass_defaults():
    # config.yaml documents every key; it must not drift from config.py
    assert config.to_dict(load_config(CONFIG)) == config.to_dict(config.Config())


def test_overrides_are_typed():
    cfg = load_config(CONFIG, ["train.lr=2e-6", "sampling.group_size=4", "judge.url=lexical",
                                      "reward.event.step=false", "train.adam_betas=[0.9, 0.95]"])
    assert cfg.train.lr == 2e-6 and cfg.sampling.group_size == 4 and cfg.judge.url == "lexical"
    assert cfg.reward.event.step is False and cfg.train.adam_betas == [0.9, 0.95]


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "did you mean 'train.lr'"),
    ("trian.lr=1", "did you mean 'train'"),
    ("reward.event.delta=0.3", "did you mean 'reward.event.delta"),
    ("sampling.group_size=eight", "sampling.group_size: expected int"),
    ("sampling.group_size=8.5", "expected int"),
    ("train.wandb=maybe", "expected bool"),
    ("train.lr", "must look like section.key=value"),
    ("train=3", "expected a mapping"),
])
def test_bad_overrides_fail_clearly(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(CONFIG, [override])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_save_config_round_trips(tmp_path):
    cfg = load_config(CONFIG, ["judge.prompts={entail: my.txt}", "seed=3"])
    config.save_config(cfg, tmp_path / "c.yaml")
    assert config.to_dict(load_config(tmp_path / "c.yaml")) == config.to_dict(cfg)


def test_every_numeric_key_has_a_range():
    """config.validate checks every int and float key (seed takes any integer): none was forgotten."""
    numeric = {k for k, v in config.settings(config.Config(), [f.name for f in config.dataclasses.fields(
        config.Config)]).items() if isinstance(v, (int, float)) and not isinstance(v, bool)} - {"seed"}
    covered = {f"{section}.{key}" for section, keys in config.RANGES.items() for key in keys}
    assert numeric - covered == set()


@pytest.mark.parametrize("override, message", [
    ("train.grad_clip=-1", "train.grad_clip must be >= 0, got -1"),
    ("reward.event.delta1=0.4", "reward.event.delta1=0.4 must not exceed reward.event.delta2=0.35"),
    ("judge.retries=-1", "judge.retries must be >= 0"),
    ("judge.timeout=0", "judge.timeout must be > 0"),
    ("reward.think_weight=-1", "reward.think_weight must be >= 0"),
    ("sampling.group_size=1", "sampling.group_size must be >= 2"),
    ("sampling.temperature=0", "sampling.temperature must be > 0"),
    ("train.lr=.nan", "train.lr must be > 0, got nan"),
    ("sft.adam_betas=[0.9, 1.5]", "sft.adam_betas must be two numbers in [0, 1)"),
    ("reward.cn.completeness_weight=0", None),
    ("data.min_frames=20", "data.min_frames=20 must not exceed data.max_frames=16"),
])
def test_out_of_range_values_are_refused_with_the_key(override, message):
    if message is None:  # one weight of two may be 0; both may not
        load_config(CONFIG, [override])
        with pytest.raises(ConfigError, match="reward.cn: its weights must not all be 0"):
            load_config(CONFIG, [override, "reward.cn.naturalness_weight=0"])
        return
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[").replace(")", r"\)")):
        load_config(CONFIG, [override])

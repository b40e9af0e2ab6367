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


@pytest.mark.parametrize("text, message", [
    ("sampling:\n  group_size: 4\ntrain:\n  lr: 1.0\nsampling:\n  top_p: 0.9\n",
     r"c.yaml:5: 'sampling' is set twice \(first on line 1\)"),
    ("train:\n  lr: 1.0\n  steps: 2\n  lr: 2.0\n", r"c.yaml:4: 'train.lr' is set twice \(first on line 2\)"),
    ("- train\n- sft\n",
     r"c.yaml: the top level must be a mapping of sections .*got a list: \['train', 'sft'\]$"),
    ("just words\n", r"c.yaml: the top level must be a mapping of sections .*got a str"),
    ("train:\n  lr: [1\n", r"c.yaml: not valid YAML: line 3, column 1: expected ',' or ']'"),
])
def test_config_files_are_read_strictly(tmp_path, text, message):
    """A key set twice (PyYAML would keep the last without a word), a top level that is not a mapping and
    broken YAML stop in one line naming the file and the line."""
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        load_config(tmp_path / "c.yaml")
    assert "\n" not in str(error.value)


def test_a_config_file_that_is_not_utf8_is_named_in_one_line(tmp_path, capsys):
    (tmp_path / "latin1.yaml").write_bytes("seed: 1\n# café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml:2: not UTF-8 \(byte 0xe9 at offset 13\): save the "
                                          "file as UTF-8"):
        load_config(tmp_path / "latin1.yaml")
    (tmp_path / "utf8.yaml").write_text("seed: 1\n# café\n", encoding="utf-8")
    assert load_config(tmp_path / "utf8.yaml").seed == 1
    import sft  # and through a program: one line, exit 1
    with pytest.raises(SystemExit) as stop:
        sft.main([str(tmp_path / "latin1.yaml")])
    assert str(stop.value.code).startswith("config error: ") and "\n" not in str(stop.value.code)


def test_long_values_are_cut_in_messages():
    huge = "x" * 4_000_000
    assert config.snippet("short") == "'short'"
    assert config.snippet(huge) == "'" + "x" * 79 + "... (4,000,000 characters)"
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"model.path={{'a': '{huge}'}}"])
    assert len(str(error.value)) < 200


def test_save_config_round_trips(tmp_path):
    cfg = load_config(CONFIG, ["judge.prompts={entail: my.txt}", "seed=3"])
    config.save_config(cfg, tmp_path / "c.yaml")
    assert config.to_dict(load_config(tmp_path / "c.yaml")) == config.to_dict(cfg)


def test_every_numeric_key_has_a_range():
    """validate checks every int and float key (seed takes any integer), and train/sft.adam_betas: none was
    declared without `setting(default, within)`, the RunConfig keys that train and sft inherit included."""
    fields = list(config.fields_of(config.Config()))
    numeric = {key for key, value, _ in fields
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    assert {"train.lr", "sft.lr", "sft.steps", "reward.think.match_threshold", "eval.limit"} <= numeric
    covered = {key for key, _, f in fields if isinstance(f.metadata.get("range"), config.Range)}
    assert numeric - {"seed"} - covered == set()
    assert {"train.adam_betas", "sft.adam_betas"} <= covered
    assert all(f.metadata.get("range") is None for key, value, f in fields if isinstance(value, (bool, str)))


def test_every_default_is_in_its_range_and_choices():
    fields = list(config.fields_of(config.Config()))
    with_choices = {key: f.metadata["choices"] for key, _, f in fields if f.metadata.get("choices")}
    assert with_choices == {"train.lr_schedule": config.LR_SCHEDULES, "sft.lr_schedule": config.LR_SCHEDULES,
                            "train.loss_agg": config.LOSS_AGGS, "train.adv_scale": config.ADV_SCALES,
                            "sft.target": config.SFT_TARGETS, "eval.reply_parsing": config.REPLY_PARSING}
    for key, value, f in fields:
        assert f.metadata.get("range") is None or value is None or f.metadata["range"].ok(value), key
        assert not f.metadata.get("choices") or value in f.metadata["choices"], key


def test_the_enumerations():
    assert config.LR_SCHEDULES == ("constant", "cosine", "linear")
    assert config.RESUME_WORDS == ("auto", "never")
    assert config.LOSS_AGGS == ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")
    assert config.ADV_SCALES == ("group", "batch", "none")
    assert config.SFT_TARGETS == ("think", "caption")
    assert config.PREFIX_ATTENTION == ("sdpa", "eager")


def test_setting_gives_each_instance_its_own_list():
    a, b = config.RunConfig(), config.RunConfig()
    a.adam_betas.append(0.5)
    assert b.adam_betas == [0.9, 0.999] and config.TrainConfig().adam_betas == [0.9, 0.999]


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
    ("sft.lr=0", "sft.lr must be > 0, got 0.0"),
    ("sft.steps=-1", "sft.steps must be >= 0, got -1"),
    ("train.micro_batch_size=0", "train.micro_batch_size must be > 0, got 0"),
    ("sft.checkpoint_every=-2", "sft.checkpoint_every must be >= 0, got -2"),
    ("model.tiny_hidden=96", "model.tiny_hidden must be a multiple of 64, got 96"),
    ("sampling.top_p=0", "sampling.top_p must be in (0, 1], got 0"),
    ("train.eps_low=1", "train.eps_low must be in [0, 1), got 1.0"),
    ("eval.max_frames=1", "eval.max_frames must be >= 2, got 1"),
])
def test_out_of_range_values_are_refused_with_the_key(override, message):
    if message is None:  # one weight of two may be 0; both may not
        load_config(CONFIG, [override])
        with pytest.raises(ConfigError, match="reward.cn: its weights must not all be 0"):
            load_config(CONFIG, [override, "reward.cn.naturalness_weight=0"])
        return
    pattern = message.replace("(", r"\(").replace("[", r"\[").replace(")", r"\)")
    with pytest.raises(ConfigError, match=pattern):
        load_config(CONFIG, [override])


def test_validate_reports_every_problem_in_one_message():
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG, ["train.lr=-1", "judge.backoff=100", "reward.think.attribute_weight=0",
                             "reward.think.action_weight=0"])
    assert str(e.value) == ("train.lr must be > 0, got -1.0; judge.backoff=100.0 must not exceed "
                            "judge.max_backoff=60.0; reward.think: its weights must not all be 0 "
                            "(config.yaml documents each key)")


# ----------------------------------------------------------------------------- check_program


@pytest.fixture
def one_rank(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def problems(program, *overrides):
    """check_program's message for the config.yaml defaults with `overrides`; "" when it passes."""
    cfg = load_config(CONFIG, list(overrides))  # the program's rules are not load_config's
    try:
        config.check_program(cfg, program)
    except ConfigError as e:
        return str(e)
    return ""


@pytest.mark.parametrize("program", ["grpo.py", "sft.py"])
def test_the_defaults_pass(one_rank, program):
    assert problems(program) == ""


@pytest.mark.parametrize("program, section", [("grpo.py", "train"), ("sft.py", "sft")])
def test_the_run_rules_of_each_program(one_rank, program, section):
    s = section
    assert problems(program, f"{s}.lr_schedule=step") == (
        f"{s}.lr_schedule must be constant, cosine or linear, got 'step'")
    assert problems(program, f"{s}.resume=nowhere/ckpt") == (
        f"{s}.resume must be auto, never or a checkpoint folder; 'nowhere/ckpt' is none")
    assert problems(program, f"{s}.eval_every=5") == f"{s}.eval_every=5 needs data.val, a held-out JSONL"
    assert problems(program, f"{s}.eval_every=5", "data.val=val.jsonl") == ""
    assert problems(program, f"{s}.replicate=2") == f"{s}.replicate=2 must divide the number of ranks, 1"
    for fine in ("cosine", "linear"):
        assert problems(program, f"{s}.lr_schedule={fine}") == ""
    assert problems(program, f"{s}.resume=never") == ""


def test_resume_takes_an_existing_folder(one_rank, tmp_path):
    assert problems("sft.py", f"sft.resume={tmp_path}") == ""
    (tmp_path / "file").write_text("")
    assert problems("sft.py", f"sft.resume={tmp_path}/file") == (
        f"sft.resume must be auto, never or a checkpoint folder; '{tmp_path}/file' is none")


def test_replicate_must_divide_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "6")
    assert problems("grpo.py", "train.replicate=3") == ""
    assert problems("grpo.py", "train.replicate=4") == "train.replicate=4 must divide the number of ranks, 6"
    assert problems("sft.py", "sft.replicate=6") == ""
    assert problems("sft.py", "sft.replicate=12") == "sft.replicate=12 must divide the number of ranks, 6"


def test_grpo_rules(one_rank):
    assert problems("grpo.py", "train.loss_agg=mean") == (
        "train.loss_agg must be one of seq-mean-token-mean, token-mean, seq-mean-token-sum-norm, got 'mean'")
    assert problems("grpo.py", "train.adv_scale=std") == (
        "train.adv_scale must be group, batch or none, got 'std'")
    assert problems("grpo.py", "model.attn_implementation=flash_attention_2") == (
        "train.prefix_shared packs each group behind one attention mask, which needs "
        "model.attn_implementation sdpa or eager, not flash_attention_2")
    assert problems("grpo.py", "model.attn_implementation=flash_attention_2",
                    "train.prefix_shared=false") == ""
    for agg in config.LOSS_AGGS:
        assert problems("grpo.py", f"train.loss_agg={agg}") == ""
    for scale in config.ADV_SCALES:
        assert problems("grpo.py", f"train.adv_scale={scale}") == ""
    assert problems("grpo.py", "model.attn_implementation=eager") == ""


def test_sft_rules(one_rank):
    assert problems("sft.py", "sft.target=both") == "sft.target must be one of think, caption, got 'both'"
    assert problems("sft.py", "sft.target=caption") == ""


def test_each_program_checks_its_own_section_only(one_rank):
    grpo_only = ["train.loss_agg=mean", "train.adv_scale=std", "train.lr_schedule=step", "train.replicate=2",
                 "model.attn_implementation=flash_attention_2", "train.eval_every=1"]
    sft_only = ["sft.target=both", "sft.lr_schedule=step", "sft.resume=nowhere", "sft.replicate=2",
                "sft.eval_every=1"]
    assert problems("sft.py", *grpo_only) == ""
    assert problems("grpo.py", *sft_only) == ""  # without train.warm_start, sft: is not grpo.py's


def test_warm_start_adds_the_sft_run_rules(one_rank):
    bad_sft = ["sft.lr_schedule=step", "sft.resume=nowhere", "sft.eval_every=1", "sft.replicate=2"]
    assert problems("grpo.py", "train.warm_start=true") == ""
    assert problems("grpo.py", "train.warm_start=true", *bad_sft) == "; ".join([
        "sft.lr_schedule must be constant, cosine or linear, got 'step'",
        "sft.resume must be auto, never or a checkpoint folder; 'nowhere' is none",
        "sft.eval_every=1 needs data.val, a held-out JSONL",
        "sft.replicate=2 must divide the number of ranks, 1"])
    # as before these rules moved into config.py, grpo.py's warm start does not check sft.target
    assert problems("grpo.py", "train.warm_start=true", "sft.target=both") == ""


def test_problems_come_together_in_order(one_rank):
    assert problems("grpo.py", "train.adv_scale=std", "train.loss_agg=mean", "train.resume=nowhere",
                    "train.warm_start=true", "sft.resume=gone", "model.attn_implementation=x") == "; ".join([
        "train.resume must be auto, never or a checkpoint folder; 'nowhere' is none",
        "train.loss_agg must be one of seq-mean-token-mean, token-mean, seq-mean-token-sum-norm, got 'mean'",
        "train.adv_scale must be group, batch or none, got 'std'",
        "train.prefix_shared packs each group behind one attention mask, which needs "
        "model.attn_implementation sdpa or eager, not x",
        "sft.resume must be auto, never or a checkpoint folder; 'gone' is none"])
    assert problems("sft.py", "sft.target=both", "sft.lr_schedule=step") == (
        "sft.lr_schedule must be constant, cosine or linear, got 'step'; "
        "sft.target must be one of think, caption, got 'both'")


def test_check_program_takes_a_training_program():
    with pytest.raises(ValueError, match="program must be one of grpo.py, sft.py, got 'evaluate.py'"):
        config.check_program(config.Config(), "evaluate.py")

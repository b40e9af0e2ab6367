"""The one typed source of truth for settings: config.yaml read into dataclasses, each key declared once
with its type, its default and the values it may take.

    cfg = load_config("config.yaml", ["train.lr=2e-6", "reward.event.delta1=0.3"])
    check_program(cfg, "grpo.py")   # once, before any model loads

What this file holds, in order:
- the checks a field can carry (`positive`, `share`, `at_least(n)`, ...) and the enumerations (LOSS_AGGS,
  LR_SCHEDULES, ...) that grpo.py, sft.py and training.py import rather than spell again;
- `setting(default, within)` / `setting(default, choices=...)`, which declares a field with its check;
- the dataclasses, one per section of config.yaml (whose comments document every key);
- load_config and validate: types, then every field's range and the rules across keys (ORDERED, the
  weights of reward.think and reward.cn), on every load;
- check_program: the rules of the sections one program runs (allowed values, the resume folder, data.val,
  WORLD_SIZE), which depend on the program and on the machine;
- to_dict, settings, save_config; snippet, which cuts a long value quoted in a message.

A new numeric key takes two edits: its field here, with its range, and its line in config.yaml, with its
comment (tests/test_config.py checks both). Dotted `key=value` overrides on the command line are parsed
as YAML scalars (so `train.lr=1e-6` is a float and `data.train=x.jsonl` a string). Unknown keys and wrong
types stop with the closest valid name; a key typed `X | None` takes null. `save_config` writes the
config it is given into the run folder: the programs give it judge.redacted_config(cfg), whose judge.url
holds no credentials, and the judge's API key is only ever named (`judge.api_key_env`), never stored.
"""
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field

import yaml


class ConfigError(ValueError):
    pass


def snippet(value, limit=80, bare=False):
    """`value` as a message quotes it: its repr (a string as it is with `bare`), cut to about `limit`
    characters with the length it had, so that an id or a string from an untrusted file (a 4 MB video id)
    never fills the terminal."""
    text = value if bare and isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value):,} characters" if isinstance(value, str) else f"{len(text):,} characters as written"
    return f"{text[:limit]}... ({size})"

# ----------------------------------------------------------------------------- what a field may hold


class Range(typing.NamedTuple):
    """The values a numeric field takes: `ok(value)` is true for them (false for NaN), `must` says which."""
    ok: typing.Callable[[typing.Any], bool]
    must: str


positive = Range(lambda v: v > 0, "must be > 0")
non_negative = Range(lambda v: v >= 0, "must be >= 0")
share = Range(lambda v: 0 <= v <= 1, "must be in [0, 1]")
below_one = Range(lambda v: 0 <= v < 1, "must be in [0, 1)")
up_to_one = Range(lambda v: 0 < v <= 1, "must be in (0, 1]")
multiple_of_64 = Range(lambda v: v > 0 and v % 64 == 0, "must be a multiple of 64")
two_betas = Range(lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "must be two numbers in [0, 1)")


def at_least(n):
    return Range(lambda v: v >= n, f"must be >= {n}")


# The allowed values of the keys that take one of a few words (import them from here).
LR_SCHEDULES = ("constant", "cosine", "linear")                               # train/sft.lr_schedule
RESUME_WORDS = ("auto", "never")                                              # train/sft.resume, or a folder
LOSS_AGGS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")  # train.loss_agg
ADV_SCALES = ("group", "batch", "none")                                       # train.adv_scale
SFT_TARGETS = ("think", "caption")                                            # sft.target
REPLY_PARSING = ("official", "tolerant")                                      # eval.reply_parsing
PREFIX_ATTENTION = ("sdpa", "eager")  # the model.attn_implementation values train.prefix_shared works with


def setting(default, within=None, *, choices=None, or_list=False):
    """A dataclass field with its check, kept in the field's metadata:
    - `within` (a Range), the values a number may take; validate checks it on every load;
    - `choices`, the words a string may be; check_program checks them, for the sections the program runs.
      The message names them "one of a, b, c", or "a, b or c" with `or_list`.
    Fields without a check stay plain (`path: str = "..."`)."""
    metadata = {"range": within, "choices": choices, "or_list": or_list}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)

# ----------------------------------------------------------------------------- the sections


@dataclass
class ModelConfig:
    path: str = "models/Qwen2-VL-7B-Instruct"
    build_tiny: str = ""
    tiny_vocab: int = setting(0, non_negative)
    tiny_hidden: int = setting(64, multiple_of_64)
    tiny_layers: int = setting(2, positive)
    tiny_init_std: float = setting(0.2, positive)
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = True
    freeze_vision: bool = False


@dataclass
class DataConfig:
    train: str = "data/train.jsonl"
    val: str = ""
    prompt_file: str = "prompts/think.txt"
    fps: float = setting(2.0, positive)
    min_frames: int = setting(4, at_least(1))
    max_frames: int = setting(16, at_least(2))
    min_pixels: int = setting(4 * 28 * 28, positive)
    max_pixels: int = setting(128 * 28 * 28, positive)
    video_max_pixels: int = setting(768 * 28 * 28, positive)
    total_pixels: int = setting(90_316_800, positive)
    max_bad_fraction: float = setting(0.1, share)
    max_prompt_tokens: int = setting(8192, positive)
    max_target_tokens: int = setting(2048, positive)
    shuffle: bool = True


@dataclass
class SamplingConfig:
    group_size: int = setting(8, at_least(2))
    temperature: float = setting(1.0, positive)
    top_p: float = setting(1.0, up_to_one)
    max_new_tokens: int = setting(1024, positive)


@dataclass
class ThinkConfig:
    match_threshold: float = setting(0.5, share)
    subject_threshold: float = setting(0.5, share)
    attribute_weight: float = setting(0.5, non_negative)
    action_weight: float = setting(0.5, non_negative)


@dataclass
class EventConfig:
    step: bool = True
    delta1: float = setting(0.28, share)
    delta2: float = setting(0.35, share)
    f1: bool = False


@dataclass
class CNConfig:
    max_score: int = setting(10, positive)
    completeness_weight: float = setting(0.5, non_negative)
    naturalness_weight: float = setting(0.5, non_negative)


@dataclass
class RewardConfig:
    format_weight: float = setting(1.0, non_negative)
    think_weight: float = setting(1.0, non_negative)
    event_weight: float = setting(1.0, non_negative)
    cn_weight: float = setting(0.0, non_negative)
    think: ThinkConfig = field(default_factory=ThinkConfig)
    event: EventConfig = field(default_factory=EventConfig)
    cn: CNConfig = field(default_factory=CNConfig)


@dataclass
class JudgeConfig:
    url: str = "http://127.0.0.1:8000/v1"
    model: str = "Qwen2.5-72B-Instruct"
    api_key_env: str = "JUDGE_API_KEY"
    timeout: float = setting(120.0, positive)
    retries: int = setting(5, non_negative)
    backoff: float = setting(1.0, non_negative)
    max_backoff: float = setting(60.0, non_negative)
    malformed_retries: int = setting(3, non_negative)
    concurrency: int = setting(16, positive)
    max_tokens: int | None = setting(1024, positive)     # None: not sent (the server's default)
    temperature: float | None = setting(0.0, non_negative)
    cache_dir: str = "runs/judge-cache"
    health_check: bool = True
    max_failed_share: float = setting(0.5, share)
    failed_window: int = setting(10, positive)
    prompts: dict[str, str] = field(default_factory=dict)


@dataclass
class RunConfig:
    """What a training program's section holds, shared by `train:` (grpo.py) and `sft:` (sft.py): the
    loop's length, AdamW and its schedule, checkpoints, the export and logging. A subclass that changes a
    default declares the field again, with its range."""
    out_dir: str = "runs/videocap-r1"
    steps: int = setting(0, non_negative)
    epochs: int = setting(1, positive)
    prompts_per_rank: int = setting(1, positive)
    micro_batch_size: int = setting(2, positive)
    replicate: int = setting(1, positive)
    lr: float = setting(1e-6, positive)
    lr_schedule: str = setting("constant", choices=LR_SCHEDULES, or_list=True)
    warmup_steps: int = setting(0, non_negative)
    min_lr_ratio: float = setting(0.1, share)
    weight_decay: float = setting(0.0, non_negative)
    adam_betas: list[float] = setting([0.9, 0.999], two_betas)
    grad_clip: float = setting(1.0, non_negative)
    checkpoint_every: int = setting(50, non_negative)
    keep_checkpoints: int = setting(2, non_negative)
    resume: str = "auto"  # RESUME_WORDS or a checkpoint folder (check_program)
    export: bool = True
    log_every: int = setting(1, positive)
    eval_every: int = setting(0, non_negative)
    max_nonfinite_steps: int = setting(3, non_negative)
    collective_timeout: float = setting(1800.0, positive)
    wandb: bool = False
    wandb_project: str = "videocap-r1"
    tensorboard: bool = False


@dataclass
class TrainConfig(RunConfig):
    warm_start: bool = False
    micro_batch_size: int = setting(8, positive)
    prefix_shared: bool = True
    num_iterations: int = setting(1, positive)
    beta: float = setting(0.04, non_negative)
    eps_low: float = setting(0.2, below_one)
    eps_high: float = setting(0.2, non_negative)
    loss_agg: str = setting("seq-mean-token-mean", choices=LOSS_AGGS)
    adv_scale: str = setting("group", choices=ADV_SCALES, or_list=True)
    adv_eps: float = setting(1e-4, non_negative)
    ref_offload: bool = False
    sample_every: int = setting(10, non_negative)


@dataclass
class SFTConfig(RunConfig):
    target: str = setting("think", choices=SFT_TARGETS)
    out_dir: str = "runs/sft"
    lr: float = setting(1e-5, positive)
    checkpoint_every: int = setting(200, non_negative)


@dataclass
class EvalConfig:
    benchmark: str = "dream1k"
    annotations: str = ""
    video_dir: str = ""
    model: str = ""
    baseline: str = ""
    out_dir: str = "runs/eval"
    predictions: str = ""
    score_only: bool = False
    batch_size: int = setting(4, positive)
    max_new_tokens: int = setting(1024, positive)
    temperature: float = setting(0.0, non_negative)
    think: bool = True
    max_frames: int = setting(32, at_least(2))
    vdc_sections: list[str] = field(
        default_factory=lambda: ["camera", "short", "background", "main_object", "detailed"])
    limit: int = setting(0, non_negative)
    malformed_retries: int = setting(9, non_negative)
    reply_parsing: str = setting("official", choices=REPLY_PARSING, or_list=True)
    judge_temperature: float | None = setting(None, non_negative)  # None: not sent, as officially
    judge_max_tokens: int | None = setting(None, positive)
    prompts: dict[str, str] = field(default_factory=dict)


@dataclass
class Config:
    seed: int = 0  # any integer
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

# ----------------------------------------------------------------------------- reading and checking


def _check(value, tp, where):
    """Return `value` as type `tp`, or raise ConfigError. Ints are accepted for floats
    (YAML writes 1 for 1.0); nothing else is coerced. `X | None` takes null (None) or an X."""
    origin = typing.get_origin(tp)
    if origin is types.UnionType:
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _check(value, inner, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {snippet(value)}")
        (item,) = typing.get_args(tp)
        return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {snippet(value)}")
        _, item = typing.get_args(tp)
        return {str(k): _check(v, item, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # PyYAML reads "1e-6" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {snippet(value)}")
    return value


def _build(cls, data, prefix):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {snippet(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid: {', '.join(names)}"
            raise ConfigError(f"unknown config key {snippet(where)}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, where + ".")
        else:
            kwargs[key] = _check(value, tp, where)
    return cls(**kwargs)


def _set_dotted(tree, dotted, value):
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
    node[leaf] = value


def _yaml_problem(e):
    """A YAMLError in one line: where, and what (PyYAML spreads it over several)."""
    mark = getattr(e, "problem_mark", None)
    what = " ".join(str(getattr(e, "problem", None) or e).split())
    if context := getattr(e, "context", None):
        what = f"{what} ({' '.join(context.split())})"
    return (f"line {mark.line + 1}, column {mark.column + 1}: " if mark else "") + what


def _duplicates(node, path, prefix=""):
    """ConfigError for the first key written twice in one mapping of the composed YAML `node` (PyYAML keeps
    the last silently: a second `sampling:` would replace the first without a word), naming the dotted key
    and both lines."""
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _duplicates(item, path, prefix)
    if not isinstance(node, yaml.MappingNode):
        return
    first = {}
    for key, value in node.value:
        if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
            name = f"{prefix}{key.value}"
            if name in first:
                raise ConfigError(f"{path}:{key.start_mark.line + 1}: {snippet(name)} is set twice "
                                  f"(first on line {first[name]}); YAML would keep only the last: merge them")
            first[name] = key.start_mark.line + 1
            _duplicates(value, path, f"{name}.")


def read_yaml(path):
    """A config file as a mapping of sections ({} when empty), read as UTF-8. A file that is missing,
    unreadable, not UTF-8, not YAML, that sets a key twice, or whose top level is not a mapping stops with
    one line naming the file (and the line where there is one)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or type(e).__name__})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}): save "
                          "the file as UTF-8") from None
    try:
        _duplicates(yaml.compose(text, Loader=yaml.SafeLoader), path)
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, train:, "
                          f"...), got a {type(tree).__name__}: {snippet(tree)}")
    return tree


def load_config(path=None, overrides=()):
    """Read a YAML file (or nothing: the defaults; read_yaml's checks) plus `key=value` overrides."""
    tree = read_yaml(path) if path else {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


# The rules across keys. Pairs whose order matters: (lower, upper).
ORDERED = [("data.min_frames", "data.max_frames"), ("data.min_pixels", "data.max_pixels"),
           ("reward.event.delta1", "reward.event.delta2"), ("judge.backoff", "judge.max_backoff")]
# Sections whose *_weight keys must not all be 0 (they weigh the parts of one score).
WEIGHTED = ("reward.think", "reward.cn")


def _get(cfg, dotted):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def fields_of(section, prefix=""):
    """(dotted key, value, dataclasses.Field) of every setting of `section` (a dataclass: the Config, or one
    of its sections), nested sections walked into; a subclass's fields include the ones it inherits."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            yield from fields_of(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, f


def validate(cfg):
    """Refuse, with the key named, values the types allow but no run can use (a negative grad_clip would
    flip the gradient's sign; delta1 above delta2 would make the step function's middle step empty): each
    field's range (`setting(default, within)`), ORDERED and WEIGHTED. load_config calls it."""
    problems = [f"{key} {within.must}, got {snippet(value)}" for key, value, f in fields_of(cfg)
                if (within := f.metadata.get("range")) and value is not None and not within.ok(value)]
    for lower, upper in ORDERED:
        if _get(cfg, lower) > _get(cfg, upper):
            problems.append(f"{lower}={_get(cfg, lower)!r} must not exceed {upper}={_get(cfg, upper)!r}")
    for section in WEIGHTED:
        weights = [v for k, v in vars(_get(cfg, section)).items() if k.endswith("_weight")]
        if not sum(weights) > 0:
            problems.append(f"{section}: its weights must not all be 0")
    if problems:
        raise ConfigError("; ".join(problems) + " (config.yaml documents each key)")

# ----------------------------------------------------------------------------- what one program runs

# The run section (a RunConfig) that each training program trains with.
PROGRAMS = {"grpo.py": "train", "sft.py": "sft"}
_RUN_KEYS = {f.name for f in dataclasses.fields(RunConfig)}


def _choice_problems(section, prefix, names):
    """The fields of `section` among `names` whose value is not one of their `choices`."""
    problems = []
    for key, value, f in fields_of(section, prefix):
        choices = f.metadata.get("choices")
        if f.name in names and choices and value not in choices:
            problems.append(f"{key} must be {_spell(choices, f.metadata['or_list'])}, got {snippet(value)}")
    return problems


def _spell(choices, or_list):
    """("a", "b", "c") as "one of a, b, c", or as "a, b or c" with `or_list`."""
    return f"{', '.join(choices[:-1])} or {choices[-1]}" if or_list else f"one of {', '.join(choices)}"


def _run_problems(cfg, name):
    """The problems of the run section `name` (train or sft) in the keys every RunConfig has: its
    lr_schedule, a resume folder that exists, data.val for eval_every, replicate dividing WORLD_SIZE."""
    run = getattr(cfg, name)
    problems = _choice_problems(run, f"{name}.", _RUN_KEYS)
    if run.resume not in RESUME_WORDS and not os.path.isdir(run.resume):
        problems.append(f"{name}.resume must be {', '.join(RESUME_WORDS)} or a checkpoint folder; "
                        f"{snippet(run.resume)} is none")
    if run.eval_every and not cfg.data.val:
        problems.append(f"{name}.eval_every={run.eval_every} needs data.val, a held-out JSONL")
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's; the process group does not exist yet
    if world % run.replicate:
        problems.append(f"{name}.replicate={run.replicate} must divide the number of ranks, {world}")
    return problems


def _own_problems(cfg, name):
    """The problems of the run section `name` in the keys only it has (train.loss_agg, sft.target, ...)."""
    run = getattr(cfg, name)
    return _choice_problems(run, f"{name}.", {f.name for f in dataclasses.fields(run)} - _RUN_KEYS)


def check_program(cfg, program):
    """Refuse (ConfigError, the problems joined by "; ") what `program`, "grpo.py" or "sft.py", cannot
    run with, beyond validate's ranges: the allowed values (`choices`) of its run section, the rules that
    look at the disk and the environment (a resume folder that exists, replicate dividing WORLD_SIZE), and
    the ones across sections (eval_every needs data.val; train.prefix_shared needs an attention that takes
    a custom mask). grpo.py checks train: and, with train.warm_start, the RunConfig keys of sft: (not
    sft.target, as before these rules moved here); sft.py checks sft:. Each program calls it once, before
    any model loads. load_config does not: evaluate.py and data.py need none of it, and a finished run's
    config.yaml read back may name a resume folder that is gone."""
    if program not in PROGRAMS:
        raise ValueError(f"program must be one of {', '.join(PROGRAMS)}, got {program!r}")
    name = PROGRAMS[program]
    problems = _run_problems(cfg, name) + _own_problems(cfg, name)
    if program == "grpo.py":
        attention = cfg.model.attn_implementation
        if cfg.train.prefix_shared and attention not in PREFIX_ATTENTION:
            problems.append("train.prefix_shared packs each group behind one attention mask, which needs "
                            f"model.attn_implementation {_spell(PREFIX_ATTENTION, True)}, not {attention}")
        if cfg.train.warm_start:
            problems += _run_problems(cfg, "sft")
    if problems:
        raise ConfigError("; ".join(problems))

# ----------------------------------------------------------------------------- writing


def to_dict(cfg):
    return dataclasses.asdict(cfg)


def settings(cfg, sections, leave_out=()):
    """{dotted key: value} of the top-level keys and the `sections` of cfg, without `leave_out`: what a
    checkpoint records so that a resume can tell what changed."""
    out = {}

    def walk(tree, prefix):
        for key, value in tree.items():
            if isinstance(value, dict) and key != "prompts":
                walk(value, f"{prefix}{key}.")
            elif f"{prefix}{key}" not in leave_out:
                out[f"{prefix}{key}"] = value
    tree = to_dict(cfg)
    walk({k: v for k, v in tree.items() if k in sections or not isinstance(v, dict)}, "")
    return out


def save_config(cfg, path):
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)

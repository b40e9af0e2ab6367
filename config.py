"""The one typed source of truth for settings: config.yaml read into dataclasses.

    cfg = load_config("config.yaml", ["train.lr=2e-6", "reward.event.delta1=0.3"])

Every key in config.yaml is a field below; the comments in config.yaml document them.
Dotted `key=value` overrides on the command line are parsed as YAML scalars (so
`train.lr=1e-6` is a float and `data.train=x.jsonl` a string). Unknown keys and wrong
types stop with the closest valid name. `save_config` writes the resolved config into
the run folder; it holds no secrets because the judge's API key is only ever named
(`judge.api_key_env`), never stored.
"""
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    path: str = "models/Qwen2-VL-7B-Instruct"
    build_tiny: str = ""
    tiny_vocab: int = 0
    tiny_hidden: int = 64
    tiny_layers: int = 2
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = True
    freeze_vision: bool = False


@dataclass
class DataConfig:
    train: str = "data/train.jsonl"
    val: str = ""
    prompt_file: str = "prompts/think.txt"
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 16
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 128 * 28 * 28
    video_max_pixels: int = 768 * 28 * 28
    total_pixels: int = 90_316_800
    max_bad_fraction: float = 0.1
    max_prompt_tokens: int = 8192
    shuffle: bool = True


@dataclass
class SamplingConfig:
    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024


@dataclass
class ThinkConfig:
    match_threshold: float = 0.5
    subject_threshold: float = 0.5
    attribute_weight: float = 0.5
    action_weight: float = 0.5


@dataclass
class EventConfig:
    step: bool = True
    delta1: float = 0.28
    delta2: float = 0.35
    f1: bool = False


@dataclass
class CNConfig:
    max_score: int = 10
    completeness_weight: float = 0.5
    naturalness_weight: float = 0.5


@dataclass
class RewardConfig:
    format_weight: float = 1.0
    think_weight: float = 1.0
    event_weight: float = 1.0
    cn_weight: float = 0.0
    think: ThinkConfig = field(default_factory=ThinkConfig)
    event: EventConfig = field(default_factory=EventConfig)
    cn: CNConfig = field(default_factory=CNConfig)


@dataclass
class JudgeConfig:
    url: str = "http://127.0.0.1:8000/v1"
    model: str = "Qwen2.5-72B-Instruct"
    api_key_env: str = "JUDGE_API_KEY"
    timeout: float = 120.0
    retries: int = 5
    backoff: float = 1.0
    max_backoff: float = 60.0
    malformed_retries: int = 3
    concurrency: int = 16
    max_tokens: int = 1024
    temperature: float = 0.0
    cache_dir: str = "runs/judge-cache"
    health_check: bool = True
    max_failed_share: float = 0.5
    failed_window: int = 10
    prompts: dict[str, str] = field(default_factory=dict)


@dataclass
class RunConfig:
    """What a training program's section holds, shared by `train:` (grpo.py) and `sft:` (sft.py): the
    loop's length, AdamW and its schedule, checkpoints, the export and logging."""
    out_dir: str = "runs/videocap-r1"
    steps: int = 0
    epochs: int = 1
    prompts_per_rank: int = 1
    micro_batch_size: int = 2
    replicate: int = 1
    lr: float = 1e-6
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    resume: str = "auto"
    export: bool = True
    log_every: int = 1
    eval_every: int = 0
    max_nonfinite_steps: int = 3
    collective_timeout: float = 1800.0
    wandb: bool = False
    wandb_project: str = "videocap-r1"
    tensorboard: bool = False


@dataclass
class TrainConfig(RunConfig):
    warm_start: bool = False
    micro_batch_size: int = 8
    prefix_shared: bool = True
    num_iterations: int = 1
    beta: float = 0.04
    eps_low: float = 0.2
    eps_high: float = 0.2
    loss_agg: str = "seq-mean-token-mean"
    adv_scale: str = "group"
    adv_eps: float = 1e-4
    ref_offload: bool = False
    sample_every: int = 10


@dataclass
class SFTConfig(RunConfig):
    target: str = "think"
    out_dir: str = "runs/sft"
    lr: float = 1e-5
    checkpoint_every: int = 200


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
    batch_size: int = 4
    max_new_tokens: int = 1024
    temperature: float = 0.0
    think: bool = True
    max_frames: int = 32
    vdc_sections: list[str] = field(
        default_factory=lambda: ["camera", "short", "background", "main_object", "detailed"])
    limit: int = 0
    malformed_retries: int = 9
    prompts: dict[str, str] = field(default_factory=dict)


@dataclass
class Config:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _check(value, tp, where):
    """Return `value` as type `tp`, or raise ConfigError. Ints are accepted for floats
    (YAML writes 1 for 1.0); nothing else is coerced."""
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
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
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls, data, prefix):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{where}'{hint}")
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


def load_config(path=None, overrides=()):
    """Read a YAML file (or nothing: the defaults) plus `key=value` overrides."""
    tree = {}
    if path:
        try:
            with open(path) as f:
                tree = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


_POSITIVE = (lambda v: v > 0, "must be > 0")
_NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")
_SHARE = (lambda v: 0 <= v <= 1, "must be in [0, 1]")


def _at_least(n):
    return lambda v: v >= n, f"must be >= {n}"


# Every numeric key and the values it takes (NaN takes none); tests/test_config.py checks that none is missing.
# The run sections' keys are listed once for train and sft alike.
_RUN = {"steps": _NON_NEGATIVE, "epochs": _POSITIVE, "prompts_per_rank": _POSITIVE, "micro_batch_size": _POSITIVE,
        "replicate": _POSITIVE,
        "lr": _POSITIVE, "warmup_steps": _NON_NEGATIVE, "min_lr_ratio": _SHARE, "weight_decay": _NON_NEGATIVE,
        "adam_betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "must be two numbers in [0, 1)"),
        "grad_clip": _NON_NEGATIVE,
        "checkpoint_every": _NON_NEGATIVE, "keep_checkpoints": _NON_NEGATIVE, "log_every": _POSITIVE,
        "eval_every": _NON_NEGATIVE, "max_nonfinite_steps": _NON_NEGATIVE, "collective_timeout": _POSITIVE}
RANGES = {
    "model": {"tiny_vocab": _NON_NEGATIVE, "tiny_hidden": (lambda v: v > 0 and v % 64 == 0, "must be a multiple of 64"),
              "tiny_layers": _POSITIVE},
    "data": {"fps": _POSITIVE, "min_frames": _at_least(1), "max_frames": _at_least(2), "min_pixels": _POSITIVE,
             "max_pixels": _POSITIVE, "video_max_pixels": _POSITIVE, "total_pixels": _POSITIVE,
             "max_bad_fraction": _SHARE, "max_prompt_tokens": _POSITIVE},
    "sampling": {"group_size": _at_least(2), "temperature": _POSITIVE,
                 "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
                 "max_new_tokens": _POSITIVE},
    "reward": {"format_weight": _NON_NEGATIVE, "think_weight": _NON_NEGATIVE, "event_weight": _NON_NEGATIVE,
               "cn_weight": _NON_NEGATIVE},
    "reward.think": {"match_threshold": _SHARE, "subject_threshold": _SHARE, "attribute_weight": _NON_NEGATIVE,
                     "action_weight": _NON_NEGATIVE},
    "reward.event": {"delta1": _SHARE, "delta2": _SHARE},
    "reward.cn": {"max_score": _POSITIVE, "completeness_weight": _NON_NEGATIVE, "naturalness_weight": _NON_NEGATIVE},
    "judge": {"timeout": _POSITIVE, "retries": _NON_NEGATIVE, "backoff": _NON_NEGATIVE,
              "max_backoff": _NON_NEGATIVE, "malformed_retries": _NON_NEGATIVE, "concurrency": _POSITIVE,
              "max_tokens": _POSITIVE, "temperature": _NON_NEGATIVE, "max_failed_share": _SHARE,
              "failed_window": _POSITIVE},
    "train": {**_RUN, "num_iterations": _POSITIVE, "beta": _NON_NEGATIVE,
              "eps_low": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
              "eps_high": _NON_NEGATIVE, "adv_eps": _NON_NEGATIVE, "sample_every": _NON_NEGATIVE},
    "sft": _RUN,
    "eval": {"batch_size": _POSITIVE, "max_new_tokens": _POSITIVE, "temperature": _NON_NEGATIVE,
             "max_frames": _at_least(2), "limit": _NON_NEGATIVE, "malformed_retries": _NON_NEGATIVE},
}
# The pairs of keys whose order matters: (lower, upper)
ORDERED = [("data.min_frames", "data.max_frames"), ("data.min_pixels", "data.max_pixels"),
           ("reward.event.delta1", "reward.event.delta2"), ("judge.backoff", "judge.max_backoff")]


def _get(cfg, dotted):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg):
    """Refuse, with the key named, values the types allow but no run can use (a negative grad_clip would
    flip the gradient's sign; delta1 above delta2 would make the step function's middle step empty)."""
    problems = []
    for section, keys in RANGES.items():
        for key, (ok, must) in keys.items():
            value = _get(cfg, f"{section}.{key}")
            if not ok(value):
                problems.append(f"{section}.{key} {must}, got {value!r}")
    for lower, upper in ORDERED:
        if _get(cfg, lower) > _get(cfg, upper):
            problems.append(f"{lower}={_get(cfg, lower)!r} must not exceed {upper}={_get(cfg, upper)!r}")
    for section in ("reward.think", "reward.cn"):
        weights = [v for k, v in vars(_get(cfg, section)).items() if k.endswith("_weight")]
        if not sum(weights) > 0:
            problems.append(f"{section}: its weights must not all be 0")
    if problems:
        raise ConfigError("; ".join(problems) + " (config.yaml documents each key)")


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
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)

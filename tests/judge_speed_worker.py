"""GRPO steps under torchrun with the configured reward through a lexical judge that answers each rank
after its own delay, and half the completions wrapped in the think/answer layout so that the rewards differ.

    torchrun --nproc_per_node 2 tests/judge_speed_worker.py MODEL_DIR OUT_DIR DELAY_0,DELAY_1 [key=value ...]

Rank r's judge sleeps DELAY_r seconds (and up to as much again, at random) before each answer.
"""
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
import grpo  # noqa: E402
import judge as judge_lib  # noqa: E402
import model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SlowJudge(judge_lib.LexicalJudge):
    """The lexical judge, each ask() answered after `delay` seconds plus a random share of it."""

    def __init__(self, delay, seed):
        super().__init__()
        self.delay, self.rng = delay, random.Random(seed)

    def ask(self, tasks):
        time.sleep(self.delay * (1 + self.rng.random()))
        return super().ask(tasks)


def in_layout(decode):
    """Tokens.decode with each text of an even length as the answer of a well-formed output (a random model
    writes none), so that the rewards of a group differ and the judge has answers to judge."""
    def wrapped(self, roll, rows=None):
        return [f'<think>{{"subjects": []}}</think><answer>{t}</answer>' if len(t) % 2 == 0 else t
                for t in decode(self, roll, rows)]
    return wrapped


def main(model_dir, out_dir, delays, *overrides):
    rank = int(os.environ.get("RANK", 0))
    delay = float(delays.split(",")[rank])
    judge_lib.make_judge = lambda cfg, feedback=True: SlowJudge(delay, rank)
    model.Tokens.decode = in_layout(model.Tokens.decode)
    cfg = config.load_config(f"{ROOT}/tests/tiny.yaml", [
        f"model.path={model_dir}", f"train.out_dir={out_dir}", "train.warm_start=false",
        f"data.train={ROOT}/tests/data/train.jsonl", f"data.prompt_file={ROOT}/prompts/think.txt",
        "train.steps=2", "sampling.group_size=4", "sampling.max_new_tokens=12", "train.prompts_per_rank=2",
        "train.micro_batch_size=3", "train.checkpoint_every=0", "train.sample_every=0", "train.lr=1e-2",
        "reward.cn_weight=1.0", "reward.think_weight=0", "train.collective_timeout=60", *overrides])
    grpo.train(cfg)


if __name__ == "__main__":
    main(*sys.argv[1:])

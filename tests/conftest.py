import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: an end-to-end run of several processes or many steps (10 s or "
                            "more on 2 cores); `python -m pytest -q tests -m 'not slow'` leaves them out")


# ---- judge fixtures (judge.py): a lexical judge server on a free port of 127.0.0.1
@pytest.fixture
def judge_server():
    from judge_server import JudgeServer
    server = JudgeServer(port=0).start()
    yield server
    server.stop()


@pytest.fixture
def judge_cfg(judge_server, tmp_path):
    """JudgeConfig for judge_server: tiny backoff and timeout, no cache, no health check."""
    from config import JudgeConfig
    return JudgeConfig(url=judge_server.url, model=judge_server.model, timeout=2.0, retries=3,
                       backoff=0.01, max_backoff=0.05, malformed_retries=2, concurrency=8,
                       cache_dir="", health_check=False)


# ---- tiny model fixtures (model.py): one random tiny model per kind, built once per test session
@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """tiny_model_dir(kind) -> folder of a tiny random model of that kind (model.build_tiny), built on first
    use."""
    import model
    from config import DataConfig
    built = {}

    def get(kind):
        if kind not in built:
            built[kind] = str(tmp_path_factory.mktemp(f"tiny-{kind}"))
            model.build_tiny(built[kind], kind, data_cfg=DataConfig())
        return built[kind]
    return get


# ---- data fixtures (data.py)
@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """The tiny model's byte-level tokenizer with Qwen's special tokens and chat template."""
    import model
    return model.build_tokenizer(str(tmp_path_factory.mktemp("tiny-tokenizer")))


# ---- resume checks (grpo.py, sft.py)
def assert_resume_is_exact(straight, resumed, initial):
    """The exports of an uninterrupted run and of a stopped-and-resumed one are bit-identical, and differ from
    the `initial` model folder (the runs did train)."""
    import torch
    from safetensors.torch import load_file
    straight = load_file(f"{straight}/export/model.safetensors")
    resumed = load_file(f"{resumed}/export/model.safetensors")
    initial = load_file(f"{initial}/model.safetensors")
    assert any(not torch.equal(straight[k], initial[k]) for k in straight)  # it did train
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k

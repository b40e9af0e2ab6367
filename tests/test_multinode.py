"""Past one node, on CPU processes (gloo): loading from rank 0 equals every rank reading the model, HSDP
equals FSDP, a run resumes on another number of ranks without repeating or skipping videos, and two torchrun
"nodes" on this machine, each in a folder of its own (a disk the other does not see), train from a model
folder only node 0 has and are stopped, naming the rank, when their checkpoints would not be on a shared
disk."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

import data
import multinode_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
WORKER = os.path.join(ROOT, "tests", "multinode_worker.py")
ENV = {**os.environ, "PYTHONPATH": ROOT}
RUN = [f"data.train={ROOT}/tests/data/train.jsonl", f"data.prompt_file={ROOT}/prompts/think.txt",
       "model.build_tiny=", "train.warm_start=false", "train.prompts_per_rank=1", "sampling.group_size=2",
       "sampling.max_new_tokens=8", "train.micro_batch_size=4", "train.lr=1e-3", "train.export=false",
       "train.sample_every=0"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(folders, args, timeout=300):
    """`args` (a script and its arguments) as two torchrun nodes of one process each on this machine, node i
    running in folders[i] -> [(returncode, stdout, stderr)] of both."""
    port = free_port()
    procs = [subprocess.Popen(TORCHRUN + ["--nnodes=2", f"--node-rank={i}", "--nproc-per-node=1",
                                          "--master-addr=127.0.0.1", f"--master-port={port}", *args],
                              cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for i, folder in enumerate(folders)]
    return [(p.returncode, *p.communicate(timeout=timeout)) if p.wait(timeout=timeout) is not None else None
            for p in procs]


def global_order():
    """The record ids in epoch 0's global order (seed 0, shuffled), as one rank taking them all sees them."""
    records = data.load_records(f"{ROOT}/tests/data/train.jsonl")
    stream = data.PromptStream(records, lambda r: {}, 0, 1, 0, len(records), True, 0.1)
    return [r.id for r, _ in stream.next()]


def consumed(out_dir, world):
    """The videos the run of `world` ranks took, step by step and rank by rank, from the recording reward."""
    per_rank = [open(os.path.join(out_dir, f"videos-world{world}-rank{r}.jsonl")).read().splitlines()
                for r in range(world)]
    return [i for step in zip(*per_rank) for line in step for i in json.loads(line)]


def test_the_data_position_carries_over_to_another_number_of_ranks():
    """2 ranks take 2 steps; 1 rank, 3 ranks, or 1 rank of 2 prompts continue the global order from the 5th
    item; the bad-video counts keep their totals and every rank knows every warned file."""
    records = [data.Record(id=str(i), video=f"v{i}.mp4", caption="c", subjects=None, events=None)
               for i in range(12)]

    def encode(record):
        if record.video in bad:
            raise data.VideoError(f"{record.video}: unreadable")
        return {}

    def streams(world, per_rank):
        return [data.PromptStream(records, encode, r, world, 3, per_rank, True, 1.0) for r in range(world)]

    def take(ranks, steps):  # the ids, step by step, rank by rank
        return [rec.id for _ in range(steps) for s in ranks for rec, _ in s.next()]
    for bad in (set(), {"v0.mp4", "v5.mp4", "v9.mp4"}):
        two = streams(2, 1)
        before = take(two, 2)
        saved = [s.state_dict() for s in two]
        for world, per_rank in ((1, 1), (3, 1), (1, 2)):
            ranks = streams(world, per_rank)
            for r, s in enumerate(ranks):
                s.load_state_dict(data.PromptStream.regroup(saved, r, world))
            assert [sum(s.bad for s in ranks), sum(s.seen for s in ranks)] == \
                [sum(s["bad"] for s in saved), sum(s["seen"] for s in saved)]
            assert all(s.warned == set().union(*(t["warned"] for t in saved)) for s in ranks)
            after = take(ranks, 2)
            if not bad:
                order = take(streams(1, 12), 1)
                assert before + after == order[:len(before + after)], (world, per_rank)


@pytest.mark.slow
def test_loading_from_rank0_equals_every_rank_reading_and_hsdp_equals_fsdp(tiny_model_dir, tmp_path):
    """On 4 ranks: the policy and the reference equal the old loading's in every parameter, buffer and
    log-prob, although rank 3 sees no model folder; check_shared names rank 3, which sees another ./shared;
    one update over a 2x2 HSDP mesh gives the parameters of one over a 1x4 FSDP mesh."""
    os.symlink(tiny_model_dir("qwen2_vl"), tmp_path / "model")
    (tmp_path / "blind").mkdir()
    out = tmp_path / "found.json"
    proc = subprocess.run(TORCHRUN + ["--standalone", "--nproc-per-node=4", WORKER, "load",
                                      tiny_model_dir("qwen2_vl"), str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=400, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(out.read_text())
    for train in (True, False):
        assert found[f"train={train}"] == {"keys": True, "params_equal": True, "dtypes": ["torch.float32"],
                                           "buffers_equal_on_every_rank": True, "logp_equal": True}, train
    assert found["check_shared"].startswith(f"rank 3 cannot see {tmp_path}/shared, where rank 0 keeps the "
                                            "checkpoints"), found["check_shared"]
    assert found["hsdp_moved"] > 1e-3                                     # the update did move the parameters
    assert found["hsdp_max_diff"] < 3e-7                                  # measured 3e-8: float rounding
    assert found["loss_replicate=2"] == pytest.approx(found["loss_replicate=1"], abs=1e-6)


@pytest.mark.slow
def test_nodes_without_a_shared_disk_are_stopped_before_any_model_loads(tmp_path):
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for folder in nodes:
        folder.mkdir()
    # each node writes ./run on its own disk: rank 1 would keep its checkpoint shards where rank 0 never looks
    results = two_nodes(nodes, [f"{ROOT}/grpo.py", f"{ROOT}/tests/tiny.yaml", *RUN, "model.path=model",
                                "train.out_dir=run", "train.steps=1"])
    for code, out, err in results:
        refusal = f"grpo.py: rank 1 cannot see {nodes[0]}/run/checkpoints, where rank 0 keeps"
        assert code != 0 and refusal in err, err[-3000:]
    assert os.listdir(nodes[1]) == []


@pytest.fixture(scope="module")
def two_node_run(tiny_model_dir, tmp_path_factory):
    """Two GRPO steps (the recording reward) as two torchrun nodes sharing out_dir but not the model folder,
    ./model, which only node 0 has."""
    base = tmp_path_factory.mktemp("two-nodes")
    nodes = [base / "node0", base / "node1"]
    for folder in nodes:
        folder.mkdir()
    os.symlink(tiny_model_dir("qwen2_vl"), nodes[0] / "model")
    results = two_nodes(nodes, [WORKER, "grpo", *RUN, "model.path=model", f"train.out_dir={base}/shared",
                                "train.steps=2"])
    return base, results


@pytest.mark.slow
def test_two_nodes_train_from_a_model_folder_only_rank0_sees(two_node_run):
    base, results = two_node_run
    for code, out, err in results:
        assert code == 0, err[-3000:]
    assert "done: 2 steps" in results[0][1] and "done:" not in results[1][1]   # the summary on rank 0 only
    assert os.listdir(base / "node1") == []                                   # nothing built or written there
    assert [n for n in os.listdir(base / "shared/checkpoints") if n.startswith("step-")] == ["step-000002"]
    assert {"rank0.pt", "rank1.pt", "meta.json"} <= set(os.listdir(base / "shared/checkpoints/step-000002"))
    assert [json.loads(line)["step"] for line in open(base / "shared/metrics.jsonl")] == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 3])
def test_a_run_resumes_on_another_number_of_ranks(two_node_run, tmp_path, monkeypatch, capsys, world):
    """2 ranks -> 1 and 2 ranks -> 3: two more steps continue the global order where the two ranks left it."""
    base, results = two_node_run
    assert all(code == 0 for code, _, _ in results)
    out = tmp_path / "run"
    shutil.copytree(base / "shared", out)
    args = [*RUN, "model.path=model", f"train.out_dir={out}", "train.steps=4"]  # as node 0 names it
    if world == 1:
        monkeypatch.chdir(base / "node0")
        monkeypatch.setenv("RECORD_DIR", str(out))
        multinode_worker.run_grpo(args)
        stdout = capsys.readouterr().out
    else:
        proc = subprocess.run(TORCHRUN + ["--standalone", f"--nproc-per-node={world}", WORKER, "grpo", *args],
                              cwd=base / "node0", capture_output=True, text=True, timeout=400, env=ENV)
        assert proc.returncode == 0, proc.stderr[-3000:]
        stdout = proc.stdout
    assert f"was written by 2 ranks, this run has {world}" in stdout
    taken = consumed(out, 2) + consumed(out, world)
    assert len(taken) == 2 * 2 + 2 * world and taken == global_order()[:len(taken)]
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3, 4]

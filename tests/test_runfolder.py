"""runfolder.py: one live run per out_dir. A live holder on this machine or a fresh heartbeat from another
refuses a second start naming the folder and the holder; a dead pid, a reused pid and a heartbeat older than
STALE_AFTER are taken over; a folder that cannot be written is one line; a lock taken from under a run is
noticed."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

import runfolder
from runfolder import LockError


def plant(folder, **holder):
    """A lock record in `folder` as another start would have written it."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "pid_namespace": runfolder.pid_namespace(), "program": "grpo.py",
              "started": "2026-01-01T00:00:00+00:00", "token": "planted", **holder}
    path = folder / runfolder.NAME
    path.write_text(json.dumps(record))
    return path


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_a_second_start_is_refused_naming_the_folder_and_the_holder(tmp_path):
    with runfolder.hold(tmp_path / "run", "train.out_dir", "grpo.py") as lock:
        record = json.loads(open(lock.path).read())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        script = "import runfolder, sys\nwith runfolder.hold(sys.argv[1], 'train.out_dir', 'grpo.py'): pass"
        other = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")],
                               capture_output=True, text=True, cwd=os.path.dirname(runfolder.__file__))
        assert other.returncode == 1
        message = other.stderr.strip().splitlines()[-1]
        assert f"LockError: train.out_dir={tmp_path / 'run'} is in use by grpo.py pid {os.getpid()} on " \
               f"{socket.gethostname()}" in message and f"kill {os.getpid()}" in message
        with runfolder.hold(tmp_path / "run", "sft.out_dir", "sft.py"):  # a nested stage of this process
            pass
        assert os.path.exists(lock.path)
    assert not os.path.exists(lock.path)  # released at the end


def test_a_live_holder_on_this_machine_keeps_its_lock(tmp_path, live_pid):
    plant(tmp_path, pid=live_pid, pid_start=runfolder.process_start(live_pid))
    with pytest.raises(LockError, match=rf"in use by grpo.py pid {live_pid} on .*wait for it to end"):
        with runfolder.hold(tmp_path, "train.out_dir", "grpo.py"):
            pass


@pytest.mark.parametrize("why", ["dead pid", "reused pid"])
def test_a_stale_lock_on_this_machine_is_taken_over(tmp_path, capsys, live_pid, why):
    if why == "dead pid":
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        path = plant(tmp_path, pid=dead.pid, pid_start=1)
    else:  # the pid lives, but it is another process than the one that wrote the lock
        path = plant(tmp_path, pid=live_pid, pid_start=runfolder.process_start(live_pid) - 1)
    with runfolder.hold(tmp_path, "train.out_dir", "grpo.py"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert "taking over the lock" in capsys.readouterr().err


def test_another_machines_lock_goes_stale_without_a_heartbeat(tmp_path, capsys):
    path = plant(tmp_path, host="node-b", pid=1234, pid_start=5)  # a pid this machine cannot check
    with pytest.raises(LockError, match=r"pid 1234 on node-b.*last heartbeat was \d+ s ago; if that run is "
                                        r"dead, the lock is taken over 300 s after"):
        with runfolder.hold(tmp_path, "train.out_dir", "grpo.py"):
            pass
    old = time.time() - runfolder.STALE_AFTER - 10
    os.utime(path, (old, old))
    with runfolder.hold(tmp_path, "train.out_dir", "grpo.py"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert "no heartbeat for 31" in capsys.readouterr().err


def test_the_holder_beats_and_notices_a_lock_taken_from_under_it(tmp_path, monkeypatch):
    monkeypatch.setattr(runfolder, "HEARTBEAT", 0.05)
    with runfolder.hold(tmp_path, "train.out_dir", "grpo.py") as lock:
        old = time.time() - 100
        os.utime(lock.path, (old, old))
        time.sleep(0.3)
        assert os.stat(lock.path).st_mtime > old + 50 and runfolder.lost() == ""  # refreshed
        plant(tmp_path, host="node-b", pid=99, pid_start=1)  # taken over after a stall, say
        deadline = time.time() + 5
        while not runfolder.lost() and time.time() < deadline:
            time.sleep(0.05)
        assert "is no longer this run's: grpo.py pid 99 on node-b" in runfolder.lost()
    assert json.loads((tmp_path / runfolder.NAME).read_text())["pid"] == 99  # not removed: not ours


def test_a_folder_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    message = r"^train.out_dir=.*file/run: cannot write into the folder \(disk full or not writable\?\): "
    with pytest.raises(LockError, match=message + "Not a directory$"):
        with runfolder.hold(tmp_path / "file" / "run", "train.out_dir", "grpo.py"):
            pass

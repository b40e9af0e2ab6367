"""One live run per folder: the lock that grpo.py, sft.py and evaluate.py hold on their out_dir while they
run, and the one-line refusal of a folder they cannot write into.

    with runfolder.hold("runs/demo", "train.out_dir", "grpo.py"):   # rank 0 only (training.run_folder)
        ... the run writes into runs/demo ...

The lock is the file FOLDER/run.lock, taken before anything is written into the folder: a JSON record of the
holder (host name, pid, the pid's start time and pid namespace, program, start time, a random token), written
beside it and linked into place with os.link, which fails when the file exists, atomically on a local disk
and on NFS (the classic NFS-safe lock), so a reader never sees half a record. While the run lives, a thread
refreshes the file's mtime every HEARTBEAT seconds. A start that finds the lock:
- held by this very process (a nested stage on the same folder): shares it;
- written on this machine (same host name and pid namespace): stale when that pid is gone or now belongs to
  another process (its start time differs): taken over; else refused;
- written on another machine (another node on a shared disk, or another container): its pid cannot be
  checked from here, so it is stale when its mtime is more than STALE_AFTER seconds older than a file written
  just now to the same disk (both times are the file server's, so the nodes' clocks need not agree): taken
  over; else refused, saying how long until it would be stale;
- refused: LockError, one line naming the folder, the holder (program, host, pid, since when) and what to do.
A stale lock is taken over by renaming it aside and checking that what was moved is the stale record (two
starts that race for one stale lock: one wins, the other is refused). A holder that finds at a heartbeat that
the file is no longer its own (deleted by hand, or taken over after it stalled for STALE_AFTER seconds) says
so through lost(): the training loop then stops without writing anything more (training.stop_watch).
Release removes the file when it is still the holder's.
"""
import contextlib
import errno
import json
import os
import secrets
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import datetime

HEARTBEAT = 30.0      # seconds between the holder's refreshes of the lock's mtime
STALE_AFTER = 300.0   # a lock from another machine without a refresh for this long is stale (NFS caches
                      # attributes for up to 60 s: keep it well above HEARTBEAT + 60)
NAME = "run.lock"


class LockError(RuntimeError):
    """The folder is another live run's, or cannot be written into; the message says which and what to do."""


_held = {}  # absolute folder -> Lock held by this process


def process_start(pid):
    """The start time of process `pid` in clock ticks since boot (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def pid_namespace():
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read(path):
    """The lock record at `path` ({} when unreadable or not a record), and its mtime (None when gone)."""
    try:
        with open(path, encoding="utf-8") as f:
            mtime = os.fstat(f.fileno()).st_mtime
            record = json.loads(f.read())
    except FileNotFoundError:
        return {}, None
    except (OSError, ValueError):
        try:
            return {}, os.stat(path).st_mtime
        except OSError:
            return {}, None
    return (record if isinstance(record, dict) else {}), mtime


def _disk_now(folder):
    """The time as the disk holding `folder` tells it: the mtime of a file written there just now."""
    fd, probe = tempfile.mkstemp(prefix=".clock-", dir=folder)
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        os.remove(probe)


def _me():
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start(os.getpid()),
            "pid_namespace": pid_namespace()}


def write_error(e, what):
    """The one-line message for an OSError `e` raised while writing `what` (a folder or a file)."""
    return f"cannot write {what} (disk full or not writable?): {e.strerror or type(e).__name__}"


@dataclass
class Lock:
    """A lock this process holds on `folder` (hold() takes and releases it)."""
    folder: str
    key: str                 # the setting that names the folder, for messages
    program: str
    token: str = field(default_factory=lambda: secrets.token_hex(8))
    count: int = 1           # nested holds of the folder in this process
    lost: str = ""           # why it is no longer ours, once a heartbeat finds that
    done: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    @property
    def path(self):
        return os.path.join(self.folder, NAME)


def _acquire(lock):
    """Create the lock file, taking over a stale one; LockError when it is live or cannot be written."""
    try:
        os.makedirs(lock.folder, exist_ok=True)
        for _ in range(5):  # a stale lock taken over, or one that vanished between two looks: look again
            if _create(lock):
                lock.thread = threading.Thread(target=_beat, args=(lock,), daemon=True, name=lock.path)
                lock.thread.start()
                return lock
            holder, mtime = _read(lock.path)
            if mtime is None:
                continue
            why = _stale(lock.folder, holder, mtime)
            if why is None:
                raise LockError(_refusal(lock, holder, mtime))
            print(f"warning: taking over the lock {lock.path} of {_holder(holder)}: {why}", file=sys.stderr,
                  flush=True)
            _take_over(lock, holder)
    except OSError as e:
        raise LockError(f"{lock.key}={lock.folder}: {write_error(e, 'into the folder')}") from None
    raise LockError(f"{lock.path}: other starts keep taking and dropping this lock; try again")


def _create(lock):
    """Link a complete record into place -> False when a lock is there already."""
    record = {**_me(), "program": lock.program, "argv": " ".join(sys.argv)[:500],
              "started": datetime.now().astimezone().isoformat(timespec="seconds"), "token": lock.token}
    fd, tmp = tempfile.mkstemp(prefix=".lock-", dir=lock.folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(record))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, lock.path)
        except OSError as e:  # a filesystem without hard links: O_EXCL, which NFSv3+ also honours
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            with os.fdopen(os.open(lock.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "w") as f:
                f.write(json.dumps(record))
        return True
    except FileExistsError:
        return False
    finally:
        os.remove(tmp)


def _same_machine(holder):
    me = _me()
    return (holder.get("host"), holder.get("pid_namespace", "")) == (me["host"], me["pid_namespace"])


def _stale(folder, holder, mtime):
    """Why the lock `holder` (its record, and its file's mtime) is stale, or None while it is live."""
    if holder.get("pid") and _same_machine(holder):
        pid = holder["pid"]
        if not _alive(pid):
            return f"pid {pid} is gone"
        start = process_start(pid)
        if start is not None and holder.get("pid_start") is not None and start != holder["pid_start"]:
            return f"pid {pid} is now another process"
        return "it is this process's own, left over by an earlier stage" if pid == os.getpid() else None
    age = _disk_now(folder) - mtime
    if age <= STALE_AFTER:
        return None
    return f"no heartbeat for {age:.0f} s (over {STALE_AFTER:.0f} s)" if holder.get("pid") else \
        f"it holds no readable record and is {age:.0f} s old"


def _take_over(lock, holder):
    """Move the stale lock aside; when what was moved is not the stale record (another start took the lock
    in between), put it back."""
    aside = f"{lock.path}.{lock.token}.stale"
    try:
        os.rename(lock.path, aside)
    except FileNotFoundError:
        return
    moved, _ = _read(aside)
    if moved.get("token") != holder.get("token"):
        with contextlib.suppress(FileExistsError):
            os.link(aside, lock.path)
    os.remove(aside)


def _holder(holder):
    return (f"{holder.get('program', 'a run')} pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"started {holder.get('started', '?')}")


def _refusal(lock, holder, mtime):
    where = f"{lock.key}={lock.folder} is in use by {_holder(holder)} (lock {lock.path})"
    if not holder.get("pid"):
        return f"{where}: another start is taking it now, or it was left half-written; delete it if no run " \
               "uses the folder"
    if _same_machine(holder):
        return (f"{where}: wait for it to end, or stop it (kill {holder['pid']} ends it cleanly), or set "
                f"another {lock.key}")
    age = _disk_now(lock.folder) - mtime
    return (f"{where}: its last heartbeat was {max(age, 0):.0f} s ago; if that run is dead, the lock is "
            f"taken over {STALE_AFTER:.0f} s after its last heartbeat, or delete {lock.path}; else set "
            f"another {lock.key}")


def _beat(lock):
    """The heartbeat thread: refresh the lock's mtime every HEARTBEAT seconds while it is still ours."""
    while not lock.done.wait(HEARTBEAT):
        holder, _ = _read(lock.path)
        if holder.get("token") != lock.token:
            lock.lost = (f"the lock {lock.path} is no longer this run's: "
                         + (f"{_holder(holder)} took it over" if holder.get("pid") else "it was deleted")
                         + f"; stopping without writing more into {lock.folder}")
            print(f"warning: {lock.lost}", file=sys.stderr, flush=True)
            return
        with contextlib.suppress(OSError):  # the next beat looks again
            os.utime(lock.path)


def _release(lock):
    lock.done.set()
    if lock.thread is not None:
        lock.thread.join(timeout=5)
    holder, _ = _read(lock.path)
    if holder.get("token") == lock.token:
        with contextlib.suppress(OSError):
            os.remove(lock.path)


@contextlib.contextmanager
def hold(folder, key, program):
    """The lock on `folder` for the block -> the Lock (key: the setting that names the folder, for messages;
    program: who holds it). Nested holds of one folder in one process share the lock."""
    folder = os.path.abspath(folder)
    if folder in _held:
        _held[folder].count += 1
    else:
        _held[folder] = _acquire(Lock(folder, key, program))
    try:
        yield _held[folder]
    finally:
        lock = _held[folder]
        lock.count -= 1
        if lock.count == 0:
            del _held[folder]
            _release(lock)


def lost():
    """Why a lock this process holds is no longer its own ("" while all are)."""
    return next((lock.lost for lock in _held.values() if lock.lost), "")


def release_all():
    """Release every lock this process holds (before os._exit, which skips the `with` blocks)."""
    for folder in list(_held):
        _release(_held.pop(folder))

"""Atomic writes and the folder lock."""

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from augsvhn import fsutil
from augsvhn.errors import AugsvhnError
from augsvhn.fsutil import DirectoryLock, atomic_path, atomic_write_bytes, atomic_write_json


def test_atomic_write_bytes_replaces(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(b"old")
    atomic_write_bytes(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def test_atomic_write_json_round_trip(tmp_path):
    path = atomic_write_json(tmp_path / "sub" / "a.json", {"b": 1, "a": [1.5, "x"]})
    assert json.loads(path.read_text()) == {"a": [1.5, "x"], "b": 1}
    assert path.read_text().index('"a"') < path.read_text().index('"b"')  # sorted keys: stable bytes


def test_atomic_path_exception_leaves_nothing(tmp_path):
    final = tmp_path / "shard-00003.h5"
    final.write_bytes(b"previous complete file")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_path(final) as temporary:
            assert temporary.parent == tmp_path
            assert temporary.name == f".shard-00003.h5.tmp-{os.getpid()}"
            temporary.write_bytes(b"half")
            raise RuntimeError("disk on fire")
    assert final.read_bytes() == b"previous complete file"
    assert [p.name for p in tmp_path.iterdir()] == ["shard-00003.h5"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_write_error_names_path(tmp_path, code):
    final = tmp_path / "out.bin"
    with pytest.raises(AugsvhnError, match="cannot write .*out.bin") as error:
        with atomic_path(final) as temporary:
            temporary.write_bytes(b"partial")
            raise OSError(code, os.strerror(code))
    assert os.strerror(code) in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_other_os_error_unchanged(tmp_path):
    with pytest.raises(OSError) as error:
        with atomic_path(tmp_path / "out.bin"):
            raise OSError(errno.EIO, "input/output error")
    assert not isinstance(error.value, AugsvhnError)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder_rejected(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(AugsvhnError, match="choose a folder you can write to"):
            atomic_write_bytes(tmp_path / "x.bin", b"x")
    finally:
        tmp_path.chmod(0o700)


def test_remove_temporary_files(tmp_path):
    (tmp_path / ".shard-00001.h5.tmp-123").write_bytes(b"x")
    (tmp_path / "shard-00002.h5").write_bytes(b"y")
    removed = fsutil.remove_temporary_files(tmp_path)
    assert [p.name for p in removed] == [".shard-00001.h5.tmp-123"]
    assert [p.name for p in tmp_path.iterdir()] == ["shard-00002.h5"]


# ---- DirectoryLock ---------------------------------------------------------------------------------

HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from augsvhn.fsutil import DirectoryLock
    with DirectoryLock(sys.argv[1], "test holder"):
        print("locked", flush=True)
        time.sleep(60)
    """
)


def test_lock_acquire_release(tmp_path):
    lock = DirectoryLock(tmp_path / "out", "generate")
    with lock:
        holder = json.loads((tmp_path / "out" / ".augsvhn.lock").read_text())
        assert holder["pid"] == os.getpid()
        assert holder["hostname"] == socket.gethostname()
        assert holder["purpose"] == "generate"
    assert not (tmp_path / "out" / ".augsvhn.lock").exists()
    with DirectoryLock(tmp_path / "out", "again"):
        pass


def test_lock_rejects_second_writer(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(AugsvhnError) as error:
            DirectoryLock(tmp_path, "second").acquire()
        message = str(error.value)
        assert str(tmp_path) in message
        assert f"process {holder.pid}" in message
        assert f"-c {tmp_path}" in message  # the holder's command line: sys.argv of `python -c CODE FOLDER`
        assert "use another folder" in message
    finally:
        holder.kill()
        holder.wait()
    # The holder was killed: its flock is gone and its pid is dead, so the lock is taken over.
    with DirectoryLock(tmp_path, "after kill"):
        assert json.loads((tmp_path / ".augsvhn.lock").read_text())["pid"] == os.getpid()


def test_lock_same_process_twice_rejected(tmp_path):
    with DirectoryLock(tmp_path, "first"):
        with pytest.raises(AugsvhnError, match=f"process {os.getpid()}"):
            DirectoryLock(tmp_path, "second").acquire()


def test_stale_lock_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {"pid": dead.pid, "hostname": socket.gethostname(), "command": "augsvhn generate (crashed)"}
    (tmp_path / ".augsvhn.lock").write_text(json.dumps(stale))
    with caplog.at_level("WARNING", logger="augsvhn.fsutil"):
        with DirectoryLock(tmp_path, "generate"):
            assert json.loads((tmp_path / ".augsvhn.lock").read_text())["pid"] == os.getpid()
    assert f"left by process {dead.pid}" in caplog.text
    assert "no longer exists" in caplog.text


def test_lock_live_pid_without_flock_rejected(tmp_path):
    # A lock file naming a live process that holds no flock is not taken over: it may be a run on a file system
    # without flock, so the user must remove the file by hand.
    stale = {"pid": os.getppid(), "hostname": socket.gethostname(), "command": "augsvhn generate"}
    (tmp_path / ".augsvhn.lock").write_text(json.dumps(stale))
    with pytest.raises(AugsvhnError, match=f"If process {os.getppid()} is not an augsvhn run, delete"):
        DirectoryLock(tmp_path, "generate").acquire()
    assert json.loads((tmp_path / ".augsvhn.lock").read_text()) == stale


def test_lock_other_host_rejected(tmp_path):
    stale = {"pid": 1, "hostname": "another-host.invalid", "command": "augsvhn generate"}
    (tmp_path / ".augsvhn.lock").write_text(json.dumps(stale))
    with pytest.raises(AugsvhnError, match="taken on another host"):
        DirectoryLock(tmp_path, "generate").acquire()


def test_empty_lock_file_taken_over(tmp_path):
    (tmp_path / ".augsvhn.lock").write_bytes(b"")
    with DirectoryLock(tmp_path, "generate"):
        pass
    assert not (tmp_path / ".augsvhn.lock").exists()

"""The work-folder lock: a file deleted or replaced in the folder cannot defeat it, and a
run that crashed never leaves it held."""

import os
import signal
import subprocess
import sys

import pytest

from segnest.errors import SegnestError
from segnest.runtime.lock import LOCK_NAME, FolderLock

posix_only = pytest.mark.skipif(os.name != "posix", reason="folders are locked on POSIX")


@posix_only
@pytest.mark.parametrize("tamper", ["delete", "replace"])
def test_deleting_or_replacing_the_lock_file_does_not_let_a_second_run_in(tmp_path, tamper):
    work = tmp_path / "run"
    with FolderLock(work):
        lock_file = work / LOCK_NAME
        if tamper == "delete":
            lock_file.unlink()
        else:
            (work / "fresh").write_text("{}")
            os.replace(work / "fresh", lock_file)
        with pytest.raises(SegnestError, match="in use by another segnest run"):
            FolderLock(work).acquire()
    with FolderLock(work):  # released with the first holder
        pass


@pytest.mark.slow
def test_a_killed_holder_never_blocks_the_next_run(tmp_path):
    work = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from segnest.runtime.lock import FolderLock; "
         f"FolderLock({str(work)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SegnestError, match=rf"in use .* \(pid {holder.pid}"):
            FolderLock(work).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with FolderLock(work):
        pass

"""Temporary folders of imports that were killed half way: found by name, deleted once their
process is gone (both the Hub/GGUF import and the GGUF conversion leave them)."""
import glob
import os
import shutil


def sweep_stale_imports(folder, kind="tmp"):
    """Delete the temporary folders of imports into ``folder`` whose process is gone (killed
    half way: ``.<name>.<kind>-<pid>-*``); those of running imports stay. Returns how many."""
    removed = 0
    prefix = f".{folder.name}.{kind}-"
    for tmp in folder.parent.glob(f"{glob.escape(prefix)}*"):
        pid = tmp.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed += not tmp.exists()
    return removed


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # another user's process, or no way to tell
        return True
    return True

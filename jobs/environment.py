"""The ``MBM_*`` environment variables the README documents, checked before a command starts.

Each is read where it takes effect (``pipelines.forkserver``, ``mbm.extractors.bert``, ``mbm.alloc``,
``mbm.data.scan``), and there a value other than the documented ones reads as the default: a
``MBM_FORKSERVER=false`` would keep the fork server it was meant to turn off. Checked here, such a value
stops the command with one line saying what the variable takes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from jobs.spec import SpecError
from mbm import scanfiles

SWITCHES = {  # name: what 0 does (1, the default, is the other value)
    "MBM_FORKSERVER": "start preprocessing workers the usual way, not from the fork server",
    "MBM_NATIVE_BERT": "load BERT text models through transformers",
}


def check_environment(env: Mapping[str, str]) -> None:
    """Raise ``SpecError`` naming the first documented ``MBM_*`` variable whose value mbm would not read as set.
    An empty value counts as unset."""
    for name, off in SWITCHES.items():
        value = env.get(name, "").strip()
        if value not in ("", "0", "1"):
            raise SpecError(f"{name}={env[name]!r}: give 0 ({off}) or 1 (the default), or unset it")
    value = env.get("MBM_MALLOC", "").strip()
    if value and value.lower() != "default":
        raise SpecError(f"MBM_MALLOC={env['MBM_MALLOC']!r}: give 'default' (glibc's own malloc settings) or unset it "
                        "(mbm's settings)")
    value = env.get("MBM_SCAN_CACHE", "").strip()
    if value and not (value.isdigit() and value.isascii()):
        raise SpecError(f"MBM_SCAN_CACHE={env['MBM_SCAN_CACHE']!r}: give the number of samples a loader process keeps "
                        "shard scans for in memory as a whole number >= 0 (0: none, each epoch replays the scans kept in "
                        "MBM_SCAN_DIR; 100000 is the default)")
    value = env.get("MBM_SCAN_DIR", "").strip()
    if value and value.lower() != scanfiles.OFF and os.path.exists(value) and not os.path.isdir(value):
        raise SpecError(f"MBM_SCAN_DIR={env['MBM_SCAN_DIR']!r} is not a folder: give a folder for the shard scans "
                        "loaders keep on disk (created if missing), or off")

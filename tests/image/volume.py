"""A directory laid out the way the kubelet writes ConfigMap and Secret volumes.

The files live in a timestamped directory (``..2026_12_07_17_40_00.123``); ``..data`` is a
symlink to it and every key is a symlink ``name -> ..data/name``. An update writes a new
timestamped directory, points a temporary symlink at it and renames that over ``..data``
(one atomic step: a reader sees the old set or the new one), then removes the old
directory, as the kubelet's AtomicWriter does.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from pathlib import Path

_counter = itertools.count()


class KubeletVolume:
    def __init__(self, path: Path, files: dict[str, bytes]) -> None:
        self.path = path
        path.mkdir(parents=True)
        path.chmod(0o755)
        self._current: Path | None = None
        self.update(files)

    def update(self, files: dict[str, bytes]) -> None:
        stamp = time.strftime("..%Y_%m_%d_%H_%M_%S", time.gmtime()) + f".{next(_counter)}"
        new = self.path / stamp
        new.mkdir()
        for name, data in files.items():
            (new / name).write_bytes(data)
            (new / name).chmod(0o644)  # the Secret's files, readable by the container's uid
        new.chmod(0o755)
        tmp = self.path / "..data_tmp"
        os.symlink(stamp, tmp)
        os.rename(tmp, self.path / "..data")  # the swap
        for name in files:
            link = self.path / name
            if not link.is_symlink():
                os.symlink(f"..data/{name}", link)
        old, self._current = self._current, new
        if old is not None:
            shutil.rmtree(old)

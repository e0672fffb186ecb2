"""Paths inside a bundle folder, checked before anything reads them: a bundle is untrusted input.

- a manifest path is a plain relative name inside the bundle folder: no `..`, not absolute, no
  backslash or control characters, no symlink on the way;
- the file is a regular file with one hard link (onnxruntime follows hard links, so a link to a
  file outside the folder would be read as if it were ours).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path
from typing import Any

from ple_export.errors import UserError

SAFE_NAME = re.compile(r"^[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*$")


def check_name(rel: Any, where: str) -> str:
    """`rel` if it is a plain relative name inside a bundle: safe characters, no `.` or `..` part."""
    if not isinstance(rel, str) or not SAFE_NAME.match(rel):
        raise UserError(f"{where}: file path {rel!r} is not a plain relative name inside the bundle")
    if any(p in (".", "..") for p in rel.split("/")):
        raise UserError(f"{where}: file path {rel!r} points outside the bundle")
    return rel


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def member_path(bundle: Path, rel: Any, where: str) -> Path:
    """The path of manifest entry `rel` inside `bundle`, refusing anything that could escape it."""
    path = bundle
    for part in check_name(rel, where).split("/"):
        path = path / part
        try:
            st = path.lstat()
        except FileNotFoundError:
            return bundle / rel  # missing: the caller reports it
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
        if stat.S_ISLNK(st.st_mode):
            raise UserError(f"{path}: is a symlink; a bundle's files must be inside its folder")
    return bundle / rel


def check_member(path: Path) -> os.stat_result:
    """A bundle file must be a regular file with a single hard link."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise UserError(f"{path}: missing (the manifest lists it)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path}: not a regular file")
    if st.st_nlink != 1:
        raise UserError(
            f"{path}: has {st.st_nlink} hard links; a bundle's files must not be hard-linked "
            "(copy the bundle instead)"
        )
    return st

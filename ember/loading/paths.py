"""Files named by other files stay inside their folder.

An index (``model.safetensors.index.json``), an adapter folder or a checkpoint names files by path;
a hostile or broken one could name ``../../../../etc/passwd`` or hold a symlink pointing anywhere.
Every such path goes through :func:`file_inside`, which resolves it (symlinks included) and refuses
anything outside the folder.

One layout is allowed to leave the folder: the Hugging Face hub cache, whose
``models--org--name/snapshots/<revision>/`` folders hold symlinks to ``../../blobs/<hash>``. Links from
a snapshot folder may resolve anywhere inside that repository's own cache folder, and nowhere else.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from ember.errors import CheckpointError, EmberError


def allowed_roots(folder: Path) -> list[Path]:
    """The resolved folders a file named inside ``folder`` may resolve into."""
    root = folder.resolve()
    roots = [root]
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith(("models--", "datasets--")):
        roots.append(root.parent.parent)  # the hub cache's repository folder (snapshots/ and blobs/)
    return roots


def file_inside(folder: str | os.PathLike, name: object, what: str,
                error: type[EmberError] = CheckpointError) -> Path:
    """``folder / name`` once it is known to stay inside ``folder``.

    Args:
        folder: the folder the name is relative to.
        name: the path as the naming file wrote it (checked to be a non-empty relative string).
        what: the naming entry for messages, e.g. ``"model.safetensors.index.json: weight_map['x']"``.
        error: the EmberError class to raise.
    Raises:
        ``error``: the name is not a string, is absolute, climbs out with ``..``, or resolves
        (through symlinks) outside the folder.
    """
    base = Path(folder)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise error(f"{what}: {name!r} is not a file name")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive \
            or ".." in parts:
        raise error(f"{what}: {name!r} points outside {base}; only files inside the folder are opened")
    path = base / name
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise error(f"{what}: {name!r} cannot be resolved ({e})") from None
    if not any(real == root or root in real.parents for root in allowed_roots(base)):
        raise error(f"{what}: {name!r} is a link to {real}, outside {base}; only files inside the folder are opened")
    return path

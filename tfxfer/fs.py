"""The few filesystem operations tfxfer needs, for local paths and `tf.io.gfile` URLs alike.

A path with "://" in it (`gs://bucket/run`, `ram://...`) goes through `tf.io.gfile`, which is
what Cloud TPU needs: its workers see no local disk of the user's. Every other path goes
through `os` and `shutil` exactly as before, so local runs keep their atomic replaces, their
fsyncs and the file modes the umask gives.

One caveat: on an object store a rename is a copy followed by a delete, not atomic, and
`fsync` has no meaning there (an object exists once its upload has finished). tfxfer's
guarantees do not rest on an atomic rename, though: every checkpoint file is written and
verified before the `latest.json` pointer naming it is written, and every run entry is
recorded in the manifest before its first byte. A reader therefore never follows a pointer to
an incomplete checkpoint; at worst it sees a half-copied `.tmp-` name, which nothing reads.
"""

from __future__ import annotations

import builtins
import json
import os
import secrets
import shutil
from typing import IO, Any

import tensorflow as tf

# Atomic writes go through hidden temporary names with this prefix (see `atomic_write_text`).
TMP_PREFIX = ".tmp-"


def is_url(path: Any) -> bool:
    """Whether `path` names a `tf.io.gfile` location (`gs://...`) rather than a local path."""
    return "://" in str(path)


def join(path: str, *parts: str) -> str:
    if is_url(path):
        return "/".join([str(path).rstrip("/"), *parts])
    return os.path.join(path, *parts)


def dirname(path: str) -> str:
    if is_url(path):
        head, _, _ = str(path).rstrip("/").rpartition("/")
        return head if is_url(head) else str(path)
    return os.path.dirname(path)


def basename(path: str) -> str:
    if is_url(path):
        return str(path).rstrip("/").rpartition("/")[2]
    return os.path.basename(path)


def exists(path: str) -> bool:
    return tf.io.gfile.exists(path) if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return tf.io.gfile.isdir(path) if is_url(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    if is_url(path):
        return tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path)
    return os.path.isfile(path)


def getsize(path: str) -> int:
    if is_url(path):
        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(path)
        return tf.io.gfile.stat(path).length
    return os.path.getsize(path)


def makedirs(path: str) -> None:
    """Creates `path` and its parents; a directory already there is fine."""
    if is_url(path):
        tf.io.gfile.makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
    """The names in directory `path` (no trailing "/" on folders, on any filesystem)."""
    if is_url(path):
        return [name.rstrip("/") for name in tf.io.gfile.listdir(path)]
    return os.listdir(path)


def remove(path: str) -> None:
    if is_url(path):
        tf.io.gfile.remove(path)
    else:
        os.remove(path)


def rmtree(path: str, ignore_errors: bool = False) -> None:
    if not is_url(path):
        shutil.rmtree(path, ignore_errors=ignore_errors)
        return
    # TensorFlow's in-memory ram:// fails a recursive delete part way through (leaving what is
    # left unlistable), so it goes file by file from the start; other filesystems fall back to
    # that when their recursive delete fails.
    if not str(path).startswith("ram://"):
        try:
            tf.io.gfile.rmtree(path)
            return
        except tf.errors.OpError:
            pass
    try:
        _remove_tree(path)
    except tf.errors.OpError:
        if not ignore_errors:
            raise


def _remove_tree(path: str) -> None:
    for name in listdir(path):
        child = join(path, name)
        if not tf.io.gfile.exists(child):
            # ram:// lists "x/.extra" for a sibling "x.extra/" (it matches names by prefix).
            continue
        if tf.io.gfile.isdir(child):
            _remove_tree(child)
        else:
            tf.io.gfile.remove(child)
    tf.io.gfile.remove(path)


def rename(source: str, target: str) -> None:
    """Moves file `source` to `target`, replacing a file there.

    Locally that is `os.replace`: atomic. On an object store it is a copy and a delete, so the
    callers order their writes so that no reader depends on its atomicity (see the module
    docstring). Folders are never renamed on a URL (not every gfile filesystem moves what is
    in them): tfxfer writes those in place.
    """
    if is_url(source) or is_url(target):
        tf.io.gfile.rename(source, target, overwrite=True)
    else:
        os.replace(source, target)


def open(path: str, mode: str = "r") -> IO:  # noqa: A001 - the module's `open`, like io.open
    """Opens `path` for reading or writing, text (UTF-8) or bytes (a "b" in `mode`)."""
    if is_url(path):
        return tf.io.gfile.GFile(path, mode)
    if "b" in mode:
        return builtins.open(path, mode)
    return builtins.open(path, mode, encoding="utf-8")


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to `path` directly (no temporary name): for files inside a fresh folder."""
    with open(path, "wb") as handle:
        handle.write(data)


def visible_files(directory: str) -> tuple[list[str], int]:
    """Every file under `directory`, recursively and sorted, and how many entries were left out.

    Left out: whatever is hidden (a name starting with "."), a hidden folder with all it holds,
    and links to folders, which are not followed (they can loop). The image and the text
    folder loaders both read class folders through this, so they follow one rule.
    """
    files, left_out = [], 0
    # tf.io.gfile.walk for a URL (gs://...): it has no links to leave out.
    walk = tf.io.gfile.walk if is_url(directory) else os.walk
    for root, folders, names in walk(directory):
        kept = sorted(
            f
            for f in folders
            if not f.startswith(".") and not os.path.islink(os.path.join(root, f))
        )
        left_out += len(folders) - len(kept)
        folders[:] = kept  # the walk descends into these only, in this order.
        for name in sorted(names):
            if name.startswith("."):
                left_out += 1
            else:
                files.append(join(root, name))
    return files, left_out


# === Atomic writes ===


def atomic_write_text(path: str, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename.

    The file gets the mode a plain `open(path, "w")` gives (0o666 less the umask), like the
    model and checkpoints beside it; `tempfile.mkstemp` would make it readable by its owner
    only, so a teammate could read `model.keras` but not the `config.json` it was made with.
    """
    if is_url(path):
        # No fsync or O_EXCL on an object store; the temporary name and the rename keep a
        # half-written object out from under the final name (see `tfxfer.fs`).
        directory = dirname(path)
        makedirs(directory)
        tmp = join(directory, f"{TMP_PREFIX}{secrets.token_hex(8)}")
        try:
            with open(tmp, "w") as handle:
                handle.write(text)
            rename(tmp, path)
        except BaseException:
            if exists(tmp):
                remove(tmp)
            raise
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = _create_temporary_file(directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _create_temporary_file(directory: str) -> tuple[int, str]:
    """Creates a new hidden `.tmp-*` file in `directory`; returns its descriptor and path."""
    for _ in range(100):
        tmp = os.path.join(directory, f"{TMP_PREFIX}{secrets.token_hex(8)}")
        try:
            # O_EXCL: never a file that is already there. 0o666: the umask then applies, as it
            # does to open().
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"No free temporary file name in {directory!r}.")


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

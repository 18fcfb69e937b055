"""Paths that are local or URLs: `gs://bucket/dir` (and s3://, az://, hf://, the other schemes
etils.epath knows), for everything a user names (workdir, prepared data, manifests, eval
sets, exports, models).

Local paths go to `os` and `open` exactly as before; URLs to `etils.epath`, which hands them
to fsspec (gcsfs for gs://), the same library Orbax uses for its own files (its arrays go
through TensorStore, which speaks gs:// itself). Object stores differ from a disk in two
ways this code cares about: an object cannot be appended to (metrics_log.py rewrites), and
there is no rename, but an object written in one upload only appears once complete, so a
write is already atomic there.

Errors about a location (a missing bucket, credentials that do not load or are refused, a
server that cannot be reached) are `StorageError`, one line naming the path and what to do.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import logging
import os
import tempfile

# epath would route gs:// through TensorFlow's gfile whenever TensorFlow is importable; we want
# fsspec/gcsfs everywhere (one client, one set of credentials, the one Orbax also uses here).
# Read on epath's first gs:// call, so setting it at import is early enough.
os.environ.setdefault("EPATH_USE_TF", "false")
# gcsfs's experimental zonal-bucket layer asks a control-plane API first, which emulators and
# plain buckets do not need.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import sys

import fsspec
import fsspec.config
import fsspec.core
from etils import epath

# gcsfs picks its class once, at its import: a process that imported it before this module
# (a user's script) has the zonal-bucket class, which stalls on every bucket on "Could not
# determine bucket type" against an emulator. Unless asked for, put the plain one back.
if "gcsfs" in sys.modules and os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"].lower() not in (
        "true", "1"):
    import gcsfs.core

    for _protocol in ("gs", "gcs"):
        fsspec.register_implementation(_protocol, gcsfs.core.GCSFileSystem, clobber=True)

# gcsfs caches directory listings per process; other processes (the other hosts of a run, a
# training run seen from a tool) add checkpoints behind its back, so list afresh every time.
fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


class StorageError(ValueError):
    """A location that cannot be used: the message names it and says what to check."""


def is_url(path) -> bool:
    """True for `scheme://...` (gs://, s3://, ...); local paths and file:// are not URLs."""
    path = os.fspath(path)
    return "://" in path and not path.startswith("file://")


def absolute(path: str) -> str:
    """os.path.abspath for local paths; URLs as given (abspath would mangle `gs://`)."""
    return path if is_url(path) else os.path.abspath(path)


def normalized(path: str) -> str:
    """os.path.normpath for local paths; a URL without its trailing slashes."""
    return path.rstrip("/") if is_url(path) else os.path.normpath(path)


def _bucket(path: str) -> str:
    scheme, rest = path.split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}"


def _named(what: str, path: str) -> str:
    return f"{what} {path!r}" if what else repr(path)


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:200] + " ..."


def _is_auth_error(e: BaseException) -> bool:
    code = getattr(e, "code", None) or getattr(e, "status", None)
    return code in (401, 403) or type(e).__module__.startswith("google.auth")


_CREDENTIALS = ("the credentials (`gcloud auth application-default login`, or "
                "GOOGLE_APPLICATION_CREDENTIALS)")


@contextlib.contextmanager
def _quiet_logger(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_credentials() -> None:
    """StorageError when GOOGLE_APPLICATION_CREDENTIALS names a file that is not credentials.

    gcsfs would quietly fall back to anonymous access, and the first request would then fail
    far from its cause (a 401 on a private bucket)."""
    key = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if not key:
        return
    import google.auth
    from google.auth import exceptions

    try:
        google.auth.default()  # with the variable set: that file, and no network
    except exceptions.GoogleAuthError as e:
        raise StorageError(f"GOOGLE_APPLICATION_CREDENTIALS={key!r} does not hold usable "
                           f"credentials ({_reason(e)}); point it at a service-account key "
                           "file or unset it") from None


def check_location(path: str, what: str = "") -> None:
    """For a URL: the bucket exists and these credentials can list it; StorageError (one
    line naming `what`, e.g. "--workdir") otherwise. Nothing to check for a local path."""
    if not is_url(path):
        return
    check_credentials()
    bucket = _bucket(path)
    try:
        # One request (gcsfs retries a failing one for ~30 s); its log of each retry's
        # traceback would bury the one line this raises.
        with _quiet_logger("gcsfs"):
            fs, name = fsspec.core.url_to_fs(bucket)
            found = fs.info(name)["type"] == "directory"
    except FileNotFoundError:
        found = False
    except (ImportError, ValueError) as e:  # no fsspec client for this scheme
        raise StorageError(f"{_named(what, path)}: {_reason(e)}") from None
    except Exception as e:  # noqa: BLE001 - fsspec clients raise their own error types
        if _is_auth_error(e):
            raise StorageError(f"{_named(what, path)}: access to {bucket} was refused "
                               f"({_reason(e)}); check {_CREDENTIALS}") from None
        raise StorageError(f"{_named(what, path)}: cannot reach {bucket} ({_reason(e)}); check "
                           f"the network, {_CREDENTIALS}, or STORAGE_EMULATOR_HOST for an "
                           "emulator") from None
    if not found:
        raise StorageError(f"{_named(what, path)}: bucket {bucket} does not exist (or these "
                           f"credentials cannot see it); create it or check {_CREDENTIALS}")


# ------------------------------------------------------------------- file-system operations
def exists(path: str) -> bool:
    return epath.Path(path).exists() if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return epath.Path(path).is_dir() if is_url(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    return epath.Path(path).is_file() if is_url(path) else os.path.isfile(path)


def listdir(path: str) -> list[str]:
    """The names in a directory (for a URL: under the prefix `path/`)."""
    if is_url(path):
        return [p.name for p in epath.Path(path).iterdir()]
    return os.listdir(path)


def makedirs(path: str) -> None:
    """os.makedirs(exist_ok=True); nothing to create on an object store (prefixes are
    implicit), beyond checking the bucket is there."""
    if is_url(path):
        check_location(path)
    else:
        os.makedirs(path, exist_ok=True)


def open(path: str, mode: str = "r", **kwargs):  # the builtin's twin
    """builtins.open, or a streaming fsspec file for a URL (reads fetch ranges as needed)."""
    if not is_url(path):
        return builtins.open(path, mode, **kwargs)
    if "b" in mode:
        return epath.Path(path).open(mode)
    # Text through our own wrapper: epath's takes no newline= (csv needs it), only UTF-8.
    raw = epath.Path(path).open(mode + "b")
    return io.TextIOWrapper(raw, encoding=kwargs.get("encoding") or "utf-8",
                            newline=kwargs.get("newline"))


def remove(path: str) -> None:
    if is_url(path):
        epath.Path(path).unlink()
    else:
        os.remove(path)


def rmtree(path: str) -> None:
    """Deletes a directory tree (a URL: every object under the prefix); missing is fine."""
    if is_url(path):
        with contextlib.suppress(FileNotFoundError):
            epath.Path(path).rmtree()
    else:
        import shutil

        shutil.rmtree(path, ignore_errors=True)


def move(src: str, dst: str) -> None:
    """shutil.move; on an object store a copy of every object, then a delete."""
    if is_url(src):
        # gcsfs tries a server-side move first and logs a traceback when the bucket does not
        # offer it, before copying instead.
        with _quiet_logger("gcsfs"):
            epath.Path(src).rename(dst)
    else:
        import shutil

        shutil.move(src, dst)


def size_and_version(path: str) -> tuple[int, int]:
    """(bytes, modification time in ns): what a rerun compares to see a file changed."""
    if is_url(path):
        st = epath.Path(path).stat()
        return int(st.length), int(st.mtime * 1e9)
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def write_bytes_atomic(data: bytes, path: str) -> None:
    """Writes `path` so a reader never sees it half-written: a local temporary file, fsynced,
    renamed over it; an object is only visible once its one upload completes."""
    if is_url(path):
        with epath.Path(path).open("wb") as f:
            f.write(data)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with builtins.open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a full disk must not keep a half-written file
            os.remove(tmp)
        raise


def write_text_atomic(text: str, path: str) -> None:
    write_bytes_atomic(text.encode("utf-8"), path)


def read_text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8")


@contextlib.contextmanager
def local_copy(path: str, names: tuple[str, ...]):
    """A local directory holding the files `names` of the directory `path` (those present):
    `path` itself when local; for a URL, a temporary copy of just those files, removed on
    exit. For small files a library can only open locally (a tokenizer's)."""
    if not is_url(path):
        yield path
        return
    check_location(path)
    with tempfile.TemporaryDirectory(prefix="mlembed-") as tmp:
        for name in names:
            src = f"{path.rstrip('/')}/{name}"
            if isfile(src):
                with open(src, "rb") as f, builtins.open(os.path.join(tmp, name), "wb") as g:
                    g.write(f.read())
        yield tmp


def writable_dir_check(path: str) -> None:
    """Creates `path` if needed and writes (then deletes) a small file there; OSError or
    StorageError when that fails."""
    if is_url(path):
        check_location(path)
        probe = f"{path.rstrip('/')}/.write-check-{os.getpid()}"
        try:
            write_bytes_atomic(b"", probe)
            remove(probe)
        except Exception as e:  # noqa: BLE001 - fsspec clients raise their own error types
            why = f"check {_CREDENTIALS}" if _is_auth_error(e) else "check the path"
            raise StorageError(f"{path!r} is not writable ({_reason(e)}); {why}") from None
        return
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
        pass


# ----------------------------------------------------------------------------- tables and arrays
# One policy for every durable file: local writes go to a temporary name beside the target,
# are fsynced and renamed over it (the rename is atomic, and the fsync makes the renamed file's
# bytes survive a power cut); a URL is written in one upload, which only appears once complete.
# pyarrow and numpy are imported here, not above, so `storage` stays light for small tools.


def _write_local_atomic(path: str, suffix: str, write) -> None:
    """write(tmp) fills a temporary file beside `path` (named with `suffix`, as np.save wants
    one), which is then fsynced and renamed over `path`; removed again on any failure."""
    tmp = f"{path}.tmp-{os.getpid()}{suffix}"
    try:
        write(tmp)
        with builtins.open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_table_atomic(table, path: str) -> None:
    """Writes the pyarrow Table `table` to `path` as parquet; a reader never sees it
    half-written."""
    import pyarrow.parquet as pq

    if is_url(path):
        with open(path, "wb") as f:
            pq.write_table(table, f)
        return
    _write_local_atomic(path, "", lambda tmp: pq.write_table(table, tmp))


def save_npy_atomic(array, path: str) -> None:
    """Writes `array` (any shape and dtype numpy can save) to `path` in .npy format; a reader
    never sees it half-written, and a short write (disk full, a file size limit) raises
    OSError instead of leaving a truncated array."""
    import errno

    import numpy as np

    array = np.asanyarray(array)
    if is_url(path):
        with open(path, "wb") as f:
            np.save(f, array)
        return

    def write(tmp):
        np.save(tmp, array)
        # np.save writes the data with fwrite, which drops a short write without an error:
        # check the file holds every byte before it counts as written.
        with builtins.open(tmp, "rb") as f:
            version = np.lib.format.read_magic(f)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            header(f)
            expected = f.tell() + array.nbytes
        written = os.path.getsize(tmp)
        if written != expected:
            raise OSError(errno.EFBIG, f"short write of {path}: {written} of {expected} bytes "
                          "(disk full or a file size limit?)")

    _write_local_atomic(path, ".npy", write)

"""Keeps Orbax's and TensorStore's failure noise off the console.

A failed background save (a full disk) makes Orbax log hundreds of traceback lines, and
TensorStore's callbacks then report the closed event loop as unraisable exceptions; a
damaged file fails several concurrent reads, each an asyncio "exception was never
retrieved". The project prints one `error:` line for these; `orbax_log` sends Orbax's
records to a file off the checkpoint disk for inspection.

Nothing is installed on import: `orbax_log` is a context manager, and `quiet_task_noise`
adds its asyncio filter when first called (by a checkpoint read or a Checkpointer).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile

from mlembed_jax import storage


class _OrbaxLogFilter(logging.Filter):
    """Keeps Orbax's own records (a failed background save logs ~600 lines of tracebacks)
    off the console; `orbax_log` writes them to a file instead (or drops them)."""

    def filter(self, record):
        return "/orbax/" not in record.pathname.replace(os.sep, "/")


def _closed_loop_noise(exc_type, exc, tb) -> bool:
    """TensorStore completing the writes of a save Orbax already gave up on (disk full): each
    callback finds Orbax's event loop closed and reports it as an unraisable exception."""
    if exc_type is not RuntimeError or str(exc) != "Event loop is closed":
        return False
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.endswith(
        os.path.join("asyncio", "base_events.py"))


class _QuietFileHandler(logging.FileHandler):
    """A log file whose own write errors are dropped: it may sit on a disk that fills up, and
    logging's default prints a '--- Logging error ---' traceback for every record."""

    def handleError(self, record):  # logging's name
        del record


def orbax_log_path(workdir: str) -> str | None:
    """Where Orbax's log goes: TMPDIR/mlembed-orbax-<pid>.log, never onto the disk that holds
    the checkpoints (a full disk there would fail the log too). None (not written) when the
    temporary directory is on that disk."""
    tmp = tempfile.gettempdir()
    if not storage.is_url(workdir):
        with contextlib.suppress(OSError):
            if os.stat(tmp).st_dev == os.stat(workdir).st_dev:
                return None
    return os.path.join(tmp, f"mlembed-orbax-{os.getpid()}.log")


@contextlib.contextmanager
def orbax_log(path: str | None):
    """While active: Orbax's log records (and the closed-event-loop tracebacks a failed save
    leaves) go to `path` (if given), not to stderr."""
    previous_hook = sys.unraisablehook

    def hook(unraisable):
        if not _closed_loop_noise(unraisable.exc_type, unraisable.exc_value,
                                  unraisable.exc_traceback):
            previous_hook(unraisable)

    sys.unraisablehook = hook
    absl_logger = logging.getLogger("absl")
    quiet = _OrbaxLogFilter()
    handlers = list(absl_logger.handlers) + list(logging.getLogger().handlers)
    for h in handlers:
        h.addFilter(quiet)
    file_handler = None
    if path:
        file_handler = _QuietFileHandler(path, delay=True)
        file_handler.setLevel(logging.WARNING)
        file_handler.addFilter(lambda r: not quiet.filter(r))
        absl_logger.addHandler(file_handler)
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        for h in handlers:
            h.removeFilter(quiet)
        if file_handler is not None:
            absl_logger.removeHandler(file_handler)
            file_handler.close()


class _TensorStoreTaskNoise(logging.Filter):
    """Orbax reads and writes tensors in concurrent asyncio tasks. When a damaged file or a
    full disk fails several of them, the first error is reported (one line) and asyncio
    would print every other one as '... exception was never retrieved' with a traceback,
    whenever the task or its gathering future is collected."""

    def filter(self, record):
        # "Task ..." or "_GatheringFuture exception was never retrieved" (a gather of them)
        if "exception was never retrieved" not in str(record.msg).split("\n", 1)[0]:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if "tensorstore" in str(exc).lower():
            return False
        tb = exc.__traceback__ if exc is not None else None
        while tb is not None:  # a task of Orbax's own (e.g. a write that hit the disk limit)
            if "/orbax/" in tb.tb_frame.f_code.co_filename.replace(os.sep, "/"):
                return False
            tb = tb.tb_next
        return True


_TASK_NOISE = _TensorStoreTaskNoise()


def quiet_task_noise() -> None:
    """Adds the asyncio filter above (once per process): called where checkpoints are read
    or written, never on import."""
    asyncio_logger = logging.getLogger("asyncio")
    if _TASK_NOISE not in asyncio_logger.filters:
        asyncio_logger.addFilter(_TASK_NOISE)

"""Where the command line's output goes: stdout, and the files of ``--plot``, ``--log`` and ``--snapshot``.

Promises (tested in ``tests/test_cli_reliability.py``):

* An output file is claimed before any work: memprof really creates it (or, for an existing file
  replaced with ``--force``, a scratch file beside it) and writes a few KiB to it, so a missing or
  read-only folder, a path under ``/proc`` or a full disk fail at once, as bad input (exit 2).
* An existing file is replaced only with ``--force``. Devices and pipes (``/dev/null``,
  ``/dev/stdout``) are written to, never replaced, and need no ``--force``.
* The report is printed first; files are written after it. A file that still cannot be written
  is one ``ERROR:`` line (and a ``HINT:``), the report stays, and memprof exits 6.
* A file is written to a scratch name beside it and renamed over the target at the end, so an
  interrupted or failed write never leaves half a file, and a replaced file stays intact until
  the new one is complete. A file memprof created and never wrote is removed again.
* stdout: a reader that goes away (``memprof ... | head -1``) ends the output quietly with exit
  141, as a Unix tool killed by SIGPIPE; any other failure to write stdout (a full disk,
  ``> /dev/full``) is one ``ERROR:`` line on stderr and exit 6.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError

#: bytes written when a file is claimed: enough to hit a full disk, small enough to be instant
_PROBE_BYTES = 64 * 1024


# =========================================================================== stdout
class WatchedStream:
    """A text stream that remembers the error its ``write``/``flush`` raised (and raises it unchanged).

    The command line installs one as ``sys.stdout`` while a command runs, so an ``OSError`` that
    reaches the top can be told apart: stdout failing (broken pipe, full disk) or anything else.
    """

    def __init__(self, stream: Any):
        self._stream = stream
        self.error: OSError | None = None

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def is_broken_pipe(exc: BaseException) -> bool:
    return isinstance(exc, BrokenPipeError) or (isinstance(exc, OSError) and exc.errno == errno.EPIPE)


def silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so that nothing else (a later flush, the
    interpreter's own at exit) tries the closed pipe again."""
    try:
        fd = sys.__stdout__.fileno() if sys.__stdout__ is not None else 1
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    except (OSError, ValueError):
        pass


def describe_os_error(exc: OSError) -> str:
    """``[Errno 28] No space left on device`` -> ``No space left on device``; other errors as raised."""
    return exc.strerror or str(exc) or type(exc).__name__


# =========================================================================== files
@dataclass
class OutputFile:
    """One ``--plot``/``--log``/``--snapshot`` file, claimed before the work and written after the report."""

    path: Path
    option: str  # "--plot"
    special: bool = False  # a device or pipe: written in place, never replaced
    created: bool = False  # memprof made the (empty) file when claiming it
    written: bool = False


@dataclass
class OutputFiles:
    """The output files of one command run: :meth:`claim` before the work, :meth:`write` after the report.

    Used as a context manager: files claimed but never written (the command failed or was
    interrupted) are removed again on exit, so no empty file is left behind.
    """

    force: bool = False
    files: list[OutputFile] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def __enter__(self) -> OutputFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard_unwritten()

    def claim(self, path: Path | None, option: str) -> Path | None:
        """Check now, by creating it, that ``path`` can be written; raise :class:`UsageError` if not."""
        if path is None:
            return None
        path = Path(path).expanduser()
        if any(f.path == path for f in self.files):
            raise UsageError(f"{path} is given twice", f"give {option} its own file")
        try:
            st = path.stat()
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise UsageError(f"{option} {path}: {describe_os_error(exc)}", "choose another path") from None
        entry = OutputFile(path, option)
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise UsageError(
                f"{option} {path} is a folder", f"give a file name, e.g. {option} {path / _example(option)}"
            )
        if st is not None and not stat.S_ISREG(st.st_mode):  # /dev/null, a FIFO: written in place
            entry.special = True
            self._probe_open(path, option, "a")
        elif st is not None:
            if not self.force:
                raise UsageError(
                    f"{option} {path} already exists",
                    "add --force to replace it, or choose another name",
                )
            self._probe_new(_scratch(path), option, shown=path)  # the folder takes a new file of this size
            self._probe_open(path, option, "r+")  # and the file itself is writable
        else:
            self._probe_new(path, option, shown=path)
            entry.created = True
        self.files.append(entry)
        return path

    def write(self, path: Path | None, writer: Callable[[Path], Any], what: str) -> bool:
        """Write a claimed file through ``writer(path)``; on failure one ERROR/HINT pair, remembered for the
        exit code (6). The file is written under a scratch name and renamed, so it is complete or absent."""
        if path is None:
            return True
        entry = next((f for f in self.files if f.path == Path(path).expanduser()), None)
        if entry is None:  # not claimed: claim it now (the API's paths, tests)
            self.claim(path, "--" + what)
            entry = self.files[-1]
        target = entry.path
        try:
            if entry.special:
                writer(target)
            else:
                scratch = _scratch(target)
                try:
                    writer(scratch)
                    os.replace(scratch, target)
                finally:
                    if scratch.exists():
                        scratch.unlink()
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            reason = describe_os_error(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
            self.failures.append(f"could not write the {what} to {target}: {reason}")
            from ..render import print_error

            print_error(
                self.failures[-1],
                "the report above is complete; free some space or choose another path with " + entry.option,
            )
            return False
        entry.written = True
        try:
            print(f"wrote the {what} to {target}", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass
        return True

    def mark_written(self, path: Path) -> None:
        """A claimed file written by someone else (the profiler's allocator snapshot)."""
        for f in self.files:
            if f.path == Path(path).expanduser():
                f.written = True

    def discard_unwritten(self) -> None:
        for f in self.files:
            if f.created and not f.written:
                try:
                    if f.path.stat().st_size == 0:
                        f.path.unlink()
                except OSError:
                    pass
        self.files = [f for f in self.files if f.written]

    @staticmethod
    def _probe_new(path: Path, option: str, shown: Path) -> None:
        """Create ``path`` (it must not exist), write a few KiB, empty it again; keep it only if it is ``shown``."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as exc:
            raise UsageError(
                f"cannot create {option} {shown}: {describe_os_error(exc)}", _hint(exc, option, shown)
            ) from None
        failure: OSError | None = None
        try:
            left = memoryview(b"\0" * _PROBE_BYTES)
            while left:  # a nearly full disk takes part of a write, then fails the next one
                left = left[os.write(fd, left) :]
            os.fsync(fd)
            os.ftruncate(fd, 0)
        except OSError as exc:
            failure = exc
        finally:
            os.close(fd)
        if failure is not None or path != shown:
            try:
                path.unlink()
            except OSError:
                pass
        if failure is not None:
            raise UsageError(
                f"cannot write {option} {shown}: {describe_os_error(failure)}", _hint(failure, option)
            ) from None

    @staticmethod
    def _probe_open(path: Path, option: str, mode: str) -> None:
        try:
            with open(path, mode):
                pass
        except OSError as exc:
            raise UsageError(f"cannot write {option} {path}: {describe_os_error(exc)}", _hint(exc, option)) from None


def _scratch(path: Path) -> Path:
    # same folder (the rename stays on one file system), same suffix (matplotlib picks the format from it)
    return path.with_name(f".{path.stem}.memprof-{os.getpid()}{path.suffix}")


def _example(option: str) -> str:
    return {"--log": "profile.log", "--snapshot": "snapshot.pickle"}.get(option, "plot.svg")


def _hint(exc: OSError, option: str, path: Path | None = None) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"free some space, or write {option} to another disk"
    if exc.errno == errno.ENOENT:
        if path is not None and not path.parent.exists():
            return f"the folder {path.parent} does not exist: create it first, or choose another path"
        return "this folder does not take new files (like /proc); choose another path"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "choose a folder you can write to"
    return "choose another path"

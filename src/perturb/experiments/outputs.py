"""A results folder (``--out``): checked before the work, locked while in use, written atomically.

``perturb validate`` and ``perturb compare`` (and :func:`perturb.validate`,
:func:`perturb.compare`) write their results into a folder.  Three rules keep what is
there whole:

* **checked first**: :func:`claimed` creates the folder (or finds it) and takes its lock
  before any data is loaded, so a folder that cannot be written (a file, a path through
  a file, no permission) is refused at once, in one line naming the option;
* **one run at a time**: the lock is an ``flock`` on ``.perturb.lock`` inside the folder,
  held by the process for as long as it uses the folder and dropped when it ends, however
  it ends (the kernel drops the ``flock`` of a killed process; the file is removed on a
  normal exit).  A second process is refused, with the pid of the first; within one
  process the lock is re-entrant (a command claims the folder, then the function it calls
  claims it again);
* **all or nothing**: :func:`staged` hands out a fresh temporary folder inside the results
  folder; the files written there replace those of the results folder only when every
  one is written (``os.replace`` of each, with Ctrl-C deferred meanwhile), and the files
  of the same kind an earlier run left that this run did not write (the ``gap.csv`` of
  an earlier run with the gap, under a run without) are removed then.  A run that fails or is
  interrupted before that leaves the folder as it was (a folder it created and left
  empty is removed).

Only files named in the writer's list of known outputs are ever removed; any other file in
the folder is left alone.

Example:
    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     out = pathlib.Path(tmp) / "run"
    ...     with staged(out, known=("a.txt", "b.txt")) as folder:
    ...         _ = (folder / "a.txt").write_text("new")
    ...     sorted(p.name for p in out.iterdir())
    ['a.txt']
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from perturb.errors import OutputError

try:  # POSIX; elsewhere folders are checked and written atomically but not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "COMPARISON_FILES",
    "LOCK_NAME",
    "STAGING_PREFIX",
    "VALIDATION_FILES",
    "check_out",
    "claimed",
    "claimed_runs",
    "claims_out",
    "remove_stale",
    "staged",
]

LOCK_NAME = ".perturb.lock"
"""The lock file inside a results folder while a run uses it."""
STAGING_PREFIX = ".perturb-staging-"
"""The prefix of the temporary folder a run writes into before its files replace the old."""
VALIDATION_FILES = (
    "results.json",
    "results.csv",
    "test_loss_vs_lr.png",
    "error_vs_eta_t.png",
    "gap.csv",
    "gap_vs_lr.png",
    "curve.png",
)
"""Every file :func:`perturb.validate` can write (``gap*`` only with the gap, ``curve.png``
only with the learning curve)."""
COMPARISON_FILES = ("compare.json", "compare.csv", "compare.png")
"""Every file :func:`perturb.compare` writes."""

_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass
class _Claim:
    """This process's hold on one folder: the locked file, a count, the folders it made."""

    fd: int | None
    count: int = 1
    created: list[Path] = field(default_factory=list)
    written: bool = False


_HELD: dict[Path, _Claim] = {}
_GUARD = threading.Lock()


def _shown(out: object) -> str:
    return repr(os.fspath(out)) if isinstance(out, str | os.PathLike) else repr(out)


def check_out(out: object, *, name: str = "out") -> tuple[Path, list[Path]]:
    """Make sure ``out`` is, or can be made, a folder this process can write; create it.

    Args:
        out: the folder.
        name: how the message names it (``"--out"`` on the command line).

    Returns:
        The absolute folder and the folders created for it (outermost first).

    Raises:
        OutputError: ``out`` is a file, lies under a file, or cannot be created or
            written; the one-line message names ``name``.

    Example:
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = (pathlib.Path(tmp) / "f").write_text("")
        ...     try:
        ...         check_out(pathlib.Path(tmp) / "f" / "sub", name="--out")
        ...     except OutputError as err:
        ...         print(str(err).split(",")[0])
        --out must be a folder perturb can create
    """
    if not isinstance(out, str | os.PathLike) or not os.fspath(out):
        raise OutputError(f"{name} must be a folder path, got {out!r}")
    folder = Path(os.path.abspath(os.fspath(out)))
    missing = []
    probe = folder
    while not os.path.exists(probe):
        if os.path.islink(probe):
            raise OutputError(
                f"{name} must be a folder perturb can create, got {_shown(out)}: "
                f"{str(probe)!r} is a broken link"
            )
        missing.append(probe)
        probe = probe.parent
    if not probe.is_dir():
        if probe == folder:
            raise OutputError(f"{name} must be a folder, got {_shown(out)}, which is a file")
        raise OutputError(
            f"{name} must be a folder perturb can create, got {_shown(out)}: "
            f"{str(probe)!r} is a file"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(
            f"{name} must be a folder perturb can write, got {_shown(out)}: "
            f"no permission to write in {str(probe)!r}"
        )
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            if not path.is_dir():
                raise OutputError(
                    f"{name} must be a folder, got {_shown(out)}: {str(path)!r} is a file"
                ) from None
        except OSError as err:
            _remove_empty(created)
            raise OutputError(
                f"{name} must be a folder perturb can create, got {_shown(out)}: "
                f"{err.strerror or err}"
            ) from err
        else:
            created.append(path)
    return folder, created


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders (innermost first) that are empty."""
    for path in reversed(folders):
        try:
            path.rmdir()
        except OSError:
            return


def _lock(folder: Path, out: object, name: str) -> int | None:
    """Open ``folder/.perturb.lock`` and ``flock`` it; refuse when another process holds it."""
    if fcntl is None:  # pragma: no cover - Windows
        return None
    path = folder / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise OutputError(
                f"{name} must be a folder perturb can write, got {_shown(out)}: "
                f"{err.strerror or err}"
            ) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputError(
                f"{name} {_shown(out)} is being written by another perturb run (pid {holder}); "
                f"wait for it to end or choose another {name}"
            ) from None
        try:  # the holder may have removed the file between our open and our lock
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _unlock(folder: Path, claim: _Claim) -> None:
    if claim.fd is not None:
        try:
            os.unlink(folder / LOCK_NAME)
        except OSError:
            pass
        os.close(claim.fd)
        claim.fd = None
    if not claim.written:
        _remove_empty(claim.created)


def _claim(out: object, name: str) -> Path:
    with _GUARD:
        named = isinstance(out, str | os.PathLike) and os.fspath(out)
        folder = Path(os.path.abspath(os.fspath(out))) if named else None
        if folder is not None and folder in _HELD:
            _HELD[folder].count += 1
            return folder
        folder, created = check_out(out, name=name)
        try:
            fd = _lock(folder, out, name)
        except OutputError:
            _remove_empty(created)
            raise
        for leftover in folder.glob(STAGING_PREFIX + "*"):  # of a run that was killed
            shutil.rmtree(leftover, ignore_errors=True)
        _HELD[folder] = _Claim(fd=fd, created=created)
        return folder


def _release(folder: Path) -> None:
    with _GUARD:
        claim = _HELD.get(folder)
        if claim is None:
            return
        claim.count -= 1
        if claim.count <= 0:
            del _HELD[folder]
            _unlock(folder, claim)


@atexit.register
def _release_all() -> None:
    with _GUARD:
        for folder, claim in list(_HELD.items()):
            _unlock(folder, claim)
        _HELD.clear()


@contextmanager
def claimed(out: str | os.PathLike[str], *, name: str = "out") -> Iterator[Path]:
    """Check ``out`` (:func:`check_out`) and hold its lock for the ``with`` block.

    Raises:
        OutputError: ``out`` cannot be a folder perturb writes, or another process holds
            its lock; the message names ``name``.

    Example:
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     with claimed(pathlib.Path(tmp) / "new") as folder:
        ...         print(sorted(p.name for p in folder.iterdir()))
        ...     print(folder.exists())  # created, left empty: removed
        ['.perturb.lock']
        False
    """
    if not _writes():  # a rank > 0 of torchrun: rank 0 checks, locks and writes
        yield Path(os.path.abspath(os.fspath(out)))
        return
    folder = _claim(out, name)
    try:
        yield folder
    finally:
        _release(folder)


def _writes() -> bool:
    """Whether this process writes results: not a rank > 0 under ``torchrun``."""
    if os.environ.get("RANK", "0") != "0":
        return False
    if "torch.distributed" not in sys.modules:
        return True
    from perturb.numeric.distributed import is_main

    return is_main()


def claims_out(function: _F) -> _F:
    """Decorate a function with a keyword ``out``: claim that folder before it runs.

    The folder is checked and locked (:func:`claimed`, the message naming ``out``) before
    the function does any work, and unlocked when it returns or raises.  ``out=None``
    claims nothing; under ``torchrun`` only rank 0 claims (it alone writes).

    Example:
        >>> @claims_out
        ... def run(*, out=None):
        ...     return out
        >>> run(out=None) is None
        True
    """

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out = kwargs.get("out")
        if out is None:
            return function(*args, **kwargs)
        with claimed(out, name="out"):
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) back until the block ends (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    except ValueError:  # pragma: no cover - signals unavailable here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
        if caught:  # delivered now, to the handler that was there (Ctrl-C: KeyboardInterrupt)
            if callable(previous):  # called here, so its exception leaves this block
                previous(signal.SIGINT, None)
            elif previous != signal.SIG_IGN:
                signal.raise_signal(signal.SIGINT)


def remove_stale(folder: Path, known: Iterable[str], keep: Iterable[str] = ()) -> list[Path]:
    """Remove the files named in ``known`` but not in ``keep`` from ``folder``.

    Returns:
        The files removed.

    Example:
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     for n in ("gap.csv", "mine.txt"):
        ...         _ = (pathlib.Path(tmp) / n).write_text("")
        ...     [p.name for p in remove_stale(pathlib.Path(tmp), ["gap.csv", "results.csv"])]
        ['gap.csv']
    """
    kept = set(keep)
    removed = []
    for name in known:
        path = folder / name
        if name not in kept and path.is_file():
            path.unlink()
            removed.append(path)
    return removed


@contextmanager
def staged(out: str | os.PathLike[str], *, known: Iterable[str]) -> Iterator[Path]:
    """A temporary folder to write a run's files in; they replace ``out``'s at the end.

    Args:
        out: the results folder (claimed for the block: :func:`claimed`).
        known: every file name this kind of run can write; those this run did not
            write are removed from ``out`` when its files move in.

    Yields:
        The temporary folder (inside ``out``).  When the block ends normally every file
        in it replaces the one of the same name in ``out``; when it raises, ``out`` is
        left as it was.

    Example:
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     out = pathlib.Path(tmp)
        ...     try:
        ...         with staged(out, known=("a.txt",)) as folder:
        ...             _ = (folder / "a.txt").write_text("half")
        ...             raise RuntimeError("interrupted")
        ...     except RuntimeError:
        ...         pass
        ...     sorted(p.name for p in out.iterdir())
        []
    """
    known = tuple(known)
    with claimed(out, name="out") as folder:
        tmp = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
        try:
            yield tmp
            written = sorted(p.name for p in tmp.iterdir())
            with _interrupts_deferred():
                for name in written:
                    os.replace(tmp / name, folder / name)
                remove_stale(folder, known, keep=written)
                with _GUARD:
                    if folder in _HELD:
                        _HELD[folder].written = True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def claimed_runs(
    out: str | os.PathLike[str], keys: Iterable[Any], *, known: Iterable[str], name: str = "out"
) -> Iterator[dict[Any, Path]]:
    """Claim the folders of one run per key (``out`` for one, ``out/seed-K`` for several).

    Every folder is checked and locked before the block; when it ends normally, the
    results of an earlier run of the other shape are removed: with one key, the
    ``seed-*`` folders holding nothing but ``known`` files; with several, the ``known``
    files directly in ``out`` and the ``seed-*`` folders of other keys.

    Yields:
        ``{key: folder}``.

    Example:
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     with claimed_runs(tmp, [0, 1], known=["r.json"]) as folders:
        ...         print([p.name for p in folders.values()])
        ['seed-0', 'seed-1']
    """
    keys = list(keys)
    known = tuple(known)
    base = Path(out)
    with claimed(out, name=name) as top:
        folders = {k: base if len(keys) == 1 else base / f"seed-{k}" for k in keys}
        with _claims([f for f in folders.values() if f != base], name):
            yield folders
            if len(keys) > 1:
                remove_stale(top, known)
            ours = {f.name for f in folders.values() if f != base}
            for old in top.glob("seed-*"):
                if old.name in ours or not old.is_dir():
                    continue
                if all(_ours(p.name, known) for p in old.iterdir()):
                    shutil.rmtree(old)


def _ours(name: str, known: tuple[str, ...]) -> bool:
    """A file a run writes, or the lock or staging folder a killed run left."""
    return name in known or name == LOCK_NAME or name.startswith(STAGING_PREFIX)


@contextmanager
def _claims(folders: list[Path], name: str) -> Iterator[None]:
    if not folders:
        yield
        return
    with claimed(folders[0], name=name), _claims(folders[1:], name):
        yield

"""Files every stage writes, and the rules its outputs follow (docs/design.md §2): atomic writes (a temporary
file or folder renamed into place), the modes a plain write gets, the output checks (never into an input, never
over a device), the lock that keeps a second writer out, and storage failures as one typed error.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import BadInputError, LorasbError


def file_sha256(path: Path) -> str:
    """The sha256 (64 hex digits) of the file at `path`, read in 4 MiB blocks: memory stays flat for any size."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# Write failures the storage causes, not lorasb: (what happened, what to do), by errno.
_STORAGE_ERRORS = {
    errno.EROFS: ("read-only file system", "pick an -o on a writable file system"),
    errno.ENOSPC: ("no space left on the device", "free space, or pick an -o on another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota, or pick another -o"),
    errno.EIO: ("input/output error", "check the disk, or pick an -o on another one"),
    errno.EACCES: ("permission denied", "pick another -o or fix its permissions"),
}


@contextlib.contextmanager
def storage_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a write under `path` that the storage fails (read-only, full, over quota, I/O error) into one
    BadInputError, `cannot write <path> (<why>) — <fix>`, whichever library wrote: safetensors and torch.save
    report a full disk in their own exception types, with the system's message inside or, torch's zip writer,
    without it."""
    try:
        yield
    except LorasbError:
        raise
    except Exception as e:
        if isinstance(e, OSError) and e.errno in _STORAGE_ERRORS:
            why, fix = _STORAGE_ERRORS[e.errno]
        elif found := next((v for code, v in _STORAGE_ERRORS.items() if os.strerror(code) in str(e)), None):
            why, fix = found
        elif "inline_container" in str(e):  # torch.save's writer, which loses the system's error
            why, fix = "the file could not be completed: a full or failing disk", _STORAGE_ERRORS[errno.ENOSPC][1]
        else:
            raise
        raise BadInputError(f"cannot write {path} ({why})", hint=fix) from e


def write_figure(fig, path: str | os.PathLike) -> None:
    """Lay out a matplotlib `fig`, write it to `path` as PNG through `atomic_path`, and release it: every plot
    lorasb writes (loss.png, lr_range.png, compare's and inspect's figures)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds, with the mode a plain
    `open()` would have given it (`plain_modes`). A write the storage fails is one error (`storage_errors`)."""
    target = Path(path)
    if target.is_dir():
        raise BadInputError("output path is a directory", path=str(target), hint="pass a file name to -o")
    make_output_folder(target.parent)
    tmp = None
    try:
        with storage_errors(target):
            for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):  # of a writer that was killed
                stale.unlink(missing_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            os.close(fd)
            yield Path(tmp)
            plain_modes(Path(tmp))
            os.replace(tmp, target)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_folder(target: Path, *, replace: bool = False, hint: str = "pick another -o") -> Iterator[Path]:
    """Yield an empty hidden folder beside `target` to write into; when the block succeeds, give everything in it
    the modes a plain write gets (`plain_modes`) and rename it onto `target`, so a reader sees the whole folder or
    none. A `target` that holds anything by then is refused (BadInputError with `hint`) unless `replace`: then the
    old folder is removed only after the new one is in place."""
    make_output_folder(target.parent)
    with storage_errors(target):
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(target), dir=target.parent))
    try:
        with storage_errors(target):
            yield staging
            # Checked again here: another process may have written there while the block ran.
            check_output_dir(target, {}, allow_nonempty=replace, hint=hint)
            swap_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def swap_folder(staging: Path, target: Path) -> None:
    """Put the finished folder `staging` in `target`'s place, with the modes a plain write gets (`plain_modes`);
    an old `target` is removed only once the new one is in place, and is put back if the rename fails."""
    plain_modes(staging)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old)  # `old` is an empty folder: the rename replaces it
    try:
        os.replace(staging, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old)


def remove_stale_staging(target: Path) -> None:
    """Delete the staging folders `atomic_folder` left beside `target` when a writer was killed. Only for outputs
    that one writer owns (an -o): a shared cache folder may be another process's staging in progress."""
    for stale in target.parent.glob(f"{glob.escape(_staging_prefix(target))}*"):
        shutil.rmtree(stale, ignore_errors=True)


def _staging_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def plain_modes(path: Path) -> None:
    """Give `path` — a file, or a folder and everything in it — the mode a plain `open()` (0o666) or `mkdir`
    (0o777) gets under the process's umask: mkstemp and mkdtemp make 0600/0700 whatever the umask, and so does
    safetensors' `save_file`, so a model another user (a serving container) must read would otherwise be private.
    Symbolic links are left alone."""
    umask = current_umask()
    file_mode, folder_mode = 0o666 & ~umask, 0o777 & ~umask
    if not path.is_dir():
        os.chmod(path, file_mode)
        return
    for folder, _, files in os.walk(path):
        os.chmod(folder, folder_mode)
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                os.chmod(os.path.join(folder, name), file_mode)


def current_umask() -> int:
    """The process's umask. Read from /proc/self/status where Linux shows it, since setting and restoring it
    (the only other way) changes it for every thread meanwhile; then set to 0o077, so that a file another thread
    creates in that instant is private rather than public."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def check_output(out: str | os.PathLike, inputs: dict[str, str | os.PathLike | None], *, folder: bool = False) -> Path:
    """Refuse an output that is, lies inside or (a `folder` output) would hold one of `inputs` ({what: path}: model
    directory or weight file, data, update, factors, adapter), compared by real path and, for existing files, by
    inode (a hard link is the same file). Inputs that are not local paths (hub ids, built-in data names) pass.
    A file output that is a folder, or a folder output that is a file, is refused too, and so is any output that
    exists as neither (a device, FIFO or socket: the rename into place would replace the node, /dev/null included).
    Returns `out` as a Path."""
    out = Path(out).expanduser()
    if out.exists() and not (out.is_file() or out.is_dir()):
        kind = next((k for k, test in _SPECIAL_FILES if test(out.stat().st_mode)), "special file")
        raise BadInputError(f"output path is a {kind}, not a file", path=str(out), hint="pass a file name to -o")
    if not folder and out.is_dir():
        raise BadInputError("output path is a directory", path=str(out), hint="pass a file name to -o")
    if folder and out.exists() and not out.is_dir():
        raise BadInputError("output path is a file", path=str(out), hint="pass a directory name to -o")
    target = Path(os.path.realpath(out))
    for what, given in inputs.items():
        source = Path(given).expanduser() if given is not None else None
        if source is None or not source.exists():
            continue
        real = Path(os.path.realpath(source))
        same_file = out.is_file() and os.path.samefile(out, source)
        if same_file or target.is_relative_to(real) or (folder and real.is_relative_to(target)):
            raise BadInputError(
                f"the output would overwrite or write into the {what}", path=str(out), hint=f"pick an -o outside {real}"
            )
    return out


_SPECIAL_FILES = (
    ("character device", stat.S_ISCHR),
    ("block device", stat.S_ISBLK),
    ("FIFO", stat.S_ISFIFO),
    ("socket", stat.S_ISSOCK),
)


def check_output_dir(
    out: str | os.PathLike, inputs: dict[str, str | os.PathLike | None], *, allow_nonempty: bool, hint: str
) -> Path:
    """`check_output(out, inputs, folder=True)`, then refuse an `out` that exists and holds anything, unless
    `allow_nonempty` (merge's --overwrite; train's --overwrite or --resume). `hint` says what the command's user
    can do instead. Returns `out` as a Path.

    Overlap with an input is checked first: there --overwrite would not help, so the hint to pass it would mislead.
    """
    out = check_output(out, inputs, folder=True)
    # A lock alone is no content: under a launcher rank 0 may have locked the folder before another rank looks, and
    # whether its holder still runs is folder_lock's question.
    if not allow_nonempty and out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise BadInputError("output directory exists and is not empty", path=str(out), hint=hint)
    return out


LOCK_FILE = ".lorasb.lock"


@contextlib.contextmanager
def folder_lock(folder: Path, what: str) -> Iterator[None]:
    """Keep a second `what` out of `folder` while this one writes into it (`output_lock` with the lock file inside
    it). Temp files of killed writers are removed once the lock is held."""
    with output_lock(folder / LOCK_FILE, what, folder):
        for stale in [*folder.glob(".*.tmp"), *folder.glob("*/.*.tmp")]:  # atomic_path's, from killed writers
            stale.unlink(missing_ok=True)
        yield


@contextlib.contextmanager
def output_lock(lock: Path, what: str, output: Path) -> Iterator[None]:
    """Keep a second `what` from writing `output` while this one does: the file `lock` holds `host pid`; one left
    by a process of this host that no longer runs is taken over."""
    me = f"{socket.gethostname()} {os.getpid()}"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = lock.read_text(errors="replace").strip() if lock.is_file() else ""
            host, _, pid = holder.partition(" ")
            if not (host == socket.gethostname() and pid.isdigit() and not _running(int(pid))):
                raise BadInputError(
                    f"another {what} is writing into this folder ({holder or 'unknown process'})",
                    path=str(output),
                    hint=f"wait for it or pick another -o; if that process is gone, delete {lock}",
                ) from None
            lock.unlink(missing_ok=True)
    with os.fdopen(fd, "w") as f:
        f.write(me + "\n")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_output_folder(folder: Path) -> None:
    """Create an output folder and its parents, as `mkdir -p`; a path under a regular file or on storage that
    cannot be written (`storage_errors`) is a one-line error."""
    try:
        with storage_errors(folder):
            folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), folder)
        raise BadInputError(
            "output folder lies under a regular file", path=str(blocker), hint="pick another -o"
        ) from None

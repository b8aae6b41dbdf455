"""Files of a run directory on local disk or on any filesystem ``pyarrow.fs`` opens by URI.

A *path* here is a local path (``results``, ``~/runs/x``) or a URI (``s3://bucket/prefix``,
``gs://bucket/prefix``, ``file:///abs``, ...). URIs go through
``pyarrow.fs.FileSystem.from_uri``, exactly as Ray Tune resolves ``RunConfig(storage_path)``,
so tltune and Ray reach the same place from the same string.

S3 credentials and endpoint come from the standard environment variables only:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (``AWS_SESSION_TOKEN``), ``AWS_DEFAULT_REGION``,
and for an S3-compatible server ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), which
pyarrow itself honours (Ray's worker processes inherit them from the driver on a local Ray;
a cluster's nodes need them in their own environment). Credentials in a URI
(``s3://KEY:SECRET@bucket``) are refused: a run's path is printed and stored with the run.
Nor are they handed to Ray's runtime environments (:func:`keep_credentials_out_of_ray`),
whose agent logs them. pyarrow's URI query options work too:
``s3://bucket/prefix?endpoint_override=host:9000&scheme=http``; every path derived from a
URI here (:func:`join`, :func:`parent`, :func:`find`, :func:`walk`) keeps them.

Object stores have no real directories: a "directory" exists while something is under it,
and ``list_dir`` of a missing directory is empty rather than an error.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import threading
import uuid
from pathlib import Path
from typing import Callable, Iterator, TypeVar
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from tltune.errors import UserError

__all__ = [
    "absolute", "append_line", "check_writable", "download", "exists", "find", "is_dir", "is_file", "is_uri", "join",
    "keep_credentials_out_of_ray", "list_dir", "move", "mtime", "name", "parent", "read_text", "refuse_credentials", "resolve",
    "run_lock", "split_query", "walk", "write_text",
]

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")  # 2+ chars: "C:\..." is not a URI
_PROBE_PREFIX = ".tltune-write-check-"
# check_writable's S3 client: fail in seconds, not after the SDK's default retries (a closed
# port takes 6 s with 3 attempts, an endpoint that accepts but never answers over 100 s).
_PROBE_CONNECT_TIMEOUT_S = 3.0
_PROBE_REQUEST_TIMEOUT_S = 5.0
_PROBE_DEADLINE_S = 30.0  # any scheme: the whole check gives up after this
_T = TypeVar("_T")


def is_uri(path: str) -> bool:
    """Whether ``path`` is a URI (``scheme://...``) rather than a local path."""
    return bool(_URI.match(str(path)))


def join(base: str, *parts: str) -> str:
    """``base`` with ``parts`` appended by ``/``, for local paths and URIs alike (a URI's
    ``?query`` stays at the end); no doubled or trailing slashes, empty parts skipped."""
    base = str(base)
    query = ""
    if is_uri(base) and "?" in base:
        base, query = base.split("?", 1)
        query = "?" + query
    tail = [p.strip("/") for p in map(str, parts) if p.strip("/")]
    if not tail:
        return base + query
    head = base if base.endswith("://") or base.strip("/") == "" else base.rstrip("/")
    sep = "" if head.endswith("/") or not head else "/"
    return head + sep + "/".join(tail) + query


def split_query(path: str) -> tuple[str, str]:
    """(``path`` without its query, the query with its ``?`` or ``""``); a local path: (path, "")."""
    path = str(path)
    if is_uri(path) and "?" in path:
        base, query = path.split("?", 1)
        return base, "?" + query
    return path, ""


def parent(path: str) -> str:
    """The directory holding ``path``, for local paths and URIs alike (a URI keeps its ``?query``):
    ``parent("s3://b/run/exp?endpoint_override=h:1")`` is ``"s3://b/run?endpoint_override=h:1"``;
    a bucket (``s3://b``) is its own parent."""
    base, query = split_query(path)
    if not is_uri(base):
        return os.path.dirname(base.rstrip("/") or "/") or "."
    prefix = _URI.match(base).group(0)
    rest = base[len(prefix):].rstrip("/")
    if "/" not in rest:
        return prefix + rest + query
    up = rest.rsplit("/", 1)[0]
    return prefix + (up or "/") + query


def name(path: str) -> str:
    """The last part of ``path``, without a URI's ``?query``."""
    return split_query(path)[0].rstrip("/").rsplit("/", 1)[-1]


def absolute(path: str) -> str:
    """A local path made absolute (``~`` expanded); a URI unchanged. A URI with credentials
    in it (``s3://KEY:SECRET@bucket``) raises ``UserError``."""
    path = str(path)
    if is_uri(path):
        refuse_credentials(path)
        return path
    return os.path.abspath(os.path.expanduser(path))


def refuse_credentials(path: str) -> None:
    """``UserError`` (one line, the secret left out) for a URI that holds credentials: a
    password in it (``scheme://user:secret@host``), or any user part on an object store
    (``s3://KEY@bucket``, ``gs://...``): they would be printed, and stored with the run."""
    path = str(path)
    if not is_uri(path):
        return
    scheme = _URI.match(path).group(1).lower()
    netloc = split_query(path)[0][len(scheme) + 3 :].split("/", 1)[0]
    if "@" not in netloc:
        return
    userinfo, host = netloc.rsplit("@", 1)
    if ":" in userinfo or scheme in ("s3", "gs", "gcs"):
        shown = f"{scheme}://{host}" + split_query(path)[0][len(scheme) + 3 + len(netloc) :]
        keys = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) instead" if scheme == "s3"
                else "set GOOGLE_APPLICATION_CREDENTIALS instead" if scheme in ("gs", "gcs")
                else "pass them in the environment instead")  # fmt: skip
        raise UserError(
            f"storage path {shown}: credentials in the URI are refused (they would be printed and stored with the run): {keys}"
        )


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path on it, as Ray resolves a ``storage_path``: a URI through
    ``pyarrow.fs.FileSystem.from_uri``, a local path as an absolute path on the local disk.

    An unknown scheme or a malformed URI raises ``UserError``; network errors (for example
    while pyarrow looks up an AWS bucket's region) are left as ``OSError``. S3 filesystems
    get ``allow_delayed_open`` so that a small file is one PUT, not a multipart upload.
    """
    path = str(path)
    if not is_uri(path):
        return pafs.LocalFileSystem(), absolute(path)
    refuse_credentials(path)
    try:
        fs, fs_path = pafs.FileSystem.from_uri(path)
    except ValueError as exc:  # pyarrow.ArrowInvalid: unknown scheme, bad query option
        scheme = _URI.match(path).group(1)
        reason = _one_line(exc)
        if "Unrecognized filesystem type" in reason:
            reason = f"pyarrow.fs has no filesystem for '{scheme}://' (use a local path, s3://, gs://, hdfs:// or file://)"
        raise UserError(f"storage path {path}: {reason}") from None
    if fs.type_name == "s3":
        fs = _s3_with(fs, allow_delayed_open=True)
    return fs, fs_path


def exists(path: str) -> bool:
    """Whether a file or directory is at ``path`` (a missing S3 bucket: ``False``)."""
    fs, fs_path = resolve(path)
    return fs.get_file_info(fs_path).type != pafs.FileType.NotFound


def is_file(path: str) -> bool:
    """Whether ``path`` is a file."""
    fs, fs_path = resolve(path)
    return fs.get_file_info(fs_path).type == pafs.FileType.File


def is_dir(path: str) -> bool:
    """Whether ``path`` is a directory (on an object store: whether anything is under it)."""
    fs, fs_path = resolve(path)
    return fs.get_file_info(fs_path).type == pafs.FileType.Directory


def list_dir(path: str) -> list[str]:
    """The names of the entries directly in directory ``path``, sorted; ``[]`` if it is missing."""
    fs, fs_path = resolve(path)
    infos = fs.get_file_info(pafs.FileSelector(fs_path, allow_not_found=True, recursive=False))
    return sorted(info.base_name for info in infos)


def find(path: str, name: str) -> list[str]:
    """Every file called ``name`` anywhere under directory ``path``, as paths like ``path``'s, sorted."""
    fs, fs_path = resolve(path)
    infos = fs.get_file_info(pafs.FileSelector(fs_path, allow_not_found=True, recursive=True))
    root = fs_path.rstrip("/")
    return sorted(join(path, i.path[len(root):]) for i in infos if i.type == pafs.FileType.File and i.base_name == name)


def walk(path: str) -> list[str]:
    """Every file anywhere under directory ``path``, as ``/``-separated paths relative to it,
    sorted; ``[]`` if it is missing (join them back with :func:`join`: a URI's query stays)."""
    fs, fs_path = resolve(path)
    infos = fs.get_file_info(pafs.FileSelector(fs_path, allow_not_found=True, recursive=True))
    root = fs_path.rstrip("/") + "/"
    return sorted(i.path[len(root):] for i in infos if i.type == pafs.FileType.File and i.path.startswith(root))


def read_bytes(path: str) -> bytes:
    """The content of file ``path``; ``FileNotFoundError`` if it is missing. A local path that
    is not a regular file (a FIFO, a device, a socket planted under a result file's name) is an
    ``OSError``, never opened: reading a FIFO would wait for ever."""
    fs, fs_path = resolve(path)
    if isinstance(fs, pafs.LocalFileSystem):
        mode = os.stat(fs_path).st_mode  # follows symlinks: a link to a FIFO is caught too
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file", fs_path)
    with fs.open_input_stream(fs_path) as f:
        return f.read()


def read_text(path: str) -> str:
    """The UTF-8 text of file ``path``; ``FileNotFoundError`` if it is missing."""
    return read_bytes(path).decode("utf-8")


def write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to file ``path``, replacing it whole (see :func:`write_bytes`)."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to file ``path``, replacing it whole: on local disk through a
    temporary file and ``os.replace`` (readers never see half a file), on an object store as
    one PUT; parent directories are created as needed."""
    fs, fs_path = resolve(path)
    if isinstance(fs, pafs.LocalFileSystem):
        target = Path(fs_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "xb") as f:
                f.write(data)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return
    _make_parent(fs, fs_path)
    with fs.open_output_stream(fs_path) as f:
        f.write(data)


def copy_file_whole(source: Path, target: Path) -> None:
    """Copy local file ``source`` to local path ``target`` through a temporary file beside it
    and ``os.replace``: ``target`` is the old file or the new one, never a cut copy (a full disk)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def append_line(path: str, line: str) -> None:
    """Append ``line`` and a newline to file ``path``, creating it. On local disk an append;
    on an object store (no appends) a read and rewrite, so not safe against a concurrent writer."""
    fs, fs_path = resolve(path)
    line = line.rstrip("\n") + "\n"
    if isinstance(fs, pafs.LocalFileSystem):
        Path(fs_path).parent.mkdir(parents=True, exist_ok=True)
        with open(fs_path, "a+b") as f:
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # the last append was cut (a full disk, a kill): this line stays whole
                    line = "\n" + line
            f.write(line.encode("utf-8"))
        return
    try:
        with fs.open_input_stream(fs_path) as f:
            old = f.read().decode("utf-8")
    except FileNotFoundError:
        old = ""
    if old and not old.endswith("\n"):
        old += "\n"
    write_text(path, old + line)


def mtime(path: str) -> float:
    """Last modification of ``path`` in seconds since the epoch; for a directory on an object
    store (which has no times) the newest file under it. ``FileNotFoundError`` if missing."""
    fs, fs_path = resolve(path)
    info = fs.get_file_info(fs_path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such file or directory: {path}")
    if info.mtime_ns is not None:
        return info.mtime_ns / 1e9
    below = fs.get_file_info(pafs.FileSelector(fs_path, recursive=True))
    times = [i.mtime_ns for i in below if i.mtime_ns is not None]
    if not times:
        raise FileNotFoundError(f"no modification time for {path}: nothing under it")
    return max(times) / 1e9


def move(src: str, dst: str) -> None:
    """Rename file or directory ``src`` to ``dst`` (both on the same filesystem, ``dst`` must
    not exist). On an object store a directory is copied object by object, then deleted."""
    fs, src_path = resolve(src)
    dst_fs, dst_path = resolve(dst)
    if fs.type_name != dst_fs.type_name:
        raise ValueError(f"cannot move {src} to {dst}: different filesystems")
    if fs.get_file_info(dst_path).type != pafs.FileType.NotFound:
        raise FileExistsError(f"cannot move {src} to {dst}: it exists")
    info = fs.get_file_info(src_path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such file or directory: {src}")
    if isinstance(fs, pafs.LocalFileSystem):
        Path(dst_path).parent.mkdir(parents=True, exist_ok=True)
        os.rename(src_path, dst_path)
    elif info.type == pafs.FileType.File:
        fs.move(src_path, dst_path)
    else:  # S3/GCS cannot rename a "directory": server-side copies, then delete
        for item in fs.get_file_info(pafs.FileSelector(src_path, recursive=True)):
            if item.type == pafs.FileType.File:
                target = dst_path.rstrip("/") + item.path[len(src_path.rstrip("/")):]
                _make_parent(fs, target)
                fs.copy_file(item.path, target)
        fs.delete_dir(src_path)


def download(path: str, local_dir: str | os.PathLike) -> Path:
    """A local copy of file or directory ``path`` (e.g. a checkpoint): a directory's contents
    are copied into ``local_dir`` and ``local_dir`` returned, a file goes to
    ``local_dir/<name>``. A local ``path`` is returned as it is, nothing copied.
    ``FileNotFoundError`` if ``path`` is missing."""
    fs, fs_path = resolve(path)
    info = fs.get_file_info(fs_path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such file or directory: {path}")
    if isinstance(fs, pafs.LocalFileSystem):
        return Path(fs_path)
    dest = Path(local_dir).expanduser().resolve()
    dest.mkdir(parents=True, exist_ok=True)
    if info.type == pafs.FileType.File:
        dest = dest / info.base_name
    pafs.copy_files(fs_path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return dest


def check_writable(path: str) -> None:
    """Prove, before anything runs, that results can be written under directory ``path`` (it
    may not exist yet) by writing and deleting a small probe file there; nothing is left
    behind (on S3 at most an empty "directory" marker for ``path``'s parent).

    Raises ``UserError`` with one line for: an unknown scheme or bad URI, a local path that is
    a file or cannot be created or written, and on an object store a missing bucket, missing
    or rejected credentials, or an endpoint that does not answer (in seconds: short timeouts,
    no retries); a URI with credentials in it (:func:`refuse_credentials`). For ``s3://`` the
    credentials must be in ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY``; the EC2 metadata service is then never needed,
    and ``AWS_EC2_METADATA_DISABLED=true`` is set in ``os.environ`` unless already set, so
    that neither this process nor the Ray workers it starts wait on it.
    """
    path = str(path)
    if not is_uri(path):
        _check_local(path, Path(absolute(path)))
        return
    refuse_credentials(path)
    fs, fs_path = _with_deadline(lambda: _resolve_for_probe(path), path)
    if isinstance(fs, pafs.LocalFileSystem):
        _check_local(path, Path(fs_path))
        return
    _with_deadline(lambda: _probe(fs, fs_path, path), path)


@contextlib.contextmanager
def run_lock(run_dir: str, lock_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the lock of run directory ``run_dir`` (a local path or URI) for this process, so
    two processes never write one run. The lock is a file in ``lock_dir`` on this machine,
    named after the run: it protects a run from processes on the same machine (on a cluster,
    the driver's)."""
    import fcntl
    import hashlib

    folder = Path(lock_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha1(absolute(run_dir).encode()).hexdigest()[:16]}.lock"
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "another process"
            raise UserError(f"{run_dir} is being written by {owner}: wait for it to end, or pass another --name") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"tltune process {os.getpid()}")
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# Environment variables that hold secrets: never put into a Ray runtime environment, which
# Ray's runtime-env agent writes to its (world-readable) log and its GCS keeps for each actor.
SECRET_ENV_VARS = frozenset({
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
})  # fmt: skip


def keep_credentials_out_of_ray() -> None:
    """Stop Ray Tune from copying the driver's AWS credentials into the runtime environment of
    every trial actor (``ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE``): the trials
    still have them where Ray's workers inherit the driver's environment (a local Ray), and a
    cluster's nodes take them from their own environment, as this module's docs say. Call it
    before a Tuner is fitted; calling it again does nothing."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE.difference_update(SECRET_ENV_VARS)


# -- internals -------------------------------------------------------------------------


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, whitespace collapsed, at most ``limit`` chars."""
    lines = str(exc).strip().splitlines()
    text = " ".join(lines[0].split()) if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _s3_with(fs: pafs.FileSystem, **options) -> pafs.FileSystem:
    """``fs`` (an S3FileSystem) rebuilt with ``options`` changed; its other settings, e.g.
    the endpoint pyarrow took from ``AWS_ENDPOINT_URL``, are kept (read via pickling state)."""
    try:
        state = dict(fs.__reduce__()[1][0])
    except Exception:  # a pyarrow without that state: keep the filesystem as it is
        return fs
    state.update(options)
    return pafs.S3FileSystem(**state)


def _make_parent(fs: pafs.FileSystem, fs_path: str) -> None:
    """Create the parent directory where the filesystem has real directories (not S3/GCS)."""
    parent = fs_path.rstrip("/").rsplit("/", 1)[0]
    if fs.type_name not in ("s3", "gcs") and parent and parent != fs_path:
        fs.create_dir(parent, recursive=True)


def _with_deadline(fn: Callable[[], _T], path: str) -> _T:
    """``fn()`` in a daemon thread; a ``UserError`` if it has not finished within the deadline."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=run, name="tltune-storage-check", daemon=True)
    worker.start()
    worker.join(_PROBE_DEADLINE_S)
    if worker.is_alive():
        raise UserError(f"storage path {path}: no answer within {_PROBE_DEADLINE_S:.0f} s (is the endpoint reachable?)")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def _check_local(path: str, target: Path) -> None:
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == target and not existing.is_dir():
        raise UserError(f"storage path {path} is a file, not a directory")
    if not existing.is_dir():
        raise UserError(f"storage path {path} cannot be created: {existing} is a file")
    missing = []
    d = target
    while d != existing:
        missing.append(d)
        d = d.parent
    created: list[Path] = []
    try:
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
        probe = target / f"{_PROBE_PREFIX}{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"storage path {path} is not writable: {exc.strerror or _one_line(exc)}") from None
    finally:
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass


def _resolve_for_probe(path: str) -> tuple[pafs.FileSystem, str]:
    """``resolve`` plus, for S3, the credential check and a client with short timeouts."""
    if urlsplit(path).scheme.lower() == "s3":
        keys = os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")
        if not keys:
            raise UserError(
                f"storage path {path}: no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(and AWS_ENDPOINT_URL for an S3-compatible server)"
            )
        os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    try:
        fs, fs_path = resolve(path)
    except OSError as exc:
        raise UserError(f"storage path {path}: {_explain(exc, path, None)}") from None
    if fs.type_name == "s3":
        fs = _s3_with(
            fs,
            connect_timeout=_PROBE_CONNECT_TIMEOUT_S,
            request_timeout=_PROBE_REQUEST_TIMEOUT_S,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
        )
    return fs, fs_path


def _probe(fs: pafs.FileSystem, fs_path: str, path: str) -> None:
    endpoint = _endpoint(fs)
    try:
        info = fs.get_file_info(fs_path)
        if info.type == pafs.FileType.File:
            raise UserError(f"storage path {path} is a file, not a directory")
        probe = fs_path.rstrip("/") + f"/{_PROBE_PREFIX}{uuid.uuid4().hex}"
        _make_parent(fs, probe)
        with fs.open_output_stream(probe) as f:
            f.write(b"tltune")
        fs.delete_file(probe)
        if info.type == pafs.FileType.NotFound:  # deleting left an empty marker for fs_path
            try:
                if not fs.get_file_info(pafs.FileSelector(fs_path, allow_not_found=True)):
                    fs.delete_dir(fs_path)
            except OSError:
                pass
    except OSError as exc:
        raise UserError(f"storage path {path}: {_explain(exc, path, endpoint)}") from None


def _endpoint(fs: pafs.FileSystem) -> str | None:
    if fs.type_name != "s3":
        return None
    try:
        state = fs.__reduce__()[1][0]
    except Exception:
        return None
    return state.get("endpoint_override") or f"AWS S3 ({state.get('region') or 'default region'})"


_DENIED = ("INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "ACCESS_DENIED", "EXPIRED_TOKEN",
           "INVALID_CLIENT_TOKEN_ID", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
           "Forbidden", "Unauthorized", "PermissionDenied", "PERMISSION_DENIED")


def _explain(exc: OSError, path: str, endpoint: str | None) -> str:
    """One line saying what went wrong, from pyarrow's (AWS SDK's) error text."""
    text = " ".join(str(exc).split())
    detail = text.split(" operation: ", 1)[-1]
    detail = re.sub(r"\s*\(Request ID: [^)]*\)|curlCode: \d+, |No response body\.", "", detail).strip(" ;.")
    where = f" at {endpoint}" if endpoint else ""
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        bucket = urlsplit(path).netloc.rsplit("@", 1)[-1]
        return f"bucket '{bucket}' does not exist{where}: create it first (neither tltune nor Ray creates buckets)"
    if any(code in text for code in _DENIED):
        keys = " (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)" if urlsplit(path).scheme.lower() == "s3" else ""
        return (f"access denied{where}: the credentials{keys} are wrong or may not write there"
                + (f" ({_one_line(detail, 200)})" if detail else ""))
    if "NETWORK_CONNECTION" in text or "curlCode" in text or "Could not connect" in text:
        return f"cannot reach {endpoint or 'the storage server'}: {_one_line(detail, 200)}"
    return _one_line(exc)

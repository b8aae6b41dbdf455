"""The trust boundary of ``--resume`` and ``result_grid``: Ray's files are unpickled only if tltune signed them.

Resuming a Tune experiment, or reading it back as a ``ResultGrid``, unpickles files of its
directory at every depth: at the top ``tuner.pkl``, the trials hex-pickled inside
``experiment_state-*.json``, the searcher's ``*.pkl`` and the search generator's
``*-state-*.json``; in a trial's folder the ``error.pkl`` Ray wrote when it failed; and
the same again in a nested Tune experiment (``repeats/``). A planted file would run code.
So every such file is signed when it is written, with an HMAC key that never leaves this
machine's user account (``$TLTUNE_KEY_FILE``, else ``~/.config/tltune/run-signing.key``),
and before Ray is handed the directory every file it may unpickle, at any depth, is checked
against the signatures. An attacker who can write the run directory can add files and
signatures, but cannot make a signature valid without the key.

The run's own record of how it was started (``runs.jsonl``, whose options ``--resume`` follows:
where Ray runs, the data root, the weights) carries its signature in the line itself
(:func:`sign_record`, :func:`check_record`).

The signatures file is append-only and keyed by content: Ray rewrites its state every few
seconds, and each version is signed before Ray uploads it (see ``raytune.sweep``), so after
a kill -9 at any moment the state in the run directory is one tltune signed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import os
import secrets
import sys
from pathlib import Path

from tltune import storage
from tltune.errors import UserError

SIGNATURES_FILE = "tltune_signatures.jsonl"
KEY_ENV = "TLTUNE_KEY_FILE"
OWN_FILES = "tltune_*"  # tltune's own records: plain JSON, never unpickled


def key_file() -> Path:
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV]).expanduser()
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config_home / "tltune" / "run-signing.key"


def signing_key() -> bytes:
    """This user's key, created on first use (readable by the user alone)."""
    path = key_file()
    if not path.exists() and not path.is_symlink():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)  # never replaces a key another process created meanwhile
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    if path.is_dir():
        raise UserError(f"the signing key {path} is a directory: point ${KEY_ENV} at a file (it is created if missing)")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:  # others who can read it could sign a planted pickle: made private, and said so
        try:
            os.chmod(path, 0o600)
        except OSError as exc:
            raise UserError(f"the signing key {path} is readable or writable by others (mode {mode:o}) and cannot be made private "
                            f"({exc.strerror}): chmod 600 {path}") from None  # fmt: skip
        print(f"warning: the signing key {path} was readable or writable by others (mode {mode:o}); it is now 600", file=sys.stderr)
    key = path.read_text().strip()
    if len(key) < 32:
        raise UserError(f"the signing key {path} is damaged: delete it (runs signed with it can no longer be resumed)")
    return key.encode()


def check_key_file() -> None:
    """A key file that exists but cannot be used (a directory, damaged, open to others) is one
    line before anything runs; a missing one is made when a run is first signed."""
    path = key_file()
    if path.exists():
        signing_key()


def signature(data: bytes, key: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def is_pickled_state(name: str) -> bool:
    """Whether Ray may unpickle file ``name`` of an experiment directory's top when it restores:
    ``tuner.pkl``, ``experiment_state-*.json``, the searcher's and callbacks' ``*.pkl``, the
    search generators' ``*-state-*.json`` (cloudpickle too) — every .pkl and .json Ray copies back.
    Hidden files are not: Ray's patterns never match them, and its uploads leave hidden
    partial copies (``.<uuid>-tmp-<name>``) behind when killed mid-copy."""
    return name.endswith((".pkl", ".json")) and not name.startswith(".") and not fnmatch.fnmatch(name, OWN_FILES)


def sign(exp_dir: str, files: dict[str, bytes]) -> None:
    """Record the signatures of ``files`` (name → content) that are about to be written to,
    or were just written to, experiment directory ``exp_dir``."""
    if not files:
        return
    key = signing_key()
    lines = [json.dumps({"file": name, "hmac": signature(data, key)}) for name, data in sorted(files.items())]
    storage.append_line(storage.join(exp_dir, SIGNATURES_FILE), "\n".join(lines))


def has_saved_state(names: list[str]) -> bool:
    """Whether Tune saved the state of an experiment whose directory holds files ``names``
    (``tuner.pkl`` alone: killed before that, nothing to resume)."""
    return any(n.startswith("experiment_state-") for n in names)


# Below an experiment's top, the files Ray unpickles: every ``*.pkl`` (a trial's ``error.pkl``,
# a class trainable's ``_dict_checkpoint.pkl``) but the one Ray only writes, and the JSON
# documents that may embed cloudpickle (``TuneFunctionDecoder``'s CLOUDPICKLE_FALLBACK).
NEVER_UNPICKLED = ("params.pkl",)  # Ray's JsonLoggerCallback writes the trial's config there and never reads it back
CLOUDPICKLED_JSON = ("*state*.json", "trial_metadata.json")  # experiment_state-*, search_gen_state-*, basic-variant-state-*...


def may_unpickle(rel_path: str, experiment_dirs: set[str] = frozenset({""})) -> bool:
    """Whether Ray may unpickle the file at ``rel_path`` (``/``-separated, relative to an
    experiment directory) when it restores or reads back the experiment. ``experiment_dirs``:
    the folders (relative, ``""`` the top) that are Tune experiments themselves, where
    :func:`is_pickled_state` applies. Hidden files never are (Ray's names and patterns never
    match them) and neither are tltune's own records."""
    folder, _, name = rel_path.rpartition("/")
    if name.startswith(".") or fnmatch.fnmatch(name, OWN_FILES):
        return False
    if folder in experiment_dirs and is_pickled_state(name):
        return True
    if name.endswith(".pkl"):
        return name not in NEVER_UNPICKLED
    return any(fnmatch.fnmatch(name, pattern) for pattern in CLOUDPICKLED_JSON)


def known_signatures(exp_dir: str, files: list[str] | None = None) -> set[str]:
    """The signatures recorded anywhere under ``exp_dir`` (its own and its nested Tune
    experiments'); ``files``: the relative paths under it, if already listed. Where a
    signature lies does not matter: none is valid without the key."""
    if files is None:
        files = storage.walk(exp_dir)
    known = set()
    for rel in files:
        if rel.rpartition("/")[2] != SIGNATURES_FILE:
            continue
        try:
            text = storage.read_text(storage.join(exp_dir, rel))
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            try:
                known.add(json.loads(line)["hmac"])
            except (ValueError, TypeError, KeyError):
                continue  # a line cut by a kill; the others still count
    return known


def is_signed(exp_dir: str, data: bytes) -> bool:
    """Whether ``data`` is content this user's tltune signed under ``exp_dir`` (``False``
    without a key: none is created). For a check at the moment Ray reads a file."""
    if not key_file().exists():
        return False
    return signature(data, signing_key()) in known_signatures(exp_dir)


def signed_state_files(exp_dir: str, purpose: str = "resume") -> list[str]:
    """The files under ``exp_dir`` that Ray may unpickle (:func:`may_unpickle`), at every
    depth, each checked against tltune's signatures; paths relative to ``exp_dir``.

    Raises :class:`UserError` (``refusing to <purpose> ...``) naming the first file this
    user's tltune did not write. Nothing
    is checked (``[]``) when there is no saved state (an ``experiment_state-*.json``) at
    any depth: Ray then unpickles nothing of the folder."""
    files = storage.walk(exp_dir)
    tops: dict[str, list[str]] = {}
    for rel in files:
        folder, _, name = rel.rpartition("/")
        tops.setdefault(folder, []).append(name)
    experiment_dirs = {f for f, names in tops.items() if "tuner.pkl" in names or has_saved_state(names)} | {""}
    if not any(has_saved_state(tops.get(d, [])) for d in experiment_dirs):  # nothing will be unpickled
        return []
    names = [rel for rel in files if may_unpickle(rel, experiment_dirs)]
    key_path = key_file()
    if not key_path.exists():
        raise UserError(
            f"refusing to {purpose} {exp_dir}: it was not created by tltune under this account (no signing key at {key_path}); "
            f"tltune hands Ray only your own runs (the key of the account that made it: ${KEY_ENV})"
        )
    key = signing_key()
    known = known_signatures(exp_dir, files)
    for rel in names:
        try:
            data = storage.read_bytes(storage.join(exp_dir, rel))
        except FileNotFoundError:  # removed since listed (Ray replaced it): what Ray reads is checked when it is there
            continue
        if signature(data, key) not in known:
            raise UserError(
                f"refusing to {purpose} {exp_dir}: {rel} is not a file tltune wrote (its signature does not match); "
                "the run directory may have been tampered with — start a new run instead"
            )
    return names


RECORD_SIGNATURE = "hmac"
FIRST_SIGNED_SCHEMA = 2  # runs.jsonl lines of this schema and later are signed


def _record_bytes(record: dict) -> bytes:
    """The signed form of a JSON record: every key but the signature, canonical."""
    return json.dumps({k: v for k, v in record.items() if k != RECORD_SIGNATURE}, sort_keys=True, separators=(",", ":")).encode()


def sign_record(record: dict) -> dict:
    """``record`` as JSON will hold it (what is not JSON as its text), with its signature under ``"hmac"``."""
    record = json.loads(json.dumps(record, default=str))
    return {**record, RECORD_SIGNATURE: signature(_record_bytes(record), signing_key())}


def check_record(record: dict, path: str, purpose: str = "resume") -> bool:
    """Whether ``record``, read from ``path``, is signed (``True``) or from before records were
    signed (``False``: schema 1, the caller warns). Raises :class:`UserError` for a signature
    that does not match, or for a record of a signed schema without one (stripped)."""
    sig = record.get(RECORD_SIGNATURE)
    schema = record.get("schema", 1)
    if sig is None and isinstance(schema, int) and schema < FIRST_SIGNED_SCHEMA:
        return False
    run_dir, name = storage.parent(path), storage.name(path)
    key_path = key_file()
    if not key_path.exists():
        raise UserError(
            f"refusing to {purpose} {run_dir}: it was not created by tltune under this account (no signing key at {key_path}); "
            f"tltune follows only your own runs' settings (the key of the account that made it: ${KEY_ENV})"
        )
    if not isinstance(sig, str) or not hmac.compare_digest(sig, signature(_record_bytes(record), signing_key())):
        raise UserError(f"refusing to {purpose} {run_dir}: {name} is not a file tltune wrote (its first line's signature is missing or "
                        "does not match); the run directory may have been tampered with — start a new run instead")  # fmt: skip
    return True

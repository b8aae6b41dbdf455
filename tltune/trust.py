"""The trust boundary of ``--resume``: Ray's state is unpickled only if tltune signed it.

Resuming a Tune experiment unpickles files of its directory (``tuner.pkl``, the trials
hex-pickled inside ``experiment_state-*.json``, the searcher's ``*.pkl``): a planted file
would run code. So every such file is signed when it is written, with an HMAC key that
never leaves this machine's user account (``$TLTUNE_KEY_FILE``, else
``~/.config/tltune/run-signing.key``), and a resume first checks each file against the
signatures. An attacker who can write the run directory can add files and signatures, but
cannot make a signature valid without the key.

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
    if not path.exists():
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
    key = path.read_text().strip()
    if len(key) < 32:
        raise UserError(f"the signing key {path} is damaged: delete it (runs signed with it can no longer be resumed)")
    return key.encode()


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


def signed_state_files(exp_dir: str) -> list[str]:
    """The pickled state files of ``exp_dir``, each checked against tltune's signatures.

    Raises :class:`UserError` naming the first file this user's tltune did not write. Nothing
    is checked (``[]``) when there is no saved state to resume."""
    names = [n for n in storage.list_dir(exp_dir) if is_pickled_state(n)]
    if not has_saved_state(names):  # nothing will be unpickled: the experiment starts anew
        return []
    key_path = key_file()
    if not key_path.exists():
        raise UserError(
            f"refusing to resume {exp_dir}: it was not created by tltune under this account (no signing key at {key_path}); "
            f"--resume only continues your own runs (the key of the account that made it: ${KEY_ENV})"
        )
    key = signing_key()
    known = set()
    try:
        for line in storage.read_text(storage.join(exp_dir, SIGNATURES_FILE)).splitlines():
            try:
                known.add(json.loads(line)["hmac"])
            except (ValueError, TypeError, KeyError):
                continue  # a line cut by a kill; the others still count
    except FileNotFoundError:
        pass
    for name in names:
        if signature(storage.read_bytes(storage.join(exp_dir, name)), key) not in known:
            raise UserError(
                f"refusing to resume {exp_dir}: {name} is not a file tltune wrote (its signature does not match); "
                "the run directory may have been tampered with — start a new run instead"
            )
    return names

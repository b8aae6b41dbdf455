"""Experiment trackers a sweep may also log to (``--log-to mlflow wandb``): what is checked
before Ray starts. The logging itself is :mod:`tltune.raytune.trackers`.

Light on purpose (no torch, no ray, the trackers' packages only imported where a local MLflow
store is opened): a missing extra, an unreachable tracking server or a W&B login that is not
there is one line and exit 2 within seconds, not an error from a callback minutes into a sweep.
Where the runs land is taken from the trackers' own environment variables
(``MLFLOW_TRACKING_URI``, ``WANDB_DIR``, ``WANDB_MODE``...), never from the run folder.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tltune.errors import UserError

REACH_TIMEOUT_S = 5.0  # an http(s) tracking server that does not answer within this is unreachable
WANDB_DEFAULT_HOST = "https://api.wandb.ai"
WANDB_DEFAULT_PROJECT = "tltune"
_LOCAL_MLFLOW_SCHEMES = ("", "file", "sqlite")  # stores opened here to check them; others are servers or databases


def check_trackers(log_to: tuple[str, ...] | None) -> None:
    """Each tracker's extra installed and its server reachable; a UserError otherwise."""
    for name in log_to or ():
        if importlib.util.find_spec(name) is None:
            raise UserError(f"--log-to {name} needs the {name} extra: pip install 'tltune[{name}]'")
    if "mlflow" in (log_to or ()):
        check_mlflow()
    if "wandb" in (log_to or ()):
        check_wandb()


def mlflow_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, a bare path made absolute (the callbacks are pickled with it
    and a resume may start elsewhere); unset: ``sqlite:///<cwd>/mlflow.db``, MLflow 3's own
    default, since its ``./mlruns`` file store is in maintenance mode and refuses to open
    unless ``MLFLOW_ALLOW_FILE_STORE=true``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if _scheme(uri) == "" and not uri.startswith("databricks"):  # "databricks", "databricks-uc": MLflow's names, no paths
        return Path(uri).expanduser().resolve().as_uri()
    return uri


def check_mlflow() -> None:
    """An http(s) server answers within a few seconds; a local store (file, sqlite) opens."""
    uri = mlflow_tracking_uri()
    if not os.environ.get("MLFLOW_TRACKING_URI", "").strip():
        print(f"--log-to mlflow: MLFLOW_TRACKING_URI is not set: the runs go to {uri}", flush=True)
    scheme = _scheme(uri)
    if scheme in ("http", "https"):
        problem = unreachable(uri.rstrip("/") + "/health")
        if problem:
            raise UserError(f"--log-to mlflow: the tracking server {uri} is not reachable ({problem}): start it or set MLFLOW_TRACKING_URI")
    elif scheme in _LOCAL_MLFLOW_SCHEMES and not uri.startswith("databricks"):
        open_mlflow_store(uri)


def open_mlflow_store(uri: str) -> None:
    """Open a local MLflow store once (a new sqlite database gets its tables here, before Ray)."""
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001  MLflow raises its own and the database driver's errors
        message = " ".join(str(exc).split())
        if "MLFLOW_ALLOW_FILE_STORE" in message:
            raise UserError(
                f"--log-to mlflow: this MLflow no longer opens file stores ({uri}): set MLFLOW_ALLOW_FILE_STORE=true, "
                "or MLFLOW_TRACKING_URI=sqlite:///<path>/mlflow.db"
            ) from None
        raise UserError(f"--log-to mlflow: cannot open the tracking store {uri}: {type(exc).__name__}: {message[:300]}") from None


def wandb_mode() -> str:
    """W&B's mode as its environment sets it: online, offline or disabled."""
    if os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes"):
        return "disabled"
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("offline", "dryrun") or os.environ.get("WANDB_OFFLINE", "").lower() in ("true", "1", "yes"):
        return "offline"
    return "disabled" if mode == "disabled" else "online"


def wandb_project() -> str:
    return os.environ.get("WANDB_PROJECT", "").strip() or WANDB_DEFAULT_PROJECT


def wandb_dir() -> Path:
    """Where W&B writes its run files: ``$WANDB_DIR/wandb``, else ``./wandb``."""
    return Path(os.environ.get("WANDB_DIR") or Path.cwd()).expanduser().resolve() / "wandb"


def check_wandb() -> None:
    """Online: an API key (``wandb login``'s netrc entry, or ``$WANDB_API_KEY``) and its
    server answering. Offline or disabled need neither."""
    mode = wandb_mode()
    if mode == "online":
        host = os.environ.get("WANDB_BASE_URL", "").strip() or WANDB_DEFAULT_HOST
        if not has_wandb_key(host):
            raise UserError(f"--log-to wandb: no W&B API key for {host}: run `wandb login` (or set WANDB_API_KEY), or log offline with WANDB_MODE=offline")
        problem = unreachable(host)
        if problem:
            raise UserError(f"--log-to wandb: the W&B server {host} is not reachable ({problem}): set WANDB_MODE=offline to log locally")
    if mode != "disabled" and not os.environ.get("WANDB_DIR"):
        print(f"--log-to wandb: WANDB_DIR is not set: its run files go to {wandb_dir()}", flush=True)


def has_wandb_key(host: str) -> bool:
    """Whether W&B would find credentials for ``host`` without asking: the environment, or
    the netrc entry `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY", "").strip() or os.environ.get("WANDB_IDENTITY_TOKEN_FILE", "").strip():
        return True
    machine = urllib.parse.urlsplit(host).hostname or host
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc").expanduser()
    try:
        entry = netrc.netrc(str(path)).authenticators(machine)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def unreachable(url: str, timeout_s: float = REACH_TIMEOUT_S) -> str | None:
    """Why ``url`` got no HTTP answer within ``timeout_s`` (any status counts as an answer,
    a 401 or 404 too), or ``None``."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout_s):
            return None
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as exc:
        return str(exc.reason)
    except (OSError, ValueError) as exc:  # a timeout, a reset connection, a malformed URL
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _scheme(uri: str) -> str:
    """A URI's scheme, ``""`` for a plain path (a Windows drive letter is a path too)."""
    scheme = urllib.parse.urlsplit(uri).scheme
    return "" if len(scheme) <= 1 else scheme.lower()

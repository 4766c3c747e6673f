"""The Hugging Face Hub: fetch a saved folder by repo id (through the Hub's cache) and upload one.

``huggingface_hub`` is imported only when a repo id is resolved or a folder is pushed (``pip install
"chase-dst[hub]"``), so ``import chase`` stays light. Its errors are translated into ones that say what
went wrong for a chase model and what to do about it; the original error stays attached as the cause.
"""

from __future__ import annotations

import importlib
import logging
import os
import pathlib
import re
from collections.abc import Sequence
from typing import Any, Optional, Union

__all__ = ["HUB_EXTRA", "download", "is_offline", "looks_like_repo_id", "require_online", "upload"]

log = logging.getLogger(__name__)

HUB_EXTRA = 'pip install "chase-dst[hub]"'
# The Hub's repo ids: an optional namespace, then a name; letters, digits, "-", "_" and "."; at most 96
# characters each; no "--" or ".." (huggingface_hub.utils.validate_repo_id, without importing it).
_PART = r"[A-Za-z0-9_.-]{1,96}"
_REPO_ID = re.compile(rf"(?:{_PART}/)?{_PART}\Z")


def looks_like_repo_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hub repo id (``"user/repo"`` or ``"repo"``)."""
    return (
        bool(_REPO_ID.match(name))
        and "--" not in name
        and ".." not in name
        and not any(p.startswith((".", "-")) or p.endswith((".", "-")) for p in name.split("/"))
    )


def _hub(module: str = "") -> Any:
    """``huggingface_hub`` or one of its submodules (``errors``, ``constants``: its package loads them
    lazily, so they are imported by name)."""
    try:
        return importlib.import_module("huggingface_hub" + (f".{module}" if module else ""))
    except ImportError as e:
        raise ImportError(f"the Hugging Face Hub needs huggingface_hub: {HUB_EXTRA}") from e


def is_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids the Hub (as huggingface_hub read it when it was imported)."""
    return bool(_hub("constants").HF_HUB_OFFLINE)


def require_online() -> None:
    """Raise ``ConnectionError`` when ``HF_HUB_OFFLINE`` forbids the Hub (before any work is done)."""
    if is_offline():
        raise ConnectionError(
            "HF_HUB_OFFLINE=1 forbids uploading: unset it (or set it to 0) to push to the Hugging Face Hub"
        )


def _version() -> str:
    from chase import __version__  # the package root: read when called, so no import cycle

    return __version__


def download(
    repo_id: str,
    files: Sequence[str],
    *,
    revision: Optional[str] = None,
    token: Union[str, bool, None] = None,
    cache_dir: Union[str, os.PathLike, None] = None,
) -> pathlib.Path:
    """The local folder holding ``files`` of the Hub model ``repo_id`` at ``revision`` (a branch, tag or
    commit hash; the default branch when None), downloaded into the Hub's cache (``HF_HUB_CACHE``,
    ``HF_HOME``; ``cache_dir`` overrides) unless already there. With ``HF_HUB_OFFLINE=1`` only the cache
    is read.

    Raises:
        FileNotFoundError: the repo or revision does not exist (or is private), or the files are not cached
            and the Hub cannot be reached (offline mode or no network); the message says which and how to
            fix it.
        PermissionError: the repo is gated and the token (if any) has no access.
    """
    hub, errors = _hub(), _hub("errors")
    at = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        path = hub.snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=list(files),
            token=token,
            cache_dir=cache_dir,
            library_name="chase",
            library_version=_version(),
        )
    except errors.GatedRepoError as e:  # a subclass of RepositoryNotFoundError: handled first
        raise PermissionError(
            f"{at} is a gated repo on the Hugging Face Hub: accept its conditions on "
            f"https://huggingface.co/{repo_id} and log in (`hf auth login`) or pass token="
        ) from e
    except errors.RepositoryNotFoundError as e:
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local folder nor a model repo on the Hugging Face Hub (if it is "
            "private, log in with `hf auth login` or pass token=; if it is a folder, check the path)"
        ) from e
    except errors.RevisionNotFoundError as e:
        raise FileNotFoundError(
            f"the Hub repo {repo_id!r} has no revision {revision!r} (give a branch, tag or commit hash)"
        ) from e
    except errors.LocalEntryNotFoundError as e:  # not (fully) cached, and the Hub not reachable
        cache = cache_dir or _hub("constants").HF_HUB_CACHE
        if is_offline() or isinstance(e.__cause__, errors.OfflineModeIsEnabled):
            raise FileNotFoundError(
                f"{at} is not a local folder and not in the Hugging Face cache ({cache}), and "
                "HF_HUB_OFFLINE=1 forbids downloading it: run once with network access and HF_HUB_OFFLINE "
                "unset (or 0) to fill the cache, point HF_HUB_CACHE/HF_HOME at a cache that holds it, or "
                "give the folder save_pretrained wrote"
            ) from e
        raise FileNotFoundError(
            f"{at} could not be fetched from the Hugging Face Hub and is not in the cache ({cache}): "
            f"check the network connection (HF_ENDPOINT if you use a mirror) and try again ({e})"
        ) from e
    except errors.HfHubHTTPError as e:  # e.g. 401: a private repo without a valid token
        raise FileNotFoundError(
            f"the Hugging Face Hub refused {at} ({e}); for a private repo log in (`hf auth login`) or pass "
            "token="
        ) from e
    log.info("%s resolved to %s", at, path)
    return pathlib.Path(path)


def upload(
    folder: Union[str, os.PathLike],
    repo_id: str,
    files: Sequence[str],
    *,
    revision: Optional[str] = None,
    private: Optional[bool] = None,
    token: Union[str, bool, None] = None,
    commit_message: str,
) -> str:
    """Create the model repo ``repo_id`` if needed (and the branch ``revision``), then upload ``files`` of
    ``folder`` in one commit. Returns the commit's URL (huggingface_hub's ``CommitInfo``, a ``str``)."""
    hub = _hub()
    require_online()
    api = hub.HfApi(token=token, library_name="chase", library_version=_version())
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    log.info("pushing %s to %s", folder, url)
    if revision is not None:  # upload_folder commits to an existing branch only
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        revision=revision,
        commit_message=commit_message,
        allow_patterns=list(files),
    )

"""Hugging Face Hub access for bundles and the LVM recipe: one file or a snapshot through the local cache, every
failure as one line that says what was wrong and what to do (a `BundleError`)."""
from __future__ import annotations

import re
from pathlib import Path

from .errors import BundleError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def hub_error(repo: str, revision: str, error: Exception) -> BundleError:
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    from huggingface_hub import constants

    revision = revision or "main"
    where = f"{repo}@{revision}"
    if isinstance(error, LocalEntryNotFoundError):
        why = "downloads are off (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        missing = re.search(r"(\d+ file\(s\) are missing \([^)]*\))", str(error))
        what = f"the cached copy is incomplete: {missing.group(1)}" if missing else "it is not in the local Hub cache"
        return BundleError(f"{where}: {what}, and {why}; download it where there is internet "
                           f"(hf download {repo} --revision {revision}) or allow downloads")
    if isinstance(error, GatedRepoError):
        return BundleError(f"{where}: the repo is gated; accept its terms on huggingface.co and log in (hf auth login)")
    if isinstance(error, RepositoryNotFoundError):
        return BundleError(f"{where}: no such model repo on the Hub (or it is private)")
    if isinstance(error, RevisionNotFoundError):
        return BundleError(f"{where}: revision {revision!r} does not exist in {repo}")
    if isinstance(error, EntryNotFoundError):
        return BundleError(f"{where}: a required file is missing from the repo ({str(error).splitlines()[0][:160]})")
    return BundleError(f"{where}: could not download from the Hub ({type(error).__name__}: {str(error).splitlines()[0][:160]})")


def hub_file(repo: str, filename: str, revision: str) -> Path:
    """One file of a Hub repo through the cache (`hf_hub_download`), errors as one-line BundleErrors."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except Exception as error:
        raise hub_error(repo, revision, error) from error


def hub_snapshot(repo: str, revision: str | None, allow_patterns: list[str] | None = None) -> Path:
    """The files of a Hub repo matching `allow_patterns` (`snapshot_download`), errors as BundleErrors."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=allow_patterns))
    except Exception as error:
        raise hub_error(repo, revision, error) from error

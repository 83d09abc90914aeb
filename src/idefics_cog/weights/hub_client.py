"""One fetch from the Hugging Face hub: the repo, where huggingface_hub caches it under `<cache>/hub`, and how to
reach the hub, read from the environment at every call (HF_ENDPOINT, HF_HUB_OFFLINE, HF_HUB_ETAG_TIMEOUT); its
errors as WeightsError messages that name the repo and the problem. hub.py says what it adds to snapshot_download."""

import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import tqdm as hf_tqdm

from idefics_cog.weights.base import ADAPTER_PICKLE, PICKLE_SUFFIXES, UnreachableError, WeightsError, env_flag

log = logging.getLogger("idefics_cog.weights.hub")


class TerminalOnlyBar(hf_tqdm):
    """snapshot_download's bars, shown on a terminal only (tqdm's `disable=None`), as its byte bars already are: its
    "Fetching N files" bar printed two lines into the server log at every start, even with everything cached.
    Off a terminal the "... fetched" line below says what was downloaded."""

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True if kwargs.get("disable") else None
        super().__init__(*args, **kwargs)


ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]
IGNORE_PATTERNS = [f"*{suffix}" for suffix in PICKLE_SUFFIXES]  # redundant with ALLOW_PATTERNS, on purpose
ADAPTER_ALLOW_PATTERNS = ALLOW_PATTERNS + [ADAPTER_PICKLE]
ADAPTER_IGNORE_PATTERNS = [pattern for pattern in IGNORE_PATTERNS if pattern != "*.bin"]
DEFAULT_TIMEOUT = 10.0
COMMIT = re.compile(r"^[0-9a-f]{40}$")


class Hub:
    """One fetch: the repo, where it is cached, and how to reach the hub (read from the environment now)."""

    def __init__(self, repo_id: str, revision: str | None, cache_dir: Path, timeout: float | None):
        self.repo_id, self.revision = repo_id, revision
        self.with_pickle = False  # also fetch (and verify) an adapter's adapter_model.bin
        self.token = None  # None: HF_TOKEN from the environment; False for a request's repo
        self.listing: tuple[str, dict] | None = None  # (commit, {path: RepoSibling}): the hub's sizes and checksums
        self.label = f"{repo_id}@{revision or constants.DEFAULT_REVISION}"
        self.cache_dir = cache_dir / "hub"
        self.storage = self.cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")
        self.verified_dir = cache_dir / "hub-verified" / self.storage.name
        self.endpoint = (os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
        self.shown_endpoint = self.endpoint or constants.ENDPOINT
        if timeout is None:
            timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or DEFAULT_TIMEOUT)
        self.timeout = timeout
        # huggingface_hub read HF_HUB_OFFLINE at import; it still blocks every request when it was set then.
        self.offline = env_flag("HF_HUB_OFFLINE") or env_flag("TRANSFORMERS_OFFLINE") or constants.is_offline_mode()
        self.online = not self.offline

    def download(self, revision: str | None, local_files_only: bool = False) -> Path:
        return Path(
            snapshot_download(
                self.repo_id,
                revision=revision,
                cache_dir=self.cache_dir,
                allow_patterns=ADAPTER_ALLOW_PATTERNS if self.with_pickle else ALLOW_PATTERNS,
                ignore_patterns=ADAPTER_IGNORE_PATTERNS if self.with_pickle else IGNORE_PATTERNS,
                local_files_only=local_files_only or self.offline,
                endpoint=self.endpoint,
                etag_timeout=self.timeout,
                tqdm_class=TerminalOnlyBar,
                token=self.token,
            )
        )

    def snapshot(self) -> Path:
        if self.offline:
            return self.cached(reason="HF_HUB_OFFLINE is set")
        # A commit sha that an earlier fetch completed and verified (its marker exists) is taken from the cache with
        # local_files_only=True: no request at all. On a warm cache snapshot_download makes none either for a full
        # sha (it skips repo_info, reads the tree listing it cached under trees/, and returns each file whose
        # snapshot link exists), so this is not about saving requests but about not depending on the hub: our own
        # probe below would otherwise cost one request, and a cold, unreachable hub makes snapshot_download retry
        # its tree listing for ~23 s. A snapshot that turns out incomplete is fetched online as usual.
        # A branch or tag is always resolved online (repo-info requests, no file download), since it may have
        # moved; the cache is the fallback when the hub cannot be used.
        if self.revision and COMMIT.match(self.revision) and self.marker_path(self.revision).exists():
            try:
                return self.download(self.revision, local_files_only=True)
            except LocalEntryNotFoundError:
                pass  # incomplete or gone: fetch what is missing
        try:
            info = HfApi(endpoint=self.endpoint, token=self.token).repo_info(
                self.repo_id, revision=self.revision, timeout=self.timeout, files_metadata=True
            )
            self.listing = (info.sha, {sibling.rfilename: sibling for sibling in info.siblings or []})
        except RevisionNotFoundError:
            raise  # the hub answered: no such revision
        except (httpx2.TransportError, OfflineModeIsEnabled, HfHubHTTPError) as exc:
            # Unreachable, timed out, down, or the repo is not found (or private): use the cache when it has the
            # snapshot (as snapshot_download itself does for these errors), else say why it could not be fetched.
            self.online = False
            reason = describe(exc, self, timeout=self.timeout)
            snapshot = self.cached(reason=reason, cause=exc)
            log.warning("%s: %s; using the cached snapshot %s", self.label, reason, snapshot.name)
            return snapshot
        return self.download(self.revision)

    def cached(self, reason: str, cause: Exception | None = None) -> Path:
        try:
            return self.download(self.revision, local_files_only=True)
        except LocalEntryNotFoundError as exc:
            incomplete = "incomplete" if isinstance(exc, IncompleteSnapshotError) else "not"
            raise UnreachableError(
                f"Hugging Face repo {self.label} is {incomplete} in the cache ({self.cache_dir}) and cannot be "
                f"downloaded: {reason}"
            ) from (cause or exc)

    def marker_path(self, commit: str) -> Path:
        return self.verified_dir / f"{commit}.json"

    @contextmanager
    def errors(self):
        """Turn huggingface_hub and network errors into a WeightsError naming the repo and the problem."""
        try:
            yield
        except WeightsError:
            raise
        except (HfHubHTTPError, httpx2.HTTPError, OSError) as exc:
            raise WeightsError(f"Hugging Face repo {self.label}: {describe(exc, self)}") from exc


def describe(exc: Exception, hub: Hub, timeout: float | None = None) -> str:
    if isinstance(exc, RevisionNotFoundError):
        return f"revision {hub.revision!r} not found in {hub.repo_id} on {hub.shown_endpoint}"
    if isinstance(exc, GatedRepoError):
        return f"the repo is gated on {hub.shown_endpoint}: accept its terms and set HF_TOKEN"
    status = getattr(getattr(exc, "response", None), "status_code", "error")
    if isinstance(exc, RepositoryNotFoundError):
        return f"repo not found on {hub.shown_endpoint} (HTTP {status}); check the id, or set HF_TOKEN if it is private"
    if isinstance(exc, RemoteEntryNotFoundError):
        return f"a file listed in the repo is missing on {hub.shown_endpoint} ({exc.response.url})"
    if isinstance(exc, HfHubHTTPError):
        return f"the hub at {hub.shown_endpoint} answered HTTP {status} ({(str(exc).strip().splitlines() or [''])[0]})"
    if isinstance(exc, httpx2.TimeoutException):
        within = f"within {timeout:g} s" if timeout is not None else "in time"
        return f"the hub at {hub.shown_endpoint} did not answer {within} ({type(exc).__name__})"
    if isinstance(exc, httpx2.TransportError):
        return f"the hub at {hub.shown_endpoint} could not be reached ({type(exc).__name__}: {exc})"
    if isinstance(exc, OfflineModeIsEnabled):
        return "offline mode is enabled (HF_HUB_OFFLINE)"
    if isinstance(exc, LocalEntryNotFoundError):
        return f"not (completely) in the cache {hub.cache_dir} and the hub cannot be used ({exc})"
    return f"{type(exc).__name__}: {exc}"

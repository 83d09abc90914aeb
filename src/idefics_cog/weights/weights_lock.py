"""Cog's managed weights: the set `cog push` shipped as image layers, mounted at its `target`, is used when every file
matches weights.lock (present, its size, its sha256, no unlisted weight file); else the setting is downloaded."""

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from idefics_cog.errors import WeightsError
from idefics_cog.weights.hub import CheckedFiles, digest
from idefics_cog.weights.source import HUB_ID, PICKLE_SUFFIXES

log = logging.getLogger(__name__)

LOCK_VERSION = 1  # lockfile.Version in replicate/cog
HF = "hf://"
WEIGHT_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
HASH_THREADS = 4  # shards hash in parallel (hashlib releases the GIL), bounded by the disk anyway


@dataclass(frozen=True)
class LockedFile:
    path: str
    size: int
    digest: str  # "sha256:<hex>"


@dataclass(frozen=True)
class LockedWeight:
    name: str
    target: Path
    uri: str  # the only source's uri: hf://owner/name[@ref], or another scheme
    commit: str  # of its fingerprint "commit:<sha>", for hf://
    set_digest: str
    files: tuple[LockedFile, ...]


def set_digest(files) -> str:
    """The weight set digest of cog's lock (weightsource.DirHash): sha256 of the sorted "<hex>  <path>" lines."""
    lines = sorted(f"{file.digest.partition(':')[2]}  {file.path}" for file in files)
    return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()


class WeightsLock:
    """The weights of a weights.lock (none when the file does not exist), and which setting may use which."""

    def __init__(self, path: Path, weights: list[LockedWeight], weights_dir: Path):
        self.path, self.weights, self.weights_dir = Path(path), weights, Path(weights_dir)
        self.refused: dict[str, str] = {}  # setting variable -> why its mounted target was not used

    @classmethod
    def read(cls, path: Path, weights_dir: Path) -> "WeightsLock":
        """Raises WeightsError naming the file when it exists but is not a version-1 weights.lock."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            return cls(path, [], weights_dir)
        except (OSError, ValueError) as exc:
            raise WeightsError(f"{path}: not a readable weights.lock ({exc})") from exc
        if not isinstance(data, dict) or data.get("version") != LOCK_VERSION:
            found = data.get("version") if isinstance(data, dict) else type(data).__name__
            raise WeightsError(f"{path}: unsupported weights.lock version {found!r} (this project reads version "
                               f"{LOCK_VERSION}, as written by `cog weights import`)")
        try:
            return cls(path, [_entry(entry) for entry in data.get("weights") or []], weights_dir)
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError(f"{path}: malformed weights.lock entry ({type(exc).__name__}: {exc})") from exc

    def source_for(self, variable: str, setting: str) -> str:
        """The mounted target when it serves `setting` and matches the lock; else `setting` itself."""
        weight = self.find(setting)
        if weight is None:
            return setting
        if not weight.target.is_dir():
            log.info("%s: %s is in %s, but its target %s is not mounted here; resolving %s=%s as usual",
                     weight.name, weight.uri, self.path.name, weight.target, variable, setting)
            return setting
        problem = check_against_lock(weight, self.weights_dir)
        if problem:
            self.refused[variable] = f"the mounted {weight.target} does not match {self.path.name}: {problem}"
            log.warning("%s=%s: %s; not loading it, resolving the setting as without a lock", variable, setting,
                        self.refused[variable])
            return setting
        log.info("%s=%s: using the managed weights %r mounted at %s (commit %s, matching %s)", variable, setting,
                 weight.name, weight.target, weight.commit, self.path.name)
        return str(weight.target)

    def find(self, setting: str) -> LockedWeight | None:
        """The entry serving a hub id `owner/name[@revision]`: same repo, and the revision (if any) is the lock's
        commit or the ref its uri names. A pinned other revision is logged and gets None (it is downloaded)."""
        if not HUB_ID.match(setting) or Path(setting).expanduser().exists():
            return None  # a local directory or a URL: used as it is
        repo, _, revision = setting.partition("@")
        for weight in self.weights:
            locked_repo, _, ref = weight.uri.removeprefix(HF).partition("@")
            if not weight.uri.startswith(HF) or locked_repo != repo:
                continue
            if revision and revision not in (weight.commit, ref or "main"):
                log.info("%s pins revision %s; %s has %s at commit %s: not using its target", setting, revision,
                         self.path.name, weight.uri, weight.commit)
                return None
            return weight
        return None


def _entry(entry: dict) -> LockedWeight:
    sources = entry["sources"]
    files = tuple(LockedFile(str(f["path"]), int(f["size"]), str(f["digest"])) for f in entry["files"])
    for file in files:
        parts = PurePosixPath(file.path).parts
        if PurePosixPath(file.path).is_absolute() or ".." in parts or not parts:
            raise ValueError(f"weight {entry['name']!r}: file path {file.path!r} leaves its target")
        if not file.digest.startswith("sha256:"):
            raise ValueError(f"weight {entry['name']!r}: {file.path} has digest {file.digest!r}, not sha256:<hex>")
    only = sources[0] if len(sources) == 1 else {}  # a multi-source weight never stands for one hub repo
    return LockedWeight(name=str(entry["name"]), target=Path(entry["target"]), uri=str(only.get("uri", "")),
                        commit=str(only.get("fingerprint", "")).removeprefix("commit:"),
                        set_digest=str(entry.get("setDigest", "")),
                        files=files)


def check_against_lock(weight: LockedWeight, weights_dir: Path) -> str | None:
    """The first problem found (None: every file matches): presence and sizes first, then the sha256 of each file the
    record does not vouch for."""
    if weight.set_digest != set_digest(weight.files):
        return f"its setDigest {weight.set_digest} is not that of the files it lists ({set_digest(weight.files)})"
    listed = {file.path for file in weight.files}
    for path in sorted(weight.target.rglob("*")):
        rel = path.relative_to(weight.target).as_posix()
        if path.is_file() and rel not in listed and rel.endswith(WEIGHT_SUFFIXES):
            return f"{rel} is a weight file the lock does not list"
    states = {}
    for file in weight.files:
        try:
            states[file.path] = os.stat(weight.target / file.path)
        except OSError:
            return f"{file.path} is missing"
        if states[file.path].st_size != file.size:
            return f"{file.path} is {states[file.path].st_size} bytes, the lock says {file.size}"
    record = CheckedFiles(weights_dir / "managed-verified" / f"{weight.name}.json", setDigest=weight.set_digest,
                          target=str(weight.target))
    todo = [file for file in weight.files if not record.vouches(file.path, file.digest, states[file.path])]
    started = time.monotonic()
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        digests = list(pool.map(lambda file: "sha256:" + digest(weight.target / file.path), todo))
    problem = None
    for file, actual in zip(todo, digests):
        if actual == file.digest:
            record.add(file.path, file.digest, states[file.path])
        elif problem is None:
            problem = f"{file.path} has sha256 {actual}, the lock says {file.digest}"
    if todo:
        log.info("%s: hashed %d files (%d bytes) in %.1f s", weight.name, len(todo), sum(f.size for f in todo),
                 time.monotonic() - started)
    record.save()
    return problem

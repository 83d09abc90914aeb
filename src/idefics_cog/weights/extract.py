"""Safe extraction of a tar (any compression) or zip: no member outside the target, no links or devices, a cap on
the bytes it expands to. Used for weights archives and for training data."""

import re
import shutil
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Optional

from idefics_cog.weights.base import WeightsError


def extract_archive(archive: Path, dest: Path, label: str, zip_name: bool = False,
                    max_bytes: Optional[int] = None) -> None:
    """Extract a tar (any compression) or zip into `dest`, refusing members that could land outside it, and
    (`max_bytes`) an archive whose members add up to more than that (a small .tar.gz can expand enormously).
    `label` names the archive in errors (its URL, or the input it came from)."""
    if zip_name or not tarfile.is_tarfile(archive):
        _extract_zip(label, archive, dest, max_bytes)
    else:
        _extract_tar(label, archive, dest, max_bytes)


def _extract_tar(url: str, archive: Path, dest: Path, max_bytes: Optional[int] = None) -> None:
    with tarfile.open(archive, "r:*") as tar:
        # Members are checked as they are read: one pass, even over a .tar.gz.
        tar.extractall(dest, members=_checked_members(url, tar, max_bytes), filter="data")


def _check_total(url: str, total: int, max_bytes: Optional[int]) -> None:
    if max_bytes is not None and total > max_bytes:
        raise WeightsError(f"{url}: the archive's members add up to more than the limit of {max_bytes} bytes; "
                           f"not extracted")


def _checked_members(url: str, tar: tarfile.TarFile, max_bytes: Optional[int] = None):
    total = 0
    for member in tar:
        total += member.size
        _check_total(url, total, max_bytes)  # before the member is written
        kind = "a symlink" if member.issym() else "a hard link" if member.islnk() else None
        kind = kind or ("a device or fifo" if member.isdev() else None)
        if kind:
            raise WeightsError(f"{url}: archive member {member.name!r} is {kind}; refusing to extract it")
        _check_name(url, member.name)
        yield member


def _extract_zip(url: str, archive: Path, dest: Path, max_bytes: Optional[int] = None) -> None:
    try:
        with zipfile.ZipFile(archive) as zip_file:
            for name in zip_file.namelist():
                _check_name(url, name)
            # file_size is what the zip says; zipfile refuses a member whose data inflates past it.
            _check_total(url, sum(info.file_size for info in zip_file.infolist()), max_bytes)
            zip_file.extractall(dest)
    except zipfile.BadZipFile:
        raise WeightsError(f"{url}: not a .tar, .tar.gz or .zip archive") from None


def _check_name(url: str, name: str) -> None:
    """Refuse a member that would land outside the target: absolute, `..`, or a Windows drive."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or re.match(r"^[A-Za-z]:", name):
        raise WeightsError(f"{url}: archive member {name!r} points outside the archive; refusing to extract it")


def root(extracted: Path) -> str:
    """The single top-level directory of an archive made with `tar czf x.tgz mymodel/`, else `.`."""
    children = list(extracted.iterdir())
    return children[0].name if len(children) == 1 and children[0].is_dir() else "."


def move_into_place(staging: Path, final: Path) -> None:
    if final.exists():  # a stale entry (the URL now expects another sha256): set it aside first
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(final)

"""Safe extraction of a tar (any compression) or zip: no member outside the target, no links, devices or sparse files,
a cap on the bytes it expands to, and caps on what tarfile would hold in memory, checked before it reads them."""

import gzip
import re
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from idefics_cog.errors import WeightsError, shorten

MAX_MEMBERS = 100_000
MAX_HEADER_BYTES = 64 << 10  # one pax or GNU long-name header's body: a real one holds a path, a few kB at most
MAX_HEADERS_BYTES = 64 << 20  # all of them in one archive: the names they give members are kept until it is closed
MAX_HEADERS_IN_A_ROW = 8  # tarfile reads a run recursively; a real member has two at most (pax, or name and link)
MAX_GLOBAL_RECORDS = 64  # records of global pax headers, applied to every member (`git archive` writes one)
SHOWN_NAME = 100  # characters of a member's name an error quotes

# Headers whose body tarfile reads whole before the member they describe.
EXTENDED_HEADERS = {tarfile.XHDTYPE: "pax extended", tarfile.SOLARIS_XHDTYPE: "pax extended",
                    tarfile.XGLTYPE: "pax global", tarfile.GNUTYPE_LONGNAME: "GNU long name",
                    tarfile.GNUTYPE_LONGLINK: "GNU long link"}


def extract_archive(archive: Path, dest: Path, label: str, zip_name: bool = False,
                    max_bytes: int | None = None) -> None:
    """`max_bytes` caps what the members add up to (a small .tar.gz can expand enormously); `label` names the archive
    in errors."""
    try:
        if zip_name or not _is_tar(archive):
            _extract_zip(label, archive, dest, max_bytes)
        else:
            _extract_tar(label, archive, dest, max_bytes)
    except _Refused as exc:
        raise WeightsError(f"{label}: {exc}") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:  # damaged; may quote a member's name
        raise WeightsError(f"{label}: the archive cannot be extracted ({shorten(exc, 300)})") from None


class _Refused(Exception):
    """A refusal while tarfile reads a header (tarfile passes on exceptions other than its own unchanged)."""


class _TarInfo(tarfile.TarInfo):
    """A member's header as tarfile reads it, refused before tarfile reads what it would hold in memory."""

    def _proc_member(self, tar):
        kind = EXTENDED_HEADERS.get(self.type)
        if kind:
            tar.headers_bytes += self.size
            tar.in_a_row += 1
            if self.size > MAX_HEADER_BYTES:
                raise _Refused(f"the archive has a {kind} header of {self.size} bytes; the limit is "
                               f"{MAX_HEADER_BYTES} bytes; not extracted")
            if tar.headers_bytes > MAX_HEADERS_BYTES:
                raise _Refused(f"the archive's pax and GNU long-name headers add up to more than "
                               f"{MAX_HEADERS_BYTES} bytes; not extracted")
            if tar.in_a_row > MAX_HEADERS_IN_A_ROW:
                raise _Refused(f"the archive has more than {MAX_HEADERS_IN_A_ROW} pax or GNU long-name headers "
                               f"in a row; not extracted")
        else:
            tar.in_a_row = 0
        if len(tar.pax_headers) > MAX_GLOBAL_RECORDS:
            raise _Refused(f"the archive's global pax headers hold more than {MAX_GLOBAL_RECORDS} records; "
                           f"not extracted")
        member = super()._proc_member(tar)
        member.pax_headers = {}  # not needed to extract; kept, a global header's records would be in every member
        return member

    def _proc_sparse(self, tar):  # GNU sparse (type S): extra headers tarfile reads in a loop; never in weights
        raise _Refused(f"archive member {_shown(self.name)} is a sparse file; refusing to extract it")

    def _proc_gnusparse_00(self, member, *details):  # pax GNU.sparse.* records, in any of their versions
        raise _Refused(f"archive member {_shown(member.name)} is a sparse file; refusing to extract it")

    _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_gnusparse_00


class _TarFile(tarfile.TarFile):
    tarinfo = _TarInfo
    headers_bytes = 0  # the pax and GNU long-name header bodies read so far
    in_a_row = 0  # such headers read since the last member's own header


def _is_tar(archive: Path) -> bool:
    """tarfile.is_tarfile, through _TarFile: opening reads the first member, whose header may be hostile."""
    try:
        _TarFile.open(archive, "r:*").close()
    except tarfile.TarError:
        return False
    return True


def _extract_tar(url: str, archive: Path, dest: Path, max_bytes: int | None = None) -> None:
    with _TarFile.open(archive, "r:*") as tar:
        # Members are checked as they are read: one pass, even over a .tar.gz.
        tar.extractall(dest, members=_checked_members(url, tar, max_bytes), filter="data")


def _check_total(url: str, total: int, max_bytes: int | None) -> None:
    if max_bytes is not None and total > max_bytes:
        raise WeightsError(f"{url}: the archive's members add up to more than the limit of {max_bytes} bytes; "
                           f"not extracted")


def _check_count(url: str, count: int) -> None:
    if count > MAX_MEMBERS:
        raise WeightsError(f"{url}: the archive has more than {MAX_MEMBERS} members; not extracted")


def _checked_members(url: str, tar: tarfile.TarFile, max_bytes: int | None = None):
    total = 0
    for count, member in enumerate(tar, start=1):
        _check_count(url, count)  # tarfile keeps every member read: millions of empty headers would fill memory
        total += member.size
        _check_total(url, total, max_bytes)  # before the member is written
        kind = "a symlink" if member.issym() else "a hard link" if member.islnk() else None
        kind = kind or ("a device or fifo" if member.isdev() else None)
        if kind:
            raise WeightsError(f"{url}: archive member {_shown(member.name)} is {kind}; refusing to extract it")
        _check_name(url, member.name)
        yield member


def _extract_zip(url: str, archive: Path, dest: Path, max_bytes: int | None = None) -> None:
    try:
        _check_zip_directory(url, archive)
        with zipfile.ZipFile(archive) as zip_file:
            _check_count(url, len(zip_file.infolist()))  # the end record may understate it
            for name in zip_file.namelist():
                _check_name(url, name)
            # file_size is what the zip says; zipfile refuses a member whose data inflates past it.
            _check_total(url, sum(info.file_size for info in zip_file.infolist()), max_bytes)
            zip_file.extractall(dest)
    except zipfile.BadZipFile:
        raise WeightsError(f"{url}: not a .tar, .tar.gz or .zip archive") from None


def _check_zip_directory(url: str, archive: Path) -> None:
    """Refuse a zip whose central directory, as its end record declares it, lists more than MAX_MEMBERS members or
    is larger than they would need, before zipfile reads it whole (an object of some 500 bytes per member)."""
    with open(archive, "rb") as file:
        end = zipfile._EndRecData(file)  # zipfile's own reading of the end record (None: not a zip)
    if end is None:
        return
    _check_count(url, end[zipfile._ECD_ENTRIES_TOTAL])
    if end[zipfile._ECD_SIZE] > MAX_MEMBERS * 1024:  # an entry is 46 bytes, the member's name and extra fields
        raise WeightsError(f"{url}: the archive's list of members is {end[zipfile._ECD_SIZE]} bytes, more than "
                           f"{MAX_MEMBERS} members need; not extracted")


def _check_name(url: str, name: str) -> None:  # absolute, `..`, or a Windows drive
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or re.match(r"^[A-Za-z]:", name):
        raise WeightsError(f"{url}: archive member {_shown(name)} points outside the archive; refusing to extract it")


def _shown(name: str) -> str:  # shortened: a GNU long name can be megabytes
    return repr(shorten(name, SHOWN_NAME))


"""Hostile archives (weights/safe_extract.py): headers that would make tarfile read or keep megabytes, too many members,
sparse files and names megabytes long, built here byte by byte where tarfile would not write them; and the archives
people do send (pax and GNU long names, a global header as `git archive` writes, .tar.gz, .zip) still extract."""

import gzip
import io
import re
import tarfile
import tracemalloc
import zipfile

import pytest

from idefics_cog.errors import shorten
from idefics_cog.weights import safe_extract
from idefics_cog.errors import WeightsError
from idefics_cog.weights.safe_extract import extract_archive

GiB = 1 << 30


def header(name: bytes, size: int, kind: bytes) -> bytes:
    """A ustar header block: `size` in octal as declared (true or not), the checksum computed as the spec says
    (the sum of the block's bytes, the checksum field counted as eight spaces)."""
    block = bytearray(512)
    block[0:len(name)] = name
    block[100:108] = b"0000644\0"
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"00000000000\0"
    block[148:156] = b" " * 8
    block[156:157] = kind
    block[257:265] = b"ustar\x0000"
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def pax_records(**records: str) -> bytes:
    """A pax header's body: `<length> <keyword>=<value>\\n`, the length counting itself."""
    body = b""
    for keyword, value in records.items():
        record = f" {keyword}={value}\n".encode()
        length = len(record) + 1
        while length != len(record) + len(str(length)):
            length = len(record) + len(str(length))
        body += str(length).encode() + record
    return body


def member(name: bytes, data: bytes = b"") -> bytes:
    return header(name, len(data), tarfile.REGTYPE) + padded(data)


END = b"\0" * 1024


def tar_bytes(members: dict[str, bytes], fmt=tarfile.PAX_FORMAT, mode: str = "w", **options) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode, format=fmt, **options) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def refused(tmp_path, data: bytes, name: str = "archive.tar", **options) -> tuple[str, int]:
    """Extract `data` expecting a WeightsError; its message, and the peak of traced memory meanwhile."""
    (tmp_path / name).write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(WeightsError) as caught:
            extract_archive(tmp_path / name, tmp_path / "out", name, **options)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(caught.value)
    assert message.startswith(f"{name}: ") and len(message) < 500
    return message, peak


# --- Headers whose body tarfile would read whole -------------------------------------------------------------

@pytest.mark.parametrize("kind, called", [
    (tarfile.XHDTYPE, "pax extended"), (tarfile.XGLTYPE, "pax global"), (tarfile.SOLARIS_XHDTYPE, "pax extended"),
    (tarfile.GNUTYPE_LONGNAME, "GNU long name"), (tarfile.GNUTYPE_LONGLINK, "GNU long link"),
])
def test_a_header_declaring_a_gibibyte_is_refused_before_it_is_read(tmp_path, kind, called):
    # 1 GiB declared, a few bytes present: the file ends early. tarfile alone would allocate the gibibyte.
    data = header(b"././@LongLink", GiB, kind) + pax_records(path="x" * 300)
    message, peak = refused(tmp_path, data)
    assert message == (f"archive.tar: the archive has a {called} header of {GiB} bytes; the limit is 65536 bytes; "
                       f"not extracted")
    assert peak < GiB / 100


def test_a_gzipped_pax_bomb_is_refused_before_it_is_read(tmp_path):
    data = gzip.compress(header(b"PaxHeaders/bomb", GiB, tarfile.XHDTYPE) + b"\0" * 400_000)
    message, peak = refused(tmp_path, data, "archive.tar.gz")
    assert f"a pax extended header of {GiB} bytes" in message and peak < GiB / 100


def test_a_megabyte_long_gnu_name_is_refused_and_never_quoted(tmp_path):
    data = tar_bytes({"a" * 1_000_000: b"x"}, tarfile.GNU_FORMAT)  # tarfile writes it as an L header
    message, peak = refused(tmp_path, data)
    assert message.startswith("archive.tar: the archive has a GNU long name header of 1000001 bytes")
    assert peak < 1_000_000


def test_a_long_name_under_the_cap_is_shortened_in_errors(tmp_path):
    name = "../" + "a" * 60_000
    quoted = f"archive member {shorten(name, 100)!r} points outside the archive; refusing to extract it"
    message, _ = refused(tmp_path, tar_bytes({name: b"x"}, tarfile.GNU_FORMAT))
    assert message == f"archive.tar: {quoted}"
    message, _ = refused(tmp_path, zip_bytes({name: b"x"}), "archive.zip")
    assert message == f"archive.zip: {quoted}"


def test_a_link_with_a_long_name_is_shortened_in_errors(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        link = tarfile.TarInfo("b" * 5000)
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    message, _ = refused(tmp_path, buffer.getvalue())
    assert message == f"archive.tar: archive member {shorten('b' * 5000, 100)!r} is a symlink; refusing to extract it"
    assert len(message) < 200


def test_pax_and_gnu_headers_adding_up_past_the_total_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(safe_extract, "MAX_HEADERS_BYTES", 10_000)
    data = tar_bytes({f"{index:03d}" + "n" * 200: b"" for index in range(100)})  # a pax header each
    message, _ = refused(tmp_path, data)
    assert message == ("archive.tar: the archive's pax and GNU long-name headers add up to more than 10000 bytes; "
                       "not extracted")


def test_a_chain_of_pax_headers_is_refused(tmp_path):
    # tarfile reads a run of headers recursively; hundreds of them would end in a RecursionError.
    body = pax_records(comment="chain")
    data = (header(b"PaxHeader", len(body), tarfile.XHDTYPE) + padded(body)) * 400 + member(b"file", b"x") + END
    message, _ = refused(tmp_path, data)
    assert message == "archive.tar: the archive has more than 8 pax or GNU long-name headers in a row; not extracted"


def test_a_global_header_of_many_records_is_refused(tmp_path):
    # Each global record would be applied to (and copied into) every member that follows.
    data = tar_bytes({"file": b"x"}, pax_headers={f"k{index}": "v" for index in range(100)})
    message, _ = refused(tmp_path, data)
    assert message == "archive.tar: the archive's global pax headers hold more than 64 records; not extracted"


# --- Sparse files, too many members, damaged archives ----------------------------------------------------------

def test_a_gnu_sparse_member_is_refused(tmp_path):
    message, _ = refused(tmp_path, header(b"holes", 0, tarfile.GNUTYPE_SPARSE) + END)
    assert message == "archive.tar: archive member 'holes' is a sparse file; refusing to extract it"


@pytest.mark.parametrize("records", [
    {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "holes", "GNU.sparse.realsize": "9"},
    {"GNU.sparse.map": "0,1", "GNU.sparse.name": "holes", "GNU.sparse.size": "9"},
    {"GNU.sparse.size": "9", "GNU.sparse.offset": "0", "GNU.sparse.numbytes": "1"},
], ids=["1.0", "0.1", "0.0"])
def test_a_pax_sparse_member_is_refused(tmp_path, records):
    body = pax_records(**records)
    data = (header(b"PaxHeader", len(body), tarfile.XHDTYPE) + padded(body)
            + member(b"GNUSparseFile.0/holes", b"1\n0\n1\n") + END)
    message, _ = refused(tmp_path, data)
    assert message.startswith("archive.tar: archive member ") and message.endswith(" is a sparse file; refusing to "
                                                                                    "extract it")


def test_too_many_members_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(safe_extract, "MAX_MEMBERS", 10)
    files = {f"f{index}": b"" for index in range(11)}
    message, _ = refused(tmp_path, tar_bytes(files))
    assert message == "archive.tar: the archive has more than 10 members; not extracted"
    message, _ = refused(tmp_path, zip_bytes(files), "archive.zip")
    assert message == "archive.zip: the archive has more than 10 members; not extracted"
    extract_archive_ok(tmp_path, tar_bytes(dict(list(files.items())[:10])))


def test_a_zip_whose_end_record_understates_its_members_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(safe_extract, "MAX_MEMBERS", 10)
    data = bytearray(zip_bytes({f"f{index}": b"" for index in range(11)}))
    data[-14:-10] = (1).to_bytes(2, "little") * 2  # the end record's two counts of entries (on this disk, in all)
    message, _ = refused(tmp_path, bytes(data), "archive.zip")
    assert message == "archive.zip: the archive has more than 10 members; not extracted"


def test_a_zip_with_a_huge_member_list_is_refused_before_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(safe_extract, "MAX_MEMBERS", 10)
    # Five members, but 15 kB of list: more than ten members of 1 kB need.
    message, _ = refused(tmp_path, zip_bytes({f"{index}" + "n" * 3000: b"" for index in range(5)}), "archive.zip")
    assert re.fullmatch(r"archive\.zip: the archive's list of members is \d+ bytes, more than 10 members need; "
                        r"not extracted", message)


def test_a_truncated_member_is_a_weights_error(tmp_path):
    data = tar_bytes({"model.bin": bytes(10_000)})
    message, _ = refused(tmp_path, data[:5000])
    assert message == "archive.tar: the archive cannot be extracted (unexpected end of data)"


# --- What people do send still extracts ------------------------------------------------------------------------

LONG = "d" * 100 + "/" + "e" * 100 + "/" + "f" * 98  # 300 characters (a single file name stops at 255)
FILES = {"config.json": b"{}", "weights/model.safetensors": b"w" * 3000, LONG: b"long"}


def extract_archive_ok(tmp_path, data: bytes, name: str = "archive.tar"):
    (tmp_path / name).write_bytes(data)
    out = tmp_path / f"out-{name}"
    extract_archive(tmp_path / name, out, name, max_bytes=10_000)
    return out


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_archives_with_long_names_still_extract(tmp_path, fmt, mode):
    # A global header as `git archive` writes it, in pax format.
    pax = {"pax_headers": {"comment": "0123456789abcdef0123456789abcdef01234567"}} if fmt == tarfile.PAX_FORMAT else {}
    out = extract_archive_ok(tmp_path, tar_bytes(FILES, fmt, mode, **pax))
    assert {path.relative_to(out).as_posix(): path.read_bytes() for path in out.rglob("*") if path.is_file()} == FILES


def test_zip_with_long_names_still_extracts(tmp_path):
    out = extract_archive_ok(tmp_path, zip_bytes(FILES), "archive.zip")
    assert {path.relative_to(out).as_posix(): path.read_bytes() for path in out.rglob("*") if path.is_file()} == FILES


def test_the_byte_limit_still_holds(tmp_path):
    message, _ = refused(tmp_path, tar_bytes({"big.bin": bytes(20_000)}), max_bytes=10_000)
    assert message == "archive.tar: the archive's members add up to more than the limit of 10000 bytes; not extracted"


def test_a_cut_short_tar_gz_is_a_weights_error(tmp_path):
    data = gzip.compress(tar_bytes({"adapter_config.json": b"{}" * 50_000}))
    message, _ = refused(tmp_path, data[:len(data) // 2])
    assert message.startswith("archive.tar: the archive cannot be extracted")

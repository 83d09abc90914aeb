"""Image files built for the tests: DICOM (pydicom), a PNG header that declares a huge image, a zip posing as one."""

import io

import numpy as np


def dicom_bytes(pixels: np.ndarray, photometric: str = "MONOCHROME2", **attributes) -> bytes:
    """An uncompressed DICOM file (Explicit VR Little Endian) made with pydicom: `pixels` is (rows, columns),
    (frames, rows, columns) or, for RGB, (rows, columns, 3)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    dataset.Modality = "OT"
    rgb = photometric == "RGB"
    if rgb:
        dataset.Rows, dataset.Columns = pixels.shape[:2]
        dataset.SamplesPerPixel, dataset.PlanarConfiguration = 3, 0
    else:
        dataset.Rows, dataset.Columns = pixels.shape[-2:]
        dataset.SamplesPerPixel = 1
        if pixels.ndim == 3:
            dataset.NumberOfFrames = pixels.shape[0]
    dataset.PhotometricInterpretation = photometric
    bits = pixels.dtype.itemsize * 8
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = bits, bits, bits - 1
    dataset.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    for key, value in attributes.items():
        setattr(dataset, key, value)
    dataset.PixelData = np.ascontiguousarray(pixels).tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (10, 20, 30), (0, 0, 0)]


def palette_dicom(stored: np.ndarray, bits: int, colors=COLORS, **attributes) -> bytes:
    """A PALETTE COLOR file: stored value i (from 0) shows colors[i]; 16-bit entries are the 8-bit ones x 257."""
    kind = np.uint8 if bits == 8 else np.uint16
    channels = np.array(colors, dtype=np.uint16) * (1 if bits == 8 else 257)
    tables = {}  # an 8-bit palette of an odd length would be padded: pydicom would misread it
    for channel, color in zip(channels.T.astype(kind), ("Red", "Green", "Blue")):
        tables[f"{color}PaletteColorLookupTableDescriptor"] = [len(colors), 0, bits]
        tables[f"{color}PaletteColorLookupTableData"] = channel.tobytes()
    return dicom_bytes(stored, "PALETTE COLOR", **{**tables, **attributes})


def ramp(width: int = 64, height: int = 8, top: int = 4095, dtype=np.uint16) -> np.ndarray:
    return np.tile(np.linspace(0, top, width).round().astype(dtype), (height, 1))


def row(image) -> list[int]:
    """The red channel of the middle row: what the model receives along a horizontal ramp."""
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    return pixels[pixels.shape[0] // 2, :, 0].astype(int).tolist()


def load_bytes(tmp_path, data: bytes, filename: str, name: str = "image", **kwargs):
    path = tmp_path / filename
    path.write_bytes(data)
    from idefics_cog.inputs.images import load_image

    return load_image(name, path, **kwargs)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (8-bit RGB) with a few bytes of pixel data: a decompression
    bomb as far as the header goes."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def zip_bytes() -> bytes:
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("scan.png", b"x")
    return buffer.getvalue()


def deflated(data: bytes) -> bytes:
    """The same DICOM file with its dataset deflated (transfer syntax 1.2.840.10008.1.2.1.99), written by pydicom."""
    from pydicom import dcmread
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    dataset = dcmread(io.BytesIO(data))
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()

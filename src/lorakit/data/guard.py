"""Training files before ``datasets`` sees them: UTF-8 text only, and a content fingerprint.

``datasets`` reports a UTF-16 or Latin-1 JSONL file as a deep ``UnicodeDecodeError`` (or, worse, as an
arrow error about a column); here it is a ``DataError`` naming the file, the line and the fix. The
same single pass hashes the bytes (SHA-256), which the run's fingerprint records so that a resume
notices an edited file even when its size and modification time are unchanged.
"""

from __future__ import annotations

import codecs
import hashlib
from pathlib import Path

from ..errors import DataError

_CHUNK = 1 << 20
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)
TEXT_SUFFIXES = (".jsonl", ".json", ".csv")


def scan_file(path: str | Path, text: bool | None = None) -> str:
    """SHA-256 of ``path``'s bytes; for text formats (by suffix unless ``text`` says) also check that
    the bytes are UTF-8, raising ``DataError`` with the line number of the first bad byte."""
    path = Path(path)
    text = path.suffix.lower() in TEXT_SUFFIXES if text is None else text
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset, first = 1, 0, True
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
                if text:
                    if first and (chunk.startswith(_UTF16_BOMS) or b"\x00" in chunk[:4096]):
                        raise DataError(f"{path}: looks like UTF-16/UTF-32 text; lorakit reads UTF-8. Re-save "
                                        "the file as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8).")
                    try:
                        decoder.decode(chunk)
                    except UnicodeDecodeError as exc:
                        bad = chunk[: exc.start].count(b"\n") + line
                        raise DataError(f"{path}: line {bad} is not UTF-8 (byte {offset + exc.start}: "
                                        f"{chunk[exc.start:exc.start + 1]!r}); re-save the file as UTF-8.") from None
                    line += chunk.count(b"\n")
                offset += len(chunk)
                first = False
            if text:
                try:
                    decoder.decode(b"", final=True)
                except UnicodeDecodeError:
                    raise DataError(f"{path}: ends inside a UTF-8 character (truncated?); re-save it as UTF-8.") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc}).") from None
    return digest.hexdigest()

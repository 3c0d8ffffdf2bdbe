"""Go's ``compress/lzw`` with LSB bit order and 8-bit literals: memberlist's only compression.

memberlist wraps compressed payloads in ``compress{Algo: 0, Buf: lzw(...)}``; ``Buf`` is what
``lzw.NewWriter(w, lzw.LSB, 8)`` writes.  The code space is the GIF/TIFF one:

* codes 0-255 are literals, 256 is *clear*, 257 is *end of data*, 258.. name dictionary entries;
* codes start 9 bits wide and grow by one bit whenever the next free code reaches a power of two,
  up to 12 bits;
* codes are packed least-significant bit first; the last partial byte is zero-padded.

:func:`compress` reproduces Go's writer byte for byte: it starts with a clear code, and when the
next free code would be 4095 it emits a clear code (at 12 bits) and starts a new dictionary
rather than filling the table.  :func:`decompress_untrusted` follows Go's reader: it accepts a
stream with or without a leading clear code, freezes the dictionary when it is full (as another
encoder might let it), handles the *KwKwK* code (the entry being defined by this very code), stops
at the end-of-data code and ignores what follows it.  Anything else -- a code beyond the
dictionary, a stream that ends before the end code, output above ``max_size`` -- is a
:class:`~vxnet.errors.BadPacket`.
"""

from __future__ import annotations

from vxnet.errors import BadPacket

__all__ = ["DEFAULT_MAX_SIZE", "compress", "decompress_untrusted"]

#: The default cap on decompressed output: a decompression bomb becomes a counted drop.
DEFAULT_MAX_SIZE = 10 * 1024 * 1024

_CLEAR = 256
_EOF = 257
_MAX_WIDTH = 12
#: Go's writer resets the dictionary when its next code would reach this value.
_WRITER_LAST_CODE = (1 << _MAX_WIDTH) - 1
_LITERALS = tuple(bytes([i]) for i in range(256))


class _BitWriter:
    """LSB-first code packer; flushes whole 64-bit words to keep Python work per code small."""

    __slots__ = ("bits", "nbits", "out")

    def __init__(self) -> None:
        self.out = bytearray()
        self.bits = 0
        self.nbits = 0

    def finish(self) -> bytes:
        nbytes = (self.nbits + 7) // 8
        self.out += self.bits.to_bytes(nbytes, "little") if nbytes else b""
        return bytes(self.out)


def compress(data: bytes) -> bytes:
    """What Go's ``lzw.NewWriter(w, lzw.LSB, 8)`` writes for ``data`` (then ``Close``)."""
    w = _BitWriter()
    if not data:  # Go: Close() with nothing written emits clear then end of data
        _emit(w, _CLEAR, 9)
        _emit(w, _EOF, 9)
        return w.finish()
    width, hi, overflow, code = _encode(w, memoryview(data))
    # Close(): the pending code, one more hi step (which may widen or reset), then EOF.
    _emit(w, code, width)
    hi += 1
    if hi == overflow:
        width += 1
        overflow <<= 1
    if hi == _WRITER_LAST_CODE:
        _emit(w, _CLEAR, width)
        width = 9
    _emit(w, _EOF, width)
    return w.finish()


def _emit(w: _BitWriter, code: int, width: int) -> None:
    w.bits |= code << w.nbits
    w.nbits += width
    if w.nbits >= 64:
        w.out += (w.bits & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")
        w.bits >>= 64
        w.nbits -= 64


def _encode(w: _BitWriter, data: memoryview) -> tuple[int, int, int, int]:
    """The main loop of Go's ``Writer.Write``; returns (width, hi, overflow, pending code)."""
    table: dict[int, int] = {}
    get = table.get
    width, hi, overflow = 9, _EOF, 512
    bits, nbits, out = _CLEAR, 9, w.out
    code = data[0]
    for x in data[1:]:
        key = code << 8 | x
        found = get(key)
        if found is not None:
            code = found
            continue
        bits |= code << nbits
        nbits += width
        if nbits >= 64:
            out += (bits & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")
            bits >>= 64
            nbits -= 64
        code = x
        hi += 1
        if hi == overflow:
            width += 1
            overflow <<= 1
        if hi == _WRITER_LAST_CODE:
            bits |= _CLEAR << nbits
            nbits += width
            width, hi, overflow = 9, _EOF, 512
            table.clear()
            continue
        table[key] = hi
    w.bits, w.nbits = bits, nbits
    return width, hi, overflow, code


def decompress_untrusted(data: bytes, max_size: int = DEFAULT_MAX_SIZE) -> bytes:
    """Decode what Go's LSB/8 writer wrote; ``BadPacket('lzw_...')`` on anything else."""
    buf = bytes(data) + b"\x00\x00\x00"  # a 3-byte window always fits: codes are <= 12 bits
    total_bits = len(data) * 8
    pos, size = 0, 0
    width, mask, hi, overflow = 9, 511, _EOF, 512
    literals = _LITERALS
    table: list[bytes] = [*literals, b"", b""]  # + entries from 258; 256/257 are never looked up
    known = len(table)  # == len(table), kept as a local for speed
    add = table.append
    out: list[bytes] = []
    emit = out.append
    last: bytes | None = None  # the previous code's string; None right after a clear code
    while True:
        end = pos + width
        if end > total_bits:
            raise BadPacket("lzw_truncated", "no end-of-data code")
        p = pos >> 3
        code = ((buf[p] | buf[p + 1] << 8 | buf[p + 2] << 16) >> (pos & 7)) & mask
        pos = end
        if code < _CLEAR:
            entry = literals[code]
        elif _EOF < code < known:
            entry = table[code]
        elif code == _CLEAR:
            width, mask, hi, overflow = 9, 511, _EOF, 512
            del table[_EOF + 1 :]
            known = len(table)
            last = None
            continue
        elif code == _EOF:
            return b"".join(out)
        elif code == known and last is not None:  # KwKwK: the code being defined right now
            entry = last + last[:1]
        else:
            raise BadPacket("lzw_invalid_code", f"code {code} beyond dictionary {known}")
        size += len(entry)
        if size > max_size:
            raise BadPacket("lzw_too_large", f"output above {max_size} bytes")
        emit(entry)
        if last is not None:
            add(last + entry[:1])
            known += 1
        last = entry
        hi += 1
        if hi >= overflow:
            if width == _MAX_WIDTH:  # dictionary full: frozen until the next clear code
                last = None
                hi -= 1
            else:
                width += 1
                mask = (1 << width) - 1
                overflow <<= 1

"""One ESP Security Association: transport mode, AES-GCM (RFC 4303 + RFC 4106).  Sans-IO.

Wire format (RFC 4303 2, RFC 4106 3)::

    SPI(4) | seq(4) | IV(8) | encrypted[payload | padding | pad length(1) | next header(1)] | ICV

* nonce = salt(4) | IV(8); AAD = SPI | seq, or SPI | seq_hi | seq_lo with Extended Sequence
  Numbers (RFC 4106 5).  The ICV is the GCM tag cut to 8, 12 or 16 bytes.
* Padding: GCM is a stream mode, so padding only makes the trailer end on a 4-byte boundary; its
  bytes are 1, 2, 3, ... (RFC 4303 2.4), and the receiver checks them after authentication.
* IV: the 64-bit sequence counter XOR ``iv_mask`` (0 unless the owner sets one).  The counter never
  repeats within an SA and never wraps, so the IV is unique per SA; the SPI is the salt (Docker's
  rule) and differs per SA, so nonces stay unique across the SAs sharing a key.  Re-creating an SA
  with the same key restarts the counter: give every instance a fresh random ``iv_mask`` (the
  :class:`~vxnet.esp.sadb.SADB` does), the way Linux's ``seqiv`` XORs a random per-SA salt in.
* Sequence numbers start at 1 and never wrap (RFC 4303 3.3.3).  With ``esn`` the counter is 64
  bits, only its low half is sent, the high half goes into the AAD and the receiver infers it from
  the highest number it has accepted (RFC 4303 Appendix A2; see :func:`_infer_esn`).  Without
  ``esn`` :meth:`SecurityAssociation.encrypt` refuses to go past 2**32 - 1 and raises
  :class:`SequenceExhausted`: re-key before that.
* Anti-replay (RFC 4303 3.4.3): a sliding window held as an int bitmask (bit ``i`` = highest - i).
  Order on receipt: length, replay check (too old or duplicate), GCM verification, padding check,
  and only then the window moves.
* Every failure of :meth:`SecurityAssociation.decrypt_untrusted` is a ``BadPacket`` whose reason
  is a drop-counter key: ``esp_truncated``, ``esp_oversize``, ``esp_wrong_spi``, ``esp_replay``,
  ``esp_auth_failed``, ``esp_bad_padding``.

ESN is on by default: its wire bytes are the same, scapy (``esn_en``) decrypts it, Wireshark 4.0
decrypts it (it cannot check the ICV: no ESN setting in its SA table), and no counter ever has to
stop.  ``esn=False`` with ``icv_len=8`` is Docker's exact kernel SA.

The per-packet methods are flat on purpose: one AESGCM per SA built once, preallocated nonce, AAD
and plaintext/output buffers (grown only for a bigger packet), ``struct`` ``pack_into``; each call
copies the payload in once and the result out once.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vxnet.errors import BadPacket, UsageError, VxnetError

ESP_PROTO = 50
HEADER_LEN = 8  # SPI + sequence number
IV_LEN = 8
TRAILER_LEN = 2  # pad length + next header
SALT_LEN = 4
KEY_LENS = (16, 24, 32)
ICV_LENS = (8, 12, 16)
DEFAULT_ICV_LEN = 16
DOCKER_ICV_LEN = 8
DEFAULT_REPLAY_WINDOW = 1024
MIN_REPLAY_WINDOW = 64
MAX_REPLAY_WINDOW = 1 << 16
DEFAULT_ESN = True
NEXT_HEADER_UDP = 17
#: The largest ESP packet (it rides in one IP datagram).
MAX_ESP_LEN = 65535
SEQ_MAX_32 = (1 << 32) - 1
SEQ_MAX_64 = (1 << 64) - 1

_PREFIX = HEADER_LEN + IV_LEN  # 16: SPI | seq | IV
_GCM_TAG = 16
_LOW = 0xFFFFFFFF
_HALF = 1 << 31
_HDR = struct.Struct("!IIQ")  # SPI, seq (low 32 bits), IV
_IV = struct.Struct("!Q")
_SEQ_ESN = struct.Struct("!II")  # seq_hi, seq_lo: the AAD after the SPI
_PADS = tuple(bytes(range(1, n + 1)) for n in range(256))
_INITIAL_CAPACITY = 2048


def esp_overhead(icv_len: int = DEFAULT_ICV_LEN) -> int:
    """Bytes ESP adds to a payload whose length+2 is a multiple of 4: 26 for ICV 8 (Docker's
    ``pktExpansion``), 30 for ICV 12, 34 for ICV 16.  Up to 3 more bytes of padding otherwise."""
    _check_icv(icv_len)
    return HEADER_LEN + IV_LEN + TRAILER_LEN + icv_len


class SequenceExhausted(VxnetError):
    """The SA has sent sequence number 2**32 - 1 and has no ESN: it must be re-keyed.

    Not a ``BadPacket`` (nothing came from the wire); ``reason`` is the drop-counter key."""

    reason = "esp_seq_exhausted"

    def __init__(self, spi: int) -> None:
        self.spi = spi
        super().__init__(
            f"{self.reason}: SA 0x{spi:08x} sent sequence number 2**32-1 without ESN; re-key"
        )


class SecurityAssociation:
    """One direction of ESP with AES-GCM in transport mode.

    A sender uses :meth:`encrypt`, a receiver :meth:`decrypt_untrusted`; one object holds both
    halves of state (the send counter and the replay window), each untouched by the other call.
    """

    __slots__ = (
        "_aad",
        "_aead",
        "_aes",
        "_bits",
        "_capacity",
        "_min_len",
        "_nonce",
        "_out",
        "_outv",
        "_pt",
        "_ptv",
        "_seq",
        "_seq_max",
        "_top",
        "_wmask",
        "esn",
        "icv_len",
        "iv_mask",
        "replay_window",
        "salt",
        "spi",
    )

    def __init__(
        self,
        spi: int,
        key: bytes,
        salt: bytes,
        *,
        icv_len: int = DEFAULT_ICV_LEN,
        replay_window: int = DEFAULT_REPLAY_WINDOW,
        esn: bool = DEFAULT_ESN,
        iv_mask: int = 0,
    ) -> None:
        if not 0 <= spi <= _LOW:
            raise UsageError(f"SPI {spi!r} is not a uint32")
        if len(key) not in KEY_LENS:
            raise UsageError(f"an AES-GCM key is 16, 24 or 32 bytes, got {len(key)}")
        if len(salt) != SALT_LEN:
            raise UsageError(f"the RFC 4106 salt is {SALT_LEN} bytes, got {len(salt)}")
        _check_icv(icv_len)
        if not MIN_REPLAY_WINDOW <= replay_window <= MAX_REPLAY_WINDOW:
            raise UsageError(
                f"replay window {replay_window} is out of range: "
                f"use {MIN_REPLAY_WINDOW}-{MAX_REPLAY_WINDOW} packets"
            )
        if not 0 <= iv_mask <= SEQ_MAX_64:
            raise UsageError(f"iv_mask {iv_mask!r} is not a uint64")
        self.spi = spi
        self.salt = bytes(salt)
        self.icv_len = icv_len
        self.replay_window = replay_window
        self.esn = esn
        self.iv_mask = iv_mask
        self._aead = AESGCM(bytes(key))
        # Only truncated ICVs need the streaming GCM API (AESGCM checks full 16-byte tags only).
        self._aes = algorithms.AES(bytes(key)) if icv_len != _GCM_TAG else None
        self._nonce = bytearray(self.salt + bytes(IV_LEN))
        self._aad = bytearray(struct.pack("!III", spi, 0, 0))
        self._seq = 0
        self._seq_max = SEQ_MAX_64 if esn else SEQ_MAX_32
        self._top = 0
        self._bits = 0
        self._wmask = (1 << replay_window) - 1
        self._min_len = _PREFIX + TRAILER_LEN + icv_len
        self._capacity = 0
        self._pt = self._out = bytearray()
        self._ptv = self._outv = memoryview(self._pt)
        self._grow(_INITIAL_CAPACITY)

    def __repr__(self) -> str:
        return (
            f"SecurityAssociation(spi=0x{self.spi:08x}, icv_len={self.icv_len}, esn={self.esn}, "
            f"seq={self._seq}, highest_seq={self._top})"
        )

    @property
    def seq(self) -> int:
        """The last sequence number sent (0 before the first packet)."""
        return self._seq

    @property
    def highest_seq(self) -> int:
        """The highest sequence number accepted (0 before the first packet)."""
        return self._top

    @property
    def seq_remaining(self) -> int:
        """How many more packets this SA may send before :class:`SequenceExhausted`."""
        return self._seq_max - self._seq

    def advance_for_test(self, *, tx_seq: int | None = None, rx_highest: int | None = None) -> None:
        """Test hook: set the last sent / highest accepted sequence number (empties the window)."""
        if tx_seq is not None:
            if not 0 <= tx_seq <= self._seq_max:
                raise UsageError(f"tx_seq {tx_seq} is beyond this SA's counter")
            self._seq = tx_seq
        if rx_highest is not None:
            if not 0 <= rx_highest <= self._seq_max:
                raise UsageError(f"rx_highest {rx_highest} is beyond this SA's counter")
            self._top = rx_highest
            self._bits = 0

    def _grow(self, needed: int) -> None:
        """Reallocate the scratch buffers for ``needed`` plaintext bytes (rare, never shrinks)."""
        capacity = max(needed, 2 * self._capacity)
        self._ptv.release()
        self._outv.release()
        # +16 of slack: the streaming GCM decryptor and the full tag written before truncation.
        self._pt = bytearray(capacity + _GCM_TAG)
        self._out = bytearray(_PREFIX + capacity + _GCM_TAG)
        self._ptv = memoryview(self._pt)
        self._outv = memoryview(self._out)
        self._capacity = capacity

    def encrypt(
        self, payload: bytes | bytearray | memoryview, next_header: int = NEXT_HEADER_UDP
    ) -> bytes:
        """The ESP packet carrying ``payload`` (a flat byte buffer): consumes one sequence number.

        Raises :class:`SequenceExhausted` past 2**32 - 1 without ESN, ``UsageError`` if the
        packet would exceed :data:`MAX_ESP_LEN` or ``next_header`` is not a byte."""
        return bytes(self.seal(b"", payload, next_header))

    def seal(
        self,
        head: bytes | bytearray | memoryview,
        body: bytes | bytearray | memoryview,
        next_header: int = NEXT_HEADER_UDP,
    ) -> memoryview:
        """:meth:`encrypt` of ``head + body`` for the hot path: the two parts are never joined
        and the packet is not copied out.  The result is a view of this SA's own buffer, valid
        until its next ``seal`` or ``encrypt``: send it at once."""
        seq = self._seq + 1
        if seq > self._seq_max:
            raise SequenceExhausted(self.spi)
        h = len(head)
        n = h + len(body)
        pad = -(n + TRAILER_LEN) & 3
        m = n + pad + TRAILER_LEN
        if m > self._capacity:
            if _PREFIX + m + self.icv_len > MAX_ESP_LEN:
                raise UsageError(f"a {n}-byte payload does not fit in one ESP packet")
            self._grow(m)
        if not 0 <= next_header <= 255:
            raise UsageError(f"next header {next_header!r} is not a byte")
        self._seq = seq
        pt = self._pt
        pt[0:h] = head
        pt[h:n] = body
        pt[n : n + pad] = _PADS[pad]
        pt[n + pad] = pad
        pt[n + pad + 1] = next_header
        iv = seq ^ self.iv_mask
        outv = self._outv
        _HDR.pack_into(outv, 0, self.spi, seq & _LOW, iv)
        _IV.pack_into(self._nonce, SALT_LEN, iv)
        if self.esn:
            _SEQ_ESN.pack_into(self._aad, 4, seq >> 32, seq & _LOW)
            aad: bytearray | memoryview = self._aad
        else:
            aad = outv[0:HEADER_LEN]
        self._aead.encrypt_into(self._nonce, self._ptv[0:m], aad, outv[_PREFIX : _PREFIX + m + 16])
        return outv[0 : _PREFIX + m + self.icv_len]

    def decrypt_untrusted(self, packet: bytes | bytearray | memoryview) -> tuple[int, bytes]:
        """``(next_header, payload)`` of an ESP packet for this SA, or ``BadPacket(reason)``."""
        if type(packet) is memoryview and (
            packet.format != "B" or packet.ndim != 1 or not packet.c_contiguous
        ):
            packet = packet.tobytes()
        n = len(packet)
        icv_len = self.icv_len
        if n < self._min_len:
            raise BadPacket("esp_truncated", f"{n} bytes, need {self._min_len}")
        if n > MAX_ESP_LEN:
            raise BadPacket("esp_oversize", f"{n} bytes")
        spi, seq_lo, iv = _HDR.unpack_from(packet, 0)
        if spi != self.spi:
            raise BadPacket("esp_wrong_spi", f"0x{spi:08x} is not 0x{self.spi:08x}")
        # Replay check before any cryptography (RFC 4303 3.4.3).
        top = self._top
        window = self.replay_window
        seq = _infer_esn(top, seq_lo) if self.esn else seq_lo
        if seq <= top:
            back = top - seq
            if back >= window or (self._bits >> back) & 1 or seq == 0:
                raise BadPacket("esp_replay", f"seq {seq}, highest {top}")
        # Integrity check and decryption.
        ct_len = n - _PREFIX - icv_len
        if ct_len > self._capacity:
            self._grow(ct_len)
        nonce = self._nonce
        _IV.pack_into(nonce, SALT_LEN, iv)
        view = memoryview(packet)
        if self.esn:
            _SEQ_ESN.pack_into(self._aad, 4, seq >> 32, seq_lo)
            aad: bytearray | memoryview = self._aad
        else:
            aad = view[0:HEADER_LEN]
        ptv = self._ptv
        if self._aes is None:
            try:
                self._aead.decrypt_into(nonce, view[_PREFIX:], aad, ptv[0:ct_len])
            except InvalidTag:
                raise BadPacket("esp_auth_failed", f"SA 0x{spi:08x} seq {seq}") from None
        else:
            tag = bytes(view[n - icv_len :])
            gcm = modes.GCM(bytes(nonce), tag, min_tag_length=icv_len)
            decryptor = Cipher(self._aes, gcm).decryptor()
            decryptor.authenticate_additional_data(aad)
            decryptor.update_into(view[_PREFIX : n - icv_len], ptv)
            try:
                decryptor.finalize()
            except InvalidTag:
                raise BadPacket("esp_auth_failed", f"SA 0x{spi:08x} seq {seq}") from None
        pt = self._pt
        pad = pt[ct_len - 2]
        end = ct_len - TRAILER_LEN - pad
        if end < 0 or (pad and pt[end : ct_len - TRAILER_LEN] != _PADS[pad]):
            raise BadPacket("esp_bad_padding", f"pad length {pad} of {ct_len} bytes")
        # Authenticated and well-formed: only now does the window move.
        if seq > top:
            ahead = seq - top
            self._bits = ((self._bits << ahead) | 1) & self._wmask if ahead < window else 1
            self._top = seq
        else:
            self._bits |= 1 << (top - seq)
        return pt[ct_len - 1], bytes(ptv[0:end])


def _infer_esn(top: int, seq_lo: int) -> int:
    """The full 64-bit sequence number of a packet carrying ``seq_lo``, given the highest, ``top``.

    Serial-number arithmetic (RFC 1982) on the low halves: up to 2**31 ahead is ahead, anything
    else is behind.  This agrees with RFC 4303 Appendix A2.1 on every packet inside the window or
    ahead of it by less than 2**31; A2.1 reads a packet *below* the window as coming from the next
    2**32 subspace, so a too-old packet would reach GCM and fail as ``esp_auth_failed`` (the Linux
    kernel does that).  Here it stays a cheap ``esp_replay``, decided before any decryption.
    """
    ahead = (seq_lo - top) & _LOW
    seq = top + ahead if ahead < _HALF else top + ahead - (1 << 32)
    if not 0 <= seq <= SEQ_MAX_64:
        raise BadPacket("esp_replay", f"seq {seq_lo} is outside the ESN window at {top}")
    return seq


def _check_icv(icv_len: int) -> None:
    if icv_len not in ICV_LENS:
        raise UsageError(f"ICV length {icv_len!r} is not one RFC 4106 allows: {ICV_LENS}")

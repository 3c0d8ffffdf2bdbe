"""ESP for encrypted overlays (``--opt encrypted``): what Docker asks of the kernel's xfrm, done in
userspace.  Transport mode, AES-GCM (RFC 4303, RFC 4106), SPIs and salts derived as Docker derives
them, keys rotated in Docker's order.

* :mod:`vxnet.esp.spi` -- Docker's SPI (FNV-1a-32 over src | tag | dst) and salt (the SPI).
* :mod:`vxnet.esp.sa` -- one :class:`SecurityAssociation`: ``encrypt`` / ``decrypt_untrusted``,
  anti-replay window, Extended Sequence Numbers.
* :mod:`vxnet.esp.sadb` -- the node's :class:`SADB`: receive SAs per (peer, key), one send SA per
  peer with the middle key, ``tx(peer)`` / ``rx(spi)`` for the dataplane.
"""

from vxnet.esp.sa import (
    DEFAULT_ESN,
    DEFAULT_ICV_LEN,
    DEFAULT_REPLAY_WINDOW,
    DOCKER_ICV_LEN,
    ESP_PROTO,
    SecurityAssociation,
    SequenceExhausted,
    esp_overhead,
)
from vxnet.esp.sadb import SADB, KeyChange, SaInfo, encrypted_mtu
from vxnet.esp.spi import derive_spi, salt_for_spi

__all__ = [
    "DEFAULT_ESN",
    "DEFAULT_ICV_LEN",
    "DEFAULT_REPLAY_WINDOW",
    "DOCKER_ICV_LEN",
    "ESP_PROTO",
    "SADB",
    "KeyChange",
    "SaInfo",
    "SecurityAssociation",
    "SequenceExhausted",
    "derive_spi",
    "encrypted_mtu",
    "esp_overhead",
    "salt_for_spi",
]

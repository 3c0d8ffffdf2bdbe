"""Independent checks: scapy's ESP and Wireshark's ESP decryption read vxnet's packets, and vxnet
reads scapy's.

scapy 2.8's built-in ``'AES-GCM'`` uses cryptography's ``AESGCM``, which always makes and expects a
16-byte tag: it ignores ``crypt_icv_size``.  For ICV 8 and 12 the tests register scapy's own
``CryptAlgo`` with the streaming ``modes.GCM`` (scapy's code path for modes with tags, which cuts
and checks short tags) under the name ``'AES-GCM-SHORT-ICV'``.  ICV 16 uses the built-in as is.
"""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import algorithms, modes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers import ipsec
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.ipsec import ESP, CryptAlgo, IPSecIntegrityError
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Packet, Raw
from scapy.utils import wrpcap

from vxnet.esp.sa import SecurityAssociation
from vxnet.esp.sadb import SADB
from vxnet.esp.spi import derive_spi, salt_for_spi

A = IPv4Address("192.168.99.2")
B = IPv4Address("192.168.99.3")
KEY = bytes.fromhex("00112233445566778899aabbccddeeff")
TAG = 4242
SPI = derive_spi(A, B, TAG)
SALT = salt_for_spi(SPI)
CASES = [(icv, esn) for icv in (8, 12, 16) for esn in (False, True)]
SCAPY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def _short_icv_algo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    algo = CryptAlgo(  # type: ignore[no-untyped-call]
        "AES-GCM-SHORT-ICV",
        cipher=algorithms.AES,
        mode=modes.GCM,
        key_size=(16, 24, 32),
        salt_size=4,
        block_size=1,
        iv_size=8,
        icv_size=16,
        format_mode_iv=lambda sa, iv, **kw: sa.crypt_salt + iv,
    )
    monkeypatch.setitem(ipsec.CRYPT_ALGOS, "AES-GCM-SHORT-ICV", algo)
    yield


def scapy_sa(icv_len: int, esn: bool, esn_hi: int = 0, seq: int = 1) -> Any:
    """scapy's SA (untyped: ``Any``)."""
    return ipsec.SecurityAssociation(  # type: ignore[no-untyped-call]
        ESP,
        spi=SPI,
        seq_num=seq,
        crypt_algo="AES-GCM" if icv_len == 16 else "AES-GCM-SHORT-ICV",
        crypt_key=KEY + SALT,  # the kernel's rfc4106 key: key | salt
        crypt_icv_size=icv_len,
        esn_en=esn,
        esn=esn_hi,
    )


def ours(icv_len: int, esn: bool) -> SecurityAssociation:
    return SecurityAssociation(SPI, KEY, SALT, icv_len=icv_len, esn=esn)


def in_ipv4(esp: bytes) -> Packet:
    """Our ESP bytes as the wire carries them: in IPv4, protocol 50 (transport mode)."""
    return IP(bytes(IP(src=str(A), dst=str(B), proto=50) / Raw(esp)))


def vxlan_datagram(i: int) -> bytes:
    """UDP -> VXLAN -> Ethernet -> IPv4 -> ICMP echo, as one VTEP sends it (UDP checksum 0)."""
    inner = (
        Ether(src="02:42:0a:00:00:02", dst="02:42:0a:00:00:03")
        / IP(src="10.0.0.2", dst="10.0.0.3")
        / ICMP(id=7, seq=i)
        / Raw(b"vxnet encrypted overlay %d" % i)
    )
    return bytes(UDP(sport=40000 + i, dport=4789, chksum=0) / VXLAN(vni=4096) / inner)


@pytest.mark.parametrize(("icv_len", "esn"), CASES)
def test_scapy_decrypts_our_vxlan(icv_len: int, esn: bool) -> None:
    tx = ours(icv_len, esn)
    for i in range(5):
        datagram = vxlan_datagram(i)
        plain = scapy_sa(icv_len, esn).decrypt(in_ipv4(tx.encrypt(datagram, 17)))
        assert plain[IP].proto == 17
        assert bytes(plain[IP].payload) == datagram
        assert plain[VXLAN].vni == 4096 and plain[ICMP].seq == i


@pytest.mark.parametrize(("icv_len", "esn"), CASES)
@SCAPY
# Next headers scapy leaves as raw bytes: it would dissect random bytes as UDP or IP and stumble.
@given(payload=st.binary(max_size=1500), next_header=st.sampled_from([59, 253, 254]))
def test_scapy_decrypts_random_payloads(
    icv_len: int, esn: bool, payload: bytes, next_header: int
) -> None:
    tx = ours(icv_len, esn)
    tx.advance_for_test(tx_seq=random.Random(len(payload)).randrange(1, 2**31))
    packet = in_ipv4(tx.encrypt(payload, next_header))
    plain = scapy_sa(icv_len, esn).decrypt(packet)
    assert plain[IP].proto == next_header
    assert bytes(plain[IP].payload) == payload


@pytest.mark.parametrize(("icv_len", "esn"), CASES)
def test_we_decrypt_scapy(icv_len: int, esn: bool) -> None:
    rx = ours(icv_len, esn)
    sa = scapy_sa(icv_len, esn)
    rng = random.Random(icv_len)
    for i in range(20):
        original = (
            IP(src=str(A), dst=str(B)) / UDP(sport=5000, dport=4789) / Raw(rng.randbytes(i * 37))
        )
        expected = bytes(IP(bytes(original)).payload)  # UDP with its checksum filled in
        encrypted = sa.encrypt(original)
        assert encrypted[IP].proto == 50 and encrypted[ESP].seq == i + 1
        assert rx.decrypt_untrusted(bytes(encrypted[ESP])) == (17, expected)


@pytest.mark.parametrize("icv_len", [8, 16])
def test_esn_high_half_agrees_with_scapy(icv_len: int) -> None:
    """Past 2**32 the wire shows only the low half; both sides put the high half in the AAD."""
    tx = ours(icv_len, esn=True)
    tx.advance_for_test(tx_seq=2**32 + 4)
    esp = tx.encrypt(b"after the wrap", 59)
    assert in_ipv4(esp)[ESP].seq == 5
    plain = scapy_sa(icv_len, True, esn_hi=1).decrypt(in_ipv4(esp))  # decrypt() edits its input
    assert bytes(plain[IP].payload) == b"after the wrap"
    with pytest.raises(IPSecIntegrityError):  # scapy really checks: the wrong high half fails
        scapy_sa(icv_len, True, esn_hi=0).decrypt(in_ipv4(esp))
    rx = ours(icv_len, esn=True)
    rx.advance_for_test(rx_highest=2**32 - 3)
    theirs = scapy_sa(icv_len, True, esn_hi=1, seq=2).encrypt(
        IP(src=str(A), dst=str(B)) / Raw(b"x")
    )
    assert rx.decrypt_untrusted(bytes(theirs[ESP])) == (0, b"x")  # scapy: proto 0 for raw IP data
    assert rx.highest_seq == 2**32 + 2


@pytest.mark.parametrize("icv_len", [8, 16])
def test_scapy_rejects_tampered(icv_len: int) -> None:
    packet = bytearray(ours(icv_len, False).encrypt(b"do not touch"))
    packet[-1] ^= 1
    with pytest.raises(IPSecIntegrityError):
        scapy_sa(icv_len, False).decrypt(in_ipv4(bytes(packet)))


# -- tshark -------------------------------------------------------------------------------------

TSHARK = shutil.which("tshark")
FIELDS = ["frame.protocols", "esp.spi", "esp.sequence", "vxlan.vni", "icmp.seq", "data.data"]
FIELDS += ["esp.icv_good", "esp.icv_bad"]


def tshark_fields(pcap: Path, records: list[str], home: Path) -> list[list[str]]:
    assert TSHARK is not None
    command = [TSHARK, "-n", "-r", str(pcap), "-o", "esp.enable_encryption_decode:TRUE"]
    command += ["-o", "esp.enable_authentication_check:TRUE"]
    for record in records:
        command += ["-o", f"uat:esp_sa:{record}"]
    command += ["-T", "fields", "-E", "separator=|"]
    for field in FIELDS:
        command += ["-e", field]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "WIRESHARK_CONFIG_DIR": str(home)}
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    return [line.split("|") for line in done.stdout.splitlines()]


@pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")
@pytest.mark.parametrize(("icv_len", "esn"), [(16, False), (8, False), (16, True)])
def test_tshark_dissects_esp_udp_vxlan_inner(tmp_path: Path, icv_len: int, esn: bool) -> None:
    a = SADB(A, icv_len=icv_len, esn=esn, rng=random.Random(0))
    a.set_keys([(TAG - 1, bytes(16)), (TAG, KEY), (TAG + 1, bytes([9]) * 16)])
    tx = a.tx(B)
    frames = [
        Ether() / IP(src=str(A), dst=str(B), proto=50) / Raw(tx.encrypt(vxlan_datagram(i)))
        for i in range(3)
    ]
    pcap = tmp_path / "esp.pcap"
    wrpcap(str(pcap), frames)
    record = a.wireshark_esp_sa()[0]  # the send SA: A -> B under the primary key
    assert f'"0x{SPI:08x}"' in record
    rows = tshark_fields(pcap, [record], tmp_path)
    assert len(rows) == 3
    for i, (protocols, spi, seq, vni, icmp_seq, data, good, bad) in enumerate(rows):
        assert protocols == "eth:ethertype:ip:esp:udp:vxlan:eth:ethertype:ip:icmp:data"
        assert (int(spi, 16), int(seq), int(vni), int(icmp_seq)) == (SPI, i + 1, 4096, i)
        assert bytes.fromhex(data) == b"vxnet encrypted overlay %d" % i
        # Wireshark's SA table has no ESN setting: it decrypts, but checks the ICV over the
        # 8-byte AAD of a non-ESN SA, so with ESN it reports the ICV as bad.
        assert (good, bad) == (("0", "1") if esn else ("1", "0"))

    wrong = record.replace(KEY.hex(), bytes(16).hex())
    for row in tshark_fields(pcap, [wrong], tmp_path):
        assert "vxlan" not in row[0]  # the control: a wrong key shows no VXLAN


def test_esp_bytes_are_what_scapy_parses() -> None:
    packet = in_ipv4(ours(16, False).encrypt(b"abc"))
    assert packet[ESP].spi == SPI and packet[ESP].seq == 1
    assert bytes(packet[ESP])[:8] == struct.pack("!II", SPI, 1)

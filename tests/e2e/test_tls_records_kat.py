"""Known answers for the pump's own TLS 1.3 record layer (``pump/records.c``), run on its
own code through the extension's ``record_protect`` / ``record_unprotect`` hooks:

- RFC 8448 section 3 (TLS_AES_128_GCM_SHA256): the application traffic secrets and the
  protected records the RFC prints (the client's data and close_notify, the server's data);
- all three suites against ``cryptography`` (an independent implementation of HKDF and the
  AEADs: RFC 8448 has no AES-256 or ChaCha20 trace): records at the size edges, sequence
  numbers that reach the IV's high bytes, KeyUpdate (RFC 8446 7.2), padding, and refusals.
"""

from __future__ import annotations

import os
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from enforcer.dataplane import native

pytestmark = pytest.mark.skipif(not native.own_records(), reason="own records unavailable")

AES128, AES256, CHACHA = 0x1301, 0x1302, 0x1303


def _h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", "").replace("\n", ""))


# RFC 8448 section 3, "Simple 1-RTT Handshake"
CLIENT_AP_SECRET = _h("9e40646ce79a7f9dc05af8889bce6552875afa0b06df0087f792ebb7c17504a5")
SERVER_AP_SECRET = _h("a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643")
PAYLOAD = bytes(range(0x32))  # 00 01 ... 31, both ways
CLIENT_RECORD = _h("""
    17 03 03 00 43 a2 3f 70 54 b6 2c 94 d0 af fa fe 82 28 ba 55 cb ef ac ea 42 f9 14 aa
    66 bc ab 3f 2b 98 19 a8 a5 b4 6b 39 5b d5 4a 9a 20 44 1e 2b 62 97 4e 1f 5a 62 92 a2
    97 70 14 bd 1e 3d ea e6 3a ee bb 21 69 49 15 e4""")  # client seq 0
SERVER_RECORD = _h("""
    17 03 03 00 43 2e 93 7e 11 ef 4a c7 40 e5 38 ad 36 00 5f c4 a4 69 32 fc 32 25 d0 5f
    82 aa 1b 36 e3 0e fa f9 7d 90 e6 df fc 60 2d cb 50 1a 59 a8 fc c4 9c 4b f2 e5 f0 a2
    1c 00 47 c2 ab f3 32 54 0d d0 32 e1 67 c2 95 5d""")  # server seq 1 (its ticket was 0)
CLIENT_CLOSE_NOTIFY = _h("17 03 03 00 13 c9 87 27 60 65 56 66 b7 4d 7f f1 15 3e fd 6d b6 d0 b0 e3")


def _ext():  # type: ignore[no-untyped-def]
    ext = native.module()
    assert ext is not None
    return ext


def test_rfc8448_client_application_data_record() -> None:
    assert _ext().record_protect(AES128, CLIENT_AP_SECRET, 0, 23, PAYLOAD) == CLIENT_RECORD
    assert _ext().record_unprotect(AES128, CLIENT_AP_SECRET, 0, CLIENT_RECORD) == (
        PAYLOAD, "more", 0)


def test_rfc8448_server_application_data_record() -> None:
    """The server's record is read with the reader's state of a client end (the same
    code: a read direction keyed with the server's secret)."""
    assert _ext().record_protect(AES128, SERVER_AP_SECRET, 1, 23, PAYLOAD) == SERVER_RECORD
    assert _ext().record_unprotect(AES128, SERVER_AP_SECRET, 1, SERVER_RECORD) == (
        PAYLOAD, "more", 0)


def test_rfc8448_client_close_notify() -> None:
    alert = _ext().record_protect(AES128, CLIENT_AP_SECRET, 1, 21, b"\x01\x00")
    assert alert == CLIENT_CLOSE_NOTIFY
    both = CLIENT_RECORD + CLIENT_CLOSE_NOTIFY
    assert _ext().record_unprotect(AES128, CLIENT_AP_SECRET, 0, both) == (
        PAYLOAD, "close_notify", 0)


# -- all three suites, against cryptography ------------------------------------------------
SUITES = {AES128: (16, hashes.SHA256, AESGCM), AES256: (32, hashes.SHA384, AESGCM),
          CHACHA: (32, hashes.SHA256, ChaCha20Poly1305)}


def _label(secret: bytes, label: bytes, length: int, suite: int) -> bytes:
    info = struct.pack(">HB", length, 6 + len(label)) + b"tls13 " + label + b"\x00"
    return HKDFExpand(SUITES[suite][1](), length, info).derive(secret)


def _seal(suite: int, secret: bytes, seq: int, inner: int, data: bytes,
          padding: int = 0) -> bytes:
    key_len, _, aead = SUITES[suite]
    key, iv = _label(secret, b"key", key_len, suite), _label(secret, b"iv", 12, suite)
    nonce = bytes(a ^ b for a, b in zip(iv, bytes(4) + struct.pack(">Q", seq), strict=True))
    plain = data + bytes([inner]) + bytes(padding)
    header = b"\x17\x03\x03" + struct.pack(">H", len(plain) + 16)
    return header + aead(key).encrypt(nonce, plain, header)


def _secret(suite: int) -> bytes:
    return os.urandom(48 if suite == AES256 else 32)


@pytest.mark.parametrize("suite", [AES128, AES256, CHACHA], ids=["aes128", "aes256", "chacha"])
@pytest.mark.parametrize("size", [0, 1, 16 * 1024 - 1, 16 * 1024])
@pytest.mark.parametrize("seq", [0, 1, 0x0102030405060708])
def test_records_match_an_independent_implementation(suite: int, size: int, seq: int) -> None:
    secret, data = _secret(suite), os.urandom(size)
    record = _ext().record_protect(suite, secret, seq, 23, data)
    assert record == _seal(suite, secret, seq, 23, data)
    assert _ext().record_unprotect(suite, secret, seq, record) == (data, "more", 0)


@pytest.mark.parametrize("suite", [AES128, AES256, CHACHA], ids=["aes128", "aes256", "chacha"])
def test_key_update_padding_and_split_input(suite: int) -> None:
    """A KeyUpdate requesting ours (answered once), then data under the next secret
    (RFC 8446 7.2), padded; delivered whole."""
    secret, data = _secret(suite), os.urandom(3000)
    following = _label(secret, b"traffic upd", len(secret), suite)
    wire = (_seal(suite, secret, 7, 23, data[:1000])
            + _seal(suite, secret, 8, 22, bytes([24, 0, 0, 1, 1]))
            + _seal(suite, following, 0, 23, data[1000:], padding=200))
    assert _ext().record_unprotect(suite, secret, 7, wire) == (data, "more", 1)


@pytest.mark.parametrize(("wire", "reason"), [
    (lambda s, k: _seal(s, k, 0, 23, b"x")[:-1] + b"\x00", "DECRYPTION_FAILED_OR_BAD_RECORD_MAC"),
    (lambda s, k: _seal(s, k, 1, 23, b"x"), "DECRYPTION_FAILED_OR_BAD_RECORD_MAC"),  # replay/seq
    (lambda s, k: _seal(s, k, 0, 23, bytes(16 * 1024 + 1)), "DATA_LENGTH_TOO_LONG"),
    (lambda s, k: b"\x17\x03\x03\x41\x01" + bytes(16 * 1024 + 257), "ENCRYPTED_LENGTH_TOO_LONG"),
    (lambda s, k: _seal(s, k, 0, 0, b"", padding=5), "BAD_RECORD_TYPE"),  # padding only
    (lambda s, k: _seal(s, k, 0, 21, b"\x02\x14"), "SSLV3_ALERT_BAD_RECORD_MAC"),
    (lambda s, k: _seal(s, k, 0, 22, bytes([24, 0, 0, 1, 2])), "BAD_KEY_UPDATE"),
    (lambda s, k: _seal(s, k, 0, 22, bytes([1, 0, 0, 0])), "UNEXPECTED_MESSAGE"),
], ids=["bad_tag", "wrong_sequence", "plaintext_over_2^14", "ciphertext_over_2^14+256",
        "no_content_type", "fatal_alert", "bad_key_update", "client_hello"])
def test_refusals(wire: object, reason: str) -> None:
    suite, secret = AES128, _secret(AES128)
    assert callable(wire)
    assert _ext().record_unprotect(suite, secret, 0, wire(suite, secret)) == (b"", reason, 0)

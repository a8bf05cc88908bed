"""TLV accessors, the flow-record and policy views, and the TLV builders."""

from __future__ import annotations

import json
import struct

import pytest

from enforcer.proxyproto import (
    PP2_TYPE_ENFORCER_IDENTITY,
    HeaderParser,
    ProxyHeader,
    SslInfo,
    Tlv,
    alpn_tlv,
    authority_tlv,
    aws_vpce_tlv,
    azure_link_tlv,
    build_v2,
    gcp_psc_tlv,
    identity_tlv,
    netns_tlv,
    noop_tlv,
    ssl_tlv,
    unique_id_tlv,
)

SRC, DST = ("203.0.113.7", 51234), ("10.0.9.9", 8443)


def roundtrip(*tlvs: Tlv, crc: bool = False) -> ProxyHeader:
    header = HeaderParser().feed(build_v2(SRC, DST, tlvs=tlvs, crc32c=crc))
    assert header is not None
    return header


def bare(*tlvs: Tlv) -> ProxyHeader:
    return ProxyHeader(2, "PROXY", "TCP4", "STREAM", SRC, DST, tlvs)


def test_no_tlvs() -> None:
    header = roundtrip()
    assert header.tlvs == ()
    assert (header.alpn, header.authority, header.unique_id, header.ssl) == (None,) * 4
    assert (header.netns, header.aws_vpce_id, header.azure_link_id) == (None,) * 3
    assert (header.gcp_psc_id, header.identity) == (None, None)
    assert header.tlvs_for_record() == {}
    assert header.tlvs_for_policy() == {}


def test_every_known_tlv_decodes() -> None:
    header = roundtrip(
        alpn_tlv(b"h2"),
        authority_tlv("payments.shop"),
        unique_id_tlv(b"\x01\x02flow"),
        ssl_tlv(
            version="TLSv1.3",
            cipher="TLS_AES_128_GCM_SHA256",
            cn="frontend",
            sig_alg="ecdsa-with-SHA256",
            key_alg="EC256",
            client_cert_presented=True,
            verified=True,
        ),
        netns_tlv("blue"),
        noop_tlv(3),
        aws_vpce_tlv("vpce-0abc"),
        azure_link_tlv(0x01020304),
        gcp_psc_tlv(0x0102030405060708),
        identity_tlv("spiffe://cluster.local/ns/shop/sa/frontend"),
        Tlv(0x99, b"\xde\xad"),
        crc=True,
    )
    assert header.alpn == b"h2"
    assert header.authority == "payments.shop"
    assert header.unique_id == b"\x01\x02flow"
    assert header.ssl == SslInfo(
        client_flags=0x07,
        verify=0,
        version="TLSv1.3",
        cn="frontend",
        cipher="TLS_AES_128_GCM_SHA256",
        sig_alg="ecdsa-with-SHA256",
        key_alg="EC256",
    )
    assert header.netns == "blue"
    assert header.aws_vpce_id == "vpce-0abc"
    assert header.azure_link_id == 0x01020304
    assert header.gcp_psc_id == 0x0102030405060708
    assert header.identity == "spiffe://cluster.local/ns/shop/sa/frontend"

    record = header.tlvs_for_record()
    assert record == {
        "crc32c": "ok",
        "alpn": "h2",
        "authority": "payments.shop",
        "unique_id": "0102666c6f77",
        "ssl": {
            "client_flags": 7,
            "verify": 0,
            "verified": True,
            "version": "TLSv1.3",
            "cn": "frontend",
            "cipher": "TLS_AES_128_GCM_SHA256",
            "sig_alg": "ecdsa-with-SHA256",
            "key_alg": "EC256",
        },
        "netns": "blue",
        "aws_vpce_id": "vpce-0abc",
        "azure_link_id": 0x01020304,
        "gcp_psc_id": 0x0102030405060708,
        "identity": "spiffe://cluster.local/ns/shop/sa/frontend",
        "0x99": "dead",
    }
    assert json.loads(json.dumps(record)) == record  # JSON-able as is
    assert header.tlvs_for_policy() == {
        "alpn": "h2",
        "authority": "payments.shop",
        "identity": "spiffe://cluster.local/ns/shop/sa/frontend",
        "aws_vpce_id": "vpce-0abc",
        "azure_link_id": str(0x01020304),
        "gcp_psc_id": str(0x0102030405060708),
    }


def test_cloud_tlvs_wire_format() -> None:
    # AWS: 0xEA, subtype 0x01, ASCII id
    assert aws_vpce_tlv("vpce-08d2bf15fac5001c9") == Tlv(0xEA, b"\x01vpce-08d2bf15fac5001c9")
    # Azure: 0xEE, subtype 0x01, uint32 little-endian
    assert azure_link_tlv(0x21000008) == Tlv(0xEE, b"\x01\x08\x00\x00\x21")
    # GCP: 0xE0, uint64 big-endian, no subtype
    assert gcp_psc_tlv(0x0102030405060708) == Tlv(0xE0, bytes(range(1, 9)))


def test_0xe0_is_gcp_not_a_subtyped_tlv() -> None:
    # A GCP value whose first byte is 0x01 must still decode as the whole uint64.
    header = roundtrip(Tlv(0xE0, b"\x01" + b"\x00" * 7))
    assert header.gcp_psc_id == 1 << 56
    assert header.tlvs_for_record() == {"gcp_psc_id": 1 << 56}


def test_enforcer_identity_tlv_format() -> None:
    assert PP2_TYPE_ENFORCER_IDENTITY == 0xE4
    assert 0xE0 <= PP2_TYPE_ENFORCER_IDENTITY <= 0xEF  # the spec's custom range
    t = identity_tlv("spiffe://td/ns/ä")
    assert t == Tlv(0xE4, b"\x01" + "spiffe://td/ns/ä".encode())
    assert roundtrip(t).identity == "spiffe://td/ns/ä"


def test_first_well_formed_cloud_tlv_is_the_typed_one() -> None:
    header = roundtrip(Tlv(0xE0, b"short"), gcp_psc_tlv(42), Tlv(0xEA, b"\x01"), aws_vpce_tlv("v"))
    assert header.gcp_psc_id == 42 and header.aws_vpce_id == "v"
    assert header.tlvs_for_record() == {
        "0xe0": b"short".hex(),
        "gcp_psc_id": 42,
        "0xea": "01",
        "aws_vpce_id": "v",
    }


def test_unknown_subtypes_are_raw() -> None:
    header = roundtrip(Tlv(0xEA, b"\x02abc"), Tlv(0xEE, b"\x07x"), Tlv(0xE4, b"\x09y"))
    assert (header.aws_vpce_id, header.azure_link_id, header.identity) == (None, None, None)
    assert header.tlvs_for_record() == {"0xea": "02616263", "0xee": "0778", "0xe4": "0979"}
    assert header.tlvs_for_policy() == {}


@pytest.mark.parametrize(
    ("presented", "verified", "resumed", "flags", "verify"),
    [
        (False, False, False, 0x01, 1),
        (True, False, False, 0x07, 1),
        (True, True, False, 0x07, 0),
        (True, True, True, 0x05, 0),
    ],
)
def test_ssl_tlv_flags(
    presented: bool, verified: bool, resumed: bool, flags: int, verify: int
) -> None:
    t = ssl_tlv(
        version="TLSv1.2",
        cipher="ECDHE-ECDSA-AES128-GCM-SHA256",
        cn=None,
        client_cert_presented=presented,
        verified=verified,
        session_resumed=resumed,
    )
    assert t.type == 0x20
    assert struct.unpack("!BI", t.value[:5]) == (flags, verify)
    info = roundtrip(t).ssl
    assert info is not None
    assert info.verified is (presented and verified)
    assert info.client_cert_presented is presented
    assert info.ssl is True
    assert (info.version, info.cipher, info.cn) == (
        "TLSv1.2",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        None,
    )


def test_ssl_tlv_sub_tlv_layout() -> None:
    t = ssl_tlv(version="TLSv1.3", cipher="C", cn="é", client_cert_presented=True, verified=True)
    assert t.value == (
        b"\x07\x00\x00\x00\x00"
        + b"\x21\x00\x07TLSv1.3"
        + b"\x22\x00\x02"
        + "é".encode()
        + b"\x23\x00\x01C"
    )


def test_ssl_verified_needs_a_certificate() -> None:
    with pytest.raises(ValueError):
        ssl_tlv(version=None, cipher=None, cn=None, client_cert_presented=False, verified=True)
    # a peer claiming verify == 0 without any certificate flag is not "verified"
    assert SslInfo(client_flags=0x01, verify=0).verified is False
    assert SslInfo(client_flags=0x04, verify=0).verified is True
    assert SslInfo(client_flags=0x02, verify=5).verified is False


def test_ssl_unknown_sub_tlvs_are_skipped() -> None:
    value = b"\x01\x00\x00\x00\x00" + b"\x26\x00\x02ab" + b"\x21\x00\x03TLS"
    info = roundtrip(Tlv(0x20, value)).ssl
    assert info is not None and info.version == "TLS"


@pytest.mark.parametrize(
    ("call", "arg"),
    [
        (identity_tlv, ""),
        (authority_tlv, ""),
        (alpn_tlv, b""),
        (unique_id_tlv, b"x" * 129),
        (aws_vpce_tlv, ""),
        (azure_link_tlv, 1 << 32),
        (azure_link_tlv, -1),
        (gcp_psc_tlv, 1 << 64),
        (netns_tlv, "ä"),
    ],
)
def test_tlv_builders_reject_bad_values(call: object, arg: object) -> None:
    with pytest.raises(ValueError):
        call(arg)  # type: ignore[operator]


def test_unique_id_accepts_str_and_128_bytes() -> None:
    assert unique_id_tlv("01J0ABC") == Tlv(0x05, b"01J0ABC")
    assert len(unique_id_tlv(b"x" * 128).value) == 128


def test_hand_built_header_with_invalid_values_reads_none() -> None:
    # The parser never produces these; accessors must still not raise on them.
    header = bare(
        Tlv(0x02, b"\xff"),
        Tlv(0x20, b"\x01"),
        Tlv(0x30, b"\x80"),
        Tlv(0xEA, b"\x01\xff"),
        Tlv(0xEE, b"\x01\x00"),
        Tlv(0xE0, b"\x00"),
        Tlv(0xE4, b"\x01"),
    )
    assert header.authority is None and header.ssl is None and header.netns is None
    assert header.aws_vpce_id is None and header.azure_link_id is None
    assert header.gcp_psc_id is None and header.identity is None
    record = header.tlvs_for_record()
    assert record == {
        "0x02": "ff",
        "0x20": "01",
        "0x30": "80",
        "0xea": "01ff",
        "0xee": "0100",
        "0xe0": "00",
        "0xe4": "01",
    }
    assert header.tlvs_for_policy() == {}


def test_alpn_with_odd_bytes_stays_printable_in_views() -> None:
    header = roundtrip(alpn_tlv(b"h2\xff"))
    assert header.alpn == b"h2\xff"
    assert header.tlvs_for_record()["alpn"] == "h2\\xff"
    assert header.tlvs_for_policy() == {"alpn": "h2\\xff"}


def test_first_typed_tlv_wins_on_hand_built_duplicates() -> None:
    header = bare(authority_tlv("a"), authority_tlv("b"))
    assert header.authority == "a"
    assert header.tlvs_for_record() == {"authority": "a"}

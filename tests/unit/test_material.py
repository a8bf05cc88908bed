"""tlsconf.material: every source loads, every bad input is one line naming file and problem."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from enforcer.tlsconf import material as material_mod
from enforcer.tlsconf.material import MaterialError, expiry_warning, load_material
from tests.e2e.tls_util import (
    ChainPki,
    Issued,
    SecretMount,
    make_cert,
    make_crl,
    material_cfg,
    write,
)


@pytest.fixture(scope="module")
def chain() -> ChainPki:
    return ChainPki.create()


@pytest.fixture(scope="module")
def root() -> Issued:
    return make_cert("unit root CA", ca=True)


@pytest.fixture(scope="module")
def leaf(root: Issued) -> Issued:
    return make_cert("svc", issuer=root, dns=("svc.local",), uri=("spiffe://t/ns/a/sa/svc",))


def _pem_files(tmp: Path, leaf: Issued, root: Issued) -> dict[str, str]:
    return {"cert": write(tmp / "tls.crt", leaf.cert_pem), "key": write(tmp / "tls.key", leaf.key_pem),
            "ca": write(tmp / "ca.crt", root.cert_pem)}


def _error(tmp: Path, **kw: object) -> str:
    with pytest.raises(MaterialError) as info:
        load_material(material_cfg(**kw))  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# --------------------------------------------------------------------------- sources


def test_pem_files(tmp_path: Path, leaf: Issued, root: Issued) -> None:
    files = _pem_files(tmp_path, leaf, root)
    m = load_material(material_cfg(**files))
    assert m.leaf is not None and m.leaf.serial_number == leaf.cert.serial_number
    assert m.has_identity and m.ca_pem == root.cert_pem
    assert m.dns_names == ("svc.local",)
    assert m.cert_file == files["cert"]
    assert set(m.sources) == set(files.values())
    assert m.key_pem is not None and b"BEGIN PRIVATE KEY" in m.key_pem


def test_kubernetes_secret_dir(tmp_path: Path, leaf: Issued, root: Issued) -> None:
    mount = SecretMount(tmp_path / "secret")
    mount.update({"tls.crt": leaf.cert_pem, "tls.key": leaf.key_pem, "ca.crt": root.cert_pem})
    m = load_material(material_cfg(dir=str(mount.path)))
    assert m.leaf is not None and m.leaf.serial_number == leaf.cert.serial_number
    assert m.ca_pem == root.cert_pem
    assert str(mount.path / "tls.crt") in m.sources and str(mount.path / "ca.crt") in m.sources


def test_secret_dir_without_ca_and_a_separate_ca(tmp_path: Path, leaf: Issued,
                                                  root: Issued) -> None:
    mount = SecretMount(tmp_path / "secret")
    mount.update({"tls.crt": leaf.cert_pem, "tls.key": leaf.key_pem})
    assert load_material(material_cfg(dir=str(mount.path))).ca_pem is None
    ca = write(tmp_path / "trust.pem", root.cert_pem)
    assert load_material(material_cfg(dir=str(mount.path), ca=ca)).ca_pem == root.cert_pem


def test_secret_dir_missing_key(tmp_path: Path, leaf: Issued) -> None:
    mount = SecretMount(tmp_path / "secret")
    mount.update({"tls.crt": leaf.cert_pem})
    msg = _error(tmp_path, dir=str(mount.path))
    assert msg == f"tls.mesh.dir: {mount.path / 'tls.key'}: no such file"


def test_inline(leaf: Issued, root: Issued) -> None:
    m = load_material(material_cfg(inline_cert=leaf.cert_pem, inline_key=leaf.key_pem,
                                   inline_ca=root.cert_pem))
    assert m.leaf is not None and m.ca_pem == root.cert_pem and m.sources == ()
    assert m.cert_file == "inline"


def test_inline_bad_key_names_the_key_path(leaf: Issued, root: Issued) -> None:
    with pytest.raises(MaterialError, match=r"^tls\.mesh\.inline\.key: the private key does "
                                             r"not match the certificate"):
        load_material(material_cfg(inline_cert=leaf.cert_pem, inline_key=root.key_pem))


def _p12(tmp: Path, leaf: Issued, extra: list[Issued], password: bytes | None) -> str:
    enc = (serialization.BestAvailableEncryption(password) if password
           else serialization.NoEncryption())
    data = pkcs12.serialize_key_and_certificates(b"svc", leaf.key, leaf.cert,
                                                 [e.cert for e in extra], enc)
    return write(tmp / "bundle.p12", data)


def test_pkcs12_with_password_env(tmp_path: Path, chain: ChainPki,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = _p12(tmp_path, chain.server, [chain.root, chain.inter], b"s3cret")
    monkeypatch.setenv("P12_PASS", "s3cret")
    m = load_material(material_cfg(pkcs12=path, pkcs12_password_env="P12_PASS"))
    assert m.leaf is not None and m.leaf.serial_number == chain.server.cert.serial_number
    # the intermediate is sent after the leaf; the root is not; all are the trust bundle
    assert m.cert_pem == chain.server.cert_pem + chain.inter.cert_pem
    assert m.ca_pem is not None and chain.root.cert_pem in m.ca_pem


def test_pkcs12_wrong_password(tmp_path: Path, leaf: Issued,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = _p12(tmp_path, leaf, [], b"right")
    monkeypatch.setenv("P12_PASS", "wrong")
    msg = _error(tmp_path, pkcs12=path, pkcs12_password_env="P12_PASS")
    assert msg == (f"tls.mesh.pkcs12: {path}: cannot open the PKCS#12 bundle (wrong password, "
                   "or not PKCS#12)")


def test_pkcs12_password_env_not_set(tmp_path: Path, leaf: Issued,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = _p12(tmp_path, leaf, [], b"right")
    monkeypatch.delenv("P12_NOPE", raising=False)
    msg = _error(tmp_path, pkcs12=path, pkcs12_password_env="P12_NOPE")
    assert msg == "tls.mesh.password_env: environment variable P12_NOPE is not set"


def test_pkcs12_garbage(tmp_path: Path) -> None:
    path = write(tmp_path / "x.p12", b"this is not a pkcs12 file")
    assert "cannot open the PKCS#12 bundle" in _error(tmp_path, pkcs12=path)


# --------------------------------------------------------------------------- bad input


def test_key_not_matching(tmp_path: Path, leaf: Issued, root: Issued) -> None:
    files = _pem_files(tmp_path, leaf, root)
    other = write(tmp_path / "other.key", root.key_pem)
    msg = _error(tmp_path, **{**files, "key": other})
    assert msg == (f"tls.mesh.key: the private key does not match the certificate (key {other}, "
                   f"certificate {files['cert']} with subject CN=svc)")


@pytest.mark.parametrize(("part", "content", "problem"), [
    ("cert", b"hello\n", "no PEM certificate found (not PEM)"),
    ("cert", b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
     "garbage PEM: a CERTIFICATE block does not decode"),
    ("cert", b"KEY", "no PEM certificate found (the file holds a private key)"),
    ("key", b"-----BEGIN PRIVATE KEY-----\nbm9wZQ==\n-----END PRIVATE KEY-----\n",
     "garbage PEM: the PRIVATE KEY block does not decode"),
    ("key", b"CERT", "no PEM private key found (the file holds a certificate)"),
    ("ca", b"KEY", "no PEM certificate found (the file holds a private key)"),
])
def test_garbage(tmp_path: Path, leaf: Issued, root: Issued, part: str, content: bytes,
                 problem: str) -> None:
    files = _pem_files(tmp_path, leaf, root)
    content = {b"KEY": leaf.key_pem, b"CERT": leaf.cert_pem}.get(content, content)
    bad = write(tmp_path / f"bad-{part}.pem", content)
    assert _error(tmp_path, **{**files, part: bad}) == f"tls.mesh.{part}: {problem} in {bad}"


@pytest.mark.parametrize("part", ["cert", "key", "ca"])
def test_empty_file(tmp_path: Path, leaf: Issued, root: Issued, part: str) -> None:
    files = _pem_files(tmp_path, leaf, root)
    empty = write(tmp_path / "empty.pem", b"\n  \n")
    assert _error(tmp_path, **{**files, part: empty}) == f"tls.mesh.{part}: {empty}: file is empty"


def test_encrypted_key(tmp_path: Path, leaf: Issued, root: Issued) -> None:
    files = _pem_files(tmp_path, leaf, root)
    enc = leaf.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.BestAvailableEncryption(b"pw"))
    key = write(tmp_path / "enc.key", enc)
    assert _error(tmp_path, **{**files, "key": key}).startswith(
        "tls.mesh.key: the private key is encrypted; give an unencrypted key")


def test_ca_file_with_a_leaf(tmp_path: Path, leaf: Issued, root: Issued) -> None:
    files = _pem_files(tmp_path, leaf, root)
    ca = write(tmp_path / "ca-with-leaf.pem", root.cert_pem + leaf.cert_pem)
    assert _error(tmp_path, **{**files, "ca": ca}) == (
        f"tls.mesh.ca: the CA bundle holds a certificate that is not a CA (CN=svc, a leaf?) "
        f"in {ca}")


def test_expired(tmp_path: Path, root: Issued) -> None:
    old = make_cert("old", issuer=root, days=1,
                    not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=3))
    cert = write(tmp_path / "old.crt", old.cert_pem)
    msg = _error(tmp_path, cert=cert, key=write(tmp_path / "old.key", old.key_pem))
    assert msg.startswith("tls.mesh.cert: certificate CN=old expired at ")
    assert msg.endswith(f" in {cert}")


def test_not_yet_valid(tmp_path: Path, root: Issued) -> None:
    future = make_cert("future", issuer=root,
                       not_before=dt.datetime.now(dt.UTC) + dt.timedelta(days=2))
    cert = write(tmp_path / "f.crt", future.cert_pem)
    msg = _error(tmp_path, cert=cert, key=write(tmp_path / "f.key", future.key_pem))
    assert msg.startswith("tls.mesh.cert: certificate CN=future is not valid before ")


def test_expired_intermediate_in_the_chain(tmp_path: Path, chain: ChainPki) -> None:
    old_inter = make_cert("old intermediate", issuer=chain.root, ca=True, path_length=0,
                          days=1, not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=3))
    leaf = make_cert("svc", issuer=old_inter)
    cert = write(tmp_path / "c.crt", leaf.cert_pem + old_inter.cert_pem)
    msg = _error(tmp_path, cert=cert, key=write(tmp_path / "c.key", leaf.key_pem))
    assert msg.startswith("tls.mesh.cert: certificate CN=old intermediate expired at ")


def test_chain_with_an_intermediate_that_did_not_sign(tmp_path: Path, chain: ChainPki) -> None:
    stranger = make_cert("stranger CA", issuer=chain.root, ca=True, path_length=0)
    cert = write(tmp_path / "c.crt", chain.server.cert_pem + stranger.cert_pem)
    msg = _error(tmp_path, cert=cert, key=write(tmp_path / "c.key", chain.server.key_pem))
    assert msg == (f"tls.mesh.cert: the chain is broken: certificate 2 (CN=stranger CA) did not "
                   f"sign certificate 1 (CN=server) in {cert}")


def test_good_chain_loads(tmp_path: Path, chain: ChainPki) -> None:
    m = load_material(material_cfg(
        cert=write(tmp_path / "c.crt", chain.server.cert_pem + chain.inter.cert_pem),
        key=write(tmp_path / "c.key", chain.server.key_pem),
        ca=write(tmp_path / "ca.crt", chain.root.cert_pem)))
    assert m.leaf is not None and m.leaf.subject == chain.server.cert.subject


def test_issuer_in_bundle_by_name_but_another_key(tmp_path: Path, leaf: Issued) -> None:
    # the CA was "rotated": same name, new key; the certificate was not reissued
    new_root = make_cert("unit root CA", ca=True)
    cert = write(tmp_path / "c.crt", leaf.cert_pem)
    ca = write(tmp_path / "ca.crt", new_root.cert_pem)
    msg = _error(tmp_path, cert=cert, key=write(tmp_path / "c.key", leaf.key_pem), ca=ca)
    assert msg == (f"tls.mesh.cert: the certificate CN=svc is not signed by the CA CN=unit root "
                   f"CA of the CA bundle {ca} (same name, another key: was the CA rotated "
                   f"without reissuing the certificate?) in {cert}")


def test_issuer_not_in_bundle_is_only_a_warning(tmp_path: Path, leaf: Issued,
                                                caplog: pytest.LogCaptureFixture) -> None:
    other = make_cert("client CA", ca=True)
    with caplog.at_level(logging.WARNING, logger="enforcer.tls"):
        m = load_material(material_cfg(cert=write(tmp_path / "c.crt", leaf.cert_pem),
                                       key=write(tmp_path / "c.key", leaf.key_pem),
                                       ca=write(tmp_path / "ca.crt", other.cert_pem)))
    assert m.leaf is not None
    assert "issuer CN=unit root CA is not in the CA bundle" in caplog.text


def test_missing_file(tmp_path: Path, leaf: Issued, root: Issued) -> None:
    files = _pem_files(tmp_path, leaf, root)
    missing = str(tmp_path / "nope.crt")
    assert _error(tmp_path, **{**files, "ca": missing}) == f"tls.mesh.ca: {missing}: no such file"


# --------------------------------------------------------------------------- CRL


def test_crl_loads(tmp_path: Path, leaf: Issued, root: Issued) -> None:
    files = _pem_files(tmp_path, leaf, root)
    crl = write(tmp_path / "crl.pem", make_crl(root, (123,)))
    m = load_material(material_cfg(**files, crl=crl))
    assert m.crl_pem is not None and crl in m.sources


def test_crl_not_signed_by_the_ca(tmp_path: Path, leaf: Issued, root: Issued) -> None:
    files = _pem_files(tmp_path, leaf, root)
    impostor = make_cert("unit root CA", ca=True)
    crl = write(tmp_path / "crl.pem", make_crl(impostor))
    assert _error(tmp_path, **files, crl=crl) == (
        f"tls.mesh.crl: the CRL issued by CN=unit root CA is not signed by the CA of that name "
        f"in the CA bundle {files['ca']} in {crl}")


def test_crl_expired(tmp_path: Path, leaf: Issued, root: Issued) -> None:
    files = _pem_files(tmp_path, leaf, root)
    crl = write(tmp_path / "crl.pem", make_crl(root, next_update_days=-1))
    assert "the CRL issued by CN=unit root CA expired at" in _error(tmp_path, **files, crl=crl)


def test_crl_missing_for_a_ca_of_the_bundle(tmp_path: Path, chain: ChainPki) -> None:
    ca = write(tmp_path / "ca.crt", chain.root.cert_pem)
    crl = write(tmp_path / "crl.pem", make_crl(chain.inter))  # the root's is missing
    assert _error(tmp_path, ca=ca, crl=crl) == (
        "tls.mesh.crl: no CRL from the CA CN=test root CA: the whole peer chain is checked for "
        f"revocation, so every CA of the bundle needs a CRL in {crl}")


def test_crl_garbage_and_without_ca(tmp_path: Path, root: Issued) -> None:
    ca = write(tmp_path / "ca.crt", root.cert_pem)
    garbage = write(tmp_path / "crl.pem", b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")
    assert _error(tmp_path, ca=ca, crl=garbage) == (
        f"tls.mesh.crl: garbage PEM: an X509 CRL block does not decode in {garbage}")
    not_crl = write(tmp_path / "notcrl.pem", root.cert_pem)
    assert "no PEM CRL found" in _error(tmp_path, ca=ca, crl=not_crl)
    good = write(tmp_path / "good.pem", make_crl(root))
    with pytest.raises(MaterialError, match="a CRL needs a ca bundle"):
        load_material(material_cfg(inline_cert=root.cert_pem, inline_key=root.key_pem, crl=good))


# --------------------------------------------------------------------------- expiry, reads


def test_expiry_warning(tmp_path: Path, root: Issued, caplog: pytest.LogCaptureFixture) -> None:
    soon = make_cert("soon", issuer=root, days=3)
    with caplog.at_level(logging.WARNING, logger="enforcer.tls"):
        m = load_material(material_cfg(cert=write(tmp_path / "s.crt", soon.cert_pem),
                                       key=write(tmp_path / "s.key", soon.key_pem)))
    assert "tls.mesh: certificate" in caplog.text and "renew it" in caplog.text
    now = dt.datetime.now(dt.UTC)
    assert expiry_warning(m, now) is not None
    assert expiry_warning(m, now - dt.timedelta(days=10)) is None


def test_fingerprint_changes_only_with_content(tmp_path: Path, leaf: Issued, root: Issued) -> None:
    files = _pem_files(tmp_path, leaf, root)
    a = load_material(material_cfg(**files))
    b = load_material(material_cfg(**files))
    assert a.fingerprint == b.fingerprint
    write(tmp_path / "ca.crt", root.cert_pem + make_cert("extra CA", ca=True).cert_pem)
    assert load_material(material_cfg(**files)).fingerprint != a.fingerprint


def test_a_swap_in_the_middle_of_a_read_is_read_again(tmp_path: Path, root: Issued,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    first = make_cert("first", issuer=root)
    second = make_cert("second", issuer=root)
    mount = SecretMount(tmp_path / "secret")
    mount.update({"tls.crt": first.cert_pem, "tls.key": first.key_pem})
    real_read = material_mod._read
    swapped: list[bool] = []

    def read_and_rotate(where: str, path: str) -> material_mod.Blob:
        blob = real_read(where, path)
        if path.endswith("tls.crt") and not swapped:  # rotate between the cert and the key
            swapped.append(True)
            mount.update({"tls.crt": second.cert_pem, "tls.key": second.key_pem})
        return blob

    monkeypatch.setattr(material_mod, "_read", read_and_rotate)
    m = load_material(material_cfg(dir=str(mount.path)))
    assert swapped and m.leaf is not None and m.leaf.subject == second.cert.subject

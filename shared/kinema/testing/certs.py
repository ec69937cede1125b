"""Throwaway PKIs for the TLS tests: a CA, and certificates it signs for servers (localhost, 127.0.0.1) and clients,
written as the PEM files cert-manager puts in a Secret (`tls.crt`, `tls.key`, `ca.crt`). EC P-256 keys: instant to
make, and every TLS stack Kinema meets (gRPC's BoringSSL, Triton, OpenSSL via `ssl`) takes them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK = ("localhost", "127.0.0.1")
_VALIDITY = dt.timedelta(days=1)
_BOTH_ENDS = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]  # one certificate serves and calls


@dataclass(frozen=True)
class Issued:
    """One certificate's files: its chain, its key and the CA that signed it."""

    cert: Path
    key: Path
    ca: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))  # fmt: skip


class CertificateAuthority:
    """A self-signed CA in `folder` (`ca.crt`, `ca.key`) that issues certificates into subfolders."""

    def __init__(self, folder: Path, name: str = "kinema-test-ca") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        usage = dict.fromkeys(("content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
                               "encipher_only", "decipher_only"), False)  # fmt: skip
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, **usage), True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert = self.folder / "ca.crt"
        self.cert.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        _write_key(self._key, self.folder / "ca.key")

    def issue(self, name: str, hosts: tuple[str, ...] = LOOPBACK) -> Issued:
        """A certificate for `name`, good for serving `hosts` (DNS names or IPs) and as a client certificate, in
        `<folder>/<name>/` as tls.crt, tls.key and ca.crt."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(_BOTH_ENDS), critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        folder = self.folder / name
        folder.mkdir(exist_ok=True)
        issued = Issued(folder / "tls.crt", folder / "tls.key", folder / "ca.crt")
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, issued.key)
        issued.ca.write_bytes(self.cert.read_bytes())
        return issued

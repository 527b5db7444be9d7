"""HTTPS and WSS served directly: a certificate of the operator's, or one made here once.

A browser opens a camera only on `https://` or on localhost, so a server on a GPU box that
a laptop reaches over the LAN needs TLS. `--tls-cert FILE --tls-key FILE` serves with the
operator's own; `--tls self-signed` makes one on first start (an ECDSA P-256 key, valid for
a year and for localhost, this machine's name and the listening address) and keeps it in the
data folder, so a browser that was told to trust it keeps trusting it across restarts. Its
SHA-256 fingerprint is printed and logged: compare it with what the browser shows before
accepting the warning. WebRTC media needs nothing here: DTLS always runs on a certificate
of the peer connection's own, checked against the fingerprint in the SDP.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from ..config import Settings

SELF_SIGNED = "self-signed"
#: Where `--tls self-signed` keeps its certificate, inside the data folder.
SELF_SIGNED_DIR = "tls"
CERT_NAME = "cert.pem"
KEY_NAME = "key.pem"
VALID_DAYS = 365
#: A kept certificate this close to its end is replaced rather than served.
RENEW_BEFORE = datetime.timedelta(days=7)


class TlsError(ValueError):
    """The TLS settings cannot be served; `str()` says what to fix, in one line."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: Path
    key: Path
    #: SHA-256 of the certificate (DER), as browsers show it: AB:CD:...
    fingerprint: str
    #: True when `--tls self-signed` made it just now.
    made: bool = False


def self_signed_paths(data_dir: Path) -> tuple[Path, Path]:
    folder = data_dir / SELF_SIGNED_DIR
    return folder / CERT_NAME, folder / KEY_NAME


def tls_files(settings: Settings) -> TlsFiles | None:
    """The certificate and key to serve with, made first for `--tls self-signed`; None for
    plain HTTP. Raises `TlsError` for settings that do not go together or files that do
    not make a working pair."""
    given = settings.tls_cert is not None or settings.tls_key is not None
    if settings.tls is not None and settings.tls != SELF_SIGNED:
        raise TlsError(f"--tls takes {SELF_SIGNED} only, not {settings.tls!r}")
    if settings.tls == SELF_SIGNED and given:
        raise TlsError("--tls self-signed and --tls-cert/--tls-key do not go together")
    if settings.tls == SELF_SIGNED:
        return ensure_self_signed(settings.data_dir, settings.host)
    if not given:
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        raise TlsError("--tls-cert and --tls-key go together: give both")
    check_pair(settings.tls_cert, settings.tls_key)
    return TlsFiles(settings.tls_cert, settings.tls_key, fingerprint(settings.tls_cert))


def check_pair(cert: Path, key: Path) -> None:
    """That the two files load as a certificate chain and its key; `TlsError` if not."""
    for path in (cert, key):
        if not path.is_file():
            raise TlsError(f"no such file: {path}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise TlsError(f"{cert} and {key} are not a certificate and its key: {exc}") from None
    except OSError as exc:
        raise TlsError(f"cannot read {cert} or {key}: {exc}") from None


def fingerprint(cert: Path) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    try:
        loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    except ValueError as exc:
        raise TlsError(f"{cert} is not a PEM certificate: {exc}") from None
    return ":".join(f"{byte:02X}" for byte in loaded.fingerprint(hashes.SHA256()))


def ensure_self_signed(data_dir: Path, host: str) -> TlsFiles:
    """The kept self-signed certificate, or a new one when there is none that works
    (missing, damaged, expiring within a week)."""
    cert, key = self_signed_paths(data_dir)
    if cert.is_file() and key.is_file() and _still_good(cert):
        try:
            check_pair(cert, key)
        except TlsError:
            pass
        else:
            return TlsFiles(cert, key, fingerprint(cert))
    _make_self_signed(cert, key, host)
    return TlsFiles(cert, key, fingerprint(cert), made=True)


def _still_good(cert: Path) -> bool:
    from cryptography import x509

    try:
        loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    except ValueError:
        return False
    now = datetime.datetime.now(datetime.UTC)
    return loaded.not_valid_after_utc - RENEW_BEFORE > now


def _names(host: str) -> list[str]:
    """Names and addresses the certificate is for: localhost, this machine's name, the
    loopback addresses and the listening address, or for a wildcard the addresses the
    machine's name resolves to."""
    machine = socket.gethostname()
    names = ["localhost", machine, "127.0.0.1", "::1"]
    if host and host not in ("0.0.0.0", "::", ""):
        names.append(host.strip("[]"))
    else:  # a wildcard: the addresses the machine's name resolves to (hosts file first)
        with contextlib.suppress(OSError):
            names.extend(socket.gethostbyname_ex(machine)[2])
    seen: list[str] = []
    for name in names:
        if name and name not in seen:
            seen.append(name)
    return seen


def _make_self_signed(cert: Path, key: Path, host: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    alternatives: list[x509.GeneralName] = []
    for name in _names(host):
        try:
            alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternatives.append(x509.DNSName(name))
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "livemorph self-signed"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "livemorph"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(private, hashes.SHA256())
    )
    cert.parent.mkdir(parents=True, exist_ok=True)
    key_bytes = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # The key is written readable by its owner only, and both files appear whole or not at
    # all (written aside, then renamed), so a crash never leaves a half-written pair.
    _write(key, key_bytes, 0o600)
    _write(cert, certificate.public_bytes(serialization.Encoding.PEM), 0o644)


def _write(path: Path, data: bytes, mode: int) -> None:
    partial = path.with_name(path.name + ".partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(descriptor, "wb") as out:
        out.write(data)
    os.replace(partial, path)


def client_context(cert: Path) -> ssl.SSLContext:
    """An SSL context that trusts `cert` alone: what a client of a self-signed server
    passes to `create_client(..., ssl=...)`."""
    return ssl.create_default_context(cafile=str(cert))

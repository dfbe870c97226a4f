"""A real Kubernetes control plane for the tests (docs/design.md#testing): etcd, kube-apiserver and
kube-controller-manager as processes on loopback ports, from the binaries ``make k8s`` builds.

The API server authorizes with RBAC, signs service-account tokens and writes an audit log of what the
operator's service accounts do. The tests talk to it as ``system:masters`` with a client certificate;
the controller manager runs the garbage collector and the namespace, service-account, deployment,
replicaset, job and disruption controllers. There is no scheduler and no kubelet: pods are created and stay
Pending unless a test plays the kubelet (``Cluster.play_kubelet``).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from support.crds import load_crds

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / ".ci" / "k8s" / "build"
OPERATOR_NAMESPACE = "promptcache-system"
OPERATOR_ACCOUNT = "promptcache"
"""The service account the chart gives the operator (release ``promptcache`` in ``promptcache-system``)."""
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_ACCOUNT}"
SCOPED_RELEASE = "scoped"
"""A second release of the chart in ``promptcache-system``, with ``operator.namespaces`` set: the namespaced RBAC."""
SCOPED_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{SCOPED_RELEASE}-promptcache"
CONTROLLERS = ("garbage-collector-controller", "namespace-controller", "serviceaccount-controller",
               "deployment-controller", "replicaset-controller", "job-controller", "disruption-controller")
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [{"level": "Metadata", "users": [OPERATOR_USER, SCOPED_USER]}, {"level": "None"}],
}


def binaries() -> Path:
    """The directory holding the three binaries: ``$PROMPTCACHE_K8S_BIN``, else what ``.ci/k8s/build`` finds or
    builds (``make test`` runs it first, with progress on the terminal)."""
    given = os.environ.get("PROMPTCACHE_K8S_BIN")
    if given:
        return Path(given)
    result = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{BUILD} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- certificates -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(key: rsa.RSAPrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


class Pki:
    """A throw-away CA and the certificates issued by it, in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._ca_key = _key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "promptcache-test-ca")])
        now = datetime.datetime.now(datetime.UTC)
        self._ca_name = name
        self._ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                    .public_key(self._ca_key.public_key()).serial_number(x509.random_serial_number())
                    .not_valid_before(now - datetime.timedelta(minutes=5))
                    .not_valid_after(now + datetime.timedelta(days=2))
                    .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                    .sign(self._ca_key, hashes.SHA256()))
        self.ca = directory / "ca.crt"
        self.ca.write_bytes(self._ca.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, *, common_name: str, organization: str | None = None,
              server: bool = False) -> KeyPair:
        key = _key()
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        if organization:
            attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
        now = datetime.datetime.now(datetime.UTC)
        builder = (x509.CertificateBuilder().subject_name(x509.Name(attributes)).issuer_name(self._ca_name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost"),
                x509.DNSName("kubernetes.default.svc")]), critical=False)
            usage = x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
        else:
            usage = x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
        cert = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False).sign(
            self._ca_key, hashes.SHA256())
        path = self.directory / f"{name}.crt"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return KeyPair(cert=path, key=_write_key(key, self.directory / f"{name}.key"))

    def signing_key(self, name: str) -> KeyPair:
        """An RSA key pair for service-account tokens (``cert`` holds the public key)."""
        key = _key()
        public = self.directory / f"{name}.pub"
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
        return KeyPair(cert=public, key=_write_key(key, self.directory / f"{name}.key"))


def kubeconfig(path: Path, url: str, ca: Path, *, user: str, client: KeyPair | None = None,
               token: str | None = None, namespace: str = "default") -> Path:
    credentials: dict[str, str] = {}
    if client is not None:
        credentials = {"client-certificate": str(client.cert), "client-key": str(client.key)}
    if token is not None:
        credentials = {"token": token}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": url, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": user, "namespace": namespace}}],
        "current-context": "test",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


# -- processes --------------------------------------------------------------------------------------------------

class Process:
    """A child process with its output in a log file; stopped (TERM, then KILL) by ``stop``."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        self.log = log
        self._out: IO[bytes] = log.open("wb")
        self.popen = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def check(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise RuntimeError(f"{self.name} exited with {code}; the end of {self.log}:\n{self.tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._out.close()


@dataclass
class ControlPlane:
    url: str
    ca: Path
    admin: KeyPair
    """A client certificate in ``system:masters``: the tests' own identity."""
    admin_kubeconfig: Path
    audit_log: Path
    directory: Path
    processes: list[Process]

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.admin.cert), str(self.admin.key))
        return context

    def check(self) -> None:
        for process in self.processes:
            process.check()


def _wait_ready(plane: ControlPlane, within: float) -> None:
    deadline = time.monotonic() + within
    context = plane.ssl_context()
    last: Exception | None = None
    while time.monotonic() < deadline:
        plane.check()
        try:
            with urllib.request.urlopen(f"{plane.url}/readyz", context=context, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError as e:
            last = e
        time.sleep(0.2)
    raise RuntimeError(f"kube-apiserver was not ready in {within}s ({last}); its log:\n{plane.processes[1].tail()}")


def _request(plane: ControlPlane, method: str, path: str, body: object | None = None) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{plane.url}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, context=plane.ssl_context(), timeout=10) as response:
        result: dict[str, Any] = json.load(response)
        return result


def _install_crds(plane: ControlPlane, within: float) -> None:
    """The repo's CRDs, Established before the controller manager starts: its garbage collector then knows our
    kinds as owners from the start (it rediscovers resources only every 30 s)."""
    path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    names = []
    for crd in load_crds():
        _request(plane, "POST", path, crd)
        names.append(crd["metadata"]["name"])
    deadline = time.monotonic() + within
    for name in names:
        while not any(c.get("type") == "Established" and c.get("status") == "True"
                      for c in (_request(plane, "GET", f"{path}/{name}").get("status") or {}).get("conditions") or []):
            if time.monotonic() > deadline:
                raise RuntimeError(f"CRD {name} was not Established in {within}s")
            time.sleep(0.1)


def _wait_controllers(plane: ControlPlane, within: float) -> None:
    """The controller manager is up once the service-account controller made ``default``'s account."""
    deadline = time.monotonic() + within
    context = plane.ssl_context()
    url = f"{plane.url}/api/v1/namespaces/default/serviceaccounts/default"
    while time.monotonic() < deadline:
        plane.check()
        try:
            with urllib.request.urlopen(url, context=context, timeout=5) as response:
                if json.load(response).get("kind") == "ServiceAccount":
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"kube-controller-manager did not start in {within}s; its log:\n{plane.processes[2].tail()}")


@contextlib.contextmanager
def control_plane(*, within: float = 120.0) -> Iterator[ControlPlane]:
    """etcd → kube-apiserver → the repo's CRDs → kube-controller-manager, ready; all stopped and their files
    removed on exit.

    etcd keeps its data in memory-backed ``/dev/shm`` when there is one. Any failure to start raises with the
    failing process's log: the tests that need the server fail, they do not skip.
    """
    bin_dir = binaries()
    shm = Path("/dev/shm")
    directory = Path(tempfile.mkdtemp(prefix="promptcache-k8s-", dir=shm if shm.is_dir() else None))
    processes: list[Process] = []
    try:
        pki = Pki(directory)
        serving = pki.issue("apiserver", common_name="kube-apiserver", server=True)
        admin = pki.issue("admin", common_name="promptcache-tests", organization="system:masters")
        manager = pki.issue("controller-manager", common_name="system:kube-controller-manager")
        accounts = pki.signing_key("service-accounts")
        policy = directory / "audit-policy.yaml"
        policy.write_text(yaml.safe_dump(AUDIT_POLICY))
        audit_log = directory / "audit.log"

        etcd_port, etcd_peer, api_port = free_port(), free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        processes.append(Process("etcd", [
            str(bin_dir / "etcd"), "--name=test", f"--data-dir={directory / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-cluster=test=http://127.0.0.1:{etcd_peer}",
            "--unsafe-no-fsync", "--log-level=warn",
        ], directory / "etcd.log"))
        url = f"https://127.0.0.1:{api_port}"
        processes.append(Process("kube-apiserver", [
            str(bin_dir / "kube-apiserver"), f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={api_port}",
            f"--tls-cert-file={serving.cert}", f"--tls-private-key-file={serving.key}",
            f"--client-ca-file={pki.ca}", "--authorization-mode=RBAC",
            "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={accounts.cert}", f"--service-account-signing-key-file={accounts.key}",
            "--service-cluster-ip-range=10.96.0.0/16", "--endpoint-reconciler-type=none", "--profiling=false",
            f"--audit-policy-file={policy}", f"--audit-log-path={audit_log}", "--audit-log-format=json",
            "--audit-log-mode=blocking", f"--cert-dir={directory / 'certs'}", "--v=1",
        ], directory / "kube-apiserver.log"))
        admin_kubeconfig = kubeconfig(directory / "admin.kubeconfig", url, pki.ca, user="admin", client=admin)
        plane = ControlPlane(url=url, ca=pki.ca, admin=admin, admin_kubeconfig=admin_kubeconfig,
                             audit_log=audit_log, directory=directory, processes=processes)
        _wait_ready(plane, within)
        _install_crds(plane, within)
        manager_kubeconfig = kubeconfig(directory / "controller-manager.kubeconfig", url, pki.ca,
                                        user="controller-manager", client=manager)
        processes.append(Process("kube-controller-manager", [
            str(bin_dir / "kube-controller-manager"), f"--kubeconfig={manager_kubeconfig}",
            f"--authentication-kubeconfig={manager_kubeconfig}", f"--authorization-kubeconfig={manager_kubeconfig}",
            f"--controllers={','.join(CONTROLLERS)}", "--leader-elect=false", "--secure-port=0",
            "--use-service-account-credentials=true", f"--root-ca-file={pki.ca}",
            "--concurrent-gc-syncs=5", "--v=1",
        ], directory / "kube-controller-manager.log"))
        _wait_controllers(plane, within)
        yield plane
    finally:
        for process in reversed(processes):
            process.stop()
        shutil.rmtree(directory, ignore_errors=True)

"""A secure Flower deployment on loopback: TLS everywhere and SuperNode authentication.

The certificates (a CA, a SuperLink certificate for 127.0.0.1/localhost) and the SuperNode key
pairs come from fedprune.federated.flower_security, as a user makes them. The SuperLink runs
with `--enable-supernode-auth`; two SuperNodes whose public keys were registered with
`flwr supernode register` train a tiny FedIT run whose final LoRA must equal the in-process
simulator's. A SuperNode with an unregistered key is refused, and one that does not trust the
CA cannot even complete the TLS handshake.

The deployment is marked slow (about a minute and a half on 2 busy cores):
    .venv/bin/python -m pytest -q -m slow tests/test_flower_secure.py
the checks of the files themselves are fast.
"""
import ipaddress
import json
import re
import stat

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from flower_loopback import OVERRIDES, ROOT, Loopback, assert_same_lora, in_process

REFUSAL_WAIT_S = 60
"""A refused SuperNode gives up after one attempt (`--max-retries 0`); this bounds the wait for it."""


def node_list(fl: Loopback) -> dict[str, str]:
    """``{node id: status}`` of every SuperNode the SuperLink knows, via `flwr supernode list`."""
    out = fl.flwr("supernode", "list", "loopback", "--format", "json")
    assert out.returncode == 0, out.stdout + out.stderr
    return {str(n["node-id"]): n["status"] for n in json.loads(out.stdout)["nodes"]}


@pytest.mark.slow
def test_secure_deployment_matches_in_process_and_refuses_unknown_nodes(tmp_path):
    from fedprune.federated.flower_security import make_node_keys, make_tls_certificates

    certs = tmp_path / "certs"
    tls = make_tls_certificates(certs)
    keys = {k.private.name: k for k in make_node_keys(certs, ["node-0", "node-1", "intruder"])}
    config_file = str(ROOT / "configs" / "federated" / "fedit.yaml")
    overrides = OVERRIDES + ["federation.strategy=fedit"]
    run_dir = tmp_path / "run"

    with Loopback(tmp_path, ca_cert=tls.ca_cert) as fl:
        fl.superlink("--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
                     "--ssl-keyfile", str(tls.server_key), "--enable-supernode-auth")
        registered = set()
        for name in ("node-0", "node-1"):  # over TLS: `flwr` trusts the CA through its connection
            out = fl.flwr("supernode", "register", str(keys[name].public), "loopback", "--format", "json")
            assert out.returncode == 0, out.stdout + out.stderr + fl.logs_tail()
            registered.add(str(json.loads(out.stdout[out.stdout.index("{"):])["node-id"]))
        assert len(registered) == 2

        # (b) who may not take part: an unregistered key; a registered key on a node that does not
        # trust the CA (were the certificate not checked, it would come online as node-0)
        bounded = ("--max-retries", "0", "--max-wait-time", "10")
        intruder = fl.supernode("intruder", "partition-id=1 num-partitions=2",
                                "--auth-supernode-private-key", str(keys["intruder"].private), *bounded)
        untrusting = fl.supernode("untrusting", "partition-id=0 num-partitions=2",
                                  "--auth-supernode-private-key", str(keys["node-0"].private), *bounded, tls=False)
        assert intruder.wait(timeout=REFUSAL_WAIT_S) != 0, fl.logs_tail()
        assert untrusting.wait(timeout=REFUSAL_WAIT_S) != 0, fl.logs_tail()
        assert "Failed to activate SuperNode" in fl.log("intruder"), fl.log("intruder")
        assert "No SuperNode found with the given public key" in fl.log("superlink"), fl.log("superlink")[-3000:]
        assert "CERTIFICATE_VERIFY_FAILED" in fl.log("untrusting"), fl.log("untrusting")
        assert node_list(fl) == {i: "registered" for i in registered}  # nobody came online, no node added

        # (a) the authorised nodes train; the run is the simulator's, to 1e-6
        for pid in (0, 1):
            fl.supernode(f"supernode{pid}", f"partition-id={pid} num-partitions=2",
                         "--auth-supernode-private-key", str(keys[f"node-{pid}"].private))
        final = fl.run(config_file, overrides, run_dir)
        assert node_list(fl) == {i: "online" for i in registered}
        assert "https://127.0.0.1" in fl.log("superlink")  # the SuperLink served TLS only

    sim = in_process(config_file, overrides, tmp_path / "inproc")
    assert_same_lora(torch.load(final, weights_only=False), sim)


def test_certificates_chain_to_the_ca_and_name_the_superlink(tmp_path):
    from fedprune.federated.flower_security import make_tls_certificates

    tls = make_tls_certificates(tmp_path, hosts=["superlink.example.org", "10.0.0.7"], days=30)
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "superlink.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                       ipaddress.ip_address("10.0.0.7")]
    assert 29 <= (server.not_valid_after_utc - server.not_valid_before_utc).days <= 30
    for key in (tls.ca_key, tls.server_key):  # readable by the owner only
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # a second call keeps what exists: the same CA and certificate, nothing re-signed
    before = {f: f.read_bytes() for f in tmp_path.iterdir()}
    make_tls_certificates(tmp_path, hosts=["superlink.example.org"])
    assert {f: f.read_bytes() for f in tmp_path.iterdir()} == before
    # removing the server certificate signs a new one with the kept CA
    tls.server_cert.unlink()
    make_tls_certificates(tmp_path, hosts=["other.example.org"])
    again = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    again.verify_directly_issued_by(ca)
    assert "other.example.org" in again.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


def test_node_keys_are_what_flower_accepts(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from flwr.cli.supernode.register import try_load_public_key

    from fedprune.federated.flower_security import make_node_keys

    k0, k1 = make_node_keys(tmp_path, ["node-0", "node-1"])
    # the loaders `flwr supernode register` and `flower-supernode` use
    assert try_load_public_key(k0.public) != try_load_public_key(k1.public)
    priv = serialization.load_ssh_private_key(k0.private.read_bytes(), None)
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp384r1"
    assert priv.public_key() == serialization.load_ssh_public_key(k0.public.read_bytes())
    assert stat.S_IMODE(k0.private.stat().st_mode) == 0o600
    assert k0.public.read_text().split()[-1] == "node-0"
    first = k0.private.read_bytes()
    assert make_node_keys(tmp_path, ["node-0"])[0].private.read_bytes() == first  # never overwritten


@pytest.mark.parametrize("call,match", [
    (lambda d, m: m.make_tls_certificates(d, hosts=["https://link:9092"]), "--host 'https://link:9092'"),
    (lambda d, m: m.make_tls_certificates(d, days=0), "--days 0"),
    (lambda d, m: m.make_node_keys(d, ["../escape"]), "node key name '../escape'"),
])
def test_bad_inputs_are_named(tmp_path, call, match):
    from fedprune.federated import flower_security

    with pytest.raises(ValueError, match=re.escape(match)):
        call(tmp_path, flower_security)
    assert not any(tmp_path.iterdir())  # refused before anything was written

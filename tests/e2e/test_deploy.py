"""The Kubernetes objects of deploy/ (kustomize overlays sidecar and gateway), rendered with
`kubectl kustomize` as `kubectl apply -k` would: every enforcer config in a ConfigMap
passes `enforcer check` with the files its pod mounts (ConfigMaps and TLS Secrets laid out
in directories at their mount paths, the certificates generated), the pods mount their
config as directories, give the drain the time it needs, and the gateway -> sidecar chain
agrees on ports, PROXY v2 and identities.

Schema validation and checkov run in `make deploy-check` (.ci/deploy-check).
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from enforcer.cli.main import main
from enforcer.config.loader import parse_address
from enforcer.config.reader import parse_duration
from enforcer.tlsconf.certs import init_pki, issue
from tests.e2e.deployed import (
    REPO,
    by_kind,
    config,
    container,
    intercept_args,
    intercept_spec,
    render,
    run_as_user,
    spiffe_id,
    the_deployment,
)

OVERLAYS = ("sidecar", "gateway")

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None,
                                reason="kubectl is not installed (kubectl kustomize)")


def enforcer_container(deployment: dict[str, Any]) -> dict[str, Any]:
    spec = deployment["spec"]["template"]["spec"]
    found = [c for c in spec.get("initContainers", []) + spec["containers"]
             if c["name"] == "enforcer"]
    assert len(found) == 1
    return dict(found[0])


def lay_out_pod(docs: list[dict[str, Any]], root: Path) -> dict[str, Path]:
    """Write every volume the enforcer container mounts under ``root``: ConfigMaps with
    their data, TLS Secrets with a certificate from a fresh CA. Returns mount path ->
    directory."""
    pki = init_pki(root / "pki")
    leaf = issue(pki.dir, root / "pki", name="mounted", spiffe_id="spiffe://cluster.local/ns/x/sa/y",
                 dns=["gateway.example.com"])
    maps = {d["metadata"]["name"]: d["data"] for d in by_kind(docs, "ConfigMap")}
    deployment = the_deployment(docs)
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts: dict[str, Path] = {}
    for mount in enforcer_container(deployment)["volumeMounts"]:
        assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
        volume = volumes[mount["name"]]
        where = root / mount["name"]
        where.mkdir()
        if "configMap" in volume:
            for key, text in maps[volume["configMap"]["name"]].items():
                (where / key).write_text(text)
        elif "secret" in volume:
            shutil.copy(leaf.cert, where / "tls.crt")
            shutil.copy(leaf.key, where / "tls.key")
            shutil.copy(pki.ca, where / "ca.crt")
        else:
            assert "emptyDir" in volume, volume
            continue
        mounts[mount["mountPath"]] = where
    return mounts


def relocate(text: str, mounts: dict[str, Path]) -> str:
    """The config with every mount path replaced by the directory standing in for it."""
    longest_first = sorted(mounts, key=len, reverse=True)
    pattern = "|".join(re.escape(m) + r"(?=[/\s]|$)" for m in longest_first)
    return re.sub(pattern, lambda m: str(mounts[m[0]]), text)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_configs_pass_check(overlay: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    docs = render(overlay)
    mounts = lay_out_pod(docs, tmp_path)
    container = enforcer_container(the_deployment(docs))
    config_arg = container["args"][container["args"].index("-c") + 1]
    config = Path(relocate(config_arg, mounts))
    assert config.is_file(), f"{config_arg} is not in a mounted volume"
    checked = tmp_path / "checked.yaml"
    checked.write_text(relocate(config.read_text(), mounts))
    assert main(["check", "-c", str(checked)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmaps_hold_the_plain_files_of_deploy(overlay: str) -> None:
    """deploy/<overlay>/enforcer/*.yaml are the configs as they run (other tests and tools
    read them directly)."""
    maps = {d["metadata"]["name"]: d["data"] for d in by_kind(render(overlay), "ConfigMap")}
    files = {p.name: p.read_text() for p in (REPO / "deploy" / overlay / "enforcer").glob("*.yaml")}
    rendered = {key: text for data in maps.values() for key, text in data.items()}
    assert rendered == files


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_confined_and_drain_in_time(overlay: str) -> None:
    docs = render(overlay)
    deployment = the_deployment(docs)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    accounts = by_kind(docs, "ServiceAccount")
    assert [a["metadata"]["name"] for a in accounts] == [pod["serviceAccountName"]]
    assert accounts[0]["automountServiceAccountToken"] is False
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = enforcer_container(deployment)
    sc = container["securityContext"]
    assert (sc["readOnlyRootFilesystem"], sc["allowPrivilegeEscalation"], sc["runAsNonRoot"],
            sc["capabilities"]) == (True, False, True, {"drop": ["ALL"]})
    assert "@sha256:" in container["image"]
    raw = yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["config.yaml"])
    drain = parse_duration(raw["limits"]["drain_timeout"])
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    sleep = float(re.search(r"sleep\((\d+)\)", pre_stop[-1])[1])  # type: ignore[index]
    assert pod["terminationGracePeriodSeconds"] > sleep + drain
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert by_kind(docs, "Namespace") and by_kind(docs, "NetworkPolicy")
    assert by_kind(docs, "PodDisruptionBudget")


def test_interception_runs_first_and_agrees_with_the_sidecar_config() -> None:
    """The init container `intercept` (root, NET_ADMIN only) runs to completion before the
    native sidecar starts; its rules send to the config's transparent listeners, skip the
    sidecar's uid (not the app's) and the admin port."""
    docs = render("sidecar")
    pod = the_deployment(docs)["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["intercept", "enforcer"]
    init, side = pod["initContainers"]
    assert "restartPolicy" not in init and side["restartPolicy"] == "Always"
    sc = init["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert (sc["runAsUser"], sc["allowPrivilegeEscalation"], sc["readOnlyRootFilesystem"],
            sc["privileged"]) == (0, False, True, False)
    spec = intercept_spec(docs)
    cfg = config(docs)
    transparent = {lst["name"]: int(lst["listen"].rsplit(":", 1)[1])
                   for lst in cfg["listeners"] if lst.get("transparent")}
    assert transparent == {"outbound": spec.outbound_port, "inbound": spec.inbound_port}
    assert spec.uids == (run_as_user(docs, "enforcer"),)
    assert run_as_user(docs, "app") not in spec.uids  # the app's connections are caught
    admin = int(cfg["admin"]["listen"].rsplit(":", 1)[1])
    assert spec.inbound_all and (admin, admin) in spec.exclude_inbound_ports
    assert (53, 53) in spec.exclude_outbound_ports
    namespace = by_kind(docs, "Namespace")[0]["metadata"]["labels"]
    assert namespace["pod-security.kubernetes.io/enforce"] == "privileged"
    assert namespace["pod-security.kubernetes.io/warn"] == "restricted"


def test_the_app_port_is_reached_through_the_sidecar_only() -> None:
    """The app listens on its pod IP (the inbound sidecar dials the original destination);
    the policy admits the app's port (intercepted) and the admin port from monitoring."""
    docs = render("sidecar")
    app = container(docs, "app")
    env = {e["name"]: e for e in app["env"]}
    assert env["LISTEN_PORT"]["value"] == "8080"
    assert env["POD_IPS"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIPs"}}
    assert [p["containerPort"] for p in app["ports"]] == [8080]
    policy = by_kind(docs, "NetworkPolicy")[0]["spec"]
    admitted = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    assert admitted == {8080, 9901}
    admin_rule = next(r for r in policy["ingress"] if r["ports"][0]["port"] == 9901)
    assert admin_rule["from"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}]


def test_the_gateway_chain_agrees_on_ports_proxy_and_identities() -> None:
    side, gate = render("sidecar"), render("gateway")
    side_cfg, gate_cfg = config(side), config(gate)
    side_rules = yaml.safe_load((REPO / "deploy/sidecar/enforcer/rules.yaml").read_text())
    gw_listener = gate_cfg["listeners"][0]
    upstream = gate_cfg["upstreams"][gw_listener["upstream"]]
    host, port = upstream["address"].rsplit(":", 1)
    service, namespace = host.split(".")[:2]
    assert namespace == side[0]["metadata"]["name"] == "shop"
    svc = next(s for s in by_kind(side, "Service") if s["metadata"]["name"] == service)
    assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
    # the gateway dials the app's port; the pod's interception hands it to the inbound
    # listener, which takes the gateway's PROXY v2 only with the gateway's identity
    spec = intercept_spec(side)
    assert spec.inbound_all and (int(port), int(port)) not in spec.exclude_inbound_ports
    inbound = next(lst for lst in side_cfg["listeners"]
                   if lst["listen"].endswith(f":{spec.inbound_port}"))
    assert upstream["proxy_protocol"]["send"] == "v2" and upstream["tls"]["mode"] == "mtls"
    pp = inbound["proxy_protocol"]
    assert pp["accept"] == "optional" and pp["trusted_identities"] == [spiffe_id(gate)]
    assert inbound["tls"]["client_auth"] in ("required", "optional")
    assert side_cfg["mesh"]["inbound"] == "strict"
    # the identities each side checks are the ones the other's Certificate carries
    assert upstream["tls"]["verify"]["uri"] == [spiffe_id(side)]
    allowed = [i for rule in side_rules["rulesets"][inbound["ruleset"]]["rules"]
               if rule["action"] == "allow" for i in rule["from"].get("identities", [])]
    assert spiffe_id(gate) in allowed
    # the NLB side: PROXY required, believed only from the balancer subnets the policy admits
    assert gw_listener["proxy_protocol"]["accept"] == "required"
    policy = by_kind(gate, "NetworkPolicy")[0]["spec"]
    blocks = [f["ipBlock"]["cidr"] for rule in policy["ingress"] for f in rule["from"]
              if "ipBlock" in f]
    assert blocks == gw_listener["proxy_protocol"]["trusted_sources"]
    # subnets, not the VPC (AWS: IPv4 VPCs up to /16, IPv6 VPCs /56 with /64 subnets)
    assert all(ipaddress.ip_network(b).prefixlen >= (20 if ipaddress.ip_network(b).version == 4
                                                      else 57) for b in blocks)
    egress = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    assert int(port) in egress
    lb = next(s for s in by_kind(gate, "Service") if s["spec"]["type"] == "LoadBalancer")
    notes = lb["metadata"]["annotations"]
    prefix = "service.beta.kubernetes.io/aws-load-balancer-"
    assert notes[prefix + "proxy-protocol"] == "*"
    assert notes[prefix + "nlb-target-type"] == "ip"
    assert notes[prefix + "healthcheck-path"] == "/readyz"
    assert notes[prefix + "healthcheck-port"] == gate_cfg["admin"]["listen"].rsplit(":", 1)[1]
    gateway = the_deployment(gate)
    assert gateway["spec"]["replicas"] >= 2
    assert "podAntiAffinity" in gateway["spec"]["template"]["spec"]["affinity"]


def _families(cidrs: list[str]) -> set[int]:
    return {ipaddress.ip_network(c).version for c in cidrs}


def _env_fields(docs: list[dict[str, Any]]) -> list[str]:
    """Every downward-API field an env var of the pod reads."""
    spec = the_deployment(docs)["spec"]["template"]["spec"]
    return [e["valueFrom"]["fieldRef"]["fieldPath"]
            for c in spec.get("initContainers", []) + spec["containers"]
            for e in c.get("env", []) if "fieldRef" in e.get("valueFrom", {})]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ipv4_ipv6_and_dual_stack_clusters(overlay: str) -> None:
    """The overlays work on IPv4, IPv6 and dual-stack clusters: every listener and the
    admin port on [::] (one dual-stack socket: tests/e2e/test_dual_stack.py), every CIDR
    list with a range of each family, dual-stack Services, the pod IPs as status.podIPs."""
    docs = render(overlay)
    cfg = config(docs)
    for listen in [lst["listen"] for lst in cfg["listeners"]] + [cfg["admin"]["listen"]]:
        assert parse_address(listen).host == "::", listen
    for lst in cfg["listeners"]:
        if "proxy_protocol" in lst:
            assert _families(lst["proxy_protocol"]["trusted_sources"]) == {4, 6}, lst
    for svc in by_kind(docs, "Service"):
        assert svc["spec"]["ipFamilyPolicy"] == "PreferDualStack", svc["metadata"]["name"]
    assert "status.podIP" not in _env_fields(docs)  # the first family's address only
    policy = by_kind(docs, "NetworkPolicy")[0]["spec"]
    blocks = [f["ipBlock"]["cidr"] for rule in policy["ingress"] + policy["egress"]
              for f in rule.get("from", []) + rule.get("to", []) if "ipBlock" in f]
    assert not blocks or _families(blocks) == {4, 6}
    if overlay != "sidecar":
        return
    assert _families([c for n in cfg["mesh"]["networks"] for c in n["cidrs"]]) == {4, 6}
    assert _env_fields(docs) == ["status.podIPs"]
    spec = intercept_spec(docs)
    assert _families([str(c) for c in spec.exclude_cidrs]) == {4, 6}
    # the installed table returns both families' excluded addresses before the redirect
    shown = main_output(["intercept", "show", "--dry-run", *intercept_args(docs)])
    for cidr in spec.exclude_cidrs:
        family = "ip" if cidr.version == 4 else "ip6"
        assert f"{family} daddr {cidr}" in shown or \
            f"{family} daddr {cidr.network_address}" in shown, shown


def main_output(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()

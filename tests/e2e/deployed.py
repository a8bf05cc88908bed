"""The Kubernetes objects of deploy/ as ``kubectl kustomize`` renders them (what ``kubectl
apply -k`` would apply), and what tests take from them: the enforcer config and rules of
the ConfigMaps, the ``intercept`` init container's arguments (parsed by enforcer's own
CLI), the SPIFFE IDs and DNS names of the Certificates, the containers' uids.

tests/e2e/test_deploy.py checks the objects themselves; tests/e2e/test_across_hosts.py
runs the rendered configs in network namespaces, so the manifests and the tested topology
cannot drift apart.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from enforcer.cli import intercept
from enforcer.intercept.ruleset import InterceptSpec

REPO = Path(__file__).resolve().parents[2]

Doc = dict[str, Any]


def render(overlay: str) -> list[Doc]:
    """``kubectl kustomize deploy/OVERLAY``, parsed (skips the test without kubectl)."""
    kubectl = shutil.which("kubectl") or pytest.skip("kubectl is not installed (kustomize)")
    done = subprocess.run([kubectl, "kustomize", str(REPO / "deploy" / overlay)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def by_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def the_deployment(docs: list[Doc]) -> Doc:
    deployments = by_kind(docs, "Deployment")
    assert len(deployments) == 1
    return deployments[0]


def pod_spec(docs: list[Doc]) -> Doc:
    return dict(the_deployment(docs)["spec"]["template"]["spec"])


def container(docs: list[Doc], name: str) -> Doc:
    """The pod's (init) container called ``name``."""
    spec = pod_spec(docs)
    found = [c for c in spec.get("initContainers", []) + spec["containers"]
             if c["name"] == name]
    assert len(found) == 1, f"one container {name!r} expected"
    return dict(found[0])


def run_as_user(docs: list[Doc], name: str) -> int:
    """The uid container ``name`` runs as (its own securityContext, else the pod's)."""
    own = container(docs, name).get("securityContext", {})
    return int(own.get("runAsUser", pod_spec(docs)["securityContext"]["runAsUser"]))


def files(docs: list[Doc]) -> dict[str, str]:
    """Every ConfigMap key (config.yaml, rules.yaml) -> its text."""
    return {key: text for cm in by_kind(docs, "ConfigMap") for key, text in cm["data"].items()}


def config(docs: list[Doc]) -> Doc:
    return dict(yaml.safe_load(files(docs)["config.yaml"]))


def certificate(docs: list[Doc], name: str) -> Doc:
    """The cert-manager Certificate ``name``'s spec (uris, dnsNames)."""
    found = [c for c in by_kind(docs, "Certificate") if c["metadata"]["name"] == name]
    assert len(found) == 1, f"one Certificate {name!r} expected"
    return dict(found[0]["spec"])


def spiffe_id(docs: list[Doc], name: str = "enforcer-mesh-tls") -> str:
    uris = certificate(docs, name)["uris"]
    assert len(uris) == 1
    return str(uris[0])


def intercept_args(docs: list[Doc]) -> list[str]:
    """The ``intercept`` init container's arguments after ``intercept apply``."""
    args = [str(a) for a in container(docs, "intercept")["args"]]
    assert args[:2] == ["intercept", "apply"], args
    return args[2:]


def intercept_spec(docs: list[Doc]) -> InterceptSpec:
    """What those arguments install, read by ``enforcer intercept``'s own parser."""
    parser = argparse.ArgumentParser()
    intercept.register(parser.add_subparsers())
    return intercept.spec_from_args(parser.parse_args(["intercept", "apply",
                                                       *intercept_args(docs)]))


def ruleset_words(text: str) -> str:
    """An nftables table as comparable words: ``nft list`` prints a single address
    without its /32 or /128, marks zero-padded and, in some versions, tcp as 6."""
    text = re.sub(r"/(32|128)\b", "", text)
    text = re.sub(r"0x0*([0-9a-f])", r"0x\1", text)
    text = re.sub(r"\bl4proto (!= )?6\b", r"l4proto \1tcp", text)
    return " ".join(text.split())

"""The Kubernetes manifests in deploy/ carry configs that pass `enforcer check`."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from enforcer.cli.main import main
from enforcer.tlsconf.certs import init_pki

REPO = Path(__file__).resolve().parents[2]


def _config_maps(path: Path) -> dict[str, dict[str, str]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path.name}: incomplete object"
    return {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}


def _secret_dir(tmp: Path) -> Path:
    """A directory laid out like a mounted kubernetes.io/tls Secret."""
    pki = init_pki(tmp / "pki")
    secret = tmp / "tls"
    secret.mkdir()
    shutil.copy(pki.server.cert, secret / "tls.crt")
    shutil.copy(pki.server.key, secret / "tls.key")
    shutil.copy(pki.ca, secret / "ca.crt")
    return secret


@pytest.mark.parametrize("manifest", sorted((REPO / "deploy").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_manifest_configs_pass_check(tmp_path: Path, manifest: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    maps = _config_maps(manifest)
    configs = [(name, data["config.yaml"]) for name, data in maps.items() if "config.yaml" in data]
    assert configs, f"{manifest.name} has no enforcer config"
    secret = _secret_dir(tmp_path)
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    for data in maps.values():
        for key, text in data.items():
            if key != "config.yaml":
                (rules_dir / key).write_text(text)
    for name, text in configs:
        cfg: dict[str, Any] = yaml.safe_load(text)
        for material in cfg.get("tls", {}).values():
            if "dir" in material:
                material["dir"] = str(secret)
        if "rulesets_file" in cfg:
            cfg["rulesets_file"] = str(rules_dir / Path(cfg["rulesets_file"]).name)
        file = tmp_path / f"{name}.yaml"
        file.write_text(yaml.safe_dump(cfg))
        assert main(["check", "-c", str(file)]) == 0, capsys.readouterr().err

"""YAML -> ``Config``. Every problem is collected with its key path; one ``ConfigError`` at the end.

Relative file paths in the config are resolved against the config file's directory.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import socket
from collections.abc import Collection, Mapping, Sequence
from types import MappingProxyType
from typing import Any, cast

import yaml

from enforcer.config import boundedyaml, passthrough
from enforcer.config.errors import ConfigError, ConfigIssue
from enforcer.config.model import (
    CIPHER_SUITES,
    DETECT_TIMEOUT,
    ORIGINAL_DESTINATION,
    Address,
    AdminConfig,
    Config,
    EgressConfig,
    FlowLogConfig,
    LimitsConfig,
    ListenerConfig,
    ListenerTlsConfig,
    MeshConfig,
    MeshNetwork,
    NodeConfig,
    ProxyProtocolAcceptConfig,
    ProxyProtocolSendConfig,
    RelayMode,
    TimeoutClose,
    TlsMaterialConfig,
    UpstreamConfig,
    UpstreamTlsConfig,
    UpstreamVerifyConfig,
)
from enforcer.config.reader import Node
from enforcer.config.rulesets import (
    RulesetConfig,
    identity_glob_problem,
    parse_rulesets,
    port_ranges,
    reference_problems,
)

TOP_KEYS = ("version", "node", "tls", "listeners", "upstreams", "rulesets", "rulesets_file",
            "flow_log", "admin", "limits", "workers", "relay", "mesh")
UNIX_PATH_MAX = 107  # bytes of a unix socket path (sun_path holds 108 with the NUL)
PROXY_SEND_TLVS = ("alpn", "authority", "ssl", "unique_id", "identity")
TCP_KEEP_SECONDS_MAX = 32767  # TCP_KEEPIDLE / TCP_KEEPINTVL (MAX_TCP_KEEPIDLE in Linux)
TCP_KEEPCNT_MAX = 127  # MAX_TCP_KEEPCNT
TCP_USER_TIMEOUT_MAX = 2_147_483.647  # seconds: TCP_USER_TIMEOUT is an int of milliseconds


def load_config(path: str) -> Config:
    """Read and validate a config file; raise ``ConfigError`` listing every problem."""
    raw = read_yaml(path)
    return parse_config(raw, source=path, base_dir=os.path.dirname(os.path.abspath(path)))


def read_yaml(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError([ConfigIssue("", f"{path}: cannot read: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError:
        raise ConfigError([ConfigIssue("", f"{path}: not UTF-8 text")]) from None
    try:
        return boundedyaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        what = exc.problem or exc.context or "invalid YAML"
        raise ConfigError([ConfigIssue("", f"{path}: invalid YAML at {where}: {what}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue("", f"{path}: invalid YAML: {exc}")]) from None
    except (boundedyaml.TooDeep, RecursionError):  # PyYAML composes nested ones recursively
        raise ConfigError([ConfigIssue("", f"{path}: invalid YAML: nested too deeply")]) from None


def parse_config(raw: Any, *, source: str | None = None, base_dir: str = ".") -> Config:
    issues: list[ConfigIssue] = []
    root = Node(raw, "", issues)
    if raw is None or not isinstance(raw, dict):
        raise ConfigError([ConfigIssue("", "the config must be a YAML mapping with version: 1")])
    root.keys(TOP_KEYS)
    p = _Parser(base_dir)
    version = root["version"].int(0)
    if root["version"].missing:
        root["version"].error("is required (version: 1)")
    elif version != 1:
        root["version"].error(f"unsupported version {version} (this enforcer reads version 1)")
    node = p.node(root["node"])
    materials = p.materials(root["tls"])
    upstreams = p.upstreams(root["upstreams"])
    rulesets = parse_rulesets(root["rulesets"])
    rulesets_file = p.path(root["rulesets_file"])
    rulesets_read = True  # False: the rulesets file could not be read (see below)
    if rulesets_file is not None:
        merged = _merge_rulesets_file(rulesets, rulesets_file, root["rulesets_file"])
        rulesets_read = merged is not None
        rulesets = merged if merged is not None else rulesets
    listeners = p.listeners(root["listeners"])
    cfg = Config(
        version=version,
        node=node,
        tls=MappingProxyType(materials),
        listeners=tuple(listeners),
        upstreams=MappingProxyType(upstreams),
        rulesets=MappingProxyType(rulesets),
        flow_log=p.flow_log(root["flow_log"]),
        admin=p.admin(root["admin"]),
        limits=p.limits(root["limits"]),
        rulesets_file=rulesets_file,
        workers=_workers(root["workers"]),
        relay=_relay(root["relay"]),
        source=source,
        mesh=_mesh(root["mesh"]),
    )
    _check_references(cfg, root, issues, rulesets_read=rulesets_read)
    if issues:
        raise ConfigError(issues)
    return cfg


def load_rulesets_file(path: str) -> dict[str, RulesetConfig]:
    """Read a separate rulesets file (``rulesets: {...}``); raise ``ConfigError``."""
    raw = read_yaml(path)
    issues: list[ConfigIssue] = []
    node = Node(raw, "", issues)
    if not isinstance(raw, dict):
        raise ConfigError([ConfigIssue("", f"{path}: expected a mapping with a rulesets: key")])
    node.keys(("rulesets",))
    out = parse_rulesets(node["rulesets"])
    if issues:
        raise ConfigError([ConfigIssue(f"{path}: {i.path}" if i.path else path, i.message)
                           for i in issues])
    return out


def is_rulesets_file(path: str) -> bool:
    """True for a YAML document whose only top-level key is ``rulesets`` (what a
    ``rulesets_file`` holds, e.g. a ConfigMap's rules.yaml), so ``enforcer check`` can
    validate one on its own."""
    try:
        raw = read_yaml(path)
    except ConfigError:
        return False
    return isinstance(raw, dict) and list(raw) == ["rulesets"]


def _merge_rulesets_file(
    inline: dict[str, RulesetConfig], path: str, where: Node
) -> dict[str, RulesetConfig] | None:
    """The inline rulesets and the file's; None (its problems reported) if unreadable."""
    try:
        from_file = load_rulesets_file(path)
    except ConfigError as exc:
        for issue in exc.issues:
            where.error(str(issue))
        return None
    merged = dict(inline)
    for name, rs in from_file.items():
        if name in merged:
            where.error(f"ruleset {name!r} is defined both inline and in {path}")
        merged[name] = rs
    return merged


def parse_address(text: str, *, allow_unix: bool = True, allow_port_zero: bool = False) -> Address:
    """Parse ``host:port``, ``[v6]:port`` or ``unix:/path``; raise ValueError naming the problem."""
    text = text.strip()
    if text.startswith("unix:"):
        if not allow_unix:
            raise ValueError(f"unix sockets are not allowed here: {text!r}")
        path = text[5:]
        if not path:
            raise ValueError("unix: needs a path (unix:/run/app.sock)")
        return Address(path=path)
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError(f"bad address {text!r} (use [v6]:port)")
        host, port_text = text[1:end], text[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad IPv6 address {host!r} in {text!r}") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"bad address {text!r} (use host:port, [v6]:port or unix:/path)")
        if ":" in host:
            raise ValueError(f"bad address {text!r} (put IPv6 addresses in brackets: [::1]:8080)")
    if not port_text.isdigit():
        raise ValueError(f"bad port {port_text!r} in {text!r}")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"port {port} out of range {low}-65535 in {text!r}")
    return Address(host=host, port=port)


class _Parser:
    def __init__(self, base_dir: str) -> None:
        self.base_dir = base_dir

    def path(self, node: Node) -> str | None:
        text = node.str(None)
        if text is None:
            return None
        if not text:
            node.error("empty path")
            return None
        return self._resolve(text)

    def _resolve(self, text: str) -> str:
        """A path as given, with ~ expanded and a relative one taken from the config file's
        directory."""
        text = os.path.expanduser(text)
        return text if os.path.isabs(text) else os.path.normpath(os.path.join(self.base_dir, text))

    def address(self, node: Node, *, listen: bool) -> Address | None:
        text = node.str(None, required=True)
        if text is None:
            return None
        if text.strip() == ORIGINAL_DESTINATION and not listen:
            return Address(original=True)
        try:
            addr = parse_address(text, allow_port_zero=listen)
        except ValueError as exc:
            node.error(str(exc))
            return None
        if addr.path is None:
            return addr
        path = self._resolve(addr.path)  # relative to the config file, as files are
        if len(os.fsencode(path)) > UNIX_PATH_MAX:
            node.error(f"unix socket path {path} is {len(os.fsencode(path))} bytes; at most "
                       f"{UNIX_PATH_MAX} fit in a socket address")
            return None
        return Address(path=path)

    def node(self, node: Node) -> NodeConfig:
        node.keys(("name", "labels"))
        name = node["name"].str(None) or socket.gethostname()
        labels: dict[str, str] = {}
        for key, value in node["labels"].items():
            text = value.str(None)
            if text is not None:
                labels[key] = text
        return NodeConfig(name=name, labels=MappingProxyType(labels))

    # -- tls materials -------------------------------------------------------------------
    def materials(self, node: Node) -> dict[str, TlsMaterialConfig]:
        out: dict[str, TlsMaterialConfig] = {}
        for name, m in node.items():
            material = self.material(name, m)
            if material is not None:
                out[name] = material
        return out

    def material(self, name: str, m: Node) -> TlsMaterialConfig | None:
        if not m.keys(("cert", "key", "ca", "crl", "dir", "inline", "pkcs12", "password_env",
                       "min_version", "cipher_suites", "groups", "spiffe")):
            if m.is_null:
                m.error("expected a mapping with cert/key/ca, dir, inline or pkcs12")
            return None
        min_version = m["min_version"].str("1.2")
        if min_version not in ("1.2", "1.3"):
            m["min_version"].error(f'must be "1.2" or "1.3"; got {m["min_version"].value!r}')
            min_version = "1.2"
        kw: dict[str, Any] = {
            "cert": self.path(m["cert"]), "key": self.path(m["key"]), "ca": self.path(m["ca"]),
            "crl": self.path(m["crl"]), "dir": self.path(m["dir"]),
            "pkcs12": self.path(m["pkcs12"]), "pkcs12_password_env": m["password_env"].str(None),
        }
        inline = m["inline"]
        if not inline.is_null and inline.keys(("cert", "key", "ca")):
            for part in ("cert", "key", "ca"):
                kw[f"inline_{part}"] = _decode_inline(inline[part])
        kw.update(self.spiffe(m["spiffe"]))
        sources = [s for s in ("cert", "dir", "inline", "pkcs12", "spiffe")
                   if (kw.get(s) if s not in ("inline", "spiffe") else not m[s].is_null)]
        if len(sources) > 1:
            m.error(f"give one source of certificate and key, not {' and '.join(sources)}")
        if kw["cert"] and not kw["key"]:
            m["key"].error("is required with cert")
        if kw["key"] and not kw["cert"]:
            m["cert"].error("is required with key")
        if not sources and not kw["ca"]:
            m.error("needs cert and key, dir, inline, pkcs12 or spiffe (or at least ca, for "
                    "trust only)")
        if not m["spiffe"].is_null:
            for part in ("ca", "crl"):
                if kw[part]:
                    m[part].error("goes with files: with spiffe the trust bundles come from "
                                  "the Workload API")
        if kw["pkcs12"] and not kw["pkcs12_password_env"]:
            pass  # an unencrypted PKCS#12 bundle is allowed
        if kw["pkcs12_password_env"] and not kw["pkcs12"]:
            m["password_env"].error("goes with pkcs12")
        return TlsMaterialConfig(name=name, path=m.path, min_version=cast(Any, min_version),
                                 cipher_suites=_cipher_suites(m["cipher_suites"]),
                                 groups=_groups(m["groups"]), **kw)

    def spiffe(self, node: Node) -> dict[str, Any]:
        """``spiffe: {socket: unix:/path, timeout: seconds}``: the SPIFFE Workload API."""
        if node.is_null or not node.keys(("socket", "timeout")):
            if not node.is_null and not isinstance(node.value, dict):
                node.error("expected a mapping: {socket: unix:/run/spire/agent.sock}")
            return {}
        sock = node["socket"]
        text = sock.str(None, required=True)
        timeout = node["timeout"].duration(10.0)
        if not 0 < timeout <= 600:
            node["timeout"].error("must be more than 0s and at most 600s")
        out: dict[str, Any] = {"spiffe_timeout": timeout}
        if text is None:
            return out
        if not text.startswith("unix:") or len(text) <= len("unix:"):
            sock.error(f"the Workload API socket is unix:/path (got {text!r})")
            return out
        path = self._resolve("/" + text[len("unix:"):].lstrip("/")
                             if text.startswith("unix:/") else text[len("unix:"):])
        if len(os.fsencode(path)) > UNIX_PATH_MAX:
            sock.error(f"unix socket path {path} is {len(os.fsencode(path))} bytes; at most "
                       f"{UNIX_PATH_MAX} fit in a socket address")
            return out
        out["spiffe_socket"] = path
        return out

    # -- listeners -----------------------------------------------------------------------
    def listeners(self, node: Node) -> list[ListenerConfig]:
        out: list[ListenerConfig] = []
        names: set[str] = set()
        items = node.list()
        if node.missing:
            node.error("is required (at least one listener)")
        for item in items:
            if not item.keys(("name", "listen", "proxy_protocol", "tls", "ruleset", "upstream",
                              "transparent", "mesh", "protocol", "egress")):
                continue
            name = item["name"].required_str()
            if name in names:
                item["name"].error(f"duplicate listener name {name!r}")
            names.add(name)
            listen = self.address(item["listen"], listen=True)
            ruleset = item["ruleset"].str("", required=True)
            if item["ruleset"].missing:
                pass  # message already says "is required"
            tls = self.listener_tls(item["tls"])
            if tls.mode == "passthrough":  # upstream: the default route, if any
                upstream = item["upstream"].str("") or ""
                passthrough.listener_problems(item, tls)
            else:
                upstream = item["upstream"].required_str()
            pp = self.proxy_accept(item["proxy_protocol"])
            if tls.mode == "off" and not item["tls"]["detect_timeout"].is_null \
                    and pp.accept != "optional":
                item["tls"]["detect_timeout"].error(
                    "with mode off goes with proxy_protocol.accept optional (it bounds the "
                    "wait for a PROXY header from a silent client)")
            if pp.trusted_identities and (tls.mode == "off" or tls.client_auth == "none"):
                item["proxy_protocol"]["trusted_identities"].error(
                    "needs tls mode terminate or auto with client_auth required or optional "
                    "(the identity comes from the client certificate)")
            mesh = item["mesh"].choice(("outbound", "inbound", "off"), "off")
            transparent = item["transparent"].bool(False)
            if mesh == "outbound" and not transparent:
                item["mesh"].error("mesh: outbound needs transparent: true (the original "
                                   "destination decides mesh or external)")
            if mesh == "inbound" and tls.mode != "auto":
                item["mesh"].error("mesh: inbound needs tls mode auto (mTLS from peers, "
                                   "plaintext refused or accepted by mesh.inbound)")
            if transparent and listen is not None and listen.is_unix:
                item["transparent"].error("needs a TCP listen address (interception "
                                          "redirects TCP), not a unix socket")
            protocol = item["protocol"].choice(("tcp", "socks5", "http_connect"), "tcp")
            egress = self.egress(item, protocol, transparent=transparent, mesh=mesh)
            out.append(ListenerConfig(name, listen or Address(), tls, pp, ruleset, upstream,
                                      transparent, None if mesh == "off" else cast(Any, mesh),
                                      cast(Any, protocol), egress))
        return out

    def egress(self, item: Node, protocol: str, *, transparent: bool,
               mesh: str) -> EgressConfig | None:
        """``protocol: socks5 | http_connect`` and its ``egress:`` settings."""
        node = item["egress"]
        if protocol == "tcp":
            if not node.is_null:
                node.error("goes with protocol: socks5 or http_connect")
            return None
        if transparent or mesh != "off":
            item["protocol"].error(f"protocol: {protocol} cannot be combined with "
                                   f"{'transparent' if transparent else 'mesh'} (the client "
                                   "names its destination)")
        if node.is_null:
            return EgressConfig()
        if not node.keys(("credentials", "request_timeout", "max_request_bytes")):
            return EgressConfig()
        timeout = node["request_timeout"].duration(10.0)
        if not 0 < timeout <= 300:
            node["request_timeout"].error("must be more than 0s and at most 300s")
        size = node["max_request_bytes"].int(8192, minimum=256, maximum=65536)
        if not node["max_request_bytes"].is_null and protocol != "http_connect":
            node["max_request_bytes"].error("goes with protocol: http_connect (a SOCKS5 "
                                            "request is bounded by its format)")
        creds = self.path(node["credentials"])  # read (and checked) by the data plane
        return EgressConfig(credentials=creds, request_timeout=max(timeout, 0.001),
                            max_request_bytes=size)

    def listener_tls(self, node: Node) -> ListenerTlsConfig:
        if node.is_null:
            node.error("is required (tls: {mode: terminate, material: NAME} or tls: {mode: off})")
            return ListenerTlsConfig(mode="off")
        node.keys(("mode", "material", "client_auth", "server_names", "strict_sni", "alpn",
                   "allow_eof_without_close_notify", "detect_timeout", "routes",
                   "close_on_revocation", "close_on_expiry"))
        mode = node["mode"].choice(("terminate", "off", "auto", "passthrough"), "terminate")
        material = node["material"].str(None)
        if mode in ("terminate", "auto") and material is None:
            node["material"].error(f"is required with mode {mode}")
        detect = node["detect_timeout"].duration(DETECT_TIMEOUT)
        if detect < 0:
            node["detect_timeout"].error("must be 0s (off) or more")
        if not node["detect_timeout"].is_null and mode not in ("auto", "off"):
            node["detect_timeout"].error("goes with mode auto, or mode off with "
                                         "proxy_protocol.accept optional (it bounds the wait "
                                         "for the client's first byte)")
        client_auth = node["client_auth"].choice(("required", "optional", "none"), "required")
        return ListenerTlsConfig(
            mode=cast(Any, mode),
            material=material,
            # passthrough sees no client certificate (rules needing one cannot match)
            client_auth=cast(Any, "none" if mode == "passthrough" else client_auth),
            server_names=node["server_names"].str_list(),
            strict_sni=node["strict_sni"].bool(False),
            alpn=_alpn(node["alpn"]),
            allow_eof_without_close_notify=node["allow_eof_without_close_notify"].bool(False),
            detect_timeout=max(detect, 0.0),
            routes=passthrough.routes(node["routes"], mode),
            close_on_revocation=self._close_on(node, "close_on_revocation", mode),
            close_on_expiry=self._close_on(node, "close_on_expiry", mode),
        )

    @staticmethod
    def _close_on(node: Node, key: str, mode: str) -> bool:
        value = node[key].bool(False)
        client_auth = node["client_auth"].value
        if value and (mode in ("off", "passthrough") or client_auth == "none"):
            node[key].error("needs client certificates (mode terminate or auto, client_auth "
                            "required or optional)")
        return value

    def proxy_accept(self, node: Node) -> ProxyProtocolAcceptConfig:
        if node.is_null:
            return ProxyProtocolAcceptConfig()
        node.keys(("accept", "trusted_sources", "timeout", "trusted_identities",
                   "flow_id_from_header"))
        accept = node["accept"].choice(("off", "optional", "required"), "off")
        trusted = node["trusted_sources"].cidr_list()
        if accept != "off" and not trusted:
            node["trusted_sources"].error(
                f"accept: {accept} needs trusted_sources (the load balancers' CIDRs)")
        timeout = node["timeout"].duration(3.0)
        if timeout <= 0:
            node["timeout"].error("must be more than 0s")
        identities = node["trusted_identities"].str_list()
        for i, pattern in enumerate(identities):
            problem = identity_glob_problem(pattern)
            if problem is not None:
                where = node["trusted_identities"]
                (where[i] if isinstance(where.value, list) else where).error(
                    f"bad identity glob {pattern!r}: {problem}")
        if identities and accept == "off":
            node["trusted_identities"].error("goes with accept: optional or required")
        adopt = node["flow_id_from_header"].bool(False)
        if adopt and accept == "off":
            node["flow_id_from_header"].error("goes with accept: optional or required")
        return ProxyProtocolAcceptConfig(cast(Any, accept), trusted, timeout, identities, adopt)

    # -- upstreams -----------------------------------------------------------------------
    def upstreams(self, node: Node) -> dict[str, UpstreamConfig]:
        out: dict[str, UpstreamConfig] = {}
        for name, u in node.items():
            if not u.keys(("address", "tls", "proxy_protocol")):
                continue
            address = self.address(u["address"], listen=False)
            tls = self.upstream_tls(u["tls"])
            pp = self.proxy_send(u["proxy_protocol"])
            if address is not None:
                out[name] = UpstreamConfig(name, address, tls, pp)
        return out

    def upstream_tls(self, node: Node) -> UpstreamTlsConfig:
        if node.is_null:
            return UpstreamTlsConfig()
        node.keys(("mode", "material", "server_name", "verify", "allow_eof_without_close_notify"))
        mode = node["mode"].choice(("off", "tls", "mtls"), "off")
        material = node["material"].str(None)
        if mode == "mtls" and material is None:
            node["material"].error("is required with mode mtls")
        v = node["verify"]
        verify = UpstreamVerifyConfig()
        if not v.is_null and v.keys(("uri", "dns", "cn")):
            verify = UpstreamVerifyConfig(v["uri"].str_list(), v["dns"].str_list(),
                                          v["cn"].str_list())
        if mode == "off" and (material or not verify.empty):
            node["mode"].error("material and verify need mode tls or mtls")
        return UpstreamTlsConfig(cast(Any, mode), material, node["server_name"].str(None), verify,
                                 node["allow_eof_without_close_notify"].bool(False))

    def proxy_send(self, node: Node) -> ProxyProtocolSendConfig:
        if node.is_null:
            return ProxyProtocolSendConfig()
        node.keys(("send", "tlvs"))
        send = node["send"].choice(("off", "v1", "v2"), "off")
        tlvs = node["tlvs"].str_list()
        for i, tlv in enumerate(tlvs):
            if tlv not in PROXY_SEND_TLVS:
                node["tlvs"][i].error(f"unknown TLV {tlv!r} (known: {', '.join(PROXY_SEND_TLVS)})")
        if tlvs and send != "v2":
            node["tlvs"].error("TLVs need send: v2")
        return ProxyProtocolSendConfig(cast(Any, send), tlvs)

    # -- the rest ------------------------------------------------------------------------
    def flow_log(self, node: Node) -> FlowLogConfig:
        if node.is_null:
            return FlowLogConfig()
        node.keys(("sink", "max_bytes", "backups", "open_events", "queue_size"))
        sink_text = node["sink"].str("stdout") or "stdout"
        sink, path = "stdout", None
        if sink_text == "off" or node["sink"].value is False:
            sink = "off"
        elif sink_text.startswith("file:"):
            sink = "file"
            path = self.path(Node(sink_text[5:], node["sink"].path, node.issues))
        elif sink_text != "stdout":
            node["sink"].error(f"must be stdout, off or file:/path; got {sink_text!r}")
        return FlowLogConfig(
            sink=cast(Any, sink),
            path=path,
            max_bytes=node["max_bytes"].int(100 * 1024 * 1024, minimum=0),
            backups=node["backups"].int(5, minimum=0, maximum=1000),
            open_events=node["open_events"].bool(False),
            queue_size=node["queue_size"].int(65536, minimum=1),
        )

    def admin(self, node: Node) -> AdminConfig:
        if node.is_null:
            return AdminConfig()
        node.keys(("listen", "stall_timeout"))
        stall = node["stall_timeout"].duration(AdminConfig().stall_timeout)
        if stall < 1.0:
            node["stall_timeout"].error("must be at least 1s")
        if node["listen"].is_null:
            return AdminConfig(stall_timeout=stall)
        return AdminConfig(self.address(node["listen"], listen=True), stall_timeout=stall)

    def limits(self, node: Node) -> LimitsConfig:
        d = LimitsConfig()
        if node.is_null:
            return d
        node.keys(("max_connections", "handshake_timeout", "connect_timeout", "idle_timeout",
                   "close_timeout", "max_lifetime", "drain_timeout", "timeout_close",
                   "tcp_keepalive_idle", "tcp_keepalive_interval", "tcp_keepalive_count",
                   "tcp_user_timeout"))
        out = LimitsConfig(
            max_connections=node["max_connections"].int(d.max_connections, minimum=1),
            handshake_timeout=node["handshake_timeout"].duration(d.handshake_timeout),
            connect_timeout=node["connect_timeout"].duration(d.connect_timeout),
            idle_timeout=node["idle_timeout"].duration(d.idle_timeout),
            close_timeout=node["close_timeout"].duration(d.close_timeout),
            max_lifetime=node["max_lifetime"].duration(d.max_lifetime),
            drain_timeout=node["drain_timeout"].duration(d.drain_timeout),
            timeout_close=cast(TimeoutClose, node["timeout_close"].choice(("fin", "rst"),
                                                                          d.timeout_close)),
            tcp_keepalive_idle=node["tcp_keepalive_idle"].duration(d.tcp_keepalive_idle),
            tcp_keepalive_interval=node["tcp_keepalive_interval"].duration(
                d.tcp_keepalive_interval),
            tcp_keepalive_count=node["tcp_keepalive_count"].int(
                d.tcp_keepalive_count, minimum=1, maximum=TCP_KEEPCNT_MAX),
            tcp_user_timeout=node["tcp_user_timeout"].duration(d.tcp_user_timeout),
        )
        for key in ("handshake_timeout", "connect_timeout", "idle_timeout", "close_timeout"):
            if getattr(out, key) <= 0:
                node[key].error("must be more than 0s")
        _check_keepalive(node, out)
        return out


def _check_keepalive(node: Node, limits: LimitsConfig) -> None:
    """The kernel takes keepalive times in whole seconds, 1 to 32767 (an idle time of 0
    turns keepalive off here), and the user timeout in milliseconds (0 = its default)."""
    idle, interval = limits.tcp_keepalive_idle, limits.tcp_keepalive_interval
    span = f"whole seconds from 1s to {TCP_KEEP_SECONDS_MAX}s"
    if idle != 0 and not _keepalive_seconds(idle):
        node["tcp_keepalive_idle"].error(f"must be 0 (keepalive off) or {span}; "
                                         f"got {node['tcp_keepalive_idle'].value!r}")
    if not _keepalive_seconds(interval):
        node["tcp_keepalive_interval"].error(
            f"must be {span}; got {node['tcp_keepalive_interval'].value!r}")
    if not 0 <= limits.tcp_user_timeout <= TCP_USER_TIMEOUT_MAX:
        node["tcp_user_timeout"].error(
            f"must be 0 (the kernel's default) to {TCP_USER_TIMEOUT_MAX:.0f}s; got "
            f"{node['tcp_user_timeout'].value!r}")


def _keepalive_seconds(value: float) -> bool:
    return 1 <= value <= TCP_KEEP_SECONDS_MAX and value == int(value)


def _alpn(node: Node) -> tuple[str, ...]:
    protocols = node.str_list()
    for i, proto in enumerate(protocols):
        if not 0 < len(proto.encode()) < 256:
            node[i].error(f"an ALPN protocol name is 1-255 bytes; got {proto!r}")
    return protocols


def _cipher_suites(node: Node) -> tuple[str, ...]:
    """``cipher_suites``: TLS 1.3 suite names in preference order (default CIPHER_SUITES)."""
    if node.is_null:
        return CIPHER_SUITES
    suites = node.str_list()
    if not suites:
        if node.value == []:
            node.error(f"needs at least one of {', '.join(CIPHER_SUITES)}")
        return CIPHER_SUITES
    for i, suite in enumerate(suites):
        where = node[i] if isinstance(node.value, list) else node
        if suite not in CIPHER_SUITES:
            where.error(f"unknown cipher suite {suite!r}; one of {', '.join(CIPHER_SUITES)}")
        elif suite in suites[:i]:
            where.error(f"{suite} is listed twice")
    return suites


_GROUP_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _groups(node: Node) -> tuple[str, ...] | None:
    """``groups``: TLS key-exchange group names in preference order (None: the default of
    ``tlsconf.groups``). Only the spelling is checked here; whether the OpenSSL in use
    offers them is checked when contexts are built (``enforcer check`` does that too)."""
    if node.is_null:
        return None
    groups = node.str_list()
    if not groups:
        if node.value == []:
            node.error("needs at least one group (e.g. X25519, P-256), or leave it out")
        return None
    seen: set[str] = set()
    for i, name in enumerate(groups):
        where = node[i] if isinstance(node.value, list) else node
        if ":" in name:
            where.error(f"{name!r}: write the groups as a YAML list, one name per item")
        elif not _GROUP_NAME.fullmatch(name):
            where.error(f"not a group name: {name!r} (letters, digits, - and _; e.g. "
                        "X25519MLKEM768, X25519, P-256)")
        elif name.lower() in seen:
            where.error(f"{name} is listed twice")
        seen.add(name.lower())
    return groups


def _mesh(node: Node) -> MeshConfig:
    """``mesh: {material, networks: [{cidrs, ports}], inbound, external: {default,
    plaintext: [{cidrs, ports}]}}``."""
    if node.is_null or not node.keys(("material", "networks", "inbound", "external")):
        return MeshConfig()
    networks = _mesh_networks(node["networks"])
    if not networks:
        node["networks"].error("is required: the CIDRs (and ports) where peers run enforcer")
    material = node["material"].str(None)
    if material is None:
        node["material"].error("is required: the TLS material for mTLS between enforcers")
    ext = node["external"]
    default: str = "deny"
    plaintext: tuple[MeshNetwork, ...] = ()
    if not ext.is_null and ext.keys(("default", "plaintext")):
        default = ext["default"].choice(("deny", "plaintext"), "deny")
        plaintext = _mesh_networks(ext["plaintext"])
    return MeshConfig(networks=networks, material=material,
                      inbound=cast(Any, node["inbound"].choice(("strict", "permissive"),
                                                                "strict")),
                      external_default=cast(Any, default), external_plaintext=plaintext)


def _mesh_networks(node: Node) -> tuple[MeshNetwork, ...]:
    out: list[MeshNetwork] = []
    for item in node.list():
        if not item.keys(("cidrs", "ports")):
            continue
        cidrs = item["cidrs"].cidr_list()
        if not cidrs:
            item["cidrs"].error("is required (10.0.0.0/8, fd00::/8 ...)")
        out.append(MeshNetwork(cidrs, port_ranges(item["ports"]) if not item["ports"].is_null
                               else ()))
    return tuple(out)


def _workers(node: Node) -> int:
    """``workers: N`` (1-256) or ``auto`` (one per CPU, stored as 0)."""
    if node.is_null:
        return 1
    if node.value == "auto":
        return 0
    return node.int(1, minimum=1, maximum=256)


def _relay(node: Node) -> RelayMode:
    """``relay: auto`` (native pump when built, else Python) | ``native`` | ``python``."""
    return cast(RelayMode, node.choice(("auto", "native", "python"), "auto"))


def resolve_workers(cfg: Config) -> int:
    return cfg.workers or max(1, os.cpu_count() or 1)


def _decode_inline(node: Node) -> bytes | None:
    text = node.str(None)
    if text is None:
        return None
    if "-----BEGIN" in text:
        return text.encode()
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        node.error("is not valid base64 (give base64 of the PEM file, or the PEM text itself)")
        return None
    if b"-----BEGIN" not in data:
        node.error("decodes to something that is not PEM")
        return None
    return data


def _check_references(cfg: Config, root: Node, issues: list[ConfigIssue], *,
                      rulesets_read: bool = True) -> None:
    """Names that must exist. A name defined with problems (reported where it is defined)
    is not also reported as unknown where it is used, nor is a listener's ruleset when the
    rulesets file could not be read."""
    known_m = ", ".join(sorted(cfg.tls)) or "none"
    known_u = ", ".join(sorted(cfg.upstreams)) or "none"
    known_r = ", ".join(sorted(cfg.rulesets)) or "none"
    materials = set(cfg.tls) | _names(root["tls"])
    upstreams = set(cfg.upstreams) | _names(root["upstreams"])
    rulesets = set(cfg.rulesets) | _names(root["rulesets"])
    lnodes = root["listeners"].list() if isinstance(root["listeners"].value, list) else []
    by_name = {}
    for ln in lnodes:
        if isinstance(ln.value, dict):
            by_name[str(ln.value.get("name"))] = ln
    for lst in cfg.listeners:
        ln = by_name.get(lst.name, root["listeners"])
        mat = lst.tls.material
        if mat is not None and mat not in materials:
            ln["tls"]["material"].error(f"unknown material {mat!r} (known: {known_m})")
        if lst.upstream and lst.upstream not in upstreams:
            ln["upstream"].error(f"unknown upstream {lst.upstream!r} (known: {known_u})")
        if lst.ruleset and lst.ruleset not in rulesets and rulesets_read:
            ln["ruleset"].error(f"unknown ruleset {lst.ruleset!r} (known: {known_r})")
        m_cfg = cfg.tls.get(mat) if mat is not None else None
        if lst.tls.close_on_revocation and m_cfg is not None and m_cfg.crl is None:
            ln["tls"]["close_on_revocation"].error(
                f"material {mat!r} has no crl, so no certificate is ever revoked (give "
                f"tls.{mat}.crl)")
        if lst.tls.mode == "passthrough":
            passthrough.route_reference_problems(ln, lst.tls, cfg.upstreams, sorted(upstreams))
            continue
        up_cfg = cfg.upstreams.get(lst.upstream)
        if up_cfg is not None and lst.egress is not None:
            _check_egress_upstream(ln, lst.upstream, up_cfg)
        elif up_cfg is not None and up_cfg.address.original != lst.transparent:
            ln["upstream"].error(
                f"upstream {lst.upstream!r} has address {ORIGINAL_DESTINATION}: only a "
                "listener with transparent: true knows it" if up_cfg.address.original else
                f"a transparent listener routes to the original destination: its upstream "
                f"needs address: {ORIGINAL_DESTINATION} (upstream {lst.upstream!r} has "
                f"{up_cfg.address})")
    if cfg.mesh.material is not None and cfg.mesh.material not in materials:
        root["mesh"]["material"].error(f"unknown material {cfg.mesh.material!r} "
                                       f"(known: {known_m})")
    for lst, ln in zip(cfg.listeners, lnodes, strict=False):
        if lst.mesh is not None and not cfg.mesh.enabled and root["mesh"].is_null:
            ln["mesh"].error(f"mesh: {lst.mesh} needs a top-level mesh section "
                             "(networks, material)")
    for name, up in cfg.upstreams.items():
        mat = up.tls.material
        if mat is not None and mat not in materials:
            root["upstreams"][name]["tls"]["material"].error(
                f"unknown material {mat!r} (known: {known_m})")
    seen: dict[tuple[str, int, str | None], str] = {}
    for lst, ln in zip(cfg.listeners, lnodes, strict=False):
        a = lst.listen
        key = (a.host, a.port, a.path)
        if (a.port or a.path) and key in seen:
            ln["listen"].error(f"{a} is also used by listener {seen[key]!r}")
        seen[key] = lst.name
    inline = root["rulesets"].value if isinstance(root["rulesets"].value, dict) else {}
    issues.extend(rule_reference_issues(cfg.rulesets, cfg.listeners, cfg.upstreams,
                                        inline=inline.keys(), rulesets_file=cfg.rulesets_file))


def _check_egress_upstream(ln: Node, name: str, up: UpstreamConfig) -> None:
    """An egress listener connects where its client asks: its upstream's address is
    original_destination, plain TCP (the client speaks TLS itself, inside the tunnel)."""
    if not up.address.original:
        ln["upstream"].error(f"an egress listener (socks5, http_connect) connects to the "
                             f"destination its client asks for: its upstream needs address: "
                             f"{ORIGINAL_DESTINATION} (upstream {name!r} has {up.address})")
    elif up.tls.mode != "off":
        ln["upstream"].error(f"upstream {name!r} of an egress listener must have tls mode off "
                             "(clients run their own TLS through the tunnel)")


def _names(section: Node) -> set[str]:
    """The names a mapping section of the raw config defines, valid or not."""
    return {str(k) for k in section.value} if isinstance(section.value, dict) else set()


def rule_reference_issues(rulesets: Mapping[str, RulesetConfig],
                          listeners: Sequence[ListenerConfig],
                          upstreams: Mapping[str, UpstreamConfig], *, inline: Collection[str],
                          rulesets_file: str | None) -> list[ConfigIssue]:
    """Rules naming unknown listeners, or that can never match on the listeners running
    them (``rulesets.reference_problems``). Problems in rulesets that came from
    ``rulesets_file`` name that file, the way its parse errors do."""
    out: list[ConfigIssue] = []
    for ruleset, path, message in reference_problems(rulesets, listeners, upstreams):
        if ruleset in inline or rulesets_file is None:
            out.append(ConfigIssue(path, message))
        else:
            out.append(ConfigIssue("rulesets_file", f"{rulesets_file}: {path}: {message}"))
    return out


def format_issues(issues: tuple[ConfigIssue, ...] | list[ConfigIssue]) -> str:
    return "\n".join(str(i) for i in issues)

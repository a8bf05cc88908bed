"""Egress proxies: listeners with ``protocol: socks5`` or ``protocol: http_connect``.

A client asks such a listener for a destination (host name or address, and a port);
policy decides on it (``to.hosts``, ``to.ports``, ``to.destinations``, ``to.cidrs``) and
only an allowed destination is resolved and connected to. Modules:

- ``hosts``: checks and normalises a requested host (pure);
- ``socks5``: the SOCKS5 handshake (RFC 1928, RFC 1929), sans-IO and bounded;
- ``httpconnect``: the HTTP/1.1 CONNECT request, sans-IO and bounded;
- ``credentials``: the credentials file (scrypt hashes) and password checks;
- ``session``: the glue a ``Connection`` calls (replies, timers, the flow record part).
"""

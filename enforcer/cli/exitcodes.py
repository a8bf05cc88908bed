"""Process exit codes, documented in docs/operations.md."""

OK = 0
DENY = 1  # policy explain: the decision is deny
FAILURE = 1  # a run or demo that failed at run time
USAGE = 2  # bad command line
BAD_CONFIG = 2  # config (or input to explain/certs) invalid
BIND_FAILED = 3  # a listener or the admin endpoint cannot bind
TLS_MATERIAL = 4  # a certificate/key could not be loaded at start
NO_NFT = 5  # intercept: the nft tool is not installed
NO_NET_ADMIN = 6  # intercept: the process lacks CAP_NET_ADMIN
INTERRUPTED = 130

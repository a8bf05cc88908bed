/* records.h: the pump's own TLS 1.3 record layer (RFC 8446 section 5), after OpenSSL's
 * handshake: record protection (AEAD by OpenSSL's EVP), parsing of the records a peer
 * sends (lengths, inner types, padding, alerts, post-handshake messages), KeyUpdate.
 *
 * It is pure: no Python, no sockets, no SSL object. It parses network bytes, so it is
 * fuzzed on its own (fuzz/fuzz_records.c) and checked against RFC 8448's known answers
 * (tests/e2e/test_tls_records_kat.py, through the module's records_* test hooks). The
 * relay (relay.c) owns when it runs; the binding (ossl.h) gives it OpenSSL's functions.
 */
#ifndef ENFORCER_RECORDS_H
#define ENFORCER_RECORDS_H

#include <stddef.h>
#include <stdint.h>

#include "ossl.h"

#ifndef SSL_R_RECORD_LAYER_FAILURE
#define SSL_R_RECORD_LAYER_FAILURE 313 /* OpenSSL >= 3.2 (sslerr.h): wraps the cause */
#endif

#define TLS13_VERSION TLS1_3_VERSION
#define RT_HEADER SSL3_RT_HEADER /* the message callback's record header */
#define RT_APPLICATION_DATA 23
#define RT_ALERT 21
#define RT_HANDSHAKE 22
#define HS_NEW_SESSION_TICKET 4
#define HS_FINISHED 20
#define HS_KEY_UPDATE 24
#define TAG_LEN 16
#define RECORD_PLAIN (16 * 1024)                 /* the largest plaintext of a record */
#define RECORD_BODY_MAX (RECORD_PLAIN + 256)     /* its largest ciphertext (RFC 8446 5.2) */
#define RECORD_MAX (5 + RECORD_BODY_MAX)
#define HANDSHAKE_MAX (64 * 1024)                /* a post-handshake message we will hold */
#define MAX_EMPTY_RECORDS 32    /* OpenSSL's limits: empty records in a row, */
#define MAX_WARN_ALERT_COUNT 5  /* and warning alerts (user_canceled) before data */

typedef struct {
    unsigned char secret[48], key[32], iv[12];
    uint64_t seq;
    EVP_CIPHER_CTX *ctx; /* keyed for this direction, or NULL until needed */
} Direction;

struct RecordsState {
    const EVP_CIPHER *cipher;
    const EVP_MD *md;
    int key_len, hash_len, server;
    Direction dir[2];   /* [0] records we read, [1] records we write */
    unsigned char *part; /* a record received in part (RECORD_MAX bytes), or NULL */
    size_t part_len;
    unsigned char *hs;   /* a handshake message received in part, or NULL */
    size_t hs_len, hs_cap;
    unsigned empty_run;  /* empty records read in a row */
    unsigned warn_run;   /* warning alerts read since the last data */
    unsigned answered;   /* our last record out is a KeyUpdate: requests need no other */
    unsigned char session_id[32]; /* a server end's session id and its cache, to drop */
    unsigned session_id_len;      /* the session if the connection fails in TLS (as */
    SSL_CTX *session_ctx;         /* OpenSSL would): not the session, which may be big */
};

typedef struct RecordsState Records;

/* Where records_input() delivers what it read. Each callback returns 0 to go on; any
   other value stops the input (the caller failed or closed: records_input returns
   RECORDS_STOPPED). key_update may return 1 instead: our direction has ended, no answer. */
typedef struct {
    void *arg;
    int (*data)(void *arg, const unsigned char *plain, size_t len);
    int (*key_update)(void *arg); /* send our KeyUpdate(update_not_requested) now */
} RecordSink;

enum {
    RECORDS_MORE = 0,         /* all input used; more records may come */
    RECORDS_CLOSE_NOTIFY = 1, /* the peer ended its stream (what follows is ignored) */
    RECORDS_FAILED = 2,       /* a TLS failure: *why names it (records_alert_for) */
    RECORDS_STOPPED = 3,      /* a callback stopped it */
};

/* Once, after binding: fetch the AEADs and HMACs (OpenSSL 3) so connections look nothing
   up by name. Without those functions (other libraries) the legacy getters are used. */
void records_init(void);
/* The cipher of a TLS 1.3 suite (0x1301-0x1303) and its key length and hash, or NULL. */
const EVP_CIPHER *records_suite(unsigned long id, int *key_len, const EVP_MD **md);
/* A record state for a suite with the two traffic secrets (client's, server's) of
   `hash_len` bytes and the next sequence numbers; NULL if it cannot be made. */
Records *records_new(unsigned long suite, int server, const unsigned char *client_secret,
                     const unsigned char *server_secret, size_t hash_len, uint64_t read_seq,
                     uint64_t write_seq);
void records_free(Records *r);
void records_release(Records *r); /* a quiet end: contexts and empty buffers go */
size_t records_bytes(const Records *r);
/* One record of inner type `type` with len <= RECORD_PLAIN bytes, written at `out` (room
   for len + 22); its size, or -1. */
int records_seal(Records *r, int type, const unsigned char *data, size_t len,
                 unsigned char *out);
/* Our KeyUpdate went out: the write direction moves to its next secret. */
int records_next_write(Records *r);
/* The records in `len` new bytes (and a record begun earlier): application data to
   sink->data (batched in `plain`, `room` >= RECORD_PLAIN + 256 bytes), KeyUpdates
   followed (answered through sink->key_update), alerts and other messages checked. */
int records_input(Records *r, const unsigned char *data, size_t len, unsigned char *plain,
                  size_t room, const RecordSink *sink, const char **why);
/* The alert OpenSSL sends for a failure records_input reported, or -1 for none (an alert
   received, or a reason not of this layer). */
int records_alert_for(const char *why);
/* The name of an SSL_R_* reason code (see records.c); `buf` holds a numbered one. */
const char *tls_reason_name(int reason, char *buf, size_t room);

#endif

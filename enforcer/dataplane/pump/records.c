/* records.c: the pump's own TLS 1.3 record layer; see records.h and "TLS 1.3 records" in
 * relay.c for when an end is taken over from OpenSSL. */
#include "records.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static EVP_MAC_CTX *hmac_ctx[2];          /* HMAC-SHA256 and -SHA384, digest set (OpenSSL 3) */
static EVP_CIPHER *fetched_cipher[3]; /* the three suites' AEADs, fetched once (OpenSSL 3) */

/* ---- reasons: enforcer's words for OpenSSL's reason codes ------------------------------
 * A TLS failure is reported with the name of its SSL_R_* reason code as OpenSSL 3.0's
 * headers spell it (a table built from the constants, so compiled in and checked): never
 * from ERR_reason_error_string(), whose words changed in OpenSSL 3.2-3.5 ("ssl/tls alert
 * handshake failure"). An alert received is SSL_R_* 1000 + its description. */
#define REASON(name) {SSL_R_##name, #name}
static const struct {
    int code;
    const char *name;
} ssl_reasons[] = {
    REASON(DECRYPTION_FAILED_OR_BAD_RECORD_MAC), REASON(ENCRYPTED_LENGTH_TOO_LONG),
    REASON(DATA_LENGTH_TOO_LONG), REASON(PACKET_LENGTH_TOO_LONG), REASON(RECORD_TOO_SMALL),
    REASON(BAD_RECORD_TYPE), REASON(WRONG_VERSION_NUMBER), REASON(BAD_LENGTH),
    REASON(INVALID_ALERT), REASON(TOO_MANY_WARN_ALERTS), REASON(UNEXPECTED_MESSAGE),
    REASON(UNEXPECTED_RECORD), REASON(BAD_KEY_UPDATE), REASON(NOT_ON_RECORD_BOUNDARY),
    REASON(EXCESSIVE_MESSAGE_SIZE), REASON(MIXED_HANDSHAKE_AND_NON_HANDSHAKE_DATA),
    REASON(UNEXPECTED_EOF_WHILE_READING), REASON(TOO_MANY_KEY_UPDATES),
    REASON(APPLICATION_DATA_AFTER_CLOSE_NOTIFY), REASON(UNKNOWN_ALERT_TYPE),
    REASON(LENGTH_MISMATCH), REASON(UNEXPECTED_CCS_MESSAGE), REASON(SSL_HANDSHAKE_FAILURE),
    REASON(RECORD_LENGTH_MISMATCH), REASON(BAD_PACKET_LENGTH), REASON(CCS_RECEIVED_EARLY),
    REASON(RENEGOTIATION_MISMATCH), REASON(NO_RENEGOTIATION), REASON(SHUTDOWN_WHILE_IN_INIT),
    REASON(PROTOCOL_IS_SHUTDOWN), REASON(READ_BIO_NOT_SET), REASON(BAD_HANDSHAKE_STATE),
    REASON(SSLV3_ALERT_UNEXPECTED_MESSAGE), REASON(SSLV3_ALERT_BAD_RECORD_MAC),
    REASON(TLSV1_ALERT_DECRYPTION_FAILED), REASON(TLSV1_ALERT_RECORD_OVERFLOW),
    REASON(SSLV3_ALERT_DECOMPRESSION_FAILURE), REASON(SSLV3_ALERT_HANDSHAKE_FAILURE),
    REASON(SSLV3_ALERT_NO_CERTIFICATE), REASON(SSLV3_ALERT_BAD_CERTIFICATE),
    REASON(SSLV3_ALERT_UNSUPPORTED_CERTIFICATE), REASON(SSLV3_ALERT_CERTIFICATE_REVOKED),
    REASON(SSLV3_ALERT_CERTIFICATE_EXPIRED), REASON(SSLV3_ALERT_CERTIFICATE_UNKNOWN),
    REASON(SSLV3_ALERT_ILLEGAL_PARAMETER), REASON(TLSV1_ALERT_UNKNOWN_CA),
    REASON(TLSV1_ALERT_ACCESS_DENIED), REASON(TLSV1_ALERT_DECODE_ERROR),
    REASON(TLSV1_ALERT_DECRYPT_ERROR), REASON(TLSV1_ALERT_EXPORT_RESTRICTION),
    REASON(TLSV1_ALERT_PROTOCOL_VERSION), REASON(TLSV1_ALERT_INSUFFICIENT_SECURITY),
    REASON(TLSV1_ALERT_INTERNAL_ERROR), REASON(TLSV1_ALERT_INAPPROPRIATE_FALLBACK),
    REASON(TLSV1_ALERT_USER_CANCELLED), REASON(TLSV1_ALERT_NO_RENEGOTIATION),
    REASON(TLSV13_ALERT_MISSING_EXTENSION), REASON(TLSV1_UNSUPPORTED_EXTENSION),
    REASON(TLSV1_CERTIFICATE_UNOBTAINABLE), REASON(TLSV1_UNRECOGNIZED_NAME),
    REASON(TLSV1_BAD_CERTIFICATE_STATUS_RESPONSE), REASON(TLSV1_BAD_CERTIFICATE_HASH_VALUE),
    REASON(TLSV1_ALERT_UNKNOWN_PSK_IDENTITY), REASON(TLSV13_ALERT_CERTIFICATE_REQUIRED),
    REASON(TLSV1_ALERT_NO_APPLICATION_PROTOCOL),
};



/* The name of an SSL_R_* reason code, or a numbered one ("SSL_REASON_313") if the table
   does not know it; `buf` (32 bytes) holds the numbered one. */
const char *tls_reason_name(int reason, char *buf, size_t room) {
    for (size_t k = 0; k < sizeof ssl_reasons / sizeof ssl_reasons[0]; k++) {
        if (ssl_reasons[k].code == reason) {
            return ssl_reasons[k].name;
        }
    }
    if (reason > 1000 && reason < 1256) {
        snprintf(buf, room, "TLS_ALERT_%d", reason - 1000);
    } else {
        snprintf(buf, room, "SSL_REASON_%d", reason);
    }
    return buf;
}

/* ---- keys and record protection ------------------------------------------------------- */
/* HKDF-Expand-Label(secret, label, "", len) for len <= the hash size: one HMAC block.
   same_key: the previous call keyed the shared HMAC context with this very secret (the
   key and the IV of one direction): it is only re-initialised, which copies the keyed
   state instead of hashing the key pads again (about half of an HMAC's instructions). */
static int expand_label(const Records *r, const unsigned char *secret, const char *label,
                        unsigned char *out, int len, int same_key) {
    unsigned char info[2 + 1 + 6 + 12 + 1 + 1], block[64];
    size_t ll = strlen(label), n = 0;
    unsigned block_len = 0;
    info[n++] = (unsigned char)(len >> 8);
    info[n++] = (unsigned char)len;
    info[n++] = (unsigned char)(6 + ll);
    memcpy(info + n, "tls13 ", 6);
    n += 6;
    memcpy(info + n, label, ll);
    n += ll;
    info[n++] = 0; /* no context */
    info[n++] = 1; /* HKDF-Expand's block counter */
    EVP_MAC_CTX *mac = hmac_ctx[r->hash_len == 48];
    size_t mac_len = 0;
    if (mac != NULL) { /* a keyed copy of a ready context: no lookups by name */
        if (ossl.EVP_MAC_init(mac, same_key ? NULL : secret, same_key ? 0 : (size_t)r->hash_len,
                              NULL) != 1 ||
            ossl.EVP_MAC_update(mac, info, n) != 1 ||
            ossl.EVP_MAC_final(mac, block, &mac_len, sizeof block) != 1) {
            ossl.ERR_clear_error();
            return -1;
        }
        block_len = (unsigned)mac_len;
    } else if (ossl.HMAC(r->md, secret, r->hash_len, info, n, block, &block_len) == NULL) {
        ossl.ERR_clear_error();
        return -1;
    }
    if ((int)block_len < len) {
        return -1;
    }
    memcpy(out, block, (size_t)len);
    ossl.OPENSSL_cleanse(block, sizeof block);
    return 0;
}

/* Key and IV of a direction from its secret; its cipher context is made again when used. */
static int derive_keys(Records *r, Direction *d) {
    if (d->ctx != NULL) {
        ossl.EVP_CIPHER_CTX_free(d->ctx);
        d->ctx = NULL;
    }
    d->seq = 0;
    return expand_label(r, d->secret, "key", d->key, r->key_len, 0) < 0 ||
                   expand_label(r, d->secret, "iv", d->iv, 12, 1) < 0
               ? -1
               : 0;
}

/* KeyUpdate: the next secret of a direction (RFC 8446 7.2), then its keys. */
static int next_keys(Records *r, Direction *d) {
    unsigned char next[48];
    if (expand_label(r, d->secret, "traffic upd", next, r->hash_len, 0) < 0) {
        return -1;
    }
    memcpy(d->secret, next, (size_t)r->hash_len);
    ossl.OPENSSL_cleanse(next, sizeof next);
    return derive_keys(r, d);
}

static EVP_CIPHER_CTX *cipher_ctx(Records *r, int w) {
    Direction *d = &r->dir[w];
    if (d->ctx == NULL) {
        d->ctx = ossl.EVP_CIPHER_CTX_new();
        if (d->ctx != NULL &&
            ossl.EVP_CipherInit_ex(d->ctx, r->cipher, NULL, d->key, NULL, w) != 1) {
            ossl.EVP_CIPHER_CTX_free(d->ctx);
            d->ctx = NULL;
        }
        if (d->ctx == NULL) {
            ossl.ERR_clear_error();
        }
    }
    return d->ctx;
}

static void nonce_of(const Direction *d, unsigned char nonce[12]) {
    memcpy(nonce, d->iv, 12);
    for (int k = 0; k < 8; k++) {
        nonce[11 - k] ^= (unsigned char)(d->seq >> (8 * k));
    }
}

/* One record of inner type `type` with `len` (<= RECORD_PLAIN) bytes of `data`, written at
   `out` (room for len + 22). Returns its size, or -1. */
int records_seal(Records *r, int type, const unsigned char *data, size_t len,
                       unsigned char *out) {
    Direction *d = &r->dir[1];
    EVP_CIPHER_CTX *ctx = cipher_ctx(r, 1);
    size_t body = len + 1 + TAG_LEN;
    unsigned char nonce[12], inner = (unsigned char)type;
    int n = 0, m = 0, f = 0;
    if (ctx == NULL || d->seq == UINT64_MAX) {
        return -1;
    }
    out[0] = RT_APPLICATION_DATA;
    out[1] = 3;
    out[2] = 3;
    out[3] = (unsigned char)(body >> 8);
    out[4] = (unsigned char)body;
    nonce_of(d, nonce);
    if (ossl.EVP_CipherInit_ex(ctx, NULL, NULL, NULL, nonce, 1) != 1 ||
        ossl.EVP_CipherUpdate(ctx, NULL, &n, out, 5) != 1 ||
        (len > 0 && ossl.EVP_CipherUpdate(ctx, out + 5, &n, data, (int)len) != 1) ||
        ossl.EVP_CipherUpdate(ctx, out + 5 + len, &m, &inner, 1) != 1 ||
        ossl.EVP_CipherFinal_ex(ctx, out + 5 + len + 1, &f) != 1 ||
        ossl.EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, TAG_LEN, out + 5 + len + 1) != 1) {
        ossl.ERR_clear_error();
        return -1;
    }
    d->seq++;
    return (int)(5 + body);
}

/* Opens the whole record at rec (header and `body` bytes) into out; returns the length of
   its content and sets *type, or NULL-terminated reason in *why and -1. */
static int open_record(Records *r, const unsigned char *rec, size_t body, unsigned char *out,
                       int *type, const char **why) {
    Direction *d = &r->dir[0];
    EVP_CIPHER_CTX *ctx = cipher_ctx(r, 0);
    unsigned char nonce[12];
    int n = 0, f = 0;
    if (ctx == NULL || d->seq == UINT64_MAX) {
        *why = "internal error";
        return -1;
    }
    if (body < TAG_LEN + 1) {
        *why = "DECRYPTION_FAILED_OR_BAD_RECORD_MAC"; /* too short for a tag and a type */
        return -1;
    }
    size_t clen = body - TAG_LEN;
    nonce_of(d, nonce);
    if (ossl.EVP_CipherInit_ex(ctx, NULL, NULL, NULL, nonce, 0) != 1 ||
        ossl.EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, TAG_LEN,
                                 (void *)(rec + 5 + clen)) != 1 ||
        ossl.EVP_CipherUpdate(ctx, NULL, &n, rec, 5) != 1 ||
        ossl.EVP_CipherUpdate(ctx, out, &n, rec + 5, (int)clen) != 1 ||
        ossl.EVP_CipherFinal_ex(ctx, out + n, &f) != 1) {
        ossl.ERR_clear_error();
        *why = "DECRYPTION_FAILED_OR_BAD_RECORD_MAC";
        return -1;
    }
    d->seq++;
    while (clen > 0 && out[clen - 1] == 0) {
        clen--; /* padding */
    }
    if (clen == 0) {
        *why = "BAD_RECORD_TYPE"; /* no content type */
        return -1;
    }
    if (clen - 1 > RECORD_PLAIN) {
        *why = "DATA_LENGTH_TOO_LONG"; /* OpenSSL's words (a record_overflow alert) */
        return -1;
    }
    *type = out[clen - 1];
    return (int)(clen - 1);
}

void records_free(Records *r) {
    for (int w = 0; w < 2; w++) {
        if (r->dir[w].ctx != NULL) {
            ossl.EVP_CIPHER_CTX_free(r->dir[w].ctx);
        }
    }
    free(r->part);
    if (r->hs != NULL) {
        ossl.OPENSSL_cleanse(r->hs, r->hs_cap);
        free(r->hs);
    }
    if (r->session_ctx != NULL) {
        ossl.SSL_CTX_free(r->session_ctx);
    }
    ossl.OPENSSL_cleanse(r, sizeof *r);
    free(r);
}

/* What a quiet end gives back: cipher contexts (made again on the next record) and
   empty buffers. */
void records_release(Records *r) {
    for (int w = 0; w < 2; w++) {
        if (r->dir[w].ctx != NULL) {
            ossl.EVP_CIPHER_CTX_free(r->dir[w].ctx);
            r->dir[w].ctx = NULL;
        }
    }
    if (r->part != NULL && r->part_len == 0) {
        free(r->part);
        r->part = NULL;
    }
    if (r->hs != NULL && r->hs_len == 0) {
        free(r->hs);
        r->hs = NULL;
        r->hs_cap = 0;
    }
}

size_t records_bytes(const Records *r) {
    return (r->part != NULL ? RECORD_MAX : 0) + r->hs_cap;
}

/* The cipher of a TLS 1.3 suite we protect records for, or NULL. */
const EVP_CIPHER *records_suite(unsigned long id, int *key_len, const EVP_MD **md) {
    switch (id & 0xffff) {
    case 0x1301: /* TLS_AES_128_GCM_SHA256 */
        *key_len = 16;
        *md = ossl.EVP_sha256();
        return fetched_cipher[0] ? fetched_cipher[0] : ossl.EVP_aes_128_gcm();
    case 0x1302: /* TLS_AES_256_GCM_SHA384 */
        *key_len = 32;
        *md = ossl.EVP_sha384();
        return fetched_cipher[1] ? fetched_cipher[1] : ossl.EVP_aes_256_gcm();
    case 0x1303: /* TLS_CHACHA20_POLY1305_SHA256 */
        *key_len = 32;
        *md = ossl.EVP_sha256();
        return fetched_cipher[2] ? fetched_cipher[2] : ossl.EVP_chacha20_poly1305();
    default:
        return NULL;
    }
}

Records *records_new(unsigned long suite, int server, const unsigned char *client_secret,
                     const unsigned char *server_secret, size_t hash_len, uint64_t read_seq,
                     uint64_t write_seq) {
    const EVP_MD *md = NULL;
    int key_len = 0;
    const EVP_CIPHER *cipher = records_suite(suite, &key_len, &md);
    size_t want = md == ossl.EVP_sha384() ? 48 : 32;
    if (cipher == NULL || md == NULL || hash_len != want) {
        return NULL;
    }
    Records *r = calloc(1, sizeof *r);
    if (r == NULL) {
        return NULL;
    }
    r->cipher = cipher;
    r->md = md;
    r->key_len = key_len;
    r->hash_len = (int)hash_len;
    r->server = server;
    /* [0] read: the peer's secret; [1] write: ours */
    memcpy(r->dir[0].secret, server ? client_secret : server_secret, hash_len);
    memcpy(r->dir[1].secret, server ? server_secret : client_secret, hash_len);
    if (derive_keys(r, &r->dir[0]) < 0 || derive_keys(r, &r->dir[1]) < 0) {
        records_free(r);
        return NULL;
    }
    r->dir[0].seq = read_seq;
    r->dir[1].seq = write_seq;
    return r;
}

int records_next_write(Records *r) { return next_keys(r, &r->dir[1]); }

/* A post-handshake message (RFC 8446 4.6). NULL, or why it is refused ("" when a callback
   stopped: *stopped is set). */
static const char *handshake_message(Records *r, const unsigned char *m, size_t len,
                                     int last_in_record, const RecordSink *sink,
                                     int *stopped) {
    if (m[0] == HS_NEW_SESSION_TICKET && !r->server) {
        return NULL; /* a ticket for later connections: the handshake's ones are kept */
    }
    if (m[0] != HS_KEY_UPDATE) {
        return "UNEXPECTED_MESSAGE";
    }
    if (len != 5 || m[4] > 1) {
        return "BAD_KEY_UPDATE";
    }
    if (!last_in_record) {
        return "NOT_ON_RECORD_BOUNDARY";
    }
    if (next_keys(r, &r->dir[0]) < 0) {
        return "internal error: key update failed";
    }
    /* update_requested: ours goes before any more data; one answers every request that
       comes before we send anything else (RFC 8446 4.6.3), so a peer sending requests and
       reading nothing does not fill our out buffer with answers */
    if (m[4] == 1 && !r->answered) {
        int sent = sink->key_update(sink->arg);
        if (sent != 0 && sent != 1) {
            *stopped = 1;
            return "";
        }
        if (sent == 0 && next_keys(r, &r->dir[1]) < 0) {
            return "internal error: key update failed";
        }
        r->answered = sent == 0;
    }
    return NULL;
}

/* The handshake content of one record: whole messages, and a part kept for the next. */
static const char *handshake_content(Records *r, const unsigned char *data, size_t len,
                                     const RecordSink *sink, int *stopped) {
    const unsigned char *b = data;
    size_t have = len;
    if (r->hs_len > 0) { /* a message began in an earlier record */
        if (r->hs_len + len > r->hs_cap) {
            size_t cap = r->hs_len + len;
            unsigned char *grown = realloc(r->hs, cap);
            if (grown == NULL) {
                return "internal error: out of memory";
            }
            r->hs = grown;
            r->hs_cap = cap;
        }
        memcpy(r->hs + r->hs_len, data, len);
        r->hs_len += len;
        b = r->hs;
        have = r->hs_len;
    }
    size_t off = 0;
    while (have - off >= 4) {
        size_t mlen = ((size_t)b[off + 1] << 16) | ((size_t)b[off + 2] << 8) | b[off + 3];
        if (mlen > HANDSHAKE_MAX) {
            return "EXCESSIVE_MESSAGE_SIZE";
        }
        if (have - off < 4 + mlen) {
            break;
        }
        const char *why = handshake_message(r, b + off, 4 + mlen, off + 4 + mlen == have, sink,
                                            stopped);
        if (why != NULL) {
            return why;
        }
        off += 4 + mlen;
    }
    size_t rest = have - off;
    if (rest > 0 && b != r->hs) { /* keep the start of a message for the next record */
        if (rest > r->hs_cap) {
            unsigned char *grown = realloc(r->hs, rest);
            if (grown == NULL) {
                return "internal error: out of memory";
            }
            r->hs = grown;
            r->hs_cap = rest;
        }
        memcpy(r->hs, b + off, rest);
    } else if (rest > 0 && off > 0) {
        memmove(r->hs, r->hs + off, rest);
    }
    r->hs_len = rest;
    return NULL;
}

/* The next whole record of side i: in data[*off:len], or completed in r->part from it.
   Returns the record (header first) and its body length, or NULL when more bytes are
   needed (what there is, is kept) or on error (*why set). */
static const unsigned char *next_record(Records *r, const char *data, size_t len, size_t *off,
                                        size_t *body, const char **why) {
    if (r->part_len == 0 && len - *off >= 5) {
        const unsigned char *h = (const unsigned char *)data + *off;
        size_t n = ((size_t)h[3] << 8) | h[4];
        if (n > RECORD_BODY_MAX) {
            *why = "ENCRYPTED_LENGTH_TOO_LONG"; /* RFC 8446 5.2 */
            return NULL;
        }
        if (len - *off >= 5 + n) {
            *off += 5 + n;
            *body = n;
            return h;
        }
    }
    if (len == *off) {
        return NULL;
    }
    if (r->part == NULL && (r->part = malloc(RECORD_MAX)) == NULL) {
        *why = "internal error: out of memory";
        return NULL;
    }
    for (;;) {
        size_t want = 5;
        if (r->part_len >= 5) {
            size_t n = ((size_t)r->part[3] << 8) | r->part[4];
            if (n > RECORD_BODY_MAX) {
                *why = "ENCRYPTED_LENGTH_TOO_LONG";
                return NULL;
            }
            want = 5 + n;
            if (r->part_len == want) {
                r->part_len = 0; /* the caller uses it before anything else is kept */
                *body = n;
                return r->part;
            }
        }
        if (*off == len) {
            return NULL;
        }
        size_t take = want - r->part_len < len - *off ? want - r->part_len : len - *off;
        memcpy(r->part + r->part_len, data + *off, take);
        r->part_len += take;
        *off += take;
    }
}

/* OpenSSL's words for an alert received (its reason codes are 1000 + the alert), so the
   flow record says the same whichever layer read it. */
static const char *alert_reason(unsigned description) {
    static char unknown[40];
    return tls_reason_name(1000 + (int)description, unknown, sizeof unknown);
}

/* The alert OpenSSL sends for each failure of ours (RFC 8446 6.2); a failure not listed
   here (an alert received, whose reason is the alert's name) gets none. */
static const struct {
    const char *why;
    unsigned char alert;
} failure_alerts[] = {
    {"DECRYPTION_FAILED_OR_BAD_RECORD_MAC", SSL_AD_BAD_RECORD_MAC},
    {"ENCRYPTED_LENGTH_TOO_LONG", SSL_AD_RECORD_OVERFLOW},
    {"DATA_LENGTH_TOO_LONG", SSL_AD_RECORD_OVERFLOW},
    {"BAD_RECORD_TYPE", SSL_AD_UNEXPECTED_MESSAGE},
    {"WRONG_VERSION_NUMBER", SSL_AD_PROTOCOL_VERSION},
    {"BAD_LENGTH", SSL_AD_UNEXPECTED_MESSAGE},
    {"RECORD_TOO_SMALL", SSL_AD_UNEXPECTED_MESSAGE},
    {"MIXED_HANDSHAKE_AND_NON_HANDSHAKE_DATA", SSL_AD_UNEXPECTED_MESSAGE},
    {"INVALID_ALERT", SSL_AD_DECODE_ERROR},
    {"TOO_MANY_WARN_ALERTS", SSL_AD_UNEXPECTED_MESSAGE},
    {"UNEXPECTED_MESSAGE", SSL_AD_UNEXPECTED_MESSAGE},
    {"BAD_KEY_UPDATE", SSL_AD_ILLEGAL_PARAMETER},
    {"NOT_ON_RECORD_BOUNDARY", SSL_AD_UNEXPECTED_MESSAGE},
    {"EXCESSIVE_MESSAGE_SIZE", SSL_AD_ILLEGAL_PARAMETER},
};


int records_alert_for(const char *why) {
    for (size_t k = 0; k < sizeof failure_alerts / sizeof failure_alerts[0]; k++) {
        if (strcmp(failure_alerts[k].why, why) == 0) {
            return failure_alerts[k].alert;
        }
    }
    return strncmp(why, "internal error", 14) == 0 ? SSL_AD_INTERNAL_ERROR : -1;
}

/* The records in `len` new bytes (see records.h). */
int records_input(Records *r, const unsigned char *data, size_t len, unsigned char *plain,
                  size_t room, const RecordSink *sink, const char **why) {
    size_t off = 0, filled = 0, body = 0;
    int eof = 0, stopped = 0;
    *why = NULL;
    while (!eof) {
        const unsigned char *rec = next_record(r, (const char *)data, len, &off, &body, why);
        if (rec == NULL) {
            break;
        }
        if (rec[0] != RT_APPLICATION_DATA) {
            *why = "BAD_RECORD_TYPE"; /* plaintext records end with the handshake */
            break;
        }
        if (rec[1] != 3 || rec[2] != 3) {
            *why = "WRONG_VERSION_NUMBER"; /* as OpenSSL checks legacy_record_version */
            break;
        }
        if (room - filled < body) {
            if (sink->data(sink->arg, plain, filled) != 0) {
                return RECORDS_STOPPED;
            }
            filled = 0;
        }
        int type = 0;
        unsigned char *out = plain + filled;
        int n = open_record(r, rec, body, out, &type, why);
        if (n < 0) {
            break;
        }
        if (type != RT_APPLICATION_DATA && type != RT_ALERT && type != RT_HANDSHAKE) {
            *why = "BAD_RECORD_TYPE";
        } else if (n == 0 && type != RT_APPLICATION_DATA) {
            *why = "BAD_LENGTH"; /* only application data may be empty */
        } else if (n == 0 && ++r->empty_run > MAX_EMPTY_RECORDS) {
            *why = "RECORD_TOO_SMALL";
        } else if (n == 0) {
            /* an empty record: nothing to do */
        } else if (r->hs_len > 0 && type != RT_HANDSHAKE) {
            *why = "MIXED_HANDSHAKE_AND_NON_HANDSHAKE_DATA"; /* RFC 8446 5.1 */
        } else if (type == RT_APPLICATION_DATA) {
            r->empty_run = r->warn_run = 0;
            filled += (size_t)n;
        } else if (type == RT_ALERT) {
            r->empty_run = 0;
            if (n != 2) {
                *why = "INVALID_ALERT";
            } else if (out[1] == 0) {
                eof = 1; /* close_notify: whatever follows it is ignored */
            } else if (out[1] != 90) { /* user_canceled comes before a close_notify */
                *why = alert_reason(out[1]);
            } else if (++r->warn_run >= MAX_WARN_ALERT_COUNT) {
                *why = "TOO_MANY_WARN_ALERTS";
            }
        } else {
            r->empty_run = 0;
            *why = handshake_content(r, out, (size_t)n, sink, &stopped);
        }
        if (*why != NULL) {
            break;
        }
    }
    if (stopped || (filled && sink->data(sink->arg, plain, filled) != 0)) {
        return RECORDS_STOPPED;
    }
    if (*why != NULL) {
        return RECORDS_FAILED;
    }
    return eof ? RECORDS_CLOSE_NOTIFY : RECORDS_MORE;
}

/* ---- setup ------------------------------------------------------------------------------ */
/* OpenSSL 3's HMAC() and legacy EVP_aes_*() look the algorithm up by name on every call
   (~20,000 instructions per HMAC in callgrind); fetched once here, they cost nothing per
   connection. Without these functions (OpenSSL 1.1.1) the slow paths are used. */
void records_init(void) {
    if (ossl.EVP_CIPHER_fetch != NULL && fetched_cipher[0] == NULL) {
        static const char *names[3] = {"AES-128-GCM", "AES-256-GCM", "ChaCha20-Poly1305"};
        for (int k = 0; k < 3; k++) {
            fetched_cipher[k] = ossl.EVP_CIPHER_fetch(NULL, names[k], NULL);
        }
    }
    if (ossl.EVP_MAC_fetch == NULL || ossl.EVP_MAC_CTX_new == NULL || ossl.EVP_MAC_init == NULL ||
        ossl.EVP_MAC_update == NULL || ossl.EVP_MAC_final == NULL || hmac_ctx[0] != NULL) {
        ossl.ERR_clear_error();
        return;
    }
    EVP_MAC *mac = ossl.EVP_MAC_fetch(NULL, "HMAC", NULL);
    static const char *digests[2] = {"SHA256", "SHA384"};
    static const unsigned char dummy[48];
    for (int k = 0; k < 2 && mac != NULL; k++) {
        OSSL_PARAM params[2] = {
            {"digest", OSSL_PARAM_UTF8_STRING, (void *)digests[k], strlen(digests[k]),
             OSSL_PARAM_UNMODIFIED},
            OSSL_PARAM_END,
        };
        EVP_MAC_CTX *ctx = ossl.EVP_MAC_CTX_new(mac);
        if (ctx != NULL && ossl.EVP_MAC_init(ctx, dummy, sizeof dummy, params) == 1) {
            hmac_ctx[k] = ctx; /* kept for the life of the process, like the fetches */
        }
    }
    ossl.ERR_clear_error();
}

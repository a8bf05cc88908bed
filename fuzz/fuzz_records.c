/* fuzz_records.c: libFuzzer harness of the own TLS 1.3 record layer (records_input and
 * everything it calls: record framing, AEAD open, padding and inner type, alerts,
 * post-handshake messages split over records, KeyUpdate), the C code that parses what a
 * TLS peer sends once the pump owns an end.
 *
 * Input: byte 0 picks the suite and the role; byte 1 the chunk size the bytes arrive in
 * (1..256 bytes, or all at once: records split anywhere); byte 2 the mode:
 * - raw (even): the rest is the ciphertext stream as is (framing, lengths, tag failures);
 * - sealed (odd): the rest is a list of (inner type, length, content, flags) that the
 *   harness seals as records with the peer's keys, so the fuzzer reaches the parsing after
 *   decryption; a flag byte may flip a bit of the sealed record or add padding. A
 *   KeyUpdate the harness seals moves its own keys on, as a peer's would.
 * Every allocation is checked by ASan, undefined behaviour by UBSan; the sink checks that
 * what comes out is no longer than what went in.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../enforcer/dataplane/pump/records.h"

static unsigned char plain[64 * 1024];
static unsigned char wire[1 << 20];

typedef struct {
    size_t delivered, fed;
} Totals;

static int on_data(void *arg, const unsigned char *data, size_t len) {
    Totals *t = arg;
    t->delivered += len;
    if (t->delivered > t->fed || (len > 0 && data == NULL)) {
        abort(); /* more plaintext than ciphertext: a parsing bug */
    }
    return 0;
}

static int on_key_update(void *arg) { return 0; }

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    ossl_link();
    records_init();
    return 0;
}

/* The sealed mode's records: the peer's stream the harness makes. */
static size_t seal_all(Records *peer, const uint8_t *in, size_t size) {
    size_t at = 0, out = 0;
    while (at + 3 <= size && out + RECORD_MAX + 300 < sizeof wire) {
        int type = in[at];
        size_t len = ((size_t)in[at + 1] << 8 | in[at + 2]) % (RECORD_PLAIN + 2);
        unsigned flags = at + 3 < size ? in[at + 3] : 0;
        at += 4;
        if (len > size - (at < size ? at : size)) {
            len = at < size ? size - at : 0;
        }
        size_t pad = flags & 0x40 ? (flags & 0x3f) : 0;
        if (len > RECORD_PLAIN - pad) { /* records_seal takes at most RECORD_PLAIN */
            len = RECORD_PLAIN - pad;
        }
        /* padded (RFC 8446 5.4): content, type, zeros, sealed as "type 0" after them */
        unsigned char inner[RECORD_PLAIN + 1];
        memcpy(inner, in + at, len);
        at += len;
        inner[len] = (unsigned char)type;
        memset(inner + len + 1, 0, pad > 0 ? pad - 1 : 0);
        int n = pad ? records_seal(peer, 0, inner, len + pad, wire + out)
                    : records_seal(peer, type, inner, len, wire + out);
        if (n < 0) {
            break;
        }
        if (flags & 0x80) {
            wire[out + (size_t)(flags & 0x3f) % (size_t)n] ^= (unsigned char)(1u << (flags & 7));
        }
        out += (size_t)n;
        if (type == 22 && len == 5 && inner[0] == 24) {
            records_next_write(peer); /* the peer's KeyUpdate: its keys move on */
        }
    }
    return out;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static const unsigned char secret[48] = {1, 2, 3, 4, 5, 6, 7, 8, 9};
    if (size < 3) {
        return 0;
    }
    unsigned long suite = 0x1301 + data[0] % 3;
    int server = (data[0] >> 2) & 1;
    size_t hash_len = suite == 0x1302 ? 48 : 32;
    size_t chunk = data[1] == 0 ? (size_t)-1 : data[1];
    Records *r = records_new(suite, server, secret, secret, hash_len, 0, 0);
    Records *peer = records_new(suite, !server, secret, secret, hash_len, 0, 0);
    if (r == NULL || peer == NULL) {
        abort();
    }
    size_t len;
    const unsigned char *stream;
    if (data[2] & 1) {
        len = seal_all(peer, data + 3, size - 3);
        stream = wire;
    } else {
        len = size - 3;
        stream = data + 3;
    }
    Totals totals = {0, len};
    RecordSink sink = {&totals, on_data, on_key_update};
    for (size_t at = 0; at < len;) {
        size_t n = len - at < chunk ? len - at : chunk;
        const char *why = NULL;
        int status = records_input(r, stream + at, n, plain, sizeof plain, &sink, &why);
        if ((status == RECORDS_FAILED) != (why != NULL)) {
            abort(); /* a failure always has a reason, and only a failure */
        }
        if (status != RECORDS_MORE) {
            break;
        }
        at += n;
    }
    records_release(r);
    records_free(r);
    records_free(peer);
    return 0;
}

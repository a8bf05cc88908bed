"""Flow ids: ULIDs, unique and sortable by creation time."""

from __future__ import annotations

import re
import threading
import time

from enforcer.observe.flowid import encode_ulid, flow_id_time, new_flow_id

ULID = re.compile(r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$")


def test_unique_and_sorted_over_100k() -> None:
    ids = [new_flow_id() for _ in range(100_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(ULID.match(i) for i in ids[:1000])


def test_timestamp_is_creation_time() -> None:
    before = time.time()
    fid = new_flow_id()
    after = time.time()
    assert before - 0.002 <= flow_id_time(fid) <= after + 0.002


def test_known_encodings() -> None:
    assert encode_ulid(0, 0) == "0" * 26
    assert encode_ulid((1 << 48) - 1, (1 << 80) - 1) == "7" + "Z" * 25
    assert encode_ulid(1, 0) == "0000000001" + "0" * 16
    assert encode_ulid(0, 31) == "0" * 25 + "Z"
    # The ULID spec's example id decodes to its 48-bit time part.
    assert flow_id_time("01ARZ3NDEKTSV4RRFFQ69G5FAV") == 1469922850.259


def test_reference_encoding() -> None:
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    ms, rand = 1_795_000_000_123, 0x1234_5678_9ABC_DEF0_1357
    value = (ms << 80) | rand
    expected = "".join(alphabet[(value >> (5 * (25 - i))) & 31] for i in range(26))
    assert encode_ulid(ms, rand) == expected


def test_unique_across_threads() -> None:
    out: list[list[str]] = [[] for _ in range(4)]

    def work(bucket: list[str]) -> None:
        bucket.extend(new_flow_id() for _ in range(20_000))

    threads = [threading.Thread(target=work, args=(b,)) for b in out]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for bucket in out for i in bucket]
    assert len(set(every)) == len(every)
    for bucket in out:  # each thread sees increasing ids
        assert bucket == sorted(bucket)


def test_fast_enough() -> None:
    start = time.perf_counter()
    for _ in range(50_000):
        new_flow_id()
    assert (time.perf_counter() - start) / 50_000 < 20e-6

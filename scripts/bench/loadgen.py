#!/usr/bin/python3
"""Load generator for scripts/bench/run.ts: the gRPC stack BuildStream 1.6 itself uses.

Runs under Debian's /usr/bin/python3 with python3-grpcio (gRPC C core) and the REAPI and
ByteStream stubs that ship inside the `buildstream` package, so every server is measured through
the same client code path as a real `bst pull`. Prints one JSON object on stdout.

  loadgen.py bytestream TARGET HASH SIZE READERS SECONDS
  loadgen.py batch TARGET DIGESTS_FILE SECONDS IN_FLIGHT MAX_BATCH_BYTES
  loadgen.py findmissing TARGET DIGESTS_FILE CALLS PER_CALL
  loadgen.py upload TARGET OBJECTS_DIR DIGESTS_FILE IN_FLIGHT

DIGESTS_FILE holds one `hash size` per line. Readers and in-flight calls are threads sharing one
channel per reader/caller; the C core does the I/O outside the GIL.

`upload` loads a peer that cannot share the mirror's object files (anything casd-backed,
bazel-remote) through its own write API: the listed blobs, read from OBJECTS_DIR/<2 hex>/<62 hex>
(the mirror's store), go up by BatchUpdateBlobs (batches up to 1 MiB, or the server's advertised
limit if lower) or, if larger, by ByteStream Write in 1 MiB chunks; then FindMissingBlobs must
report none of them missing.
"""
import hashlib
import json
import os
import sys
import threading
import time
import uuid

import grpc
from buildstream._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildstream._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from buildstream._protos.google.bytestream import bytestream_pb2, bytestream_pb2_grpc

# bst 1.6 raises the receive limit the same way for its own channels' large messages.
CHANNEL_OPTIONS = [('grpc.max_receive_message_length', 64 << 20)]


def read_digests(path):
    with open(path) as f:
        return [re_pb2.Digest(hash=h, size_bytes=int(s)) for h, s in (line.split() for line in f if line.strip())]


def run_threads(count, fn):
    results = [None] * count
    errors = []

    def wrap(i):
        try:
            results[i] = fn(i)
        except Exception as e:  # reported, and the run fails
            errors.append(repr(e))
    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit('load generator failed: ' + errors[0])
    return results


def bytestream(target, hash_, size, readers, seconds):
    size = int(size)
    resource = 'blobs/%s/%d' % (hash_, size)

    def read_once(stub, check):
        h = hashlib.sha256() if check else None
        got = 0
        for response in stub.Read(bytestream_pb2.ReadRequest(resource_name=resource)):
            got += len(response.data)
            if h:
                h.update(response.data)
        if got != size or (h and h.hexdigest() != hash_):
            raise RuntimeError('bad read: %d bytes' % got)
        return got

    # One untimed read, checked end to end: proves the content, and warms both servers the same
    # way (page cache; the mirror rehashes a blob on its first read by a process).
    read_once(bytestream_pb2_grpc.ByteStreamStub(grpc.insecure_channel(target, options=CHANNEL_OPTIONS)), True)
    end = time.monotonic() + float(seconds)

    def reader(i):
        stub = bytestream_pb2_grpc.ByteStreamStub(grpc.insecure_channel(target, options=CHANNEL_OPTIONS))
        moved = 0
        while time.monotonic() < end:
            moved += read_once(stub, False)
        return moved
    start = time.monotonic()
    moved = sum(run_threads(int(readers), reader))
    return {'mb_per_s': moved / (time.monotonic() - start) / 1e6, 'bytes': moved}


def batch(target, digests_file, seconds, in_flight, max_batch):
    digests = read_digests(digests_file)
    batches, cur, size = [], [], 0
    for d in digests:
        if cur and size + d.size_bytes > int(max_batch):
            batches.append(cur)
            cur, size = [], 0
        cur.append(d)
        size += d.size_bytes
    if cur:
        batches.append(cur)
    # One untimed pass over every batch warms both servers alike (page cache; first-read hashing).
    warm = re_grpc.ContentAddressableStorageStub(grpc.insecure_channel(target, options=CHANNEL_OPTIONS))
    for b in batches:
        warm.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=b))
    end = time.monotonic() + float(seconds)
    lock = threading.Lock()
    next_batch = [0]

    def caller(i):
        stub = re_grpc.ContentAddressableStorageStub(grpc.insecure_channel(target, options=CHANNEL_OPTIONS))
        blobs = 0
        while time.monotonic() < end:
            with lock:
                b = batches[next_batch[0] % len(batches)]
                next_batch[0] += 1
            response = stub.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=b))
            for r in response.responses:
                if r.status.code != 0 or len(r.data) != r.digest.size_bytes:
                    raise RuntimeError('batch read miss: %s' % r.status.message)
            blobs += len(response.responses)
        return blobs
    start = time.monotonic()
    blobs = sum(run_threads(int(in_flight), caller))
    return {'blobs_per_s': blobs / (time.monotonic() - start), 'batches': len(batches)}


def findmissing(target, digests_file, calls, per_call):
    present = read_digests(digests_file)
    per_call = int(per_call)
    stub = re_grpc.ContentAddressableStorageStub(grpc.insecure_channel(target, options=CHANNEL_OPTIONS))
    times = []
    for i in range(-3, int(calls)):  # the first three calls are warm-up, not timed
        # Half present (a sliding window over the stored digests), half absent.
        half = per_call // 2
        start = (abs(i) * half) % max(1, len(present) - half)
        query = present[start:start + half]
        query += [re_pb2.Digest(hash=hashlib.sha256(b'absent-%d-%d' % (i, j)).hexdigest(), size_bytes=100) for j in range(per_call - len(query))]
        t0 = time.monotonic()
        response = stub.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(blob_digests=query))
        if i >= 0:
            times.append((time.monotonic() - t0) * 1000)
        if len(response.missing_blob_digests) != per_call - half:
            raise SystemExit('FindMissingBlobs answered %d missing, expected %d' % (len(response.missing_blob_digests), per_call - half))
    times.sort()
    return {'p50_ms': times[len(times) // 2], 'p99_ms': times[min(len(times) - 1, int(len(times) * 0.99))]}


def upload(target, objects_dir, digests_file, in_flight):
    digests = read_digests(digests_file)
    channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    caps = re_grpc.CapabilitiesStub(channel).GetCapabilities(re_pb2.GetCapabilitiesRequest())
    advertised = caps.cache_capabilities.max_batch_total_size_bytes
    # Data plus per-entry framing stays under the limit; 0 means "no limit" (casd).
    budget = min(1 << 20, advertised or (1 << 20)) - (16 << 10)

    def path(d):
        return os.path.join(objects_dir, d.hash[:2], d.hash[2:])

    work, cur, size = [], [], 0
    for d in digests:
        if d.size_bytes > budget:
            work.append(('write', d))
            continue
        if cur and (size + d.size_bytes > budget or len(cur) >= 2000):
            work.append(('batch', cur))
            cur, size = [], 0
        cur.append(d)
        size += d.size_bytes
    if cur:
        work.append(('batch', cur))
    lock = threading.Lock()
    next_item = [0]

    def worker(i):
        ch = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        cas = re_grpc.ContentAddressableStorageStub(ch)
        bs = bytestream_pb2_grpc.ByteStreamStub(ch)
        moved = 0
        while True:
            with lock:
                if next_item[0] >= len(work):
                    return moved
                kind, item = work[next_item[0]]
                next_item[0] += 1
            if kind == 'batch':
                requests = []
                for d in item:
                    with open(path(d), 'rb') as f:
                        requests.append(re_pb2.BatchUpdateBlobsRequest.Request(digest=d, data=f.read()))
                response = cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=requests))
                for r in response.responses:
                    if r.status.code != 0:
                        raise RuntimeError('BatchUpdateBlobs %s: %d %s' % (r.digest.hash, r.status.code, r.status.message))
                moved += sum(d.size_bytes for d in item)
            else:
                d = item
                resource = 'uploads/%s/blobs/%s/%d' % (uuid.uuid4(), d.hash, d.size_bytes)

                def chunks():
                    offset = 0
                    with open(path(d), 'rb') as f:
                        while True:
                            data = f.read(1 << 20)
                            last = offset + len(data) >= d.size_bytes
                            yield bytestream_pb2.WriteRequest(resource_name=resource if offset == 0 else '', write_offset=offset,
                                                              finish_write=last, data=data)
                            offset += len(data)
                            if last:
                                return
                response = bs.Write(chunks())
                if response.committed_size != d.size_bytes:
                    raise RuntimeError('ByteStream Write %s committed %d of %d' % (d.hash, response.committed_size, d.size_bytes))
                moved += d.size_bytes
    start = time.monotonic()
    moved = sum(run_threads(int(in_flight), worker))
    seconds = time.monotonic() - start
    cas = re_grpc.ContentAddressableStorageStub(channel)
    for i in range(0, len(digests), 10000):
        missing = cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(blob_digests=digests[i:i + 10000])).missing_blob_digests
        if missing:
            raise SystemExit('after upload, %d blobs are still missing, e.g. %s/%d' % (len(missing), missing[0].hash, missing[0].size_bytes))
    return {'blobs': len(digests), 'bytes': moved, 'seconds': seconds}


if __name__ == '__main__':
    mode, args = sys.argv[1], sys.argv[2:]
    result = {'bytestream': bytestream, 'batch': batch, 'findmissing': findmissing, 'upload': upload}[mode](*args)
    print(json.dumps(result))

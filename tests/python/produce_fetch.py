"""A client generated from proto/weir/v1/weir.proto with Python grpcio, talking to one
broker address only: creates a topic, produces every line of the given files (one key per
file, one record per line, in requests of up to 100 lines), reads every partition back, and
reads everything again as the one member of an Ordered consumer group (join, pull, ack).
Prints one JSON line: per key, the lines read by fetch and by the group, and whether each
came back complete and in order.

Usage: produce_fetch.py PROTO_DIR OUT_DIR ADDRESS TOPIC PARTITIONS FILE...
"""

import json
import os
import sys

from grpc_tools import protoc


def main():
    proto_dir, out_dir, address, topic, partitions = sys.argv[1:6]
    files = sys.argv[6:]
    os.makedirs(out_dir, exist_ok=True)
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            os.path.join(proto_dir, "weir", "v1", "weir.proto"),
        ]
    )
    if status != 0:
        sys.exit(f"protoc failed with {status}")
    sys.path.insert(0, out_dir)
    import grpc
    from weir.v1 import weir_pb2 as pb
    from weir.v1 import weir_pb2_grpc as rpc

    channel = grpc.insecure_channel(address)
    admin = rpc.AdminStub(channel)
    producer = rpc.ProducerStub(channel)
    consumer = rpc.ConsumerStub(channel)

    admin.CreateTopic(
        pb.CreateTopicRequest(
            name=topic, config=pb.TopicConfig(partitions=int(partitions))
        ),
        timeout=30,
    )
    sent = {}
    for path in files:
        key = os.path.basename(path)
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        sent[key] = lines
        for start in range(0, len(lines), 100):
            chunk = lines[start : start + 100]
            producer.Produce(
                pb.ProduceRequest(
                    topic=topic,
                    records=[pb.Record(key=key.encode(), value=line) for line in chunk],
                ),
                timeout=30,
            )

    got = {}
    for partition in range(int(partitions)):
        offset = 0
        while True:
            answer = consumer.Fetch(
                pb.FetchRequest(
                    topic=topic, partition=partition, offset=offset, max_bytes=4 << 20
                ),
                timeout=30,
            )
            if not answer.records:
                break
            for r in answer.records:
                got.setdefault(r.record.key.decode(), []).append(r.record.value)
                offset = r.offset + 1
    # The same through an Ordered group: join (creating it), pull and ack until every line
    # came, or 60 s of empty pulls.
    group = topic + "-readers"
    joined = consumer.Join(
        pb.JoinRequest(
            group=group,
            create=pb.GroupConfig(
                topic=topic,
                type=pb.GROUP_TYPE_ORDERED,
                start=pb.StartPosition(earliest=True),
            ),
        ),
        timeout=30,
    )
    total = sum(len(lines) for lines in sent.values())
    by_group = {}
    received = 0
    empty = 0
    while received < total and empty < 60:
        answer = consumer.Pull(
            pb.PullRequest(
                group=group,
                member_id=joined.member_id,
                max_messages=500,
                max_wait_ms=1000,
            ),
            timeout=30,
        )
        if not answer.deliveries:
            empty += 1
            continue
        for d in answer.deliveries:
            by_group.setdefault(d.record.key.decode(), []).append(d.record.value)
        received += len(answer.deliveries)
        consumer.Ack(
            pb.AckRequest(
                group=group,
                member_id=joined.member_id,
                acks=[
                    pb.DeliveryRef(partition=d.partition, offset=d.offset)
                    for d in answer.deliveries
                ],
            ),
            timeout=30,
        )
    print(
        json.dumps(
            {
                key: {
                    "sent": len(lines),
                    "read": len(got.get(key, [])),
                    "same": got.get(key) == lines,
                    "group_read": len(by_group.get(key, [])),
                    "group_same": by_group.get(key) == lines,
                }
                for key, lines in sent.items()
            }
        )
    )


main()

"""Avro single-object encoding by an independent implementation (fastavro), for interop tests.

    fastavro_codec.py fingerprint SCHEMA.avsc   -> the schema's CRC-64-AVRO fingerprint, as the
                                                 8 header bytes in hex (little-endian), and its
                                                 Parsing Canonical Form, both computed by fastavro
    fastavro_codec.py encode SCHEMA.avsc        stdin: JSON records, one a line
                                                 stdout: hex of C3 01 + fingerprint + body
    fastavro_codec.py decode SCHEMA.avsc        stdin: hex lines; fails unless the header is
                                                 fastavro's fingerprint of SCHEMA; stdout: JSON

Timestamps (timestamp-millis) are integers of milliseconds on both sides; `bytes` fields are
hex strings in JSON. Run by the Rust tests with the venv of deploy/local/pyenv.sh.
"""
import datetime
import io
import json
import sys

import fastavro
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def load(path):
    with open(path) as f:
        parsed = parse_schema(json.load(f))
    pcf = to_parsing_canonical_form(parsed)
    header = b"\xc3\x01" + bytes.fromhex(fingerprint(pcf, "CRC-64-AVRO"))
    return parsed, pcf, header


def bytes_fields(parsed):
    return {f["name"] for f in parsed["fields"] if f["type"] == "bytes"}


def to_json(value):
    if isinstance(value, datetime.datetime):
        return (value - EPOCH) // datetime.timedelta(milliseconds=1)
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    raise TypeError(f"cannot encode {type(value)}")


def main():
    cmd, path = sys.argv[1], sys.argv[2]
    parsed, pcf, header = load(path)
    if cmd == "fingerprint":
        print(header[2:].hex())
        print(pcf)
        return
    binary = bytes_fields(parsed)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        if cmd == "encode":
            record = json.loads(line)
            for name in binary:
                record[name] = bytes.fromhex(record[name])
            out = io.BytesIO()
            out.write(header)
            fastavro.schemaless_writer(out, parsed, record)
            print(out.getvalue().hex())
        elif cmd == "decode":
            data = bytes.fromhex(line)
            if data[:10] != header:
                sys.exit(f"header {data[:10].hex()} is not C3 01 + fastavro's fingerprint {header[2:].hex()}")
            buf = io.BytesIO(data[10:])
            record = fastavro.schemaless_reader(buf, parsed)
            if buf.read():
                sys.exit("trailing bytes after the record")
            print(json.dumps(record, default=to_json, sort_keys=True))
        else:
            sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()

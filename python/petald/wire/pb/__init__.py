"""Generated protobuf code for petald's wire schemas (proto/petald/v1/*.proto), committed byte for
byte as `just proto` (proto/generate.py) writes it; tests/unit/wire/test_proto_drift.py fails when
it drifts. Do not edit these modules: edit the .proto and regenerate. Peers' bytes are parsed
and validated by the typed codecs one level up (e.g. `petald.wire.kad_messages`), not here."""

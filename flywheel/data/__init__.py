"""The data stages: ingest, clean, validate, split (and the formats, records and MinHash they share)."""

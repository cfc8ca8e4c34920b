"""From text to training tokens: `torchmics prepare-data` and the token file format it writes.

`tokenfile` is the format (header, atomic writer, memory-mapped reader), `tokenizer` loads a local
tokenizer and names it, `sources` streams documents out of text / JSONL / Parquet files, and
`prepare` tokenizes them on every core into one token file.
"""

"""Raw text -> tokenizer -> packed webdataset shards + manifest.json.

Command line: ``python -m data_prep INPUT... --out DIR`` (see ``--help``).
From Python::

    from data_prep import PrepOptions, prepare
    manifest = prepare(PrepOptions(inputs=["corpus/"], out="shards/", tokenizer="bytes", seq_len=256))

The shard format is described in :mod:`dlmtrain.data.format`.
"""

from data_prep.pipeline import PrepOptions, parse_size, prepare

__all__ = ["PrepOptions", "prepare", "parse_size"]

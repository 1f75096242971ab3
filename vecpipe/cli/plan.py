"""``vecpipe plan``: the disk a chunks table and its indexes take, worked out page by page."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from vecpipe.cli.common import config_from_args

__all__ = ["register"]


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the storage estimate for a chunks table of ``--rows`` rows."""
    from vecpipe.db.plan import Workload, estimate

    v = config_from_args(args).vector
    index = args.index or v.index
    work = Workload(
        rows=args.rows, dimension=args.dim or v.dimension, column_type=args.type or v.column_type,
        index=index, m=args.m or v.hnsw_m, lists=args.lists or v.ivfflat_lists,
        text_bytes=args.text_bytes, text_compression=args.text_compression,
        tenant_bytes=args.tenant_bytes, doc_id_bytes=args.doc_id_bytes,
        metadata_bytes=args.metadata_bytes, metadata_values=args.metadata_values,
        tsv_ratio=args.tsv_ratio, text_lexemes=args.text_lexemes, btree_fill=args.btree_fill,
    )
    est = estimate(work)
    if args.json:
        out = {k: v for k, v in asdict(est).items() if k != "workload"}
        out.update(workload=asdict(work), indexes_bytes=est.indexes_bytes,
                   table_bytes=est.table_bytes, total_bytes=est.total_bytes)
        print(json.dumps(out, indent=2))
    else:
        print("\n".join(est.report()))
    return 0


def register(sub: Any) -> None:
    """Add ``vecpipe plan``."""
    p = sub.add_parser("plan", help="estimate the disk a chunks table and its indexes take")
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--dim", type=int, help="dimensions (default: VECPIPE_DIMENSION)")
    p.add_argument("--type", choices=["vector", "halfvec"])
    p.add_argument("--index", choices=["hnsw", "ivfflat", "none"])
    p.add_argument("--m", type=int)
    p.add_argument("--lists", type=int)
    p.add_argument("--text-bytes", type=int, default=800, help="bytes of text a chunk")
    p.add_argument("--text-compression", type=float, default=1.0,
                   help="compressed/raw size of the text under pglz (1: incompressible)")
    p.add_argument("--tenant-bytes", type=int, default=8)
    p.add_argument("--doc-id-bytes", type=int, default=24)
    p.add_argument("--metadata-bytes", type=int, default=32,
                   help="pg_column_size of the metadata jsonb")
    p.add_argument("--metadata-values", type=int, default=2,
                   help="scalar values in the metadata (GIN entries a row)")
    p.add_argument("--tsv-ratio", type=float, default=0.88,
                   help="stored full-text column bytes per byte of text (0.88: English prose)")
    p.add_argument("--text-lexemes", type=int, default=0,
                   help="distinct lexemes a chunk, GIN entries (default: text bytes / 12)")
    p.add_argument("--btree-fill", type=float, default=0.7,
                   help="B-tree leaf fill: 0.7 for random inserts, 0.9 after REINDEX")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

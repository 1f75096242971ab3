"""``vecpipe bench``: each stage measured against its physical limit, in the same run.

    vecpipe bench embed    [--chunks 1000] [--backend onnx-int8] [--device cuda]
    vecpipe bench write    [--rows 20000] [--hnsw-rows 2000]
    vecpipe bench e2e      [--chunks 500] [--rate 1.0] [--latency-docs 30]
    vecpipe bench search   [--rows 100000] [--queries 200] [--ef-search 20,40,80,160]
    vecpipe bench reingest [--chunks 500]

Every benchmark runs on real services: the configured ones (VECPIPE_KAFKA_BOOTSTRAP,
VECPIPE_DATABASE_URL) when they answer, else local ones started in a temporary home and removed
after. It works in topics, consumer groups and a schema of its own (``bench_<hex>``), deleted
at the end, so it never touches real data. The pipeline and its limit are measured on the same
machine in the same run, and the figures that matter are their ratio. Progress goes to stderr;
the result is one JSON object on stdout (``--json``) or a short summary. Benchmarks are not
tests: nothing here fails on a slow figure, ``meets_target`` only says how it compares.
"""

"""RAG stage: chunking, BM25 / dense / hybrid retrieval over a persistent index, cited answers,
and retrieval evaluation on BEIR-format data."""

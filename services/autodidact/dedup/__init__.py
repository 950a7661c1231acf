"""The dedup service: embedding diversity over persistent FAISS namespaces."""

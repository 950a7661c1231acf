"""The coordinator: jobs, recipes, the durable job store, progress, lineage and export."""

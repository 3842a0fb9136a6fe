"""From configs to tables: cached attribution runs, metric rows, aggregated tables, regression checks."""

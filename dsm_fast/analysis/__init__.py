"""What users do with a normalized energy (docs/method.md §3.5): one module per analysis, each a function returning
numbers plus a plot function; the ``dsm-fast`` subcommands of the same names call them."""

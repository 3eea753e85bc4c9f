"""gcl's jobs (one thin module each) and the `gcl` command line."""

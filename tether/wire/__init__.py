"""Generated wire code (from tether.proto; regenerate with `make proto`)."""

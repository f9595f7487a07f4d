"""securefed.data."""

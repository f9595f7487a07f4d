"""securefed.report."""

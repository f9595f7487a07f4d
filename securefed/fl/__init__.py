"""securefed.fl."""

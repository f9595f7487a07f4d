"""securefed.models."""

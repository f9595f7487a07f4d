"""securefed.crypto."""

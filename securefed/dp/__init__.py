"""securefed.dp."""

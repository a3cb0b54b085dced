"""What a transfer keeps on disk so that it can go on after a crash: the journals."""

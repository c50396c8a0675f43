"""One pure-numpy codec per on-disk format (no I/O); each matches a spec in formats/."""

"""What is written next to an image: the `.txt` sidecar, confined and atomic."""

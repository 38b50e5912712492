"""One thin recipe module per pipeline stage; run as `python -m stages.<name>`."""

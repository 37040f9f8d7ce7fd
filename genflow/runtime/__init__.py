"""What a running ``genflow`` command needs: a local Prefect API, Ctrl-C handling, progress on the terminal."""

"""Runners: setup -> loop -> save -> report, one module per command. No terminal I/O beyond `Progress`."""

"""The web page and the HTTP API that `watcher run` serves on the daemon's one model."""

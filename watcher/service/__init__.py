"""Running as a service: the daemon, its lock, systemd notify, status, systemd/launchd install."""
